"""Time to target: DP-KFAC against SGD, AdamW, Muon and SOAP, every run interleaved in one process.

    python benchmarks/kfac_time_to_target.py [--quick] [--json PATH]
    python benchmarks/kfac.py --parts time_to_target [--quick]   (the same, as a part of kfac.py)

Three tasks: the digits ``autoencoder`` and ``cnn`` of ``kfac.py`` (same targets) and a small
``GPTLanguageModel`` on the standard library's source (character level; the loss target is one the
tuned AdamW reaches in a few hundred steps). Every optimizer runs its own small grid, all runs of a
task in one process and interleaved step by step (run 1 step 1, run 2 step 1, ..., run 1 step 2,
...), so that machine load falls on all of them alike; each run stops at the target. A step is
timed from ``zero_grad`` to the end of ``optimizer.step`` (wall time); evaluations are not timed.

- ``sgd``: SGD with momentum 0.9. ``adamw``: AdamW (no weight decay: the target is a training loss).
- ``muon``: ``torch.optim.Muon`` on the 2-D weights of the hidden ``nn.Linear`` layers (with
  ``adjust_lr_fn="match_rms_adamw"``, so one learning rate suits both), AdamW on every other
  parameter (biases, norms, embeddings, convolution kernels, the output layer), as its docs say.
- ``soap``: SOAP from ``pytorch-optimizer`` (the ``bench`` extra), ``precondition_frequency=10``.
- ``dpkfac``: ``KFACPreconditioner`` (what the ``DPKFAC`` callback calls) on SGD with momentum;
  a setting is ``(lr, damping, kl_clip, factor_update_steps, inv_update_steps, fisher)`` plus any
  other ``KFACOptions`` field (``factor_subsample``, ``position_subsample``, ``factor_rank``,
  ``stagger_decompositions``, ...); the grids hold the previous code's points next to the new
  options', so each is measured side by side in the same race.

``best_setting`` is the grid point with the fewest seconds to target (median over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kfac import TASKS, digits

from lightning_parallel.kfac import KFACOptions, KFACPreconditioner

GPT = {"block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32, "batch": 16}


def gpt_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Training windows of the stdlib corpus and a fixed evaluation set of 256 windows."""
    from lightning_parallel.data.text import encode, stdlib_corpus

    ids = encode(stdlib_corpus(400_000))
    return ids, ids


class Task:
    """A task's data, model factory, batches and evaluation."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name == "gpt":
            ids, _ = gpt_data()
            self.ids = ids
            t = GPT["block_size"]
            gen = torch.Generator().manual_seed(1234)
            starts = torch.randint(0, len(ids) - t - 1, (256,), generator=gen)
            self.eval_x = torch.stack([ids[s : s + t] for s in starts])
            self.eval_y = torch.stack([ids[s + 1 : s + t + 1] for s in starts])
        else:
            self.spec = TASKS[name]
            self.x, self.y = digits()

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        if self.name == "gpt":
            from lightning_parallel.models import GPTLanguageModel

            cfg = {k: v for k, v in GPT.items() if k != "batch"}
            return GPTLanguageModel(**cfg)  # type: ignore[arg-type]
        model: nn.Module = self.spec["model"]()
        return model

    def batches(self, seed: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        out = []
        if self.name == "gpt":
            t, b = GPT["block_size"], GPT["batch"]
            for _ in range(steps):
                starts = torch.randint(0, len(self.ids) - t - 1, (b,), generator=gen)
                out.append(
                    (
                        torch.stack([self.ids[s : s + t] for s in starts]),
                        torch.stack([self.ids[s + 1 : s + t + 1] for s in starts]),
                    )
                )
            return out
        b = self.spec["batch"]
        order, cursor = torch.randperm(len(self.y), generator=gen), 0
        for _ in range(steps):
            if cursor + b > len(self.y):
                order, cursor = torch.randperm(len(self.y), generator=gen), 0
            idx = order[cursor : cursor + b]
            cursor += b
            out.append((self.x[idx], self.y[idx]))
        return out

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.name == "gpt":
            logits = model.blocks(x)  # type: ignore[operator]
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss: torch.Tensor = self.spec["loss"](model(x), x, y)
        return loss

    def metric(self, model: nn.Module) -> float:
        with torch.no_grad():
            if self.name == "gpt":
                return float(self.loss(model, self.eval_x, self.eval_y))
            return float(self.spec["metric"](model(self.x), self.x, self.y))

    @property
    def fisher(self) -> str:
        return "gaussian" if self.name == "autoencoder" else "categorical"


class Run:
    """One optimizer at one grid point, stepped by the race."""

    def __init__(self, task: Task, optimizer: str, setting: tuple[Any, ...], seed: int) -> None:
        self.task, self.optimizer_name, self.setting, self.seed = task, optimizer, setting, seed
        self.model = task.model(seed)
        self.model.train()
        lr = float(setting[0] if not isinstance(setting[0], tuple) else setting[0][1])
        self.kfac: KFACPreconditioner | None = None
        self.optimizers: list[torch.optim.Optimizer] = []
        params = list(self.model.parameters())
        if optimizer == "sgd":
            self.optimizers.append(torch.optim.SGD(params, lr=lr, momentum=0.9))
        elif optimizer == "adamw":
            self.optimizers.append(torch.optim.AdamW(params, lr=lr, weight_decay=0.0))
        elif optimizer == "muon":
            linears = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
            hidden = {id(m.weight) for m in linears[:-1]}  # the output layer goes to AdamW
            matrices = [p for p in params if id(p) in hidden]
            others = [p for p in params if id(p) not in hidden]
            self.optimizers.append(
                torch.optim.Muon(matrices, lr=lr, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
            )
            self.optimizers.append(torch.optim.AdamW(others, lr=lr, weight_decay=0.0))
        elif optimizer == "soap":
            from pytorch_optimizer import SOAP

            self.optimizers.append(SOAP(params, lr=lr, weight_decay=0.0, precondition_frequency=10))
        elif optimizer == "dpkfac":
            self.optimizers.append(torch.optim.SGD(params, lr=lr, momentum=0.9))
            options = dict(setting[1:])
            if options.get("fisher") == "sampled":
                options["fisher"] = task.fisher
            self.kfac = KFACPreconditioner(self.model, KFACOptions(**options))
        else:
            raise ValueError(f"unknown optimizer {optimizer!r}")
        self.seconds = 0.0
        self.steps = 0
        self.reached: int | None = None
        self.diverged = False

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        start = time.perf_counter()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.task.loss(self.model, x, y).backward()
        if self.kfac is not None:
            self.kfac.step(self.optimizers[0])
        for optimizer in self.optimizers:
            optimizer.step()
        self.seconds += time.perf_counter() - start
        self.steps += 1

    def evaluate(self, target: float) -> None:
        value = self.task.metric(self.model)
        if value != value or value > 1e6:
            self.diverged = True
        elif value <= target:
            self.reached = self.steps

    @property
    def done(self) -> bool:
        return self.diverged or self.reached is not None


def race(task: Task, grids: dict[str, list[tuple[Any, ...]]], seeds: list[int], target: float,
         max_steps: int, eval_every: int) -> list[Run]:
    """All runs of a task, interleaved step by step; each stops at the target (or max_steps)."""
    runs = [Run(task, name, setting, seed) for seed in seeds for name, grid in grids.items() for setting in grid]
    batches = {seed: task.batches(seed, max_steps) for seed in seeds}
    for step in range(max_steps):
        active = [r for r in runs if not r.done]
        if not active:
            break
        for run in active:
            run.step(*batches[run.seed][step])
            if run.steps % eval_every == 0:
                run.evaluate(target)
    return runs


def kfac(lr: float, damping: float, kl_clip: float, fus: int, ius: int, fisher: str = "empirical",
         **more: Any) -> tuple[Any, ...]:
    """A DPKFAC grid point: ``(("lr", lr), (option, value), ...)``; ``fisher="sampled"`` is the task's likelihood."""
    options = {"damping": damping, "kl_clip": kl_clip, "factor_update_steps": fus, "inv_update_steps": ius,
               "fisher": fisher, **more}
    return (("lr", lr), *options.items())


def grids(quick: bool) -> dict[str, dict[str, list[tuple[Any, ...]]]]:
    """Each optimizer's grid per task (quick: the points around each full grid's best)."""
    full: dict[str, dict[str, list[tuple[Any, ...]]]] = {
        "autoencoder": {
            "sgd": [(0.03,), (0.05,), (0.1,)],
            "adamw": [(0.004,), (0.006,), (0.008,), (0.01,)],
            "muon": [(0.005,), (0.01,), (0.02,)],
            "soap": [(0.003,), (0.006,), (0.01,)],
            "dpkfac": [
                kfac(0.3, 0.05, 0.01, 1, 10, "sampled"),  # the previous benchmark's best
                kfac(0.3, 0.1, 0.01, 10, 100, "sampled"),
                kfac(0.3, 0.1, 0.01, 20, 200, "sampled"),
                kfac(0.5, 0.1, 0.02, 10, 100, "sampled"),
                kfac(0.3, 0.1, 0.01, 10, 100, "sampled", method="inverse"),
                # the cheaper steps of this branch, side by side with the points above
                kfac(0.3, 0.1, 0.01, 10, 100, "sampled", stagger_decompositions=True),
                kfac(0.3, 0.1, 0.01, 10, 100, "sampled", factor_rank=64),
            ],
        },
        "cnn": {
            "sgd": [(0.05,), (0.1,), (0.2,)],
            "adamw": [(0.01,), (0.02,), (0.03,)],
            "muon": [(0.01,), (0.02,), (0.03,)],
            "soap": [(0.003,), (0.01,), (0.03,)],
            "dpkfac": [
                kfac(0.3, 0.03, 0.001, 1, 10, "sampled"),  # the previous benchmark's best
                kfac(0.3, 0.03, 0.001, 5, 50, factor_subsample=2),
                kfac(0.3, 0.03, 0.001, 5, 50, factor_subsample=2, method="inverse"),
                # the 512-input Linear (index 6) is most of the preconditioning cost: left to SGD
                kfac(0.3, 0.03, 0.001, 5, 50, factor_subsample=2, skip_layers=("^6$",)),
                kfac(0.5, 0.03, 0.001, 5, 50, factor_subsample=2, skip_layers=("^6$",)),
                # truncated eigenbases: the 513-input Linear preconditioned at 4x fewer multiply-adds
                kfac(0.3, 0.03, 0.001, 5, 50, factor_subsample=2, factor_rank=32),
                kfac(0.3, 0.03, 0.001, 5, 50, "sampled", factor_subsample=2, factor_rank=32),
                kfac(0.3, 0.03, 0.001, 5, 50, factor_subsample=2, position_subsample=2, factor_rank=32),
                kfac(0.3, 0.03, 0.001, 5, 50, factor_subsample=2, factor_rank=16),
            ],
        },
        "gpt": {
            "sgd": [(0.3,), (1.0,)],
            "adamw": [(0.003,), (0.01,)],
            "muon": [(0.01,), (0.02,)],
            "soap": [(0.003,), (0.01,)],
            "dpkfac": [
                kfac(0.3, 0.03, 0.001, 10, 100),
                kfac(0.3, 0.01, 0.001, 10, 100, factor_subsample=2),
                kfac(0.3, 0.03, 0.001, 10, 100, position_subsample=2),
                kfac(0.3, 0.03, 0.001, 10, 100, position_subsample=2, factor_rank=32),
            ],
        },
    }
    if not quick:
        return full
    # quick: the two best points of the full run per optimizer (see RESULTS.md)
    best = {
        "autoencoder": {"sgd": [0, 1], "adamw": [0, 1], "muon": [0, 1], "soap": [1, 2], "dpkfac": [1, 4]},
        "cnn": {"sgd": [0, 1], "adamw": [1, 2], "muon": [1, 2], "soap": [1, 2], "dpkfac": [2, 5, 6]},
        "gpt": {"sgd": [0], "adamw": [0], "muon": [1], "soap": [1], "dpkfac": [0, 2]},
    }
    return {task: {name: [grid[i] for i in best[task][name]] for name, grid in g.items()} for task, g in full.items()}


TARGETS = {"autoencoder": TASKS["autoencoder"]["target"], "cnn": TASKS["cnn"]["target"], "gpt": 2.2}
MAX_STEPS = {"autoencoder": 1000, "cnn": 400, "gpt": 800}


def time_to_target(quick: bool, tasks: tuple[str, ...] = ("autoencoder", "cnn", "gpt")) -> list[dict[str, Any]]:
    seeds = [0] if quick else [0, 1]
    rows = []
    for name in tasks:
        task = Task(name)
        load_before = os.getloadavg()[0]
        wall, cpu = time.perf_counter(), time.process_time()
        runs = race(task, grids(quick)[name], seeds, TARGETS[name], MAX_STEPS[name], eval_every=10)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        by_setting: dict[tuple[str, tuple[Any, ...]], list[Run]] = {}
        for run in runs:
            by_setting.setdefault((run.optimizer_name, run.setting), []).append(run)
            print(f"  {name:12s} {run.optimizer_name:7s} seed={run.seed} setting={_show(run.setting)}"
                  f" steps={run.reached} seconds={run.seconds:.2f}", flush=True)
        for optimizer in grids(quick)[name]:
            best: dict[str, Any] | None = None
            for (opt, setting), group in by_setting.items():
                if opt != optimizer:
                    continue
                seconds = statistics.median(r.seconds if r.reached else float("inf") for r in group)
                steps = statistics.median(r.reached if r.reached else float("inf") for r in group)
                if best is None or seconds < best["seconds"]:
                    best = {"seconds": seconds, "steps": steps, "setting": setting, "group": group}
            assert best is not None
            reached = best["seconds"] != float("inf")
            rows.append({
                "task": name,
                "optimizer": optimizer,
                "steps_to_target": int(best["steps"]) if reached else None,
                "seconds_to_target": round(best["seconds"], 3) if reached else None,
                "best_setting": dict(best["setting"]) if optimizer == "dpkfac" else list(best["setting"]),
                "target": TARGETS[name],
                "seeds": len(seeds),
                "seconds_per_seed": [round(r.seconds, 3) if r.reached else None for r in best["group"]],
                "ms_per_step": round(1e3 * statistics.median(r.seconds / max(r.steps, 1) for r in best["group"]), 3),
                "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                # CPU seconds over wall seconds of the whole race: below 1 means others held the core
                "cpu_share": round(cpu / wall, 3),
            })
    return rows


def _show(setting: tuple[Any, ...]) -> str:
    if setting and isinstance(setting[0], tuple):
        return ",".join(f"{k}={v}" for k, v in setting if v not in ("empirical",))
    return str(setting)


def print_rows(rows: list[dict[str, Any]]) -> None:
    anchors = {(r["task"]): r["seconds_to_target"] for r in rows if r["optimizer"] == "adamw"}
    for r in rows:
        ratio = ""
        if r["seconds_to_target"] and anchors.get(r["task"]):
            ratio = f" ({r['seconds_to_target'] / anchors[r['task']]:.2f}x AdamW)"
        print(f"time_to_target {r['task']:12s} {r['optimizer']:7s} steps={r['steps_to_target']}"
              f" seconds={r['seconds_to_target']}{ratio} ms/step={r['ms_per_step']} best={r['best_setting']}"
              f" load={r['load_average']} cpu_share={r['cpu_share']}")


def cli(argv: list[str] | None, doc: str, part: str, func: Any, printer: Any, tasks: str) -> None:
    """The command line of a benchmark part: ``--quick``, ``--json PATH``, ``--tasks a,b``; one thread."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick mode (see the module docstring)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--tasks", default=tasks)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = func(args.quick, tuple(args.tasks.split(",")))
    printer(rows)
    if args.json is not None:
        args.json.write_text(json.dumps({part: rows, "quick": args.quick}, indent=2))


def main(argv: list[str] | None = None) -> None:
    cli(argv, __doc__ or "", "time_to_target", time_to_target, print_rows, "autoencoder,cnn,gpt")


if __name__ == "__main__":
    main()
