"""The one micro-batch splitter against torch.chunk/torch.tensor_split and the policy written in its docstring."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch

from lightning_parallel.pipeline.micro_batches import batch_size, split_micro_batches


@pytest.mark.parametrize(("size", "chunks"), [(8, 1), (8, 2), (8, 4), (12, 3), (7, 7)])
def test_even_split_matches_torch_chunk(size: int, chunks: int) -> None:
    x, y = torch.randn(size, 3), torch.arange(size)
    parts = split_micro_batches((x, y), chunks)
    assert len(parts) == chunks
    for (px, py), rx, ry in zip(parts, torch.chunk(x, chunks), torch.chunk(y, chunks)):
        assert torch.equal(px, rx) and torch.equal(py, ry)


@pytest.mark.parametrize(("size", "chunks"), [(10, 4), (32, 3), (20, 3), (5, 4), (9, 2)])
def test_uneven_split_sizes_differ_by_at_most_one_and_cover_the_batch(size: int, chunks: int) -> None:
    y = torch.arange(size)
    parts = split_micro_batches(y, chunks)
    sizes = [len(p) for p in parts]
    assert len(parts) == chunks and max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert torch.equal(torch.cat(parts), y)
    # the bounds are round(i * size / chunks), written out independently
    assert sizes == [round((i + 1) * size / chunks) - round(i * size / chunks) for i in range(chunks)]


def test_batch_smaller_than_micro_batches_is_refused() -> None:
    with pytest.raises(ValueError, match=r"A batch of 2 examples cannot feed micro_batches=3"):
        split_micro_batches((torch.zeros(2, 2), torch.zeros(2)), 3)
    with pytest.raises(ValueError, match=r"micro_batches=0 must be positive"):
        split_micro_batches(torch.zeros(4), 0)


def test_structure_is_kept_and_per_batch_values_are_repeated() -> None:
    Pair = namedtuple("Pair", ["x", "y"])
    batch = {"pair": Pair(torch.arange(6), torch.arange(6) * 2), "scale": 0.5, "name": "train", "x": [torch.ones(6)]}
    parts = split_micro_batches(batch, 2)
    assert isinstance(parts[0]["pair"], Pair) and isinstance(parts[0]["x"], list)
    assert torch.equal(parts[1]["pair"].y, torch.tensor([6, 8, 10]))
    assert [p["scale"] for p in parts] == [0.5, 0.5] and [p["name"] for p in parts] == ["train", "train"]
    assert batch_size(batch) == 6


def test_per_example_non_tensor_values_are_split_like_tensors() -> None:
    ids = [f"id{i}" for i in range(10)]
    parts = split_micro_batches((torch.arange(10), ids, tuple(range(10))), 4)
    assert [p[1] for p in parts] == [ids[0:2], ids[2:5], ids[5:8], ids[8:10]]
    assert all(p[1] == [f"id{int(i)}" for i in p[0]] for p in parts)
    assert [list(p[2]) for p in parts] == [[int(i) for i in p[0]] for p in parts]


def test_non_tensor_list_of_another_length_is_refused() -> None:
    with pytest.raises(ValueError, match=r"list of 3 non-tensor values but has 8 examples"):
        split_micro_batches((torch.zeros(8), ["a", "b", "c"]), 2)


def test_batch_without_tensor_is_refused() -> None:
    with pytest.raises(TypeError, match=r"Found no tensor in a batch of type list"):
        split_micro_batches(["a", "b"], 2)
