"""Per-tensor overrides (regex filter → α, weights, densities, γ, gradients): library, CLI, in-memory and recipes,
each checked against numpy references computed here."""

from __future__ import annotations

import json
import math
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_single, tree_digest
from safetensors.torch import load_file
from typer.testing import CliRunner

import capmerge
from capmerge.cli import app
from capmerge.errors import UsageError
from capmerge.merge.overrides import Overrides, parse_cli
from capmerge.recipes.recipe import load
from capmerge.recipes.schema import RecipeError

runner = CliRunner()
NAMES = ["embed.weight", "layers.0.attn.w", "layers.0.mlp.w", "layers.1.attn.w", "layers.1.mlp.w",
         "layers.2.attn.w", "layers.2.mlp.w", "head.w"]  # fmt: skip
SHAPE = (6, 5)


# ---- numpy references (independent of capmerge's code) ----


def np_magnitude(t: np.ndarray, d: float) -> np.ndarray:
    n = t.size
    k = min(n, max(1, math.floor(d * n + 0.5)))
    v = np.sort(np.abs(t).ravel())[::-1][k - 1]
    return np.where(np.abs(t) >= v, t, 0.0)


def np_breadcrumbs(t: np.ndarray, d: float, gamma: float) -> np.ndarray:
    n = t.size
    k = min(n, max(1, math.floor(d * n + 0.5)))
    top = min(math.floor(gamma * n + 0.5), n - k)
    s = np.sort(np.abs(t).ravel())[::-1]
    hi = s[top - 1] if top > 0 else np.inf
    lo = s[top + k - 1]
    return np.where((np.abs(t) >= lo) & (np.abs(t) < hi), t, 0.0)


def np_merge(theta, taus, *, alpha, weights, density, prune="none", sign="none", normalize=False, gamma=0.01):
    """θ + α·δ in float64 (the engine computes in float32: compare with a float32 tolerance)."""
    pruned = []
    for t, d in zip(taus, density, strict=True):
        t = t.astype(np.float64)
        if prune == "magnitude" and d < 1.0:
            t = np_magnitude(t, d)
        elif prune == "breadcrumbs":
            t = np_breadcrumbs(t, d, gamma)
        pruned.append(t)
    w = np.array(weights, dtype=np.float64)
    if sign == "total":
        elected = np.where(sum(wi * t for wi, t in zip(w, pruned, strict=True)) >= 0, 1.0, -1.0)
        masks = [(np.sign(t) == elected).astype(np.float64) for t in pruned]
    else:
        masks = [np.ones_like(t) for t in pruned]
    delta = sum(wi * m * t for wi, m, t in zip(w, masks, pruned, strict=True))
    if normalize:
        den = sum(wi * m for wi, m in zip(w, masks, strict=True))
        delta = np.where(den > 0, delta / np.where(den > 0, den, 1.0), delta)
    return theta.astype(np.float64) + alpha * delta


@pytest.fixture
def ck(tmp_path: Path) -> dict:
    """A float32 base of 3 blocks (+ embed and head) and two tie-free vectors; single files."""
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(SHAPE, generator=g) for n in NAMES}
    base["position_ids"] = torch.arange(4)
    vecs = [{n: torch.randn(SHAPE, generator=g) for n in NAMES} for _ in range(2)]
    return {
        "P": save_single(tmp_path / "p.safetensors", base),
        "V": [save_single(tmp_path / f"v{i}.safetensors", v) for i, v in enumerate(vecs)],
        "base": {n: base[n].numpy() for n in NAMES},
        "vecs": [{n: v[n].numpy() for n in NAMES} for v in vecs],
        "tmp": tmp_path,
    }


def check(out: Path, ck: dict, expect: dict[str, dict], **common: object) -> None:
    """Every tensor of ``out`` against np_merge with ``common`` options updated by ``expect[name]``."""
    got = load_file(str(out))
    for n in NAMES:
        opts = {**common, **expect.get(n, {})}
        want = np_merge(ck["base"][n], [v[n] for v in ck["vecs"]], **opts)  # type: ignore[arg-type]
        np.testing.assert_allclose(got[n].numpy(), want, rtol=1e-5, atol=1e-5, err_msg=f"{n} {opts}")
    assert torch.equal(got["position_ids"], torch.arange(4))


# ---- merge semantics ----


def test_per_tensor_alpha_weights_density_first_match_per_parameter(ck: dict) -> None:
    out = ck["tmp"] / "o.safetensors"
    s = capmerge.apply(ck["P"], ck["V"], out, method="ties", density=0.5, alpha=0.7, overrides=[
        r"attn:alpha=0.3,density=0.25/0.75",
        {"filter": r"layers\.2\.", "alpha": 2.0, "density": 0.9},  # attn: alpha and density already set above
        (r"mlp", {"weights": [0.6, 0.4]}),
        r"^head\.:weight=2",
    ])  # fmt: skip
    assert s.warnings == []
    ties = {"prune": "magnitude", "sign": "total", "normalize": True}
    expect = {
        "layers.0.attn.w": {"alpha": 0.3, "density": [0.25, 0.75]},
        "layers.1.attn.w": {"alpha": 0.3, "density": [0.25, 0.75]},
        "layers.2.attn.w": {"alpha": 0.3, "density": [0.25, 0.75]},  # the first override wins for both
        "layers.0.mlp.w": {"weights": [0.6, 0.4]},
        "layers.1.mlp.w": {"weights": [0.6, 0.4]},
        "layers.2.mlp.w": {"alpha": 2.0, "density": [0.9, 0.9], "weights": [0.6, 0.4]},  # two overrides combine
        "head.w": {"weights": [2.0, 2.0]},
    }
    check(out, ck, expect, alpha=0.7, weights=[1, 1], density=[0.5, 0.5], **ties)
    rec = json.loads(load_file_metadata(out)["capmerge.merge"])
    assert rec["overrides"][0] == {"filter": "attn", "alpha": 0.3, "density": [0.25, 0.75]}
    assert rec["overrides"][2] == {"filter": "mlp", "weight": [0.6, 0.4]}


def load_file_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_gradients_over_the_block_index(ck: dict) -> None:
    out = ck["tmp"] / "g.safetensors"
    capmerge.apply(ck["P"], ck["V"], out, method="magnitude", alpha=0.4, overrides=[
        "mlp:alpha=1/0",  # 3 blocks: 1.0, 0.5, 0.0
        {"filter": "attn", "density_gradient": [1.0, 0.5], "alpha": [0.0, 1.0, 0.5]},
        {"filter": "weight$", "alpha": [9.0, 9.0]},  # embed.weight is outside any block: keeps the global α
        {"filter": "embed", "alpha": 0.25},  # ... and the search goes on to this one
    ])  # fmt: skip
    expect = {
        "layers.0.mlp.w": {"alpha": 1.0},
        "layers.1.mlp.w": {"alpha": 0.5},
        "layers.2.mlp.w": {"alpha": 0.0},
        "layers.0.attn.w": {"alpha": 0.0, "density": [1.0, 1.0]},
        "layers.1.attn.w": {"alpha": 1.0, "density": [0.75, 0.75]},
        "layers.2.attn.w": {"alpha": 0.5, "density": [0.5, 0.5]},
        "embed.weight": {"alpha": 0.25},
    }
    check(out, ck, expect, alpha=0.4, weights=[1, 1], density=[1.0, 1.0], prune="magnitude")


def test_gamma_override_with_breadcrumbs(ck: dict) -> None:
    out = ck["tmp"] / "b.safetensors"
    capmerge.apply(ck["P"], ck["V"], out, method="breadcrumbs", density=0.5, gamma=0.05,
                   overrides=["attn:gamma=0.2", "layers.1.mlp:gamma=0"])  # fmt: skip
    expect = {n: {"gamma": 0.2} for n in NAMES if "attn" in n} | {"layers.1.mlp.w": {"gamma": 0.0}}
    check(out, ck, expect, alpha=1.0, weights=[1, 1], density=[0.5, 0.5], prune="breadcrumbs", gamma=0.05)


def test_sweeps_keep_overridden_values_pinned(ck: dict) -> None:
    t = ck["tmp"]
    s = capmerge.apply(ck["P"], ck["V"], t / "a{alpha}.safetensors", alpha=[0.2, 0.5], overrides=["attn:alpha=0.9"])
    assert s.outputs == [str(t / "a0.2.safetensors"), str(t / "a0.5.safetensors")]
    for a in (0.2, 0.5):
        expect = {n: {"alpha": 0.9} for n in NAMES if "attn" in n}
        check(t / f"a{a}.safetensors", ck, expect, alpha=a, weights=[1, 1], density=[1, 1])
    capmerge.apply(ck["P"], ck["V"], t / "d{density}.safetensors", method="ties", density=[0.3, 0.6],
                   overrides=["mlp:density=0.8"])  # fmt: skip
    ties = {"prune": "magnitude", "sign": "total", "normalize": True}
    for d in (0.3, 0.6):
        expect = {n: {"density": [0.8, 0.8]} for n in NAMES if "mlp" in n}
        check(t / f"d{d}.safetensors", ck, expect, alpha=1.0, weights=[1, 1], density=[d, d], **ties)


def test_overrides_with_add_sub_and_global_gradient(ck: dict) -> None:
    """The three-checkpoint form counts its pairs as vectors; an override α beats --alpha-gradient."""
    out = ck["tmp"] / "as.safetensors"
    capmerge.apply(ck["P"], [ck["V"][0]], out, add=[ck["V"][1]], alpha=0.5, alpha_gradient=[1.0, 0.0],
                   overrides=["layers.1:alpha=3,weight=1/-1"])  # fmt: skip
    base = ck["base"]
    vecs = [ck["vecs"][0], {n: ck["vecs"][1][n] - base[n] for n in NAMES}]  # add without sub: A − BASE
    got = load_file(str(out))
    grad = {"layers.0": 1.0, "layers.1": 3.0, "layers.2": 0.0}
    for n in NAMES:
        a = next((v for k, v in grad.items() if n.startswith(k)), 0.5)
        w = [1, -1] if n.startswith("layers.1") else [1, 1]
        want = np_merge(base[n], [v[n] for v in vecs], alpha=a, weights=w, density=[1, 1])
        np.testing.assert_allclose(got[n].numpy(), want, rtol=1e-5, atol=1e-5, err_msg=n)


def test_in_memory_and_model_equal_the_file_apply(ck: dict) -> None:
    ovs = ["attn:alpha=0.3,density=0.25/0.75", "mlp:alpha=1/0,weight=0.6/0.4", "head:gamma=0.3"]
    out = ck["tmp"] / "f.safetensors"
    opts = {"method": "ties", "density": 0.5, "alpha": 0.7, "overrides": ovs}
    capmerge.apply(ck["P"], ck["V"], out, **opts)
    ref = load_file(str(out))
    sd = {n: torch.from_numpy(ck["base"][n].copy()) for n in NAMES}
    done = capmerge.apply_to_state_dict(sd, [str(p) for p in ck["V"]], device="cpu", **opts)
    assert sorted(done) == sorted(NAMES)
    model = torch.nn.Module()
    for n in NAMES:
        mod = model
        parts = n.split(".")
        for p in parts[:-1]:
            if not hasattr(mod, p):
                mod.add_module(p, torch.nn.Module())
            mod = getattr(mod, p)
        mod.register_parameter(parts[-1], torch.nn.Parameter(torch.from_numpy(ck["base"][n].copy())))
    capmerge.apply_to_model(model, [str(p) for p in ck["V"]], device="cpu", **opts)
    params = dict(model.named_parameters())
    for n in NAMES:
        assert torch.equal(sd[n], ref[n]), n
        assert torch.equal(params[n].detach(), ref[n]), n


def test_kernels_see_the_overrides(ck: dict) -> None:
    """The device path (Triton kernels; interpreted on a CPU-only machine) writes the CPU bytes."""
    pytest.importorskip("triton", reason="triton is a dependency on Linux x86-64 only")
    t = ck["tmp"]
    opts = {"method": "ties", "density": 0.5, "overrides": ["attn:alpha=0.3,density=0.25/0.75", "mlp:weight=2/1"]}
    for dev in ("cpu", "cuda"):
        capmerge.apply(ck["P"], ck["V"], t / f"k-{dev}.safetensors", device=dev, **opts)
    a, b = load_file(str(t / "k-cpu.safetensors")), load_file(str(t / "k-cuda.safetensors"))
    assert all(torch.equal(a[n], b[n]) for n in a)
    sd = {n: torch.from_numpy(ck["base"][n].copy()) for n in NAMES}
    capmerge.apply_to_state_dict(sd, [str(p) for p in ck["V"]], device="cuda", **opts)
    assert all(torch.equal(sd[n], a[n]) for n in NAMES)


def test_unused_overrides_warn(ck: dict) -> None:
    ovs = ["attn:alpha=0.5", "layers.0.attn:alpha=0.1", "^head:alpha=0", "nothing:density=1"]
    s = capmerge.apply(ck["P"], ck["V"], ck["tmp"] / "w.safetensors", exclude=["head"], overrides=ovs)
    assert s.warnings == [
        "--override 'layers.0.attn:alpha=0.1' has no effect: earlier overrides set its parameters on every tensor it "
        "matches (or its gradient matches only tensors outside blocks)",
        "--override '^head:alpha=0' matches no merged tensor; it has no effect",
        "--override 'nothing:density=1' matches no merged tensor; it has no effect",
    ]
    sd = {n: torch.from_numpy(ck["base"][n].copy()) for n in NAMES}
    with pytest.warns(UserWarning, match="override 1 \\(filter 'xyz'\\) matches no merged tensor"):
        capmerge.apply_to_state_dict(sd, [str(ck["V"][0])], overrides=[{"filter": "xyz", "alpha": 0}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        capmerge.apply_to_state_dict(sd, [str(ck["V"][0])], overrides=[{"filter": "attn", "alpha": 0}])


# ---- parsing and errors ----


def test_cli_syntax() -> None:
    o = parse_cli(r"layers\.(?:0|1)\.:alpha=1/0.5/0, density=0.2/0.5 ,weights=2,gamma=0.1")
    assert o.filter == r"layers\.(?:0|1)\." and o.pattern.search("model.layers.1.x")
    assert o.params == {"alpha_gradient": (1.0, 0.5, 0.0), "density": (0.2, 0.5), "weight": (2.0,), "gamma": 0.1}
    assert parse_cli("a{1,2}:alpha=0.5").params == {"alpha": 0.5}  # commas inside the regex are fine
    assert parse_cli(":density-gradient=0.5").params == {"density_gradient": (0.5,)}  # empty filter: every tensor
    ov = Overrides.build(["x:alpha=1"])
    assert ov.to_list() == [{"filter": "x", "alpha": 1.0}]


@pytest.mark.parametrize(
    "spec,message",
    [
        ("attn", "expected REGEX:key=value[,key=value...]"),
        ("attn:", "no parameters after the ':'"),
        ("attn:alpha", "invalid parameter 'alpha' (expected key=value)"),
        ("attn:alpha=x", "alpha: invalid number 'x' (lists use /, e.g. 0.2/0.5)"),
        ("attn:alpha=nan", "alpha: expected a finite number, got nan"),
        ("attn:alpha=0.1,alpha=0.2", "alpha given twice"),
        ("attn:beta=1", "unknown key 'beta' (expected filter and alpha, alpha_gradient, weight, density"),
        ("attn:density=0", "density must be in (0, 1], got 0"),
        ("attn:density=0.5/1.5", "density must be in (0, 1], got 1.5"),
        ("attn:density_gradient=1/0", "density_gradient must be in (0, 1], got 0"),
        ("attn:gamma=1", "gamma must be in [0, 1), got 1"),
        ("attn:density=0.1/0.2/0.3", "density has 3 values for 2 vectors"),
        ("attn:weight=1/2/3", "weight has 3 values for 2 vectors"),
        ("attn:alpha=1/0,alpha_gradient=1/0", "alpha is a list (a gradient) and alpha_gradient is given too"),
        ("attn:alpha=1,alpha_gradient=1/0", "alpha and alpha_gradient both given"),
        ("attn:density=0.5,density_gradient=1/0.5", "density and density_gradient both given"),
        ("(attn:alpha=1", "filter: invalid regex '(attn'"),
    ],
)
def test_cli_errors_are_one_line_and_write_nothing(ck: dict, spec: str, message: str) -> None:
    out = ck["tmp"] / "bad"
    before = tree_digest(ck["tmp"])
    r = runner.invoke(app, ["apply", str(ck["P"]), *map(str, ck["V"]), "-o", str(out), "--override", spec])
    assert r.exit_code == 2, r.output
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert lines[0].endswith(f"(--override {spec!r})") and "Traceback" not in r.output
    assert not out.exists() and tree_digest(ck["tmp"]) == before


@pytest.mark.parametrize(
    "spec,message",
    [
        ({"alpha": 1}, "missing filter: (a regex on tensor names)"),
        ({"filter": 3, "alpha": 1}, "filter: expected a regex string, got 3"),
        ({"filter": "x"}, "no parameters to set"),
        ({"filter": "x", "alpha": "big"}, "alpha: expected a finite number, got 'big'"),
        ({"filter": "x", "alpha": True}, "alpha: expected a finite number, got True"),
        ({"filter": "x", "density": []}, "density: expected one or more numbers, got an empty list"),
        ({"filter": "x", "weight": 1, "weights": 2}, "weight and weights both given"),
        (["x", 1], "expected a mapping with filter: and parameters"),
    ],
)
def test_library_errors_name_the_override(ck: dict, spec: object, message: str) -> None:
    with pytest.raises(UsageError) as e:
        capmerge.apply(ck["P"], ck["V"], ck["tmp"] / "x.safetensors", overrides=[{"filter": "ok", "alpha": 1}, spec])
    assert message in str(e.value) and "(override 2" in str(e.value)
    assert not (ck["tmp"] / "x.safetensors").exists()


def test_list_tensors_shows_effective_parameters(ck: dict) -> None:
    args = ["apply", str(ck["P"]), *map(str, ck["V"]), "--list-tensors", "--method", "ties", "--density", "0.5",
            "--alpha", "0.7", "--override", "attn:alpha=0.3,density=0.25/0.75", "--override", "mlp:alpha=1/0",
            "--override", "nomatch:gamma=0.1"]  # fmt: skip
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "merge  layers.0.attn.w   alpha=0.3 weights=1.0 density=0.25,0.75 gamma=0.01 [override 1: alpha, " \
        "density]" in r.stdout  # fmt: skip
    assert "merge  layers.1.mlp.w   alpha=0.5 weights=1.0 density=0.5 gamma=0.01 [override 2: alpha]" in r.stdout
    assert "merge  head.w   alpha=0.7 weights=1.0 density=0.5 gamma=0.01\n" in r.stdout
    assert "warning: --override 'nomatch:gamma=0.1' matches no merged tensor" in r.stderr
    r = runner.invoke(app, [*args, "--json"])
    d = json.loads(r.stdout)
    assert d["params"]["layers.2.mlp.w"] == {"alpha": 0.0, "weights": [1.0, 1.0], "density": [0.5, 0.5],
                                             "gamma": 0.01, "overrides": {"alpha": 2}}  # fmt: skip
    assert len(d["warnings"]) == 1


def test_cli_apply_with_overrides_and_warning(ck: dict) -> None:
    out = ck["tmp"] / "c.safetensors"
    ovs = ["--override", r"layers\.[01]\.:alpha=2,weight=1/0", "--override", "zzz:alpha=1"]
    r = runner.invoke(app, ["apply", str(ck["P"]), *map(str, ck["V"]), "-o", str(out), "--alpha", "0.5", *ovs])
    assert r.exit_code == 0, r.output
    assert "warning: --override 'zzz:alpha=1' matches no merged tensor; it has no effect" in r.stderr
    expect = {n: {"alpha": 2.0, "weights": [1, 0]} for n in NAMES if n.startswith(("layers.0", "layers.1"))}
    check(out, ck, expect, alpha=0.5, weights=[1, 1], density=[1, 1])


# ---- recipes ----


def _recipe(ck: dict, body: str) -> Path:
    text = textwrap.dedent(f"""\
        vars:
          base: {ck["P"]}
          v0: {ck["V"][0]}
          v1: {ck["V"][1]}
          a: 0.3
        workdir: {ck["tmp"] / "work"}
        steps:
          merged:
            op: apply
            base: ${{base}}
            vectors: ["${{v0}}", "${{v1}}"]
            output: {ck["tmp"] / "r.safetensors"}
        """) + textwrap.indent(textwrap.dedent(body), "    ")  # fmt: skip
    p = ck["tmp"] / "r.yaml"
    p.write_text(text)
    return p


def test_recipe_overrides_and_mergekit_style_lists(ck: dict) -> None:
    p = _recipe(ck, """\
        method: ties
        alpha: [{filter: attn, value: "${a}"}, {filter: mlp, value: [1.0, 0.0]}, {value: 0.7}]
        density: [{filter: "layers\\\\.2", value: [0.25, 0.75]}, {value: 0.5}]
        weights: [{filter: head, value: 2}]
        overrides:
          - {filter: "layers\\\\.0\\\\.attn", alpha: 1.5}
          - filter: embed
            gamma: 0.2
            weight: [0.6, 0.4]
        """)  # fmt: skip
    r = load(p)
    assert r.steps[0].options["alpha"] == 0.7 and r.steps[0].options["density"] == 0.5
    assert r.steps[0].options["overrides"] == [
        {"filter": "layers\\.0\\.attn", "alpha": 1.5},
        {"filter": "embed", "gamma": 0.2, "weight": [0.6, 0.4]},
        {"filter": "attn", "alpha": 0.3},
        {"filter": "mlp", "alpha": [1.0, 0.0]},
        {"filter": "head", "weight": 2},
        {"filter": "layers\\.2", "density": [0.25, 0.75]},
    ]
    res = capmerge.run_recipe(p)
    assert res["steps"][0]["status"] == "ran" and res["steps"][0]["result"]["warnings"] == []
    ties = {"prune": "magnitude", "sign": "total", "normalize": True}
    expect = {
        "layers.0.attn.w": {"alpha": 1.5},
        "layers.1.attn.w": {"alpha": 0.3},
        "layers.2.attn.w": {"alpha": 0.3, "density": [0.25, 0.75]},
        "layers.0.mlp.w": {"alpha": 1.0},
        "layers.1.mlp.w": {"alpha": 0.5},
        "layers.2.mlp.w": {"alpha": 0.0, "density": [0.25, 0.75]},
        "head.w": {"weights": [2, 2]},
        "embed.weight": {"weights": [0.6, 0.4]},  # gamma has no effect with ties (no breadcrumbs)
    }
    check(ck["tmp"] / "r.safetensors", ck, expect, alpha=0.7, weights=[1, 1], density=[0.5, 0.5], **ties)
    # caching: unchanged → cached; a changed override value → a new key, the step runs again
    assert capmerge.run_recipe(p)["steps"][0]["status"] == "cached"
    key = res["steps"][0]["key"]
    p.write_text(p.read_text().replace("alpha: 1.5", "alpha: 1.25"))
    res2 = capmerge.run_recipe(p)
    assert res2["steps"][0]["status"] == "ran" and res2["steps"][0]["key"] != key
    assert capmerge.run_recipe(p, a=0.4)["steps"][0]["status"] == "ran"  # a variable inside a filter list
    p.write_text(p.read_text().replace("filter: embed", "filter: nothing"))
    r = runner.invoke(app, ["run", str(p)])
    assert r.exit_code == 0 and "warning: step merged: override 2 (filter 'nothing') matches no merged" in r.stderr


def test_recipe_filter_list_from_the_command_line(ck: dict) -> None:
    p = _recipe(ck, "alpha: ${alphas}\n").read_text().replace("  a: 0.3", "  alphas: 0.5")
    (ck["tmp"] / "r.yaml").write_text(p)
    r = runner.invoke(app, ["run", str(ck["tmp"] / "r.yaml"), "alphas=[{filter: attn, value: 0.25}, {value: 2}]"])
    assert r.exit_code == 0, r.output
    check(ck["tmp"] / "r.safetensors", ck, {n: {"alpha": 0.25} for n in NAMES if "attn" in n}, alpha=2.0,
          weights=[1, 1], density=[1, 1])  # fmt: skip
    r = runner.invoke(app, ["run", str(ck["tmp"] / "r.yaml"), "alphas=[{filter: attn, value: 0}, {valu: 2}]"])
    assert r.exit_code == 2 and r.stderr.startswith("error: alpha: unknown key 'valu' in a filter list"), r.stderr
    assert r.stderr.endswith("r.yaml:5: steps.merged.alpha[1].valu)\n"), r.stderr  # the line of vars.alphas


def test_recipe_default_gradient(ck: dict) -> None:
    p = _recipe(ck, "alpha: [{filter: head, value: 0.1}, {value: [1.0, 0.0]}]\n")
    r = load(p)
    assert r.steps[0].options["alpha_gradient"] == [1.0, 0.0] and "alpha" not in r.steps[0].options
    capmerge.run_recipe(p)
    expect = {"layers.0.attn.w": {"alpha": 1.0}, "layers.0.mlp.w": {"alpha": 1.0}, "layers.1.attn.w": {"alpha": 0.5},
              "layers.1.mlp.w": {"alpha": 0.5}, "layers.2.attn.w": {"alpha": 0.0}, "layers.2.mlp.w": {"alpha": 0.0},
              "head.w": {"alpha": 0.1}}  # fmt: skip
    check(ck["tmp"] / "r.safetensors", ck, expect, alpha=1.0, weights=[1, 1], density=[1, 1])


@pytest.mark.parametrize(
    "body,line,where,message",
    [
        ("overrides: [{filter: attn, beta: 1}]\n", 13, "overrides[0].beta", "unknown key 'beta'"),
        ("overrides:\n  - filter: attn\n    density: 0\n", 15, "overrides[0].density", "density must be in (0, 1]"),
        ("overrides:\n  - filter: '(x'\n    alpha: 1\n", 14, "overrides[0].filter", "filter: invalid regex '(x'"),
        ("overrides:\n  - alpha: 1\n", 14, "overrides[0]", "missing filter:"),
        (
            "overrides:\n  - {filter: x, weights: [1, 2, 3]}\n",
            14,
            "overrides[0].weights",
            "weight has 3 values for 2 vectors",
        ),
        ("overrides: {filter: x, alpha: 1}\n", 13, "overrides", "overrides: expected a list of"),
        ("overrides: [attn]\n", 13, "overrides[0]", "expected REGEX:key=value"),  # the command-line form is ok
        ("overrides: [3]\n", 13, "overrides[0]", "expected a mapping with filter:"),
        ("alpha: [{filter: x}]\n", 13, "alpha[0]", "alpha: missing value:"),
        ("alpha: [{value: 1}, {filter: x, value: 2}]\n", 13, "alpha[0]", "only the last entry may omit filter:"),
        ("alpha:\n  - filter: x\n    valeu: 2\n", 15, "alpha[0].valeu", "unknown key 'valeu' in a filter list"),
        ("alpha:\n  - filter: x\n    value: big\n", 15, "alpha[0].value", "alpha: expected a finite number"),
        ("density: [{filter: x, value: 2}]\n", 13, "density[0].value", "density must be in (0, 1], got 2"),
        ("gamma: [{filter: x, value: 0.1}, {value: two}]\n", 13, "gamma[1].value", "gamma: expected a number"),
        (
            "alpha_gradient: [1, 0]\nalpha: [{filter: x, value: 1}, {value: [1, 0]}]\n",
            14,
            "alpha",
            "the default of the filter list is a gradient, and alpha_gradient is given too",
        ),
    ],
)
def test_recipe_validation_errors_have_file_line(ck: dict, body: str, line: int, where: str, message: str) -> None:
    p = _recipe(ck, body)
    with pytest.raises(RecipeError) as e:
        load(p)
    assert len(e.value.errors) == 1, e.value.errors
    what, loc = e.value.errors[0]
    assert message in what and loc == f"{p}:{line}: steps.merged.{where}", e.value.errors
    r = runner.invoke(app, ["run", str(p)])
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and f"{p}:{line}: steps.merged.{where})" in r.stderr
    assert not (ck["tmp"] / "r.safetensors").exists()
