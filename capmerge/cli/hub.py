"""``capmerge push VECTOR REPO_ID`` and ``capmerge pull REPO_ID [-o DIR]``: the Hugging Face Hub."""

from __future__ import annotations

import json
import sys
import warnings
from typing import Annotated

import typer

from capmerge.cli.app import app, handle_errors
from capmerge.cli.common import Json, Quiet

Token = Annotated[
    str | None, typer.Option("--token", help="Hub token (overrides HF_TOKEN and the stored login). Never printed.")
]

PUSH_HELP = """Upload a capability vector (file or sharded directory) or a merged model directory to the Hub, with a
generated model card (README.md), in one commit. The repo is created if needed.

Examples:

  capmerge push capvector.safetensors my-org/spatial-capvector --recommended-alpha 0.5

  capmerge push capvector/ my-org/spatial-capvector --revision v2 --create-pr
"""

PULL_HELP = """Download what a vector or model needs (safetensors, index, json configs, tokenizer files, card) into the
Hugging Face cache, or DIR; every file is checked against the repo's listing (size, sha256). Prints the local path.

Examples:

  capmerge pull my-org/spatial-capvector

  capmerge pull hf://my-org/spatial-capvector@v2 -o capvector/
"""


@app.command("push", help=PUSH_HELP)
def push_cmd(
    vector: Annotated[str, typer.Argument(help="A vector file, a vector directory, or a merged model directory.")],
    repo_id: Annotated[str, typer.Argument(help="org/name of the Hub repo.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo as private.")] = False,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch to commit to (created if needed).")] = None,
    commit_message: Annotated[str | None, typer.Option("--commit-message", help="The commit message.")] = None,
    token: Token = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request instead of committing.")] = False,
    recommended_alpha: Annotated[
        float | None, typer.Option("--recommended-alpha", help="α to recommend in the model card.")
    ] = None,
    quiet: Quiet = False,
    as_json: Json = False,
) -> None:
    from capmerge.errors import SkippedFileWarning
    from capmerge.share import push

    with handle_errors(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SkippedFileWarning)  # every one listed; the rest as the filters say
        url = push(vector, repo_id, private=private, revision=revision, commit_message=commit_message, token=token,
                   create_pr=create_pr, recommended_alpha=recommended_alpha)  # fmt: skip
    skipped = [str(w.message) for w in caught if issubclass(w.category, SkippedFileWarning)]
    for w in caught:
        if not issubclass(w.category, SkippedFileWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if as_json:
        print(json.dumps({"repo_id": repo_id, "url": url, "pull_request": create_pr, "skipped": skipped}))
    else:
        print(url)
    if not quiet:
        for line in skipped:
            print(f"warning: {line}", file=sys.stderr)
        what = "opened a pull request" if create_pr else "committed"
        print(f"push: {what} on {repo_id}", file=sys.stderr)


@app.command("pull", help=PULL_HELP)
def pull_cmd(
    repo_id: Annotated[str, typer.Argument(help="org/name or hf://org/name[@revision][/subpath].")],
    output: Annotated[
        str | None,
        typer.Option("--output", "-o", metavar="DIR", help="Directory to fill (must not exist or be empty)."),
    ] = None,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch, tag, commit or refs/pr/N.")] = None,
    token: Token = None,
) -> None:
    from capmerge.share import pull

    with handle_errors():
        path = pull(repo_id, output=output, revision=revision, token=token)
    print(path)
