"""Preemption and dead-rank trials of real `lightning-parallel fit` runs (2 CPU processes).

Strategies (``--strategies``): ``ddp`` (DDP + DPKFAC with a sampled categorical Fisher), ``chimera``
(ChimeraStrategy, 2 stages) and ``interlocking`` (InterlockingBackpropStrategy, 2 stages, asynchronous), all on
the same MLP over synthetic data (``tests/helpers/processes.py``); ``auxnet`` (AuxNetStrategy, 2 stages) on
request. Each trial starts the command, waits for
step 5, then:

- ``sigterm-rank0``: SIGTERM to rank 0 (Lightning's launcher process; it forwards the signal to rank 1);
- ``sigterm-all``: SIGTERM to both ranks;
- ``slurm-rank0`` / ``slurm-all``: both ranks started by hand with SLURM variables (no launcher, auto-requeue
  on, no ``scontrol`` on this machine), SIGTERM to rank 0 / to both, as ``scancel``/preemption does;
- ``kill9-rank1`` / ``kill9-rank0``: SIGKILL to one rank of a launcher run (rank 0 is the launcher itself);

and records how long until every rank is gone, the exit statuses it can see (the launcher's, or both for
SLURM; rank 1's is not visible under the launcher), whether the preemption checkpoint exists and which step
it holds, and (kill -9) whether the output names the dead rank. With ``--resume`` every SIGTERM trial's
checkpoint is resumed to step 30 and compared with one uninterrupted run per strategy (largest loss difference
over the steps after the checkpoint).

    python benchmarks/reliability.py --quick --json reliability.json   # 1 trial per case
    python benchmarks/reliability.py --trials 5 --resume                # the issue's 5 trials per case
    python benchmarks/reliability.py --trials 5 --resume --resume-trials 2   # resume 2 of the 5

The runs use ``tests/helpers/callbacks.py``'s ``StepMarker`` (pid and per-step loss files), so they run from
a checkout. Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.helpers.processes import clean_env, gone, run_config  # noqa: E402

CASES = ("sigterm-rank0", "sigterm-all", "slurm-rank0", "slurm-all", "kill9-rank1", "kill9-rank0")
STRATEGIES = ("ddp", "chimera", "interlocking", "auxnet")
RESUME_TO = 30


def _losses(marks: Path, rank: int) -> dict[int, float]:
    path = marks / f"rank{rank}.losses"
    lines = path.read_text().split() if path.is_file() else []
    return {int(s): float(v) for s, v in zip(lines[::2], lines[1::2])}


def _step(marks: Path, rank: int) -> int:
    return max(_losses(marks, rank), default=0)


def _command(config: Path, ckpt: Path | None = None) -> list[str]:
    args = [sys.executable, "-m", "lightning_parallel.cli", "fit", "--config", str(config)]
    return args + ([f"--ckpt_path={ckpt}"] if ckpt is not None else [])


def _start(args: list[str], tmp: Path, slurm: bool) -> list[subprocess.Popen[str]]:
    common = {"cwd": tmp, "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True, "start_new_session": True}
    if not slurm:
        return [subprocess.Popen(args, env=clean_env(), **common)]  # type: ignore[call-overload]
    port = 20000 + (os.getpid() + int(time.time())) % 20000
    procs = []
    for rank in (0, 1):
        variables = {
            "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0", "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": "reliability", "SLURM_NODELIST": "127.0.0.1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        procs.append(subprocess.Popen(args, env=clean_env(variables), **common))  # type: ignore[call-overload]
    return procs


def run_to_end(strategy: str, tmp: Path, name: str, ckpt: Path | None = None) -> tuple[dict[int, float], str]:
    """An uninterrupted run (or a resumed one) to step ``RESUME_TO``: rank 0's losses and the output."""
    marks = tmp / f"{name}-marks"
    config = tmp / f"{name}.yaml"
    config.write_text(run_config(strategy, max_steps=RESUME_TO, root=tmp / f"{name}-root", marks=marks, sleep_s=0.0))
    (proc,) = _start(_command(config, ckpt), tmp, slurm=False)
    try:
        out = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{name} run of {strategy} failed ({proc.returncode}):\n{out[-3000:]}")
    return _losses(marks, 0), out


def trial(strategy: str, case: str, tmp: Path, reference: dict[int, float] | None) -> dict[str, object]:
    marks, root = tmp / "marks", tmp / "root"
    config = tmp / "run.yaml"
    config.write_text(run_config(strategy, max_steps=400, root=root, marks=marks, sleep_s=0.3))
    procs = _start(_command(config), tmp, slurm=case.startswith("slurm"))
    row: dict[str, object] = {"strategy": strategy, "case": case}
    try:
        deadline = time.monotonic() + 240
        while min(_step(marks, 0), _step(marks, 1)) < 5:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                return {**row, "error": "did not reach step 5", "output": procs[0].communicate()[0][-2000:]}
            time.sleep(0.2)
        pids = [int((marks / f"rank{r}.pid").read_text()) for r in (0, 1)]
        victims = pids if case.endswith("-all") else pids[1:] if case.endswith("rank1") else pids[:1]
        kill = case.startswith("kill9")
        sent = time.monotonic()
        for pid in victims:
            os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
        while not all(gone(p) for p in pids) and time.monotonic() - sent < 120:
            for p in procs:
                p.poll()
            time.sleep(0.05)
        exit_s = time.monotonic() - sent
        outputs = [p.communicate(timeout=30)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    text = "\n".join(outputs)
    ckpt = root / "preempted" / "preempted.ckpt"
    row.update(
        exit_s=round(exit_s, 2),
        statuses=[p.returncode for p in procs],
        checkpoint=ckpt.is_file(),
        traceback="Traceback" in text,
    )
    if kill:
        dead = pids.index(victims[0])
        row["names_dead_rank"] = f"rank {dead} (pid {victims[0]}" in text and "dead" in text
        row["message"] = next((line for line in text.splitlines() if "lost its peers" in line), "")[:200]
    else:
        row["received"] = sum(f"rank {r}: SIGTERM received" in text for r in (0, 1))
    if ckpt.is_file():
        import torch

        step = int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"])
        row["checkpoint_step"] = step
        row["last_logged_step"] = _step(marks, 0)
        if reference is not None:
            resumed, _ = run_to_end(strategy, tmp, "resumed", ckpt)
            row["resumed_steps"] = sorted(resumed) == list(range(step + 1, RESUME_TO + 1))
            # interlocking (asynchronous) reports each step's loss one step late: the first step of a run
            # returns 0, so its first resumed record is no loss; from the next one on, step s reports s - 1's
            compared = [s for s in sorted(resumed) if strategy not in ("interlocking", "auxnet") or s > step + 1]
            row["resume_diffs"] = [abs(resumed[s] - reference[s]) for s in compared]
            row["resume_max_diff"] = max(row["resume_diffs"], default=float("nan"))  # type: ignore[type-var]
            before = _losses(marks, 0)
            row["before_max_diff"] = max(abs(before[s] - reference[s]) for s in before if s <= step)
    if os.environ.get("RELIABILITY_OUTPUT") or ("error" not in row and not kill and row["checkpoint"] is False):
        row["output"] = text[-2000:]
    return row


def summary(rows: list[dict[str, object]], strategies: list[str], cases: list[str]) -> None:
    print(
        f"\n{'strategy':<13} {'case':<14} {'trials':>6} {'max exit s':>10} {'statuses':<24} {'ckpt':>5} "
        f"{'named':>6} {'resume diff':>11}"
    )
    for strategy in strategies:
        for case in cases:
            mine = [r for r in rows if r["strategy"] == strategy and r["case"] == case and "error" not in r]
            if not mine:
                print(f"{strategy:<13} {case:<14} no completed trial")
                continue
            statuses = sorted({str(r["statuses"]) for r in mine})
            diffs = [float(r["resume_max_diff"]) for r in mine if "resume_max_diff" in r]  # type: ignore[arg-type]
            print(
                f"{strategy:<13} {case:<14} {len(mine):>6} {max(float(r['exit_s']) for r in mine):>10.1f} "  # type: ignore[arg-type]
                f"{' '.join(statuses):<24} {sum(bool(r['checkpoint']) for r in mine):>5} "
                f"{sum(bool(r.get('names_dead_rank')) for r in mine):>6} "
                f"{(f'{max(diffs):.2g}' if diffs else '-'):>11}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one trial per case")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--strategies", nargs="*", default=list(STRATEGIES[:3]), choices=STRATEGIES)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=CASES)
    parser.add_argument("--resume", action="store_true", help="resume SIGTERM checkpoints and compare")
    parser.add_argument("--resume-trials", type=int, default=None, help="resume only the first N trials of a case")
    parser.add_argument("--json", type=Path, default=None)
    opts = parser.parse_args()
    trials = 1 if opts.quick else opts.trials
    rows: list[dict[str, object]] = []
    for strategy in opts.strategies:
        reference = None
        if opts.resume:
            with tempfile.TemporaryDirectory() as tmp:
                reference, _ = run_to_end(strategy, Path(tmp), "whole")
        for case in opts.cases:
            for index in range(trials):
                resume = opts.resume_trials is None or index < opts.resume_trials
                with tempfile.TemporaryDirectory() as tmp:
                    row = trial(strategy, case, Path(tmp), reference if resume else None)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "output"}), flush=True)
                if "output" in row:
                    print(row["output"], flush=True)
                if opts.json is not None:
                    opts.json.write_text(json.dumps(rows, indent=2))
    summary(rows, opts.strategies, opts.cases)


if __name__ == "__main__":
    main()
