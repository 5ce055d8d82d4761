"""Named chat templates for ``chat_template:`` (mergekit's names: ``alpaca``, ``chatml``, ``exaone``, ``llama3``,
``mistral``), written for capmerge. Each is Jinja as transformers renders it (``apply_chat_template``: ``messages``,
``add_generation_prompt``, ``bos_token``, ``eos_token``, ``raise_exception``), whitespace controlled with ``-`` so
the rendering does not depend on the environment's trim settings.

What each renders (docs/mergekit.md): ``chatml`` and ``mistral`` the same prompts as mergekit 0.1.5's templates of
those names; ``llama3`` Meta's layout (no newline between turns, where mergekit's template puts one after each
``<|eot_id|>``); ``exaone`` LG's layout (mergekit's template also renders its own indentation); ``alpaca`` mergekit's
layout, with a blank line before the generation prompt and none at the start when there is no system message.
"""

from __future__ import annotations

CHATML = "\n".join(
    [
        "{%- for message in messages -%}",
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}",
    ]
)

LLAMA3 = "\n".join(
    [
        "{{- bos_token -}}",
        "{%- for message in messages -%}",
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' -}}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}",
    ]
)

MISTRAL = "\n".join(
    [
        "{%- set turns = messages -%}",
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- set system_message = messages[0]['content'] -%}{%- set turns = messages[1:] -%}",
        "{%- endif -%}",
        "{{- bos_token -}}",
        "{%- for message in turns -%}",
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}",
        "{{- raise_exception('mistral chat template: after an optional system message the roles must alternate user, "
        "assistant, user, ...') -}}",
        "{%- endif -%}",
        "{%- if message['role'] == 'user' -%}",
        "{%- set head = system_message + '\\n\\n' if loop.first and system_message is defined else '' -%}",
        "{{- ' [INST] ' + head + message['content'] + ' [/INST]' -}}",
        "{%- elif message['role'] == 'assistant' -%}",
        "{{- ' ' + message['content'] + eos_token -}}",
        "{%- else -%}",
        "{{- raise_exception('mistral chat template: only user and assistant roles, after an optional system "
        "message') -}}",
        "{%- endif -%}",
        "{%- endfor -%}",
    ]
)

ALPACA = "\n".join(
    [
        "{%- set ns = namespace(text='', sep='') -%}",
        "{%- set systems = messages | selectattr('role', 'equalto', 'system') | list -%}",
        "{%- if systems -%}",
        "{%- set ns.text = systems[-1]['content'] | trim -%}{%- set ns.sep = '\\n\\n' -%}",
        "{%- endif -%}",
        "{%- set heads = {'user': '### Instruction:\\n', 'assistant': '### Response:\\n',",
        "                 'user_context': '### Input:\\n'} -%}",
        "{%- for message in messages if message['role'] in heads -%}",
        "{%- set ns.text = ns.text + ns.sep + heads[message['role']] + message['content'] | trim -%}",
        "{%- set ns.sep = '\\n\\n' -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt and messages and messages[-1]['role'] != 'assistant' -%}",
        "{%- set ns.text = ns.text + ns.sep + '### Response:\\n' -%}",
        "{%- endif -%}",
        "{{- ns.text -}}",
    ]
)

EXAONE = "\n".join(
    [
        "{%- for message in messages -%}",
        "{%- if loop.first and message['role'] != 'system' -%}{{- '[|system|][|endofturn|]\\n' -}}{%- endif -%}",
        "{{- '[|' + message['role'] + '|]' + message['content'] -}}",
        "{{- '\\n' if message['role'] == 'user' else '[|endofturn|]\\n' -}}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{- '[|assistant|]' -}}{%- endif -%}",
    ]
)

NAMED = {"alpaca": ALPACA, "chatml": CHATML, "exaone": EXAONE, "llama3": LLAMA3, "mistral": MISTRAL}


def problem(value: object) -> str | None:
    """Why ``value`` cannot be a ``chat_template`` (None: it can be: ``auto``, a name here, or Jinja text)."""
    if value == "auto" or (isinstance(value, str) and resolve(value) is not None):
        return None
    return f"chat_template {value!r}: give auto, a named template ({', '.join(NAMED)}) or the template text (Jinja)"


def resolve(value: str) -> str | None:
    """The template text for a ``chat_template`` value: a name's template, Jinja text as given; None for a value
    that is neither (a name capmerge does not know: no ``{`` in it)."""
    if value in NAMED:
        return NAMED[value]
    return value if "{" in value else None
