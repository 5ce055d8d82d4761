"""capmerge.ortho under torch.distributed: 2 CPU processes (gloo), spawned once for the whole module.

DDP (plain tensors), FSDP2 (``fully_shard``: DTensor parameters, τ sharded like them) and LoRA under FSDP2 must give
the loss, the report and the gradients of the single-process run on the same data; one ``reg()`` call must issue
exactly one all-reduce; the hard modes must agree too. Each rank computes the single-process reference itself and
the comparisons are made in the workers; rank 0 writes the outcome for the assertions below.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_ortho import MODES, Tiny, perturb, snapshot, vector_for  # noqa: E402

WORLD = 2


def task_loss(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(12).reshape(3, 4) % 11  # the same batch on every rank
    return (model(ids) ** 2).mean()


def make_model(seed: int = 0) -> tuple[Tiny, dict[str, torch.Tensor]]:
    model = Tiny(seed=seed)
    ref = snapshot(model)
    perturb(model, scale=0.05)
    return model, ref


def reference_run(mode: str, tau, lora: bool = False):
    """Single-process loss, report and gradients (no collective)."""
    from capmerge.ortho import OrthogonalityLoss

    model, ref = make_model()
    if lora:
        model = make_lora(model)
    reg = OrthogonalityLoss(model, tau, mode=mode, reference=ref, weight=0.5, ignore_unmatched=lora)
    value = reg()
    (task_loss(model) + value).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(value.detach()), reg.report()["proj"], grads


def make_lora(model: Tiny):
    import peft

    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=3, lora_alpha=4, target_modules=["attn", "mlp"]))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return wrapped


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    from capmerge.errors import UsageError
    from capmerge.ortho import OrthogonalityLoss, project_gradients

    mesh = init_device_mesh("cpu", (WORLD,))
    results: dict[str, object] = {}
    calls = {"n": 0}
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        calls["n"] += 1
        return real_all_reduce(*args, **kwargs)

    def shard(model: torch.nn.Module) -> torch.nn.Module:
        for block in model.modules():
            if type(block).__name__ == "Block":
                fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    tau = vector_for(Tiny())
    try:
        for mode in MODES:
            want_value, want_proj, want_grads = reference_run(mode, tau)
            # DDP: nothing special; names carry "module."
            model, ref = make_model()
            ddp = DDP(model)
            reg = OrthogonalityLoss(ddp, tau, mode=mode, reference=ref, weight=0.5)
            value = reg(ddp)
            (task_loss(ddp) + value).backward()
            grads = {n: p.grad for n, p in model.named_parameters()}
            results[f"ddp/{mode}"] = [abs(float(value) - want_value), max_diff(grads, want_grads)]
            # FSDP2: DTensor parameters, τ and θ_ref sharded, one all-reduce per call
            model, ref = make_model()
            shard(model)
            assert all(type(p).__name__ == "DTensor" for p in model.parameters())
            reg = OrthogonalityLoss(model, tau, mode=mode, reference=ref, weight=0.5)
            dist.all_reduce = counting_all_reduce
            try:
                value = reg(model)
                n_calls = calls["n"]
                calls["n"] = 0
            finally:
                dist.all_reduce = real_all_reduce
            (task_loss(model) + value).backward()
            grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
            proj = reg.report()["proj"]
            results[f"fsdp2/{mode}"] = [abs(float(value) - want_value), max_diff(grads, want_grads),
                                        abs(proj - want_proj), n_calls]  # fmt: skip
        # LoRA under FSDP2: A row-sharded (gathered through the one all-reduce), B and τ sharded by rows
        want_value, want_proj, want_grads = reference_run("cosine2", tau, lora=True)
        model, ref = make_model()
        model = shard(make_lora(model))
        reg = OrthogonalityLoss(model, tau, mode="cosine2", reference=ref, weight=0.5, ignore_unmatched=True)
        assert sum(t.a_sharded for t in reg._targets) == 4, [(t.name, t.a_sharded) for t in reg._targets]
        dist.all_reduce = counting_all_reduce
        try:
            value = reg()
        finally:
            dist.all_reduce = real_all_reduce
        (task_loss(model) + value).backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
        results["fsdp2/lora"] = [abs(float(value) - want_value), max_diff(grads, want_grads),
                                 abs(reg.report()["proj"] - want_proj), calls["n"]]  # fmt: skip
        # Hard mode under FSDP2 (optimizer pre-hook) vs single process (parameter hooks), one SGD step
        single, _ = make_model()
        opt = torch.optim.SGD(single.parameters(), lr=0.1)
        project_gradients(single, tau)
        task_loss(single).backward()
        opt.step()
        model, _ = make_model()
        shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        try:  # parameter hooks do not see FSDP2's gradients: the error's hint is followed right below
            project_gradients(model, tau)
            results["hint/optimizer"] = "no error"
        except UsageError as exc:
            results["hint/optimizer"] = str(exc)
        handle = project_gradients(model, tau, optimizer=opt)
        task_loss(model).backward()
        opt.step()
        handle.remove()
        after = {n: p.detach().full_tensor() for n, p in model.named_parameters()}
        results["fsdp2/project_gradients"] = [max_diff(after, snapshot(single))]
        # A Partial parameter is refused; redistributed, as the message says, it works
        from torch.distributed.tensor import DTensor, Partial, Replicate

        holder = torch.nn.Module()
        holder.w = torch.nn.Parameter(DTensor.from_local(torch.tensor([1.0, 2.0, 2.0]), mesh, [Partial()]))
        w_tau = {"w": torch.tensor([0.0, 3.0, 4.0])}  # τ̂ = (0, 0.6, 0.8)
        try:
            OrthogonalityLoss(holder, w_tau, mode="projection2", reference={"w": torch.zeros(3)})
            results["hint/partial"] = "no error"
        except UsageError as exc:
            results["hint/partial"] = str(exc)
        holder.w = torch.nn.Parameter(holder.w.detach().redistribute(mesh, [Replicate()]))  # sums the partials
        reg = OrthogonalityLoss(holder, w_tau, mode="projection2", reference={"w": torch.zeros(3)})
        results["hint/partial/value"] = float(reg())  # θ = 2·(1, 2, 2): ⟨θ, τ̂⟩² = (2·(1.2 + 1.6))² = 31.36
    except Exception as exc:  # report instead of hanging the other rank
        import traceback

        results["error"] = f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        raise
    finally:
        if rank == 0 or "error" in results:
            Path(out + (f".{rank}" if "error" in results else "")).write_text(json.dumps(results))
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: a gloo background thread still alive then can std::terminate the
    # process (SIGABRT, about one run in fifteen here) after every result is written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory) -> dict[str, list[float]]:
    pytest.importorskip("torch.distributed.fsdp")
    pytest.importorskip("peft")
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = str(tmp_path_factory.mktemp("dist") / "results.json")
    try:
        mp.spawn(worker, args=(free_port(), out), nprocs=WORLD, join=True)
    except Exception as exc:
        errors = [json.loads(p.read_text())["error"] for p in sorted(Path(out).parent.glob("results.json.*"))]
        pytest.fail("; ".join(errors) or str(exc))
    return json.loads(Path(out).read_text())


@pytest.mark.parametrize("mode", MODES)
def test_ddp_matches_single_process(dist_results, mode: str) -> None:
    value_diff, grad_diff = dist_results[f"ddp/{mode}"]
    assert value_diff <= 1e-6 and grad_diff <= 1e-5, dist_results[f"ddp/{mode}"]


@pytest.mark.parametrize("mode", MODES)
def test_fsdp2_matches_single_process_with_one_collective(dist_results, mode: str) -> None:
    value_diff, grad_diff, proj_diff, n_calls = dist_results[f"fsdp2/{mode}"]
    assert value_diff <= 1e-5 and grad_diff <= 1e-5 and proj_diff <= 1e-5, dist_results[f"fsdp2/{mode}"]
    assert n_calls == 1


def test_fsdp2_lora_matches_single_process(dist_results) -> None:
    value_diff, grad_diff, proj_diff, n_calls = dist_results["fsdp2/lora"]
    assert value_diff <= 1e-5 and grad_diff <= 1e-5 and proj_diff <= 1e-5, dist_results["fsdp2/lora"]
    assert n_calls == 1


def test_fsdp2_project_gradients_matches_single_process(dist_results) -> None:
    assert dist_results["fsdp2/project_gradients"][0] <= 1e-6


def test_fsdp2_hints_work_when_followed(dist_results) -> None:
    """Parameter hooks under FSDP2 → "pass optimizer=" (followed above, same result as a single process); a Partial
    parameter → "redistribute it first" (followed: the loss of the summed tensor, computed by hand)."""
    assert dist_results["hint/optimizer"].endswith("pass optimizer= so that .grad is projected before each step")
    assert dist_results["fsdp2/project_gradients"][0] <= 1e-6
    assert dist_results["hint/partial"].endswith("redistribute it first")
    assert dist_results["hint/partial/value"] == pytest.approx((2 * (1.2 + 1.6)) ** 2, rel=1e-6)
