"""capmerge.merge.masks: option parsing, block indices, tensor masks, per-layer α, sweep templates (hand-made cases)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from capmerge.errors import CapmergeError, UsageError
from capmerge.merge.masks import (
    TensorMask,
    alpha_for,
    check_template,
    count_layers,
    expand_template,
    format_number,
    layer_index,
    parse_float_list,
    parse_layers,
)

# Real tensor names, each with its block index (None = outside any block).
REAL_NAMES = {
    # Llama / Mistral
    "model.embed_tokens.weight": None,
    "model.layers.0.self_attn.q_proj.weight": 0,
    "model.layers.12.mlp.up_proj.weight": 12,
    "model.layers.31.post_attention_layernorm.weight": 31,
    "model.norm.weight": None,
    "lm_head.weight": None,
    # GPT-2
    "transformer.wte.weight": None,
    "transformer.h.3.attn.c_attn.weight": 3,
    "transformer.h.11.mlp.c_proj.bias": 11,
    "transformer.ln_f.weight": None,
    # BERT
    "bert.embeddings.word_embeddings.weight": None,
    "encoder.layer.5.output.dense.weight": 5,
    "bert.encoder.layer.10.attention.self.query.weight": 10,
    "bert.pooler.dense.weight": None,
    # ViT (timm and HF)
    "vision_tower.blocks.0.x": 0,
    "blocks.7.attn.qkv.weight": 7,
    "vit.encoder.layer.11.attention.attention.key.weight": 11,
    "cls_token": None,
    "patch_embed.proj.weight": None,
    # T5: the outer "block" wins over the inner "layer"
    "encoder.block.2.layer.1.DenseReluDense.wi.weight": 2,
    # OpenVLA-style
    "language_model.model.layers.3.self_attn.o_proj.weight": 3,
    "language_model.lm_head.weight": None,
    "vision_backbone.featurizer.blocks.11.mlp.fc1.weight": 11,
    "vision_backbone.fused_featurizer.blocks.26.norm1.weight": 26,
    "vision_backbone.featurizer.patch_embed.proj.weight": None,
    "projector.fc1.weight": None,
}


def message(exc: pytest.ExceptionInfo[BaseException]) -> str:
    return str(exc.value)


# --- parse_float_list ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.6,0.4", [0.6, 0.4]),
        (" 0.6 , 0.4 ", [0.6, 0.4]),
        ("1", [1.0]),
        ("-0.5,2,1e-3", [-0.5, 2.0, 0.001]),
    ],
)
def test_parse_float_list(text: str, expected: list[float]) -> None:
    assert parse_float_list(text, "--weights") == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.6,x", "invalid --weights value 'x' (expected numbers separated by commas)"),
        ("0.6;0.4", "invalid --weights value '0.6;0.4' (expected numbers separated by commas)"),
        ("", "invalid --weights '' (empty item; expected numbers separated by commas)"),
        ("0.6,,0.4", "invalid --weights '0.6,,0.4' (empty item; expected numbers separated by commas)"),
        ("0.6,", "invalid --weights '0.6,' (empty item; expected numbers separated by commas)"),
        ("nan", "invalid --weights value 'nan' (expected finite numbers)"),
        ("1,inf", "invalid --weights value 'inf' (expected finite numbers)"),
    ],
)
def test_parse_float_list_errors(text: str, expected: str) -> None:
    with pytest.raises(UsageError) as exc:
        parse_float_list(text, "--weights")
    assert message(exc) == expected


def test_parse_float_list_names_the_option() -> None:
    with pytest.raises(UsageError, match=r"^invalid --gradient value 'a'"):
        parse_float_list("1,a", "--gradient")


def test_usage_error_is_a_value_error_with_exit_code_2() -> None:
    with pytest.raises(ValueError) as exc:
        parse_float_list("x", "--weights")
    assert isinstance(exc.value, CapmergeError)
    assert exc.value.exit_code == 2


# --- parse_layers -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("0-7,12", {0, 1, 2, 3, 4, 5, 6, 7, 12}),
        ("3", {3}),
        ("3-3", {3}),
        (" 0 - 2 , 5 ", {0, 1, 2, 5}),
        ("4,1-2,2", {1, 2, 4}),
        ("007", {7}),
    ],
)
def test_parse_layers(spec: str, expected: set[int]) -> None:
    result = parse_layers(spec)
    assert isinstance(result, frozenset)
    assert result == expected


@pytest.mark.parametrize("spec", ["a", "1-", "", "-1", "1,,2", "1-2-3", "1.5", "1,", " "])
def test_parse_layers_bad_syntax(spec: str) -> None:
    with pytest.raises(UsageError) as exc:
        parse_layers(spec)
    assert message(exc) == f"invalid --layers {spec!r} (expected block indices and ranges such as 0-7,12)"


def test_parse_layers_backwards_range() -> None:
    with pytest.raises(UsageError) as exc:
        parse_layers("0,7-3")
    assert message(exc) == "invalid --layers '0,7-3' (range 7-3 runs backwards)"


def test_parse_layers_huge_range_is_refused() -> None:
    with pytest.raises(UsageError) as exc:
        parse_layers("0-999999999")
    assert message(exc) == "invalid --layers '0-999999999' (block indices stop at 99999)"


@pytest.mark.parametrize(("spec", "expected"), [("99999", {99999}), ("99998-99999", {99998, 99999}),
                                                ("0099999", {99999}), ("10000", {10000})])  # fmt: skip
def test_parse_layers_limit_is_inclusive(spec: str, expected: set[int]) -> None:
    """The documented limit (docs/reliability.md: "--layers indices stop at 99999") admits 99999 itself, however many
    leading zeros it has; 100000 is the first index refused."""
    assert parse_layers(spec) == expected
    with pytest.raises(UsageError) as exc:
        parse_layers("100000")
    assert message(exc) == "invalid --layers '100000' (block indices stop at 99999)"


# --- layer_index --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), list(REAL_NAMES.items()))
def test_layer_index_real_names(name: str, expected: int | None) -> None:
    assert layer_index(name) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.vision.blocks.3.layers.7.w", 3),  # several containers: the first match wins
        ("model.layers.norm.layers.4.w", 4),  # a container not followed by an integer is skipped
        ("model.layer_norm.3.weight", None),  # "layer_norm" is not a container
        ("model.mylayers.3.weight", None),
        ("model.layers.3a.weight", None),
        ("h.0", 0),
        ("layers.5", 5),
        ("model.layers.05.w", 5),
        ("3.layers", None),
        ("", None),
    ],
)
def test_layer_index_edge_cases(name: str, expected: int | None) -> None:
    assert layer_index(name) == expected


def test_layer_index_with_pattern() -> None:
    pattern = r"\.stage(\d+)\."
    assert layer_index("backbone.stage2.conv.weight", pattern) == 2
    assert layer_index("backbone.stem.conv.weight", pattern) is None
    # the pattern replaces the built-in rule entirely
    assert layer_index("model.layers.9.w", pattern) is None
    assert layer_index("model.layers.9.w", re.compile(r"layers\.(\d+)")) == 9
    # an optional group that did not take part in the match: outside any block
    assert layer_index("model.head.w", r"model\.(?:layers\.(\d+)|head)") is None


def test_layer_index_pattern_without_group() -> None:
    with pytest.raises(UsageError) as exc:
        layer_index("model.layers.3.w", r"layers\.\d+")
    assert message(exc).startswith(r"--layer-pattern 'layers\\.\\d+' has no capture group")


def test_layer_index_pattern_non_integer_group() -> None:
    with pytest.raises(UsageError) as exc:
        layer_index("model.layers.q.w", r"layers\.(\w+)\.")
    assert (
        message(exc) == "--layer-pattern 'layers\\\\.(\\\\w+)\\\\.' captured 'q', not a block index (model.layers.q.w)"
    )
    assert exc.value.where == "model.layers.q.w"
    with pytest.raises(UsageError, match="captured '-1'"):
        layer_index("model.layers.-1.w", r"layers\.([^.]+)\.")


def test_layer_index_invalid_pattern() -> None:
    with pytest.raises(UsageError) as exc:
        layer_index("model.layers.3.w", "layers.(x+")
    assert (
        message(exc) == "invalid --layer-pattern regex 'layers.(x+' (missing ), unterminated subpattern at position 7)"
    )


# --- count_layers -------------------------------------------------------------------------------------------------


def test_count_layers() -> None:
    llama = ["model.embed_tokens.weight", "model.layers.0.w", "model.layers.2.w", "model.layers.1.w", "lm_head.weight"]
    assert count_layers(llama) == 3
    assert count_layers(["model.embed_tokens.weight", "lm_head.weight"]) == 0
    assert count_layers([]) == 0
    assert count_layers(["blocks.0.w"]) == 1
    assert count_layers(["stage0.w", "stage4.w", "model.layers.9.w"], r"^stage(\d+)") == 5
    assert count_layers(iter(REAL_NAMES)) == 32  # a generator is fine; largest index is 31


# --- TensorMask ---------------------------------------------------------------------------------------------------

OPENVLA = [
    "language_model.model.embed_tokens.weight",
    "language_model.model.layers.0.self_attn.q_proj.weight",
    "language_model.model.layers.0.mlp.up_proj.weight",
    "language_model.model.layers.1.self_attn.q_proj.weight",
    "language_model.model.layers.1.mlp.up_proj.weight",
    "language_model.model.norm.weight",
    "language_model.lm_head.weight",
    "vision_backbone.featurizer.blocks.0.attn.qkv.weight",
    "vision_backbone.featurizer.blocks.11.attn.qkv.weight",
    "projector.fc1.weight",
]


def test_trivial_mask_selects_everything() -> None:
    mask = TensorMask.build()
    assert mask.is_trivial
    assert mask == TensorMask()
    assert all(mask.selects(n) for n in OPENVLA)


@pytest.mark.parametrize(
    ("kwargs", "trivial"),
    [({"include": ["x"]}, False), ({"exclude": ["x"]}, False), ({"layers": "1"}, False), ({"include": []}, True)],
)
def test_is_trivial(kwargs: dict[str, object], trivial: bool) -> None:
    assert TensorMask.build(**kwargs).is_trivial is trivial  # type: ignore[arg-type]


def test_layer_pattern_alone_keeps_the_mask_trivial() -> None:
    assert TensorMask.build(layer_pattern=r"blocks\.(\d+)").is_trivial


def test_include_any_of_several() -> None:
    mask = TensorMask.build(include=[r"^language_model\.", r"^projector\."])
    assert [n for n in OPENVLA if mask.selects(n)] == OPENVLA[:7] + ["projector.fc1.weight"]


def test_include_is_search_not_match() -> None:
    mask = TensorMask.build(include=["q_proj"])
    assert [n for n in OPENVLA if mask.selects(n)] == [OPENVLA[1], OPENVLA[3]]


def test_single_string_counts_as_one_regex() -> None:
    # a bare string is one pattern, not a list of one-character patterns
    mask = TensorMask.build(include="lm_head", exclude="vision")
    assert [n for n in OPENVLA if mask.selects(n)] == ["language_model.lm_head.weight"]


def test_exclude_wins_over_include() -> None:
    mask = TensorMask.build(include=[r"layers\.0\."], exclude=["mlp"])
    assert [n for n in OPENVLA if mask.selects(n)] == ["language_model.model.layers.0.self_attn.q_proj.weight"]
    both = TensorMask.build(include=["q_proj"], exclude=["q_proj"])
    assert not any(both.selects(n) for n in OPENVLA)


def test_exclude_only() -> None:
    mask = TensorMask.build(exclude=[r"^vision_backbone\.", "embed_tokens", "lm_head"])
    assert [n for n in OPENVLA if mask.selects(n)] == OPENVLA[1:6] + ["projector.fc1.weight"]


def test_layers_drop_tensors_outside_blocks() -> None:
    mask = TensorMask.build(layers="1,11")
    assert [n for n in OPENVLA if mask.selects(n)] == [
        "language_model.model.layers.1.self_attn.q_proj.weight",
        "language_model.model.layers.1.mlp.up_proj.weight",
        "vision_backbone.featurizer.blocks.11.attn.qkv.weight",
    ]


def test_layers_and_include_combine() -> None:
    mask = TensorMask.build(include=[r"^language_model\."], layers="0-7")
    assert [n for n in OPENVLA if mask.selects(n)] == OPENVLA[1:5]


def test_layers_with_layer_pattern() -> None:
    mask = TensorMask.build(layers="0", layer_pattern=r"featurizer\.blocks\.(\d+)\.")
    assert [n for n in OPENVLA if mask.selects(n)] == ["vision_backbone.featurizer.blocks.0.attn.qkv.weight"]


def test_mask_selecting_nothing_is_fine() -> None:
    mask = TensorMask.build(include=["no_such_tensor"])
    listing = mask.describe(OPENVLA)
    assert listing["selected"] == []
    assert listing["counts"] == {"selected": 0, "not_selected": len(OPENVLA)}
    assert listing["by_layer"] == {}
    assert not TensorMask.build(layers="5").selects("lm_head.weight")


def test_describe() -> None:
    mask = TensorMask.build(exclude=["mlp", "embed_tokens"])
    listing = mask.describe(iter(OPENVLA))
    assert listing == {
        "selected": [
            "language_model.model.layers.0.self_attn.q_proj.weight",
            "language_model.model.layers.1.self_attn.q_proj.weight",
            "language_model.model.norm.weight",
            "language_model.lm_head.weight",
            "vision_backbone.featurizer.blocks.0.attn.qkv.weight",
            "vision_backbone.featurizer.blocks.11.attn.qkv.weight",
            "projector.fc1.weight",
        ],
        "not_selected": [
            "language_model.model.embed_tokens.weight",
            "language_model.model.layers.0.mlp.up_proj.weight",
            "language_model.model.layers.1.mlp.up_proj.weight",
        ],
        "counts": {"selected": 7, "not_selected": 3},
        "by_layer": {0: 2, 1: 1, 11: 1, "other": 3},
    }
    assert list(listing["by_layer"]) == [0, 1, 11, "other"]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"include": ["ok", "("]}, "invalid --include regex '(' (missing ), unterminated subpattern at position 0)"),
        ({"exclude": ["[a-"]}, "invalid --exclude regex '[a-' (unterminated character set at position 0)"),
        (
            {"layer_pattern": "(?P<x"},
            "invalid --layer-pattern regex '(?P<x' (missing >, unterminated name at position 4)",
        ),
        ({"layers": "7-3"}, "invalid --layers '7-3' (range 7-3 runs backwards)"),
        ({"layers": ""}, "invalid --layers '' (expected block indices and ranges such as 0-7,12)"),
    ],
)
def test_build_errors(kwargs: dict[str, object], expected: str) -> None:
    with pytest.raises(UsageError) as exc:
        TensorMask.build(**kwargs)  # type: ignore[arg-type]
    assert message(exc) == expected


def test_build_rejects_layer_pattern_without_group_up_front() -> None:
    with pytest.raises(UsageError, match="has no capture group"):
        TensorMask.build(layers="0-3", layer_pattern=r"layers\.\d+")


def test_selects_reports_non_integer_layer_group() -> None:
    mask = TensorMask.build(layers="0", layer_pattern=r"layers\.(\w+)")
    with pytest.raises(UsageError) as exc:
        mask.selects("model.layers.q.w")
    assert exc.value.where == "model.layers.q.w"


def test_mask_is_frozen_and_hashable() -> None:
    mask = TensorMask.build(include=["a"], layers="1-2")
    with pytest.raises(AttributeError):
        mask.layers = None  # type: ignore[misc]
    assert hash(mask) == hash(TensorMask.build(include=["a"], layers="1-2"))


# --- alpha_for ----------------------------------------------------------------------------------------------------


def alphas(gradient: list[float] | None, n_layers: int, alpha: float = 0.7) -> list[float]:
    return [alpha_for(f"model.layers.{i}.mlp.up_proj.weight", alpha, gradient, n_layers) for i in range(n_layers)]


def test_gradient_three_points_over_five_layers() -> None:
    assert alphas([1.0, 0.5, 0.0], 5) == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_gradient_two_points_is_a_linear_ramp() -> None:
    # t = l / 4: 0, 0.25, 0.5, 0.75, 1 → 0 + 2t
    assert alphas([0.0, 2.0], 5) == [0.0, 0.5, 1.0, 1.5, 2.0]


def test_gradient_more_points_than_layers() -> None:
    # 3 layers over 5 points: p = 0, 2, 4 → the points themselves
    assert alphas([0.1, 9.0, 0.2, 9.0, 0.3], 3) == [0.1, 0.2, 0.3]


def test_gradient_between_points() -> None:
    # 4 layers, 3 points: p = l * 2 / 3 = 0, 2/3, 4/3, 2
    # l=1: 1 + (0 - 1) * 2/3 = 1/3; l=2: 0 + (1 - 0) * 1/3 = 1/3
    got = alphas([1.0, 0.0, 1.0], 4)
    assert got == pytest.approx([1.0, 1 / 3, 1 / 3, 1.0], abs=1e-12)


def test_gradient_single_value_is_constant() -> None:
    assert alphas([0.3], 4) == [0.3, 0.3, 0.3, 0.3]


def test_gradient_single_layer_model() -> None:
    assert alphas([0.2, 0.8], 1) == [0.2]


def test_no_gradient_means_alpha() -> None:
    assert alphas(None, 3, alpha=0.7) == [0.7, 0.7, 0.7]


def test_gradient_uses_alpha_outside_blocks() -> None:
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert alpha_for(name, 0.7, [1.0, 0.0], 32) == 0.7


def test_gradient_with_layer_pattern() -> None:
    pattern = r"^stage(\d+)\."
    assert alpha_for("stage1.conv.w", 0.7, [0.0, 1.0], 3, pattern) == 0.5
    assert alpha_for("model.layers.1.w", 0.7, [0.0, 1.0], 3, pattern) == 0.7


def test_gradient_on_openvla_names() -> None:
    n = count_layers(OPENVLA)  # 12, from the vision blocks
    assert n == 12
    assert alpha_for("vision_backbone.featurizer.blocks.11.attn.qkv.weight", 0.5, [0.0, 1.0], n) == 1.0
    assert alpha_for("language_model.model.layers.0.mlp.up_proj.weight", 0.5, [0.0, 1.0], n) == 0.0
    assert alpha_for("projector.fc1.weight", 0.5, [0.0, 1.0], n) == 0.5


def test_empty_gradient() -> None:
    with pytest.raises(UsageError) as exc:
        alpha_for("model.layers.0.w", 1.0, [], 4)
    assert message(exc) == "--gradient is empty (expected one or more numbers separated by commas)"
    with pytest.raises(UsageError):
        alpha_for("lm_head.weight", 1.0, [], 4)


def test_gradient_block_beyond_n_layers() -> None:
    with pytest.raises(UsageError) as exc:
        alpha_for("model.layers.4.w", 1.0, [1.0, 0.0], 4)
    assert message(exc) == "tensor is in block 4 but the model has 4 blocks (model.layers.4.w)"


# --- format_number / expand_template / check_template -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.5, "0.5"),
        (1.0, "1.0"),
        (1, "1.0"),
        (0.25, "0.25"),
        (0.1 + 0.2, "0.3"),
        (0.30000000000000004, "0.3"),
        (2.0, "2.0"),
        (-0.5, "-0.5"),
        (0.0, "0.0"),
        (10.0, "10.0"),
        (1 / 3, "0.333333"),
        (0.1234567, "0.123457"),
        (1e-7, "1e-07"),
    ],
)
def test_format_number(value: float, expected: str) -> None:
    assert format_number(value) == expected


def test_expand_template() -> None:
    assert expand_template("out/a{alpha}", alpha=0.5) == "out/a0.5"
    assert expand_template("m_a{alpha}_d{density}.safetensors", alpha=1.0, density=0.1 + 0.2) == (
        "m_a1.0_d0.3.safetensors"
    )
    assert expand_template("{alpha}/{alpha}", alpha=0.25) == "0.25/0.25"
    assert expand_template("plain.safetensors", alpha=0.5) == "plain.safetensors"
    assert expand_template("odd{}braces{", alpha=0.5) == "odd{}braces{"


def test_expand_template_missing_value() -> None:
    with pytest.raises(UsageError) as exc:
        expand_template("out_{density}", alpha=0.5)
    assert message(exc) == "the output 'out_{density}' has a {density} placeholder but no --density value"


def test_check_template_ok() -> None:
    check_template("out_{alpha}", "alpha", [0.25, 0.5, 1.0])
    check_template("out", "alpha", [0.5])  # one value needs no placeholder
    check_template("out", "alpha", [])
    check_template("out_{alpha}_{density}", "density", [0.1, 0.2])


def test_check_template_needs_placeholder() -> None:
    with pytest.raises(UsageError) as exc:
        check_template("out.safetensors", "alpha", [0.5, 1.0])
    assert message(exc) == "--alpha lists several values: the output 'out.safetensors' needs a {alpha} placeholder"
    with pytest.raises(UsageError) as exc:
        check_template("out_{alpha}", "density", [0.1, 0.2])
    assert message(exc) == "--density lists several values: the output 'out_{alpha}' needs a {density} placeholder"


def test_check_template_unknown_placeholder() -> None:
    with pytest.raises(UsageError) as exc:
        check_template("out_{foo}", "alpha", [0.5])
    assert message(exc) == "unknown placeholder {foo} in the output 'out_{foo}' (known: {alpha}, {density})"


def test_check_template_colliding_names() -> None:
    with pytest.raises(UsageError) as exc:
        check_template("out_{alpha}", "alpha", [0.5, 0.5])
    assert message(exc) == "--alpha lists 0.5 twice"
    with pytest.raises(UsageError) as exc:
        check_template("out_{alpha}", "alpha", [0.1234561, 0.1234562])
    assert message(exc) == "--alpha values 0.1234561 and 0.1234562 give the same output name (0.123456)"


# --- import cost --------------------------------------------------------------------------------------------------


def test_masks_does_not_import_torch() -> None:
    code = "import sys, capmerge.merge.masks; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
