"""Memory per rank of a pipeline: parameter bytes, optimizer state and peak RSS, against DDP and torch.

One ``GPTLanguageModel`` (fp32, AdamW) and one global batch, trained for a few optimizer steps by:

- ``one-process``: a single process (``Trainer(devices=1)``);
- ``ddp``: ``Trainer(strategy="ddp")`` on 4 processes (each rank reads a quarter of the batch);
- ``1f1b``, ``chimera``, ``chimera-zb``, ``gpipe``: ``ChimeraStrategy(stages=4, schedule=...,
  partition="parameters", stage_local=True)`` on 4 processes, the GPT built in ``configure_model`` (on the
  meta device; each rank materialises its stages); ``1f1b-eager``: the same with the GPT built in
  ``__init__`` the way most modules are written (freed down to the held stages after partitioning).
  ``--full-module`` runs them as before stage-local weights (``stage_local=False``, every rank holds the
  whole module);
- ``torch-1f1b``: ``torch.distributed.pipelining``'s ``Schedule1F1B`` on 4 processes over a manual split
  built on the meta device (each rank materialises only its stage), the same partition;
- ``1f1b-recompute``: ``1f1b`` with ``recompute=True`` (stage 0, which stores D micro-batches' activations
  under 1F1B, recomputes its forward in backward); against ``1f1b`` it gives the activation memory saved
  (the peak RSS difference: weights and optimizer state are the same) and the time it costs;
- ``interlocking``: ``InterlockingBackpropStrategy(k=2, stages=4, micro_batches=4, partition="parameters",
  stage_local=True)`` on 4 processes, GPT built on meta; each rank also holds its stage's auxiliary head
  (a linear ``n_embd -> vocab``), so its ideal is P/D plus one head.

Every run is a fresh group of processes, so that each rank's peak resident set size
(``ru_maxrss``) belongs to that run alone. Figures per rank, the maximum over ranks:

- ``parameter_bytes_per_rank``: bytes of the materialised (non-meta) parameters the rank holds: the
  LightningModule's and any stage copy the strategy keeps (Chimera's second stage), each storage once;
- ``ideal_parameter_bytes_per_rank``: P for one process and DDP, P/D for 1f1b/gpipe/torch and 2P/D for
  Chimera (two stages per rank), with P the model's parameter bytes;
- ``optimizer_state_bytes_per_rank``: bytes of the tensors in the optimizers' state after the steps;
- ``peak_rss_above_baseline_bytes``: peak RSS minus the RSS once torch, Lightning and the package are
  imported (before the model is built);
- ``step_s``: wall time of the last training step (``torch-1f1b``: of the last schedule step), the
  maximum over ranks.

``--big`` trains a GPT of >= 400M parameters with 1f1b and chimera on 4 processes (3 steps) and measures one
DDP rank's bytes in one process (parameters, gradients and AdamW state of the whole model); it needs
stage-local weights and about 16 GiB available (Chimera: 4 ranks x half the model's parameters, gradients and
AdamW state), and refuses to start with less.

    python benchmarks/pipeline_memory.py [--quick] [--json PATH] [--big] [--runs A,B] [--batch B] [--steps S]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl

from lightning_parallel.models import GPTLanguageModel
from lightning_parallel.pipeline.partition import partition_blocks, stage_slices
from lightning_parallel.strategies.chimera import ChimeraStrategy
from lightning_parallel.strategies.interlocking import InterlockingBackpropStrategy

WORLD = 4
STAGES = 4
MICRO_BATCHES = 4
VOCAB = 128
BLOCK_SIZE = 64
RUNS = ("one-process", "ddp", "1f1b", "chimera", "chimera-zb", "gpipe", "1f1b-eager", "torch-1f1b", "1f1b-recompute",
        "interlocking")
BIG_RUNS = ("1f1b", "chimera")
_IMPLS = {"one-process": "lightning", "ddp": "lightning.DDPStrategy", "torch-1f1b": "torch.distributed.pipelining",
          "interlocking": "lightning_parallel.InterlockingBackpropStrategy"}


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _model_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "vocab_size": VOCAB, "block_size": BLOCK_SIZE, "n_layer": config["n_layer"], "n_head": config["n_head"],
        "n_embd": config["n_embd"], "optimizer": "adamw", "lr": 1e-3,
    }


def _data(config: dict[str, Any]) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    size = config["steps"] * config["batch"]
    idx = torch.randint(0, VOCAB, (size, BLOCK_SIZE), generator=g)
    return TensorDataset(idx, torch.roll(idx, -1, dims=1))


def _tensor_bytes(tensors: Any) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in tensors:
        if tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def _optimizer_tensors(optimizers: Any) -> list[Tensor]:
    return [v for opt in optimizers for state in opt.state.values() for v in state.values() if isinstance(v, Tensor)]


class _StepTimer(pl.Callback):
    """Wall time of each training step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.times.append(time.perf_counter() - self._start)


# ----------------------------------------------------------------------------- one rank of one run
def _trainer_run(run: str, config: dict[str, Any]) -> tuple[list[Tensor], list[Tensor], float]:
    torch.manual_seed(0)
    stage_local = not config.get("full_module", False)
    pipeline = run not in ("one-process", "ddp")
    meta_built = pipeline and stage_local and run != "1f1b-eager"
    model = GPTLanguageModel(**_model_kwargs(config), build_in_configure_model=meta_built)
    strategy: Any
    if run == "one-process":
        strategy, devices, batch = "auto", 1, config["batch"]
    elif run == "ddp":
        strategy, devices, batch = "ddp", WORLD, config["batch"] // WORLD
    elif run == "interlocking":
        strategy = InterlockingBackpropStrategy(k=2, stages=STAGES, micro_batches=MICRO_BATCHES, partition="parameters",
                                                stage_local=stage_local)
        devices, batch = WORLD, config["batch"]
    else:
        schedule = run.removesuffix("-eager").removesuffix("-recompute")
        strategy = ChimeraStrategy(STAGES, MICRO_BATCHES, schedule=schedule, partition="parameters",  # type: ignore[arg-type]
                                   stage_local=stage_local, recompute=run.endswith("-recompute"))
        devices, batch = WORLD, config["batch"]
    timer = _StepTimer()
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=config["steps"], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
    )
    trainer.fit(model, DataLoader(_data(config), batch_size=batch))
    params = list(model.parameters())
    if isinstance(strategy, ChimeraStrategy):
        params += [p for m in strategy.held_stage_modules.values() for p in m.parameters()]
    return params, _optimizer_tensors(trainer.optimizers), timer.times[-1]


def _torch_run(rank: int, config: dict[str, Any]) -> tuple[list[Tensor], list[Tensor], float]:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPTLanguageModel(**_model_kwargs(config))
    blocks = list(model.blocks)
    sizes = partition_blocks(blocks, STAGES, "parameters")
    held = stage_slices(sizes)[rank]
    stage_module = nn.Sequential(*blocks[held])
    stage_module.to_empty(device="cpu")
    for index, block in zip(range(held.start, held.stop), stage_module):
        model.pipeline_init_weights(index, block)
    stage = PipelineStage(stage_module, rank, STAGES, torch.device("cpu"))

    def loss_fn(output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output.reshape(-1, VOCAB), target.reshape(-1))

    schedule = Schedule1F1B(stage, n_microbatches=MICRO_BATCHES, loss_fn=loss_fn)
    optimizer = torch.optim.AdamW(stage_module.parameters(), lr=1e-3)
    data = _data(config)
    step_s = 0.0
    for step in range(config["steps"]):
        started = time.perf_counter()
        idx, targets = data[step * config["batch"] : (step + 1) * config["batch"]]
        optimizer.zero_grad(set_to_none=True)
        if rank == 0:
            schedule.step(idx)
        elif rank == STAGES - 1:
            schedule.step(target=targets, losses=[])
        else:
            schedule.step()
        optimizer.step()
        step_s = time.perf_counter() - started
    return list(stage_module.parameters()), _optimizer_tensors([optimizer]), step_s


def _worker(rank: int, world: int, port: int, run: str, config: dict[str, Any], out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), NODE_RANK="0")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    baseline = _rss_peak_bytes()  # torch, Lightning and the package are imported; no model exists yet
    if run == "torch-1f1b":
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
        params, state, step_s = _torch_run(rank, config)
    else:
        params, state, step_s = _trainer_run(run, config)
    record = {
        "step_s": step_s,
        "parameter_bytes": _tensor_bytes(params),
        "optimizer_state_bytes": _tensor_bytes(state),
        "peak_rss_above_baseline_bytes": _rss_peak_bytes() - baseline,
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def measure(run: str, config: dict[str, Any]) -> dict[str, Any]:
    """Train ``run`` in a fresh group of processes; the per-rank figures, the maximum over ranks."""
    world = 1 if run == "one-process" else WORLD
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(world, _free_port(), run, config, out_dir), nprocs=world,
                           start_method="spawn")
        ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]
    total = model_parameter_bytes(config)
    per_rank = {"one-process": 1.0, "ddp": 1.0, "chimera": 2 / STAGES, "chimera-zb": 2 / STAGES}.get(run, 1 / STAGES)
    extra = 4 * (config["n_embd"] + 1) * VOCAB if run == "interlocking" else 0  # one auxiliary head, fp32
    suffix = "" if run in ("one-process", "ddp", "torch-1f1b") or not config.get("full_module") else " (full module)"
    return {
        "run": run,
        "impl": _IMPLS.get(run, "lightning_parallel.ChimeraStrategy") + suffix,
        "stages": 1 if run in ("one-process", "ddp") else STAGES,
        "parameter_bytes_per_rank": max(r["parameter_bytes"] for r in ranks),
        "ideal_parameter_bytes_per_rank": int(total * per_rank) + extra,
        "optimizer_state_bytes_per_rank": max(r["optimizer_state_bytes"] for r in ranks),
        "peak_rss_above_baseline_bytes": max(r["peak_rss_above_baseline_bytes"] for r in ranks),
        "peak_rss_above_baseline_bytes_by_rank": [r["peak_rss_above_baseline_bytes"] for r in ranks],
        "step_s": max(r["step_s"] for r in ranks),
    }


def recompute_summary(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Activation memory saved by ``recompute=True`` under 1F1B and the time it costs (``1f1b`` against
    ``1f1b-recompute``: the peak RSS difference of the rank that recomputes, and the step-time ratio)."""
    by_run = {r["run"]: r for r in records}
    plain, recomputed = by_run.get("1f1b"), by_run.get("1f1b-recompute")
    if plain is None or recomputed is None:
        return None
    rank0 = plain["peak_rss_above_baseline_bytes_by_rank"][0] - recomputed["peak_rss_above_baseline_bytes_by_rank"][0]
    return {
        "recomputed_stages": [0],
        "rank0_peak_rss_saved_bytes": rank0,
        "max_rank_peak_rss_saved_bytes": plain["peak_rss_above_baseline_bytes"] - recomputed["peak_rss_above_baseline_bytes"],
        "step_time_ratio": recomputed["step_s"] / plain["step_s"],
    }


def model_parameter_bytes(config: dict[str, Any]) -> int:
    """P: the model's parameter bytes, counted on a meta build."""
    with torch.device("meta"):
        model = GPTLanguageModel(**_model_kwargs(config))
    return sum(p.numel() * p.element_size() for p in model.parameters())


def ddp_rank_bytes(config: dict[str, Any]) -> dict[str, int]:
    """One DDP rank's parameter, gradient and AdamW state bytes at ``config`` (one process, one step)."""
    torch.manual_seed(0)
    model = GPTLanguageModel(**_model_kwargs(config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, VOCAB, (2, BLOCK_SIZE))
    model.pipeline_loss(model(idx), (idx, idx)).backward()
    optimizer.step()
    return {
        "parameter_bytes": _tensor_bytes(model.parameters()),
        "gradient_bytes": _tensor_bytes(p.grad for p in model.parameters() if p.grad is not None),
        "optimizer_state_bytes": _tensor_bytes(_optimizer_tensors([optimizer])),
    }


def _available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def _print(records: list[dict[str, Any]], title: str) -> None:
    mib = 2**20
    print(title)
    print(f"{'run':<16}{'impl':<50}{'params MiB':>11}{'ideal MiB':>10}{'x ideal':>8}{'optim MiB':>10}{'peak RSS MiB':>13}")
    for r in records:
        ratio = r["parameter_bytes_per_rank"] / r["ideal_parameter_bytes_per_rank"]
        print(f"{r['run']:<16}{r['impl']:<50}{r['parameter_bytes_per_rank'] / mib:>11.1f}"
              f"{r['ideal_parameter_bytes_per_rank'] / mib:>10.1f}{ratio:>8.2f}"
              f"{r['optimizer_state_bytes_per_rank'] / mib:>10.1f}{r['peak_rss_above_baseline_bytes'] / mib:>13.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller GPT (n_embd 256), under two minutes")
    parser.add_argument("--json", type=str, default=None, help="write the records to this JSON file")
    parser.add_argument("--big", action="store_true", help="also train a >= 400M-parameter GPT (needs ~12 GiB free)")
    parser.add_argument("--runs", type=str, default=",".join(RUNS), help="comma-separated subset of runs")
    parser.add_argument("--full-module", action="store_true", help="our runs with stage_local=False (the 'before')")
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch (more: more activation memory)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per run")
    args = parser.parse_args()
    config = {"n_layer": 8, "n_head": 8, "n_embd": 256 if args.quick else 512, "batch": args.batch,
              "steps": args.steps, "full_module": args.full_module}
    started = time.perf_counter()
    records = [measure(run, config) for run in args.runs.split(",")]
    params = model_parameter_bytes(config) // 4
    _print(records, f"GPT n_layer={config['n_layer']} n_embd={config['n_embd']} ({params / 1e6:.1f}M parameters), "
                    f"AdamW, batch {config['batch']}x{BLOCK_SIZE}, {config['steps']} steps, D={STAGES}")
    out: dict[str, Any] = {"records": records, "config": {**config, "world": WORLD, "stages": STAGES,
                                                          "micro_batches": MICRO_BATCHES, "parameters": params}}
    summary = recompute_summary(records)
    if summary is not None:
        out["recompute"] = summary
        print(f"recompute=True under 1f1b: rank 0's peak RSS {summary['rank0_peak_rss_saved_bytes'] / 2**20:+.1f} MiB "
              f"lower (max over ranks {summary['max_rank_peak_rss_saved_bytes'] / 2**20:+.1f} MiB), step time "
              f"x{summary['step_time_ratio']:.2f}")
    if args.big:
        big = {"n_layer": 24, "n_head": 16, "n_embd": 1184, "batch": 4, "steps": 3, "full_module": False}
        free = _available_gib()
        if free < 16:
            raise SystemExit(f"--big needs about 16 GiB available; /proc/meminfo shows {free:.1f} GiB.")
        big_params = model_parameter_bytes(big) // 4
        big_records = [measure(run, big) for run in BIG_RUNS]
        _print(big_records, f"\n--big: GPT {big_params / 1e6:.0f}M parameters, AdamW fp32, {big['steps']} steps")
        ddp = ddp_rank_bytes(big)
        ddp_total = sum(ddp.values())
        print(f"one DDP rank at this size (measured in one process): {ddp_total / 2**30:.2f} GiB of parameters, "
              f"gradients and AdamW state; 4 ranks need {4 * ddp_total / 2**30:.1f} GiB before activations")
        out["big"] = {"records": big_records, "ddp_rank": ddp, "config": {**big, "parameters": big_params},
                      "available_gib_before": free}
    out["config"]["wall_s"] = time.perf_counter() - started
    out["config"]["load_average"] = os.getloadavg()[0]
    print(f"\nwall {out['config']['wall_s']:.0f} s, load average {out['config']['load_average']:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
