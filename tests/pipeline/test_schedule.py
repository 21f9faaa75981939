"""Schedules and the cost model against the analytic figures of the GPipe, 1F1B and Chimera papers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_parallel.pipeline.schedule import (
    Action,
    ActionKind,
    Schedule,
    build_schedule,
    validate_schedule,
)
from lightning_parallel.pipeline.simulate import simulate

POINTS = [(2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16)]


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
@pytest.mark.parametrize(("d", "n"), [(1, 3), (3, 5), *POINTS])
@pytest.mark.parametrize(("f", "b"), [(1.0, 1.0), (1.0, 2.0), (0.5, 1.5)])
def test_synchronous_bubble_ratio(kind: str, d: int, n: int, f: float, b: float) -> None:
    result = simulate(build_schedule(kind, d, n), forward=f, backward=b)
    assert result.bubble_ratio == pytest.approx((d - 1) / (n + d - 1))
    assert result.makespan == pytest.approx((n + d - 1) * (f + b))


@pytest.mark.parametrize("d", [2, 4, 6, 8])
def test_chimera_bubble_ratio_with_equal_forward_and_backward(d: int) -> None:
    result = simulate(build_schedule("chimera", d, d), forward=1.0, backward=1.0)
    assert result.bubble_ratio == pytest.approx((d - 2) / (2 * d + d - 2))


def test_chimera_paper_figures() -> None:
    assert simulate(build_schedule("chimera", 4, 4), backward=1.0).bubble_ratio == pytest.approx(0.20)
    assert simulate(build_schedule("1f1b", 4, 4), backward=1.0).bubble_ratio == pytest.approx(3 / 7)
    assert simulate(build_schedule("chimera", 8, 8), backward=1.0).bubble_ratio == pytest.approx(6 / 22)


@pytest.mark.parametrize(("d", "makespan", "efficiency"), [(4, 16.0, 0.75), (8, 36.0, 2 / 3)])
def test_chimera_with_backward_twice_forward(d: int, makespan: float, efficiency: float) -> None:
    result = simulate(build_schedule("chimera", d, d), forward=1.0, backward=2.0)
    assert result.makespan == makespan
    assert result.efficiency == pytest.approx(efficiency)
    one_f_one_b = simulate(build_schedule("1f1b", d, d), forward=1.0, backward=2.0)
    assert one_f_one_b.efficiency == pytest.approx(d / (2 * d - 1))


@pytest.mark.parametrize(
    ("d", "n", "efficiency"), [(4, 4, 0.923), (4, 8, 0.960), (8, 8, 0.889), (8, 16, 0.941)]
)
def test_chimera_zero_bubble_reaches_the_lower_bound(d: int, n: int, efficiency: float) -> None:
    schedule = build_schedule("chimera-zb", d, n)
    result = simulate(schedule, forward=1.0, backward_input=1.0, backward_weight=1.0)
    assert result.makespan == 3 * n + d / 2 - 1
    assert result.efficiency == pytest.approx(efficiency, abs=5e-4)
    assert max(result.peak_activations) <= d


@pytest.mark.parametrize(("d", "n"), POINTS)
def test_activation_memory_bounds(d: int, n: int) -> None:
    chimera = simulate(build_schedule("chimera", d, n)).peak_activations
    assert all(d // 2 + 1 <= peak <= d for peak in chimera)
    assert chimera == chimera[::-1]  # the two directions mirror each other
    one_f_one_b = simulate(build_schedule("1f1b", d, n)).peak_activations
    assert one_f_one_b[0] == min(d, n)
    assert one_f_one_b == sorted(one_f_one_b, reverse=True)
    assert simulate(build_schedule("gpipe", d, n)).peak_activations == [n] * d


def test_forward_doubling_cuts_bubbles_of_direct_concatenation() -> None:
    doubled = simulate(build_schedule("chimera", 4, 8, forward_doubling=True))
    concatenated = simulate(build_schedule("chimera", 4, 8))
    assert doubled.makespan < concatenated.makespan
    assert concatenated.makespan == 2 * simulate(build_schedule("chimera", 4, 4)).makespan


@pytest.mark.parametrize("kind", ["chimera", "chimera-zb"])
def test_chimera_structure(kind: str) -> None:
    schedule = build_schedule(kind, 4, 8)
    assert [schedule.replica_of(m) for m in range(8)] == [0, 1] * 4
    assert schedule.stages_of(0) == [(0, 0), (1, 3)]
    assert schedule.stages_of(2) == [(0, 2), (1, 1)]
    for r in range(4):
        reduces = [a for a in schedule.actions[r] if a.kind is ActionKind.ALL_REDUCE]
        assert {(a.replica, a.stage) for a in reduces} == set(schedule.stages_of(r))
    # edge stages finish first: the all-reduce of rank 0's down stage 0 comes before its last action
    assert schedule.actions[0][-1].kind is ActionKind.ALL_REDUCE


def test_transfer_time_stretches_each_hand_off() -> None:
    schedule = build_schedule("gpipe", 4, 1)
    assert simulate(schedule, forward=1, backward=2, transfer=0.5).makespan == pytest.approx(12 + 6 * 0.5)


def test_per_stage_costs() -> None:
    schedule = build_schedule("gpipe", 2, 2)
    # the slow second stage dominates: F0 (1), then stage 1 runs 2 forwards (3 each) and 2 backwards (6 each)
    assert simulate(schedule, forward=[1, 3], backward=[2, 6]).makespan == pytest.approx(1 + 6 + 12 + 2)


def test_validator_rejects_a_deadlock() -> None:
    in_order = (
        (Action(ActionKind.FORWARD, 0, 0, 0), Action(ActionKind.BACKWARD, 0, 0, 0)),
        (Action(ActionKind.FORWARD, 0, 1, 0), Action(ActionKind.BACKWARD, 0, 1, 0)),
    )
    validate_schedule(Schedule("gpipe", 2, 1, 1, in_order))
    # rank 0 waits for a gradient before sending the activation that would produce it
    crossed = (tuple(reversed(in_order[0])), in_order[1])
    with pytest.raises(ValueError, match="deadlocks"):
        validate_schedule(Schedule("gpipe", 2, 1, 1, crossed))


def test_validator_rejects_incomplete_duplicate_and_misplaced_actions() -> None:
    good = build_schedule("gpipe", 2, 2)
    with pytest.raises(ValueError, match="incomplete"):
        validate_schedule(Schedule("gpipe", 2, 2, 1, (good.actions[0][:-1], good.actions[1])))
    with pytest.raises(ValueError, match="appears twice"):
        validate_schedule(
            Schedule("gpipe", 2, 2, 1, (good.actions[0] + good.actions[0][:1], good.actions[1]))
        )
    with pytest.raises(ValueError, match="lives on rank 1"):
        validate_schedule(Schedule("gpipe", 2, 2, 1, (good.actions[1], good.actions[0])))
    with pytest.raises(ValueError, match="expected stages=2"):
        validate_schedule(Schedule("gpipe", 2, 2, 1, good.actions[:1]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "pipedream", "stages": 4, "micro_batches": 4}, r"kind='pipedream'.*gpipe, 1f1b, chimera"),
        ({"kind": "chimera", "stages": 3, "micro_batches": 6}, r"even number of stages.*stages=3.*stages=4"),
        ({"kind": "chimera-zb", "stages": 1, "micro_batches": 2}, r"stages=1"),
        ({"kind": "chimera", "stages": 4, "micro_batches": 6}, r"multiple of stages = 4.*micro_batches=6"),
        ({"kind": "chimera-zb", "stages": 4, "micro_batches": 2}, r"micro_batches=2.*micro_batches=4"),
        (
            {"kind": "chimera", "stages": 4, "micro_batches": 4, "forward_doubling": True},
            r"2 \* stages \(forward doubling\) = 8",
        ),
        (
            {"kind": "1f1b", "stages": 4, "micro_batches": 4, "forward_doubling": True},
            r"forward_doubling=True",
        ),
        ({"kind": "gpipe", "stages": 0, "micro_batches": 4}, r"stages=0 must be a positive integer"),
        ({"kind": "gpipe", "stages": 2, "micro_batches": 0}, r"micro_batches=0 must be a positive integer"),
    ],
)
def test_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_schedule(**kwargs)


def test_bad_costs() -> None:
    schedule = build_schedule("gpipe", 2, 2)
    with pytest.raises(ValueError, match="forward has 3 per-stage costs; expected one per stage"):
        simulate(schedule, forward=[1, 1, 1])
    with pytest.raises(ValueError, match="transfer=-1"):
        simulate(schedule, transfer=-1)
    with pytest.raises(ValueError, match="backward=-2"):
        simulate(schedule, backward=-2)


@pytest.mark.parametrize(("d", "n", "makespan"), [(4, 4, 13), (4, 8, 26), (8, 8, 27), (8, 16, 51)])
def test_chimera_zero_bubble_for_a_first_stage_without_input_gradient(d: int, n: int, makespan: int) -> None:
    schedule = build_schedule("chimera-zb", d, n, first_stage_input_gradient=False)
    costs = {"backward_input": [0] + [1] * (d - 1), "backward_weight": [2] + [1] * (d - 1)}
    result = simulate(schedule, forward=1, **costs)
    assert result.makespan == makespan
    assert max(result.peak_activations) <= d
    # the textbook order loses to it when the first stage has no input gradient
    assert simulate(build_schedule("chimera-zb", d, n), forward=1, **costs).makespan >= makespan


@pytest.mark.parametrize("kind", ["gpipe", "1f1b", "chimera", "chimera-zb"])
@pytest.mark.parametrize(("d", "n"), [(2, 4), (4, 8), (8, 16)])
def test_every_stage_sends_in_micro_batch_order(kind: str, d: int, n: int) -> None:
    """Backends that match messages by order (NCCL) need each stage's forwards and backwards in order."""
    variants = [build_schedule(kind, d, n)]
    if kind == "chimera-zb":
        variants.append(build_schedule(kind, d, n, first_stage_input_gradient=False))
    if kind == "chimera":
        variants.append(build_schedule(kind, d, n, forward_doubling=True))
    for schedule in variants:
        for order in schedule.actions:
            for kinds in ({ActionKind.FORWARD}, {ActionKind.BACKWARD, ActionKind.BACKWARD_INPUT}):
                for replica, stage in schedule.stages_of(schedule.actions.index(order)):
                    mbs = [
                        a.micro_batch
                        for a in order
                        if a.kind in kinds and (a.replica, a.stage) == (replica, stage)
                    ]
                    assert mbs == sorted(mbs)


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["gpipe", "1f1b", "chimera", "chimera-zb"]),
    half_stages=st.integers(1, 4),
    units=st.integers(1, 3),
    forward=st.floats(0.1, 3.0),
    backward=st.floats(0.1, 3.0),
)
def test_any_schedule_is_valid_and_keeps_every_rank_equally_busy(
    kind: str, half_stages: int, units: int, forward: float, backward: float
) -> None:
    d = 2 * half_stages
    n = d * units
    schedule = build_schedule(kind, d, n)
    validate_schedule(schedule)
    result = simulate(schedule, forward=forward, backward=backward)
    assert result.busy == pytest.approx([n * (forward + backward)] * d)
    assert 0 < result.efficiency <= 1 + 1e-9
    if kind in ("gpipe", "1f1b"):
        assert result.makespan == pytest.approx((n + d - 1) * (forward + backward))
    assert all(1 <= peak <= n for peak in result.peak_activations)
