"""The `lightning-parallel` command: help, and one clear paragraph with exit code 2 for bad input."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lightning_parallel.cli import main
from tests.test_configs import ROOT, run_cli

QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def test_help_says_what_the_package_offers() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for name in ("ChimeraStrategy", "DPKFAC", "CompressedActivationPrecision", "QuantizationPrecision", "fit"):
        assert name in result.stdout


def _assert_clean_error(result: object, *fragments: str) -> None:
    assert result.returncode == 2  # type: ignore[attr-defined]
    err = result.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in err
    line = [x for x in err.splitlines() if x.startswith("lightning-parallel: error:")]
    assert len(line) == 1, err
    for fragment in fragments:
        assert fragment in line[0], line[0]


def test_missing_config_file() -> None:
    _assert_clean_error(run_cli("fit", "--config", "missing.yaml"), "missing.yaml", "no such file")


def test_unknown_class_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(QUICKSTART).read_text().replace("models.ResNetClassifier", "models.ResNetClassifer"))
    _assert_clean_error(run_cli("fit", "--config", str(bad)), "ResNetClassifer", "class_path", str(bad))


def test_wrong_type_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(QUICKSTART).read_text().replace("lr: 0.003", "lr: fast"))
    _assert_clean_error(run_cli("fit", "--config", str(bad)), '"lr"', "float", "fast")


def test_unknown_option_names_the_option() -> None:
    _assert_clean_error(
        run_cli("fit", "--config", QUICKSTART, "--model.init_args.bogus=1"), "bogus", "not accepted"
    )


def test_schedule_subcommand_prints_grid_and_cost_model() -> None:
    result = run_cli("schedule", "--kind", "chimera", "--stages", "4", "--micro-batches", "4")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("rank ") >= 4
    # With backward = 2 x forward the best Chimera order at D = N = 4 takes 16 units: 12 of work, 0.75.
    assert "efficiency 0.750" in result.stdout


def test_schedule_subcommand_refuses_odd_stages_for_chimera() -> None:
    result = run_cli("schedule", "--kind", "chimera", "--stages", "3", "--micro-batches", "4")
    assert result.returncode != 0
    assert "stages" in result.stderr and "Traceback" not in result.stderr


# ---- values our constructors refuse: exit 2, our message first, no traceback --------------------------------

CONFIGS_DIR = ROOT / "configs"


def _main_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run the command in this process; return its one error paragraph (after checking exit status 2)."""
    with pytest.raises(SystemExit) as exit_info, pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["lightning-parallel"])
        main(["fit", *args, "--trainer.fast_dev_run=1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith("lightning-parallel: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _edited(tmp_path: Path, config: str, old: str, new: str) -> str:
    text = (CONFIGS_DIR / config).read_text()
    assert old in text, f"{old!r} not in {config}"
    path = tmp_path / config
    path.write_text(text.replace(old, new))
    return str(path)


_CASES = {
    # id: (config, old text, new text, fragments of our message)
    "chimera-stages-3": (
        "chimera_resnet.yaml", "stages: 2", "stages: 3", ("ChimeraStrategy(stages=3", "schedule='1f1b'"),
    ),
    "interlocking-k-5-of-4": (
        "interlocking_resnet.yaml", "k: 2", "k: 5", ("k=5", "4"),
    ),
    "dpkfac-factor-update-steps-0": (
        "kfac_resnet.yaml", "factor_update_steps: 1", "factor_update_steps: 0", ("DPKFAC", "factor_update_steps=0"),
    ),
    "dpkfac-damping-negative": ("kfac_resnet.yaml", "damping: 0.003", "damping: -1", ("DPKFAC", "damping")),
    "compression-bits-3": (
        "compressed_resnet.yaml", "bits: 2", "bits: 3", ("CompressedActivationPrecision", "bits=3"),
    ),
    "quantization-act-bits-1": (
        "qat_resnet.yaml", "act_bits: 8", "act_bits: 1", ("QuantizationPrecision", "act_bits=1"),
    ),
    "nested-quantization-inside-compression": (
        "compressed_resnet.yaml",
        "inner: 32-true",
        "inner:\n          class_path: lightning_parallel.plugins.QuantizationPrecision\n"
        "          init_args:\n            mode: qat-int8\n            act_bits: 1",
        ("QuantizationPrecision", "act_bits=1"),
    ),
    "data-batch-size-0": ("quickstart.yaml", "batch_size: 32", "batch_size: 0", ("DigitsDataModule", "batch_size=0")),
    "model-lr-negative": ("quickstart.yaml", "lr: 0.003", "lr: -1", ("ResNetClassifier", "lr=-1")),
}


@pytest.mark.parametrize("case", sorted(_CASES))
def test_refused_value_is_one_paragraph_with_exit_2(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, old, new, fragments = _CASES[case]
    line = _main_error(capsys, "--config", _edited(tmp_path, config, old, new), f"--trainer.default_root_dir={tmp_path}")
    for fragment in fragments:
        assert fragment in line, line
    assert "Namespace(" not in line and "Union" not in line
    assert str(tmp_path / config) in line  # the config it came from


def test_chimera_message_names_the_schedule_argument(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _main_error(capsys, "--config", str(CONFIGS_DIR / "chimera_resnet.yaml"), "--trainer.strategy.init_args.stages=3")
    assert "kind=" not in line and "schedule='1f1b'" in line


def test_refused_value_in_a_real_process_has_no_traceback(tmp_path: Path) -> None:
    result = run_cli(
        "fit", "--config", str(CONFIGS_DIR / "compressed_resnet.yaml"), "--trainer.plugins.init_args.bits=3",
        "--trainer.fast_dev_run=1", cwd=tmp_path,
    )
    _assert_clean_error(result, "CompressedActivationPrecision", "bits=3")


def test_missing_ckpt_path_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "gone.ckpt"
    line = _main_error(capsys, "--config", QUICKSTART, f"--ckpt_path={missing}", f"--trainer.default_root_dir={tmp_path}")
    assert str(missing) in line and "no such file" in line


def test_truncated_ckpt_path_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, whole)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    line = _main_error(capsys, "--config", QUICKSTART, f"--ckpt_path={cut}", f"--trainer.default_root_dir={tmp_path}")
    assert str(cut) in line and "truncated" in line


def test_unreadable_ckpt_path_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    line = _main_error(capsys, "--config", QUICKSTART, f"--ckpt_path={text}", f"--trainer.default_root_dir={tmp_path}")
    assert str(text) in line and "not a readable checkpoint" in line
