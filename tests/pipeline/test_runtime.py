"""The runtime against single-process full-batch training, on gloo CPU processes."""

from __future__ import annotations

import pickle
import time

import pytest
import torch
import torch.multiprocessing as mp

from tests.helpers.distributed import _worker, free_port, run_distributed
from tests.pipeline import _runtime_workers as w

KINDS = ("gpipe", "1f1b", "chimera", "chimera-zb")


def _check(results: list, stages: int, batch: int) -> None:
    for case_index in range(len(results[0])):
        kind, model, _, losses, _ = results[0][case_index]
        expected = w.reference(model, stages, batch)
        seen = 0
        for rank_results in results:
            _, _, states, rank_losses, _ = rank_results[case_index]
            assert rank_losses == pytest.approx(losses, abs=1e-6)
            for (_, stage), state in states.items():
                for name, value in state.items():
                    torch.testing.assert_close(
                        torch.from_numpy(value),
                        expected[stage][name],
                        atol=1e-5,
                        rtol=0,
                        msg=f"{kind} {model} stage {stage} {name}",
                    )
                seen += 1
        replicas = 2 if kind.startswith("chimera") else 1
        assert seen == stages * replicas


def _check_forward(results: list, stages: int, batch: int, n: int) -> None:
    for case_index in range(len(results[0])):
        _, model, *_ = results[0][case_index]
        full = torch.nn.Sequential(*w.make_blocks(model, stages))
        x, _ = w.make_batches(model, batch)[0]
        # forward_only ran after the three updates: compare against the updated reference
        for block, state in zip(full, w.reference(model, stages, batch)):
            block.load_state_dict(state)
        with torch.no_grad():
            expected = full(x).chunk(n)
        outs = {m: o for rank_results in results for m, o in rank_results[case_index][4]}
        assert sorted(outs) == list(range(n))
        for m, o in outs.items():
            torch.testing.assert_close(torch.from_numpy(o), expected[m], atol=1e-5, rtol=0)


def test_two_stages_every_schedule_matches_single_process() -> None:
    cases = [(kind, model, 4) for kind in KINDS for model in ("mlp", "transformer")]
    results = run_distributed(w.train_worker, 2, cases, 8, timeout=120.0)
    _check(results, 2, 8)
    _check_forward(results, 2, 8, 4)


def test_four_stages_every_schedule_matches_single_process() -> None:
    cases = [(kind, "mlp", 4) for kind in KINDS] + [
        ("chimera", "transformer", 8),
        ("chimera-zb", "transformer", 4),
    ]
    results = run_distributed(w.train_worker, 4, cases, 8, timeout=180.0)
    _check(results, 4, 8)


def test_stalled_peer_raises_within_timeout() -> None:
    start = time.monotonic()
    results = run_distributed(w.dying_worker, 2, "stall", timeout=60.0)
    assert "gave up" in results[0] and "global rank 1" in results[0]
    assert time.monotonic() - start < 45.0


def test_dead_peer_raises_instead_of_hanging() -> None:
    # run_distributed fails as soon as a worker dies, so collect rank 0's answer by hand
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, 2, port, w.dying_worker, ("exit",), results, 30.0), daemon=True)
        for r in range(2)
    ]
    for proc in procs:
        proc.start()
    try:
        rank, status, value = results.get(timeout=60.0)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
    assert (rank, status) == (0, "ok")
    value = pickle.loads(value)  # the worker sends its return value pickled (by value)
    assert "gave up" in value and "global rank 1" in value
