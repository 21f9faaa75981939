"""Early checks of the command line, so that common mistakes end in one clear paragraph and exit code 2."""

from __future__ import annotations

import functools
import sys
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


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


USER_ERRORS: tuple[type[Exception], ...] = (ValueError, TypeError, ModuleNotFoundError)


class ConstructorErrors:
    """Remembers the errors the config's constructors raise while LightningCLI instantiates them.

    jsonargparse reports a constructor's ``ValueError`` inside a ``Union`` (``strategy: str | Strategy``,
    ``plugins``, ``data``) as "does not validate against any of the Union subtypes", with the message as a
    bullet deep in a traceback. Wrapping every instantiator keeps the original exception and its class, so
    the command can print that message first. The innermost constructor fails first (a nested precision
    plugin is built before the plugin that wraps it), so :meth:`first` is the cause.
    """

    def __init__(self) -> None:
        self.failures: list[tuple[type, Exception]] = []

    def wrap(self, instantiator: Callable[..., Any]) -> Callable[..., Any]:
        """``instantiator`` that records the user errors it raises (same signature, for jsonargparse)."""

        @functools.wraps(instantiator)
        def recording(class_type: type, *args: Any, **kwargs: Any) -> Any:
            try:
                return instantiator(class_type, *args, **kwargs)
            except USER_ERRORS as err:
                self.failures.append((class_type, err))
                raise

        return recording

    def first(self) -> tuple[type, Exception] | None:
        """The first recorded failure, or ``None``."""
        return self.failures[0] if self.failures else None


def constructor_message(class_type: type | None, err: BaseException) -> str:
    """One paragraph: the class that refused its arguments and its own message (which names the argument)."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    if class_type is None or text.startswith(class_type.__name__):
        return text
    return f"{class_type.__name__}: {text}"


_CKPT_KEYWORDS = ("last", "best", "hpc", "registry")  # and "registry:NAME"


def check_ckpt_path(ckpt_path: object) -> None:
    """Exit with a message naming the file if ``--ckpt_path`` is missing, truncated or not a checkpoint.

    Keywords (``last``, ``best``, ``hpc``, ``registry...``), remote URLs and directories (sharded
    checkpoints) are left to Lightning. A Lightning checkpoint is a zip archive (torch's format); a file that
    starts like one but has no readable central directory was cut short (an interrupted copy or save).
    """
    if not isinstance(ckpt_path, (str, Path)):
        return
    text = str(ckpt_path)
    if text in _CKPT_KEYWORDS or text.startswith("registry:") or "://" in text:
        return
    path = Path(text)
    if path.is_dir():
        return
    if not path.is_file():
        fail(f"--ckpt_path {text}: no such file. Pass the path of a checkpoint written by this Trainer (*.ckpt).")
    with path.open("rb") as handle:
        head = handle.read(4)
    if head[:2] == b"PK" and not zipfile.is_zipfile(path):
        size = path.stat().st_size
        fail(
            f"--ckpt_path {text}: the checkpoint is truncated or damaged ({size} bytes, no readable zip "
            "directory). Resume from an earlier checkpoint or drop --ckpt_path to start afresh."
        )
    if not head:
        fail(f"--ckpt_path {text}: the file is empty. Resume from an earlier checkpoint or drop --ckpt_path.")
