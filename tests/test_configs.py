"""Every shipped YAML under configs/ parses and trains for two steps through the `lightning-parallel` command."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
_CLUSTER_VARIABLES = {
    "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE",
    "LOCAL_WORLD_SIZE", "GROUP_RANK",
}


def run_cli(*args: str, timeout: float = 240.0, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run ``lightning-parallel ARGS`` in a fresh interpreter (multi-process configs relaunch the command)."""
    # A leftover LOCAL_RANK or MASTER_PORT would make Lightning believe the processes were launched already.
    env = {k: v for k, v in os.environ.items() if k not in _CLUSTER_VARIABLES}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "lightning_parallel.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )


def test_configs_exist() -> None:
    assert (ROOT / "configs" / "quickstart.yaml") in CONFIGS


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_runs_two_steps(config: Path, tmp_path: Path) -> None:
    result = run_cli(
        "fit", "--config", str(config), "--trainer.fast_dev_run=2", f"--trainer.default_root_dir={tmp_path}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, f"{config.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_validation_interval_fits_the_epoch(config: Path) -> None:
    # fast_dev_run ignores val_check_interval; a real run refuses a step interval longer than an epoch unless
    # validation counts steps across epochs (check_val_every_n_epoch: null)
    cfg = yaml.safe_load(config.read_text())
    trainer = cfg.get("trainer", {})
    interval = trainer.get("val_check_interval")
    if not isinstance(interval, int) or trainer.get("check_val_every_n_epoch", 1) is None:
        return
    data = cfg["data"]
    module, name = data["class_path"].rsplit(".", 1)
    datamodule = getattr(importlib.import_module(module), name)(**data.get("init_args", {}))
    datamodule.setup("fit")
    batches = len(datamodule.train_dataloader())
    if trainer.get("strategy") == "ddp":
        batches //= int(trainer.get("devices", 1))
    assert interval <= batches, f"{config.name}: val_check_interval={interval} > {batches} training batches"
