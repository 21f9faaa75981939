"""SIGTERM and kill -9 of real `lightning-parallel fit` runs (2 CPU processes): DDP + DPKFAC with a sampled
Fisher, ChimeraStrategy and InterlockingBackpropStrategy (``tests/helpers/processes.py``).

SIGTERM to rank 0 (the launcher, what a scheduler signals) and to every rank: every rank exits within 30 s
with status 143 and the checkpoint of the last completed step is written; resuming from the rank-0 run's
checkpoint continues the uninterrupted run's losses. kill -9 of either rank: the other exits within 10 s with
a message naming the dead rank.
The unit tests check the signal flag and the dead-rank table without processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_parallel.callbacks import PreemptionCheckpoint
from lightning_parallel.peers import PeerTable, is_communication_error
from lightning_parallel.preemption import SignalFlag, exit_status
from tests.helpers.processes import clean_env, gone, run_config

STRATEGIES = ["ddp", "chimera", "interlocking"]


def _start(
    tmp: Path, name: str, *, max_steps: int, sleep_s: float, ckpt: Path | None = None, strategy: str = "ddp"
) -> tuple[subprocess.Popen[str], Path]:
    marks = tmp / name
    config = tmp / f"{name}.yaml"
    config.write_text(run_config(strategy, max_steps=max_steps, root=tmp / f"{name}-root", marks=marks, sleep_s=sleep_s))
    env = clean_env()
    args = [sys.executable, "-m", "lightning_parallel.cli", "fit", "--config", str(config)]
    if ckpt is not None:
        args.append(f"--ckpt_path={ckpt}")
    proc = subprocess.Popen(
        args, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    return proc, marks


def _losses(marks: Path, rank: int = 0) -> dict[int, float]:
    lines = (marks / f"rank{rank}.losses").read_text().split()
    return {int(s): float(v) for s, v in zip(lines[::2], lines[1::2])}


def _wait_for_step(marks: Path, step: int, proc: subprocess.Popen[str], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all((marks / f"rank{r}.losses").is_file() for r in (0, 1)) and min(
            max(_losses(marks, r), default=0) for r in (0, 1)
        ) >= step:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before step {step}:\n{proc.communicate()[0][-4000:]}")
        time.sleep(0.2)
    pytest.fail(f"the run did not reach step {step} within {timeout:.0f} s")


def _wait_all_gone(pids: list[int], proc: subprocess.Popen[str], timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        proc.poll()
        if all(gone(p) for p in pids):
            return time.monotonic() - start
        time.sleep(0.1)
    return float("inf")


def _cleanup(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="module", params=STRATEGIES)
def strategy(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def uninterrupted(strategy: str, tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    tmp = tmp_path_factory.mktemp("whole")
    proc, marks = _start(tmp, "whole", max_steps=30, sleep_s=0.0, strategy=strategy)
    try:
        out = proc.communicate(timeout=240)[0]
    finally:
        _cleanup(proc)
    assert proc.returncode == 0, out[-4000:]
    return _losses(marks)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["rank0", "all"])
def test_sigterm_checkpoints_exits_143_and_resumes(
    strategy: str, target: str, tmp_path: Path, uninterrupted: dict[int, float]
) -> None:
    proc, marks = _start(tmp_path, "run", max_steps=200, sleep_s=0.3, strategy=strategy)
    try:
        _wait_for_step(marks, 5, proc)
        pids = [int((marks / f"rank{r}.pid").read_text()) for r in (0, 1)]
        assert pids[0] == proc.pid
        for pid in pids if target == "all" else pids[:1]:
            os.kill(pid, signal.SIGTERM)
        took = _wait_all_gone(pids, proc, timeout=30.0)
        out = proc.communicate(timeout=10)[0]
    finally:
        _cleanup(proc)
    assert took <= 30.0, f"ranks still running 30 s after SIGTERM:\n{out[-4000:]}"
    assert proc.returncode == exit_status(signal.SIGTERM) == 143, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    ckpt = tmp_path / "run-root" / "preempted" / "preempted.ckpt"
    assert ckpt.is_file(), out[-4000:]
    for rank in (0, 1):
        assert f"rank {rank}: SIGTERM received" in out, out[-4000:]
    step = int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"])
    before = _losses(marks)
    assert max(before) == step  # the checkpoint is the last completed step
    if target == "all":
        return  # the resumed trajectory is checked once, after SIGTERM to rank 0

    # resume to step 30 and compare with the uninterrupted run; the all-reduce is the same, so the same bits
    resumed_proc, resumed_marks = _start(tmp_path, "resumed", max_steps=30, sleep_s=0.0, ckpt=ckpt, strategy=strategy)
    try:
        out = resumed_proc.communicate(timeout=240)[0]
    finally:
        _cleanup(resumed_proc)
    assert resumed_proc.returncode == 0, out[-4000:]
    resumed = _losses(resumed_marks)
    assert sorted(resumed) == list(range(step + 1, 31))
    for s in range(1, step + 1):
        assert abs(before[s] - uninterrupted[s]) <= 1e-6
    # interlocking reports a step's loss one step late (0 at a run's first step): compare from the second record
    compared = [s for s in resumed if strategy != "interlocking" or s > step + 1]
    worst = max(abs(resumed[s] - uninterrupted[s]) for s in compared)
    assert worst <= 1e-6, f"largest loss difference after resuming {worst:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("dead", [1, 0])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_kill_9_names_the_dead_rank(strategy: str, dead: int, tmp_path: Path) -> None:
    proc, marks = _start(tmp_path, "run", max_steps=200, sleep_s=0.3, strategy=strategy)
    try:
        _wait_for_step(marks, 3, proc)
        pids = [int((marks / f"rank{r}.pid").read_text()) for r in (0, 1)]
        os.kill(pids[dead], signal.SIGKILL)
        took = _wait_all_gone(pids, proc, timeout=30.0)
        out = proc.communicate(timeout=30)[0]  # rank 1's output comes through the launcher's pipe too
    finally:
        _cleanup(proc)
    survivor = 1 - dead
    assert took <= 10.0, f"rank {survivor} took {took:.1f} s to exit"
    if dead == 1:
        assert proc.returncode == 1
    assert f"rank {survivor} lost its peers: rank {dead} (pid {pids[dead]}" in out and "is dead" in out, out[-4000:]
    # one error naming the rank ends the survivor's output, not gloo's "Connection closed by peer"
    last_error = [line for line in out.splitlines() if "Error" in line or "PeerLost" in line][-1]
    assert last_error.startswith("lightning_parallel.peers.PeerLost: "), out[-4000:]


# ---- without processes -----------------------------------------------------------------------------------


def test_signal_flag_only_notes_and_forwards() -> None:
    forwarded: list[int] = []
    flag = SignalFlag((signal.SIGUSR2,), forward=forwarded.append)
    before = signal.getsignal(signal.SIGUSR2)
    assert flag.install()
    try:
        assert flag.agreed() is None
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.05)
        assert flag.agreed() == signal.SIGUSR2
        assert forwarded == [signal.SIGUSR2]  # forwarded once
    finally:
        flag.uninstall()
    assert signal.getsignal(signal.SIGUSR2) == before


def test_peer_table_names_a_dead_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    host = "this-host"
    table = PeerTable(rank=0, hosts=[host, host, "other"], pids=[os.getpid(), child.pid, 1])
    assert table.dead_ranks() == [1]
    text = table.describe()
    assert f"rank 1 (pid {child.pid} on {host}) is dead" in text and "other hosts (2)" in text


def test_communication_errors_are_recognised() -> None:
    assert is_communication_error(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [::1]:1"))
    assert not is_communication_error(ValueError("batch_size=0 must be >= 1."))


def test_preemption_checkpoint_validates_its_arguments() -> None:
    with pytest.raises(TypeError, match=r"signals='SIGTERM' must be a list"):
        PreemptionCheckpoint(signals="SIGTERM")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"lists 'SIGTERMX', not a signal name"):
        PreemptionCheckpoint(signals=["SIGTERMX"])
    with pytest.raises(ValueError, match=r"filename='a/b.ckpt' must be a plain file name"):
        PreemptionCheckpoint(filename="a/b.ckpt")
