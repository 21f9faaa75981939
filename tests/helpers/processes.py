"""Real `lightning-parallel fit` runs for preemption and dead-rank tests (and benchmarks/reliability.py).

The run is DDP + DPKFAC (sampled categorical Fisher) on 2 CPU processes over synthetic data; its
``StepMarker`` writes each rank's pid and per-step losses under ``marks`` so a caller can signal a rank
once training is under way.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_VARIABLES = {
    "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE",
    "LOCAL_WORLD_SIZE", "GROUP_RANK",
}

DDP_KFAC_CONFIG = """\
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 2
  strategy: ddp
  max_steps: {max_steps}
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  enable_checkpointing: false
  limit_val_batches: 0
  num_sanity_val_steps: 0
  default_root_dir: {root}
  callbacks:
    - class_path: tests.helpers.callbacks.StepMarker
      init_args: {{directory: {marks}, sleep_s: {sleep_s}}}
    - class_path: lightning_parallel.callbacks.DPKFAC
      init_args: {{fisher: categorical, factor_update_steps: 1, inv_update_steps: 5}}
model:
  class_path: lightning_parallel.models.MLPClassifier
  init_args: {{in_features: 16, hidden: [32], num_classes: 4, lr: 0.01, optimizer: adam}}
data:
  class_path: lightning_parallel.data.SyntheticDataModule
  init_args: {{shape: [16], num_classes: 4, num_samples: 512, batch_size: 16}}
"""


_STRATEGIES = {
    "ddp": "ddp",
    "chimera": (
        "\n    class_path: lightning_parallel.strategies.ChimeraStrategy"
        "\n    init_args: {{stages: {devices}, micro_batches: 4, timeout_s: 60}}"
    ),
    "interlocking": (
        "\n    class_path: lightning_parallel.strategies.InterlockingBackpropStrategy"
        "\n    init_args: {{stages: {devices}, micro_batches: 4, k: 1, timeout_s: 60}}"
    ),
    "auxnet": (
        "\n    class_path: lightning_parallel.strategies.AuxNetStrategy"
        "\n    init_args: {{stages: {devices}, micro_batches: 4, timeout_s: 60}}"
    ),
}


def run_config(strategy: str, *, devices: int = 2, **fields: object) -> str:
    """The config of a real run: ``DDP_KFAC_CONFIG`` for ``"ddp"``; for ``"chimera"`` / ``"interlocking"`` / ``"auxnet"`` the same
    MLP (4 blocks) and data under that pipeline strategy, without DPKFAC. ``fields``: max_steps, root, marks,
    sleep_s."""
    text = DDP_KFAC_CONFIG.format(**fields).replace("devices: 2", f"devices: {devices}")
    if strategy == "ddp":
        return text
    text = text.replace("strategy: ddp", "strategy:" + _STRATEGIES[strategy].format(devices=devices))
    text = text.replace(
        "    - class_path: lightning_parallel.callbacks.DPKFAC\n"
        "      init_args: {fisher: categorical, factor_update_steps: 1, inv_update_steps: 5}\n",
        "",
    )
    return text.replace("hidden: [32]", "hidden: [32, 32, 32]")


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without launcher or SLURM variables, the checkout on the path, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARIABLES and not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(extra or {}))
    return env


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie waiting for its parent counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[-1][:1] == "Z"
    except OSError:
        return True
