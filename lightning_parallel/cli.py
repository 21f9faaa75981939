"""The ``lightning-parallel`` command: a LightningCLI over the package's models, data and plugins.

``lightning-parallel fit --config configs/quickstart.yaml`` trains; ``validate``, ``test`` and ``predict``
work as in any LightningCLI. ``lightning-parallel schedule ...`` draws a pipeline schedule without training.

Errors in the user's input (a missing config file, an unknown ``class_path``, a value of the wrong type, a
value one of the config's constructors refuses, a missing or truncated ``--ckpt_path``) are reported as one
paragraph that names the file, key or argument and says what would work, with exit code 2, instead of a
stack trace. Errors raised while training keep their traceback. ``LIGHTNING_PARALLEL_TRACEBACK=1`` re-raises
a refused constructor value with its traceback (for debugging a constructor itself).

Every run gets a :class:`~lightning_parallel.callbacks.PreemptionCheckpoint` unless its config lists one:
SIGTERM writes the checkpoint of the last completed step on every rank and exits with status 143. A
preempted process, and one whose peer died (its traceback printed, with the dead rank named), ends with
``os._exit`` after Lightning's teardown: the interpreter's finalisation took 6-16 s on a loaded machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

import lightning_parallel  # noqa: F401 - registers the strategies' short names
from lightning_parallel.callbacks.preemption import Preempted, PreemptionCheckpoint
from lightning_parallel.cli_errors import (
    USER_ERRORS,
    ConstructorErrors,
    check_ckpt_path,
    check_config_files,
    condense,
    constructor_message,
    fail,
)
from lightning_parallel.peers import is_communication_error
from lightning_parallel.pipeline.schedule import SCHEDULE_KINDS, build_schedule
from lightning_parallel.pipeline.simulate import simulate
from lightning_parallel.pipeline.timeline import describe, render_png, render_text, schedule_timeline

DESCRIPTION = """\
lightning-parallel: PyTorch Lightning plugins for faster, leaner training.

  Strategies  chimera, pipeline_1f1b, pipeline_gpipe (ChimeraStrategy), interlocking
              (InterlockingBackpropStrategy)
  Precision   CompressedActivationPrecision (compressed saved activations),
              QuantizationPrecision (QAT, bitsandbytes weights, 8-bit optimizers)
  Callbacks   DPKFAC (distributed K-FAC preconditioning), MetricsSummary, PreemptionCheckpoint
              (added to every run: SIGTERM writes a checkpoint and exits 143)
  Models      ResNetClassifier, GPTLanguageModel, MLPClassifier
  Data        DigitsDataModule, TextDataModule, SyntheticDataModule (no download)

Train:       lightning-parallel fit --config configs/quickstart.yaml
Schedules:   lightning-parallel schedule --kind chimera --stages 4 --micro-batches 8
Consolidate: lightning-parallel consolidate CKPT_DIR OUT.ckpt  (sharded pipeline checkpoint -> one file)
"""


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-parallel`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "schedule":
        raise SystemExit(schedule_command(args[1:]))
    if args and args[0] == "consolidate":
        from lightning_parallel.pipeline.consolidate import consolidate_command

        raise SystemExit(consolidate_command(args[1:]))
    _ArgumentParser.config_files = check_config_files(args)
    try:
        _run_cli(args if argv is not None else None)
    except Preempted as stop:
        # the checkpoint is written and Lightning has torn down: skip the interpreter's slow finalisation
        _exit_now(stop.code if isinstance(stop.code, int) else 1)
    except Exception as error:
        if not is_communication_error(error):
            raise
        # a peer died: Lightning has torn down; the traceback stays, the finalisation of a process group
        # with a dead member (seconds, or a hang in a destructor) is skipped
        traceback.print_exc()
        _exit_now(1)


def _exit_now(status: int) -> NoReturn:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _run_cli(args: list[str] | None) -> None:
    _CLI(
        parser_class=_ArgumentParser,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "lightning-parallel", "description": DESCRIPTION, "formatter_class": _raw_formatter()},
        args=args,
    )


def schedule_command(argv: list[str] | None = None) -> int:
    """``lightning-parallel schedule``: print a schedule's grid, bubble ratio and memory per rank.

    Args:
        argv: the arguments after ``schedule`` (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 2 on bad arguments.
    """
    parser = argparse.ArgumentParser(
        prog="lightning-parallel schedule",
        description="Draw a pipeline schedule and print the cost model's bubble ratio and memory per rank.",
    )
    parser.add_argument("--kind", choices=SCHEDULE_KINDS, default="chimera", help="the schedule")
    parser.add_argument("--stages", type=int, default=4, help="pipeline stages D (= ranks)")
    parser.add_argument(
        "--micro-batches", type=int, default=None, help="micro-batches N per step (default: D)"
    )
    parser.add_argument("--forward-doubling", action="store_true", help="Chimera: two forwards per slot")
    parser.add_argument("--forward", type=float, default=1.0, help="forward time of one micro-batch")
    parser.add_argument(
        "--backward", type=float, default=2.0, help="backward time (split evenly into I and W)"
    )
    parser.add_argument("--transfer", type=float, default=0.0, help="time of one hand-off between ranks")
    parser.add_argument(
        "--first-stage-without-input-gradient",
        action="store_true",
        help="the first stage's input needs no gradient: its whole backward is weight-gradient work "
        "(chimera-zb orders for it)",
    )
    parser.add_argument("--png", default=None, help="also draw the timeline into this PNG file (plot extra)")
    args = parser.parse_args(argv)
    try:
        micro_batches = args.micro_batches if args.micro_batches is not None else args.stages
        no_input_gradient = args.first_stage_without_input_gradient
        extra = (
            {"first_stage_input_gradient": False} if no_input_gradient and args.kind == "chimera-zb" else {}
        )
        schedule = build_schedule(
            args.kind, args.stages, micro_batches, forward_doubling=args.forward_doubling, **extra
        )
        costs: dict[str, list[float]] = {}
        if no_input_gradient and args.stages > 1:
            half = args.backward / 2
            costs = {
                "backward_input": [0.0] + [half] * (args.stages - 1),
                "backward_weight": [args.backward] + [half] * (args.stages - 1),
            }
        result = simulate(
            schedule, forward=args.forward, backward=args.backward, transfer=args.transfer, **costs
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    timeline = schedule_timeline(schedule, result)
    print(render_text(timeline))
    print(describe(schedule, result))
    if args.png:
        try:
            render_png(
                timeline, args.png, title=f"{schedule.kind} D={schedule.stages} N={schedule.micro_batches}"
            )
        except ModuleNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"wrote {args.png}")
    return 0


class _CLI(LightningCLI):
    """LightningCLI whose refused constructor values and bad ``--ckpt_path`` end in one paragraph, exit 2."""

    @override
    def before_instantiate_classes(self) -> None:
        self.constructor_errors = ConstructorErrors()
        # LightningCLI's own instantiators (model, data) stay in front; ours builds every other class
        registered = getattr(self.parser, "_instantiators", None)
        if isinstance(registered, dict):
            for key, instantiator in list(registered.items()):
                registered[key] = self.constructor_errors.wrap(instantiator)
        self.parser.add_instantiator(self.constructor_errors.wrap(_build), object, subclasses=True)

    @override
    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except _REFUSED as err:
            if os.environ.get("LIGHTNING_PARALLEL_TRACEBACK") == "1":
                raise
            failure = self.constructor_errors.first()
            source = f" (from {', '.join(_ArgumentParser.config_files)})" if _ArgumentParser.config_files else ""
            if failure is not None:
                fail(constructor_message(failure[0], failure[1]) + source)
            # the Trainer itself (built directly, not by jsonargparse) refused a combination
            fail(f"Trainer: {condense(str(err))}{source}")

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        # preemption writes a checkpoint and exits non-zero on every rank (Lightning's handler can hang)
        callbacks: list[Any] = trainer.callbacks  # type: ignore[attr-defined]
        if not any(isinstance(cb, PreemptionCheckpoint) for cb in callbacks):
            callbacks.append(PreemptionCheckpoint())
        return trainer

    @override
    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyperparameters here, before anything else touches the file
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        check_ckpt_path(ckpt_path)
        try:
            super()._parse_ckpt_path()
        except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            fail(f"--ckpt_path {ckpt_path}: not a readable checkpoint ({first}).")


_REFUSED: tuple[type[Exception], ...] = (*USER_ERRORS, MisconfigurationException)


def _build(class_type: type, *args: Any, **kwargs: Any) -> Any:
    return class_type(*args, **kwargs)


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
