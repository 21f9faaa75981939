"""The `lightning-parallel` command: help, and one clear paragraph with exit code 2 for bad input."""

from __future__ import annotations

from pathlib import Path

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
