"""Early checks of the command line, so that common mistakes end in one clear paragraph and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path


def fail(message: str) -> None:
    """Print ``message`` as one paragraph on stderr and exit with status 2 (a usage error)."""
    print(f"lightning-parallel: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_config_files(args: Sequence[str]) -> tuple[str, ...]:
    """Exit with a clear message if a ``--config`` file does not exist; return the config paths."""
    found: list[str] = []
    for index, arg in enumerate(args):
        path: str | None = None
        if arg in ("--config", "-c") and index + 1 < len(args):
            path = args[index + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        if path is not None and not Path(path).is_file():
            shipped = sorted(p.name for p in Path("configs").glob("*.yaml")) if Path("configs").is_dir() else []
            hint = f" Configs in ./configs: {', '.join(shipped)}." if shipped else ""
            fail(f"--config {path}: no such file. Pass the path of a LightningCLI YAML file.{hint}")
        if path is not None:
            found.append(path)
    return tuple(found)


_NOISE = (
    "Subtypes:",
    "Given value",
    "Errors:",
    "Expected a <class 'NoneType'>",
    "Does not validate against any of the Union subtypes",
)


def condense(message: str) -> str:
    """Turn jsonargparse's nested error report into one paragraph: the key, the problem, the fix."""
    kept = [line.strip().lstrip("- ").strip() for line in message.splitlines()]
    kept = [line for line in kept if line and not line.startswith(_NOISE)]
    text = " ".join(kept)
    if "has no attribute" in text or "Import path" in text or "not a subclass" in text:
        text += (
            " Check the class_path spelling: a full import path such as "
            "lightning_parallel.models.ResNetClassifier, or a class name the package exports."
        )
    return text
