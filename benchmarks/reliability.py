"""Preemption and dead-rank trials of real `lightning-parallel fit` runs (DDP + DPKFAC, 2 CPU processes).

Each trial starts the command, waits for step 5, then:

- ``sigterm-rank0``: SIGTERM to rank 0 (Lightning's launcher process; it forwards the signal to rank 1);
- ``sigterm-all``: SIGTERM to both ranks;
- ``slurm-all``: both ranks started by hand with SLURM variables (no launcher, auto-requeue on, no
  ``scontrol`` on this machine), SIGTERM to both, as ``scancel``/preemption does;
- ``kill9-rank1``: SIGKILL to rank 1.

and records how long until every rank is gone, the exit statuses it can see (rank 0's, or both for SLURM),
whether the preemption checkpoint exists, and (kill -9) whether the output names the dead rank.

    python benchmarks/reliability.py --quick --json reliability.json   # 1 trial per case
    python benchmarks/reliability.py --trials 5                         # the issue's 5 trials per case

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
CLUSTER = {"MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE"}
CONFIG = """\
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 2
  strategy: ddp
  max_steps: 400
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  enable_checkpointing: false
  limit_val_batches: 0
  num_sanity_val_steps: 0
  default_root_dir: {root}
  callbacks:
    - class_path: tests.helpers.callbacks.StepMarker
      init_args: {{directory: {marks}, sleep_s: 0.3}}
    - class_path: lightning_parallel.callbacks.DPKFAC
      init_args: {{fisher: categorical, factor_update_steps: 1, inv_update_steps: 5}}
model:
  class_path: lightning_parallel.models.MLPClassifier
  init_args: {{in_features: 16, hidden: [32], num_classes: 4, lr: 0.01, optimizer: adam}}
data:
  class_path: lightning_parallel.data.SyntheticDataModule
  init_args: {{shape: [16], num_classes: 4, num_samples: 512, batch_size: 16}}
"""
CASES = ("sigterm-rank0", "sigterm-all", "slurm-all", "kill9-rank1")


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLUSTER and not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(extra or {}))
    return env


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[-1][:1] == "Z"
    except OSError:
        return True


def _step(marks: Path, rank: int) -> int:
    path = marks / f"rank{rank}.losses"
    lines = path.read_text().split() if path.is_file() else []
    return int(lines[-2]) if len(lines) >= 2 else 0


def trial(case: str, tmp: Path) -> dict[str, object]:
    marks, root = tmp / "marks", tmp / "root"
    config = tmp / "run.yaml"
    config.write_text(CONFIG.format(root=root, marks=marks))
    args = [sys.executable, "-m", "lightning_parallel.cli", "fit", "--config", str(config)]
    if case == "slurm-all":
        port = 20000 + os.getpid() % 20000
        procs = []
        for rank in (0, 1):
            slurm = {
                "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": str(rank),
                "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0", "SLURM_JOB_ID": "4242",
                "SLURM_JOB_NAME": "reliability", "SLURM_NODELIST": "127.0.0.1", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }
            procs.append(subprocess.Popen(args, cwd=tmp, env=_env(slurm), stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True, start_new_session=True))
    else:
        procs = [subprocess.Popen(args, cwd=tmp, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=True)]
    try:
        deadline = time.monotonic() + 240
        while min(_step(marks, 0), _step(marks, 1)) < 5:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                return {"case": case, "error": "did not reach step 5", "output": procs[0].communicate()[0][-2000:]}
            time.sleep(0.2)
        pids = [int((marks / f"rank{r}.pid").read_text()) for r in (0, 1)]
        targets = {"sigterm-rank0": pids[:1], "sigterm-all": pids, "slurm-all": pids, "kill9-rank1": pids[1:]}[case]
        sent = time.monotonic()
        for pid in targets:
            os.kill(pid, signal.SIGKILL if case == "kill9-rank1" else signal.SIGTERM)
        while not all(_gone(p) for p in pids) and time.monotonic() - sent < 120:
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
    return {
        "case": case,
        "exit_s": round(exit_s, 2),
        "statuses": [p.returncode for p in procs],
        "checkpoint": (root / "preempted" / "preempted.ckpt").is_file(),
        "names_dead_rank": "rank 1 (pid" in text and "is dead" in text,
        "traceback": "Traceback" in text,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one trial per case")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=CASES)
    parser.add_argument("--json", type=Path, default=None)
    opts = parser.parse_args()
    trials = 1 if opts.quick else opts.trials
    rows = []
    for case in opts.cases:
        for _ in range(trials):
            with tempfile.TemporaryDirectory() as tmp:
                row = trial(case, Path(tmp))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "output"}), flush=True)
    print(f"\n{'case':<15} {'trials':>6} {'max exit s':>10} {'statuses':<22} {'ckpt':>5} {'named':>6}")
    for case in opts.cases:
        mine = [r for r in rows if r["case"] == case and "error" not in r]
        if not mine:
            print(f"{case:<15} no completed trial")
            continue
        statuses = sorted({str(r["statuses"]) for r in mine})
        print(
            f"{case:<15} {len(mine):>6} {max(float(r['exit_s']) for r in mine):>10.1f} {' '.join(statuses):<22} "
            f"{sum(bool(r['checkpoint']) for r in mine):>5} {sum(bool(r['names_dead_rank']) for r in mine):>6}"
        )
    if opts.json is not None:
        opts.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
