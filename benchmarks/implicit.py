"""Implicit and continuous-depth models: DEQ phantom gradients, the ODE discrete adjoint, stiffness, K-FAC.

    python benchmarks/implicit.py [--quick] [--json PATH] [--only deq,ode,stiff,snopt]

(a) ``deq``: a DEQ classifier on digits (Flatten + Linear(64, 64), DEQ of tanh(W z + x) with Anderson,
    30 iterations at most, tolerance 1e-4, Linear(64, 10); Adam 3e-3, batch 64) trained with our
    ``phantom`` (5 steps, damping 0.5) and ``implicit`` backward and with torchdeq's phantom
    (``grad=5, tau=0.5``) and implicit (``ift=True``) modes, over several seeds. Record fields:
    ``variant``, ``seed``, ``backward_ms`` (median CPU time per step of ``loss.backward()``), ``forward_ms``,
    ``test_acc`` (held-out 20%), and per variant ``backward_ms_median``, ``test_acc_mean``; summary
    ``speedup_vs_implicit`` (our implicit backward over our phantom), ``acc_gap_points`` (implicit minus
    phantom test accuracy, mean over seeds, in points), ``speedup_vs_torchdeq_phantom``.
(b) ``ode``: the ODE classifier's ODE part (width 32, rk4) on a digits batch of 64, and the 2-D CNF on
    512 moons points. Fields per ``problem`` and ``variant``: ``grad_rel_error`` (float64; relative
    norm of the difference of all parameter and input gradients against backprop through the same
    solver: our ``backprop`` for ours, ``torchdiffeq.odeint`` for torchdiffeq's adjoint),
    ``saved_bytes`` (float32; unique storages autograd saved in forward, parameters excluded),
    ``step_ms`` (float32; median CPU time of forward + backward, variants interleaved; the
    machine is shared, so CPU time is the steadier clock), ``step_wall_ms``, ``saved_ratio`` and
    ``time_ratio`` (over our backprop). Variants: ``discrete_K1``, ``discrete_Ksqrt``, ``discrete_Ksteps``, ``backprop``,
    ``torchdiffeq_odeint``, ``torchdiffeq_adjoint`` at fixed steps, and ``dopri5`` adaptive rows
    (``discrete_adaptive``, ``torchdiffeq_adjoint_adaptive``, ``torchdiffeq_odeint_adaptive``).
(c) ``stiff``: ``y' = -1000 (y - cos t) + A y`` (``A`` a small slow rotation) on ``[0, 2]``; fields
    ``method``, ``min_steps`` (fewest steps, over a 1.25x grid, with ``|y(2) - y_ref| <= 1e-4``), and
    ``ratio_vs_implicit_euler``.
(d) ``snopt``: the ODE classifier on digits (width 32, 8 rk4 steps, discrete adjoint, 3 checkpoints,
    batch 64) trained with Adam and with SGD (momentum 0.9) + K-FAC preconditioning (the factors
    accumulated over stages and steps; damping 3e-3, KL clip 1e-3, inverses every 10 steps), each
    over a 3-point learning-rate grid (2 points with ``--quick``); fields ``optimizer``, ``lr``, ``seed``, ``steps_to_target``,
    ``seconds_to_target`` (CPU seconds of training steps until the held-out accuracy >= ``target``,
    checked every 10 steps; ``null`` if not reached), ``final_val_acc``; ``summary`` per optimizer:
    the best learning rate by median steps (then seconds).

Anchors (torchdeq, torchdiffeq) come from the ``bench`` extra and are skipped with a note when missing.
Everything runs on one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_parallel.data.toy2d import sample_toy2d
from lightning_parallel.implicit import DEQ
from lightning_parallel.kfac import KFACOptions, KFACPreconditioner
from lightning_parallel.models.deq import TanhCell
from lightning_parallel.models.flow import CNFField
from lightning_parallel.models.ode import MLPField
from lightning_parallel.ode import ODEBlock


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardised digits, a fixed 80/20 split: ``(x_train, y_train, x_test, y_test)``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    n = int(0.8 * len(y))
    mean, std = x[:n].mean(0), x[:n].std(0) + 1e-3
    x = (x - mean) / std
    return x[:n], y[:n], x[n:], y[n:]


def _median_ms(values: list[float]) -> float:
    return 1e3 * statistics.median(values)


# ---------------------------------------------------------------------------------------------- (a) DEQ
class _TorchDEQ(nn.Module):
    """torchdeq's DEQ around the same cell."""

    def __init__(self, cell: nn.Module, **kwargs: Any) -> None:
        super().__init__()
        from torchdeq import get_deq

        self.f = cell
        self.deq = get_deq(
            f_solver="anderson", f_max_iter=30, f_tol=1e-4, b_max_iter=30, b_tol=1e-6, **kwargs
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, _ = self.deq(lambda z: self.f(z, x), torch.zeros_like(x))
        return z[-1]


def _deq_layer(variant: str, cell: nn.Module) -> nn.Module:
    if variant == "phantom":
        return DEQ(cell, max_iter=30, tol=1e-4, backward="phantom", phantom_steps=5, damping=0.5)
    if variant == "implicit":
        return DEQ(cell, max_iter=30, tol=1e-4, backward="implicit", backward_max_iter=30, backward_tol=1e-6)
    if variant == "torchdeq_phantom":
        return _TorchDEQ(cell, ift=False, grad=5, tau=0.5)
    return _TorchDEQ(cell, ift=True)


def run_deq(quick: bool) -> dict[str, Any]:
    try:
        import torchdeq  # noqa: F401

        variants = ["phantom", "implicit", "torchdeq_phantom", "torchdeq_implicit"]
        note = ""
    except ImportError:
        variants, note = ["phantom", "implicit"], "torchdeq is not installed (pip install -e .[bench])"
    x_train, y_train, x_test, y_test = digits()
    seeds = [0, 1, 2] if quick else [0, 1, 2, 3, 4]
    epochs = 4 if quick else 12
    records = []
    for seed in seeds:
        for variant in variants:
            torch.manual_seed(seed)
            stem, cell, head = nn.Linear(64, 64), TanhCell(64), nn.Linear(64, 10)
            layer = _deq_layer(variant, cell)
            params = [*stem.parameters(), *cell.parameters(), *head.parameters()]
            opt = torch.optim.Adam(params, lr=3e-3)
            gen = torch.Generator().manual_seed(seed)
            fwd, bwd = [], []
            for _ in range(epochs):
                perm = torch.randperm(len(y_train), generator=gen)
                for i in range(0, len(perm) - 63, 64):
                    idx = perm[i : i + 64]
                    start = time.process_time()
                    loss = F.cross_entropy(head(layer(stem(x_train[idx]))), y_train[idx])
                    middle = time.process_time()
                    opt.zero_grad()
                    loss.backward()
                    end = time.process_time()
                    opt.step()
                    fwd.append(middle - start)
                    bwd.append(end - middle)
            with torch.no_grad():
                acc = float((head(layer(stem(x_test))).argmax(1) == y_test).float().mean())
            records.append(
                {
                    "variant": variant,
                    "seed": seed,
                    "forward_ms": _median_ms(fwd),
                    "backward_ms": _median_ms(bwd),
                    "test_acc": acc,
                }
            )
            print(
                f"deq {variant:18s} seed {seed}: fwd {records[-1]['forward_ms']:.2f} ms, bwd {records[-1]['backward_ms']:.2f} ms, acc {acc:.4f}",
                flush=True,
            )
    per_variant = {}
    for variant in variants:
        rows = [r for r in records if r["variant"] == variant]
        per_variant[variant] = {
            "backward_ms_median": statistics.median(r["backward_ms"] for r in rows),
            "forward_ms_median": statistics.median(r["forward_ms"] for r in rows),
            "test_acc_mean": statistics.mean(r["test_acc"] for r in rows),
            "test_acc_std": statistics.pstdev(r["test_acc"] for r in rows),
        }
    ours = per_variant["phantom"]
    summary = {
        "speedup_vs_implicit": per_variant["implicit"]["backward_ms_median"] / ours["backward_ms_median"],
        "acc_gap_points": 100 * (per_variant["implicit"]["test_acc_mean"] - ours["test_acc_mean"]),
    }
    if "torchdeq_phantom" in per_variant:
        summary["speedup_vs_torchdeq_phantom"] = (
            per_variant["torchdeq_phantom"]["backward_ms_median"] / ours["backward_ms_median"]
        )
    return {
        "records": records,
        "per_variant": per_variant,
        "summary": summary,
        "epochs": epochs,
        "note": note,
    }


# ---------------------------------------------------------------------------------------------- (b) ODE
def _problems(
    dtype: torch.dtype,
) -> dict[str, tuple[nn.Module, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]]:
    """``name -> (field, y0, loss of y1)`` for the ODE classifier's ODE part and the CNF."""
    torch.manual_seed(0)
    x_train, y_train, _, _ = digits()
    stem, head, field = nn.Linear(64, 32), nn.Linear(32, 10), MLPField(32)
    for module in (stem, head, field):
        module.to(dtype)
    with torch.no_grad():
        y0 = torch.tanh(stem(x_train[:64].to(dtype)))
        for p in field.parameters():  # a trained-looking field, not the near-zero init
            p.mul_(2.0)
    head.requires_grad_(False)
    labels = y_train[:64]
    torch.manual_seed(0)
    cnf = CNFField(64).to(dtype)
    with torch.no_grad():
        for p in cnf.parameters():
            p.mul_(2.0)
    points = sample_toy2d("moons", 512, seed=0).to(dtype)
    state = torch.cat([points, points.new_zeros(512, 1)], dim=1)

    def nll(out: torch.Tensor) -> torch.Tensor:
        return -(-0.5 * out[:, :2].pow(2).sum(1) - math.log(2 * math.pi) + out[:, 2]).mean()

    return {
        "ode_classifier": (field, y0, lambda out: F.cross_entropy(head(out), labels)),
        "cnf_moons": (cnf, state, nll),
    }


def _saved_bytes(run: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    excluded = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return out, sum(seen.values())


def _gradient(
    field: nn.Module,
    y0: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    integrate: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    y = y0.detach().requires_grad_()
    params = list(field.parameters())
    grads = torch.autograd.grad(loss_fn(integrate(y)), [y, *params])
    return torch.cat([g.reshape(-1) for g in grads])


def _variants(field: nn.Module, steps: int) -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], str]]:
    """``variant -> (integrate, reference variant)``."""
    k = math.ceil(math.sqrt(steps))
    out: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], str]] = {
        "discrete_K1": (ODEBlock(field, method="rk4", steps=steps, checkpoints=1), "backprop"),
        "discrete_Ksqrt": (ODEBlock(field, method="rk4", steps=steps, checkpoints=k), "backprop"),
        "discrete_Ksteps": (ODEBlock(field, method="rk4", steps=steps, checkpoints=steps), "backprop"),
        "backprop": (ODEBlock(field, method="rk4", steps=steps, adjoint="backprop"), "backprop"),
        "discrete_adaptive": (
            ODEBlock(field, method="dopri5", rtol=1e-5, atol=1e-7, checkpoints=8),
            "backprop_adaptive",
        ),
        "backprop_adaptive": (
            ODEBlock(field, method="dopri5", rtol=1e-5, atol=1e-7, adjoint="backprop"),
            "backprop_adaptive",
        ),
    }
    try:
        import torchdiffeq
    except ImportError:
        return out
    t = torch.tensor([0.0, 1.0])
    grid = {"method": "rk4", "options": {"step_size": 1.0 / steps}}

    def make(fn: Callable[..., torch.Tensor], **kw: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda y: fn(field, y, t.to(y.dtype), **kw)[-1]

    out["torchdiffeq_odeint"] = (make(torchdiffeq.odeint, **grid), "torchdiffeq_odeint")
    out["torchdiffeq_adjoint"] = (make(torchdiffeq.odeint_adjoint, **grid), "torchdiffeq_odeint")
    tol = {"method": "dopri5", "rtol": 1e-5, "atol": 1e-7}
    out["torchdiffeq_odeint_adaptive"] = (make(torchdiffeq.odeint, **tol), "torchdiffeq_odeint_adaptive")
    out["torchdiffeq_adjoint_adaptive"] = (
        make(torchdiffeq.odeint_adjoint, **tol, adjoint_rtol=1e-5, adjoint_atol=1e-7),
        "torchdiffeq_odeint_adaptive",
    )
    return out


def run_ode(quick: bool) -> dict[str, Any]:
    steps = 16 if quick else 36
    reps = 5 if quick else 15
    records = []
    for problem in ("ode_classifier", "cnf_moons"):
        field64, y64, loss64 = _problems(torch.float64)[problem]
        variants64 = _variants(field64, steps)
        grads = {name: _gradient(field64, y64, loss64, fn) for name, (fn, _) in variants64.items()}
        field32, y32, loss32 = _problems(torch.float32)[problem]
        params = list(field32.parameters())
        variants32 = _variants(field32, steps)
        rows = []
        for name, (fn, ref) in variants32.items():
            y = y32.detach().requires_grad_()
            out, saved = _saved_bytes(lambda fn=fn, y=y: fn(y), params)
            del out
            error = float((grads[name] - grads[ref]).norm() / grads[ref].norm())
            rows.append(
                {
                    "problem": problem,
                    "variant": name,
                    "reference": ref,
                    "grad_rel_error": error,
                    "saved_bytes": saved,
                }
            )
        wall: dict[str, list[float]] = {name: [] for name in variants32}
        cpu: dict[str, list[float]] = {name: [] for name in variants32}
        for _ in range(reps):  # variants interleaved, so that they share the machine's load
            for name, (fn, _) in variants32.items():
                y = y32.detach().requires_grad_()
                start, start_cpu = time.perf_counter(), time.process_time()
                loss32(fn(y)).backward()
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
        for r in rows:
            r["step_ms"] = _median_ms(cpu[r["variant"]])
            r["step_wall_ms"] = _median_ms(wall[r["variant"]])
        base = next(r for r in rows if r["variant"] == "backprop")
        for r in rows:
            r["saved_ratio"] = r["saved_bytes"] / base["saved_bytes"]
            r["time_ratio"] = r["step_ms"] / base["step_ms"]
            print(
                f"ode {problem:15s} {r['variant']:29s} err {r['grad_rel_error']:.2e} saved {r['saved_bytes']:>10d} B"
                f" ({r['saved_ratio']:.3f}x) step {r['step_ms']:8.2f} ms ({r['time_ratio']:.2f}x)",
                flush=True,
            )
        records += rows
    return {"records": records, "steps": steps}


# ---------------------------------------------------------------------------------------------- (c) stiff
class _Stiff(nn.Module):
    """``y' = -1000 (y - cos t) + A y``, ``A`` a slow rotation (no parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("a", torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -1000.0 * (y - torch.cos(t)) + y @ self.a.t()


def run_stiff(quick: bool) -> dict[str, Any]:
    y0 = torch.tensor([[1.5, -0.5]], dtype=torch.float64)
    with torch.no_grad():
        reference = ODEBlock(
            _Stiff(), (0.0, 2.0), method="dopri5", rtol=1e-11, atol=1e-13, max_steps=200_000
        )(y0)
    grid = sorted({round(2 * 1.25**i) for i in range(60)} | {1})
    records = []
    for method in ("euler", "rk4", "dopri5", "implicit_euler", "crank_nicolson"):
        found = None
        for steps in grid:
            if steps > (4000 if quick else 20000):
                break
            with torch.no_grad(), torch.autograd.set_grad_enabled(False):
                y = ODEBlock(_Stiff(), (0.0, 2.0), method=method, steps=steps)(y0)  # type: ignore[arg-type]
            if torch.isfinite(y).all() and float((y - reference).abs().max()) <= 1e-4:
                found = steps
                break
        records.append({"method": method, "min_steps": found})
        print(f"stiff {method:15s} min steps {found}", flush=True)
    base = next(r["min_steps"] for r in records if r["method"] == "implicit_euler")
    for r in records:
        r["ratio_vs_implicit_euler"] = (
            None if r["min_steps"] is None or base is None else r["min_steps"] / base
        )
    return {"records": records, "tolerance": 1e-4}


# ---------------------------------------------------------------------------------------------- (d) SNOpt
def run_snopt(quick: bool) -> dict[str, Any]:
    x_train, y_train, x_test, y_test = digits()
    target = 0.93
    max_steps = 300 if quick else 800
    seeds = [0, 1] if quick else [0, 1, 2]
    grids = {"adam": [1e-3, 3e-3, 1e-2], "kfac": [0.03, 0.1, 0.3]}
    if quick:
        grids = {"adam": [3e-3, 1e-2], "kfac": [0.03, 0.1]}
    records = []
    for optimizer, grid in grids.items():
        for lr in grid:
            for seed in seeds:
                records.append(
                    _snopt_run(optimizer, lr, seed, x_train, y_train, x_test, y_test, target, max_steps)
                )
    summary = {}
    for optimizer, grid in grids.items():
        best = None
        for lr in grid:
            rows = [r for r in records if r["optimizer"] == optimizer and r["lr"] == lr]
            steps = statistics.median(r["steps_to_target"] or math.inf for r in rows)
            seconds = statistics.median(r["seconds_to_target"] or math.inf for r in rows)
            if best is None or (steps, seconds) < (best["median_steps"], best["median_seconds"]):
                best = {"lr": lr, "median_steps": steps, "median_seconds": seconds}
        summary[optimizer] = best
    print(json.dumps(summary), flush=True)
    return {"records": records, "summary": summary, "target": target, "max_steps": max_steps}


def _snopt_run(
    optimizer: str,
    lr: float,
    seed: int,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    target: float,
    max_steps: int,
) -> dict[str, Any]:
    torch.manual_seed(seed)
    stem, head = nn.Sequential(nn.Linear(64, 32), nn.Tanh()), nn.Linear(32, 10)
    model = nn.Sequential(stem, ODEBlock(MLPField(32), method="rk4", steps=8, checkpoints=3), head)
    pre = None
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        pre = KFACPreconditioner(model, KFACOptions(damping=0.003, kl_clip=0.001, inv_update_steps=10))
    gen = torch.Generator().manual_seed(seed)
    reached, seconds, elapsed, acc = None, None, 0.0, 0.0
    for step in range(1, max_steps + 1):
        idx = torch.randint(0, len(y_train), (64,), generator=gen)
        start = time.process_time()
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        if pre is not None:
            pre.step(opt)
        opt.step()
        elapsed += time.process_time() - start
        if step % 10 == 0:
            with torch.no_grad():
                acc = float((model(x_test).argmax(1) == y_test).float().mean())
            if acc >= target:
                reached, seconds = step, elapsed
                break
    print(
        f"snopt {optimizer:5s} lr {lr:g} seed {seed}: steps {reached}, seconds {seconds}, acc {acc:.4f}",
        flush=True,
    )
    return {
        "optimizer": optimizer,
        "lr": lr,
        "seed": seed,
        "steps_to_target": reached,
        "seconds_to_target": seconds,
        "final_val_acc": acc,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer seeds, epochs and steps")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--only", default="deq,ode,stiff,snopt", help="comma-separated sections")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sections = {"deq": run_deq, "ode": run_ode, "stiff": run_stiff, "snopt": run_snopt}
    out: dict[str, Any] = {"quick": args.quick}
    for name in args.only.split(","):
        start = time.perf_counter()
        out[name] = sections[name](args.quick)
        out[name]["seconds"] = time.perf_counter() - start
        print(f"== {name}: {out[name]['seconds']:.0f} s", flush=True)
        if "summary" in out[name]:
            print(json.dumps(out[name]["summary"], indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
