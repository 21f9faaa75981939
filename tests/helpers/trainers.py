"""A quiet one-device Trainer for tests: no logger, checkpointing, progress bar or model summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl


def quiet_trainer(tmp_path: Path, callbacks: list[Any] | None = None, **kwargs: Any) -> pl.Trainer:
    """A CPU Trainer on one device writing only under ``tmp_path``; ``kwargs`` override the defaults."""
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
    }
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks or [], **defaults)
