"""Timelines: the text grid, the PNG and the ``schedule`` subcommand."""

from __future__ import annotations

import builtins
from pathlib import Path
from typing import Any

import pytest

from lightning_parallel.cli import schedule_command
from lightning_parallel.pipeline.schedule import Action, ActionKind, build_schedule
from lightning_parallel.pipeline.simulate import simulate
from lightning_parallel.pipeline.timeline import render_png, render_text, schedule_timeline


def test_text_grid_of_gpipe_matches_hand_drawn() -> None:
    schedule = build_schedule("gpipe", 2, 2)
    text = render_text(schedule_timeline(schedule, simulate(schedule, forward=1, backward=1)), cell=2)
    assert text.splitlines() == [
        "rank  0 |F0F1....B0B1|",
        "rank  1 |..F0F1B0B1..|",
    ]


def test_text_grid_marks_up_replica_in_lower_case_and_long_actions_with_dashes() -> None:
    schedule = build_schedule("chimera", 2, 2)
    lines = render_text(schedule_timeline(schedule, simulate(schedule))).splitlines()
    assert lines[0].startswith("rank  0 |F0 f1 b1 ---")
    assert len({len(line) for line in lines}) == 1


def test_measured_trace_in_seconds() -> None:
    trace = [
        [
            (Action(ActionKind.FORWARD, 0, 0, 0), 0.0, 0.02),
            (Action(ActionKind.BACKWARD, 0, 0, 0), 0.06, 0.10),
        ],
        [
            (Action(ActionKind.FORWARD, 0, 1, 0), 0.02, 0.04),
            (Action(ActionKind.BACKWARD, 0, 1, 0), 0.04, 0.06),
        ],
    ]
    assert render_text(trace, quantum=0.02, cell=2).splitlines() == [
        "rank  0 |F0....B0--|",
        "rank  1 |..F0B0....|",
    ]


def test_bad_render_arguments() -> None:
    with pytest.raises(ValueError, match="cell=0 must be at least 1"):
        render_text([], cell=0)
    trace = [[(Action(ActionKind.FORWARD, 0, 0, 0), 0.0, 1.0)]]
    with pytest.raises(ValueError, match="quantum=-1"):
        render_text(trace, quantum=-1)


def test_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    schedule = build_schedule("chimera-zb", 4, 4)
    path = tmp_path / "zb.png"
    render_png(schedule_timeline(schedule, simulate(schedule)), str(path), title="zb")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_without_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_import = builtins.__import__

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("matplotlib"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ModuleNotFoundError, match=r'pip install "lightning-parallel\[plot\]"'):
        render_png([], str(tmp_path / "x.png"))


def test_schedule_command(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    png = tmp_path / "c.png"
    argv = ["--kind", "chimera", "--stages", "4", "--micro-batches", "8", "--png", str(png)]
    assert schedule_command(argv) == 0
    out = capsys.readouterr().out
    assert out.count("rank  ") == 4
    assert "efficiency 0.750  bubble ratio 0.250" in out
    assert "peak stored activations per rank (micro-batches): [3, 4, 4, 3]" in out
    assert png.exists()


def test_schedule_command_reports_the_papers_figure(capsys: pytest.CaptureFixture[str]) -> None:
    assert schedule_command(["--kind", "chimera", "--stages", "4", "--backward", "1"]) == 0
    assert "bubble ratio 0.200" in capsys.readouterr().out


def test_schedule_command_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert schedule_command(["--kind", "chimera", "--stages", "3", "--micro-batches", "6"]) == 2
    assert "stages=3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        schedule_command(["--kind", "zigzag"])


def test_schedule_command_for_a_first_stage_without_input_gradient(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--kind", "chimera-zb", "--stages", "4", "--first-stage-without-input-gradient"]
    assert schedule_command(argv) == 0
    assert "makespan 13  efficiency 0.923" in capsys.readouterr().out
    assert schedule_command(["--kind", "chimera-zb", "--stages", "4"]) == 0
    assert "makespan 13  efficiency 0.923" in capsys.readouterr().out
