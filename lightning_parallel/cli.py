"""The ``lightning-parallel`` command: a LightningCLI over the package's models, data and plugins.

``lightning-parallel fit --config configs/quickstart.yaml`` trains; ``validate``, ``test`` and ``predict``
work as in any LightningCLI. ``lightning-parallel schedule ...`` draws a pipeline schedule without training.

Errors in the user's input (a missing config file, an unknown ``class_path``, a value of the wrong type) are
reported as one paragraph that names the file or key and says what would work, with exit code 2, instead of
a stack trace.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import NoReturn

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

import lightning_parallel  # noqa: F401 - registers the strategies' short names
from lightning_parallel.cli_errors import check_config_files, condense, fail

DESCRIPTION = """\
lightning-parallel: PyTorch Lightning plugins for faster, leaner training.

  Strategies  chimera, pipeline_1f1b, pipeline_gpipe (ChimeraStrategy), interlocking
              (InterlockingBackpropStrategy)
  Precision   CompressedActivationPrecision (compressed saved activations),
              QuantizationPrecision (QAT, bitsandbytes weights, 8-bit optimizers)
  Callbacks   DPKFAC (distributed K-FAC preconditioning), MetricsSummary
  Models      ResNetClassifier, GPTLanguageModel, MLPClassifier
  Data        DigitsDataModule, TextDataModule, SyntheticDataModule (no download)

Train:       lightning-parallel fit --config configs/quickstart.yaml
Schedules:   lightning-parallel schedule --kind chimera --stages 4 --micro-batches 8
"""


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-parallel`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "schedule":
        from lightning_parallel.pipeline.timeline import schedule_command

        raise SystemExit(schedule_command(args[1:]))
    _ArgumentParser.config_files = check_config_files(args)
    LightningCLI(
        parser_class=_ArgumentParser,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "lightning-parallel", "description": DESCRIPTION, "formatter_class": _raw_formatter()},
        args=None if argv is None else args,
    )


class _ArgumentParser(LightningArgumentParser):
    """Reports a bad argument or config value as one paragraph with exit code 2, without the usage wall."""

    config_files: tuple[str, ...] = ()

    @override
    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        source = f" (from {', '.join(self.config_files)})" if self.config_files else ""
        fail(f"{condense(message)}{source} Run with --help to list the accepted keys.")
        raise AssertionError("unreachable")


def _raw_formatter() -> type:
    from jsonargparse import DefaultHelpFormatter

    class RawDescription(DefaultHelpFormatter):
        def _fill_text(self, text: str, width: int, indent: str) -> str:
            return "".join(indent + line for line in text.splitlines(keepends=True))

    return RawDescription


if __name__ == "__main__":
    main()
