"""Stage-local weights: layout-independent materialisation, freeing, tied parameters and their gradients."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_parallel.models import GPTLanguageModel, MLPClassifier, ResNetClassifier
from lightning_parallel.pipeline.partition import stage_slices
from lightning_parallel.pipeline.stage_local import (
    free_blocks,
    materialize_blocks,
    materialized_bytes,
    sum_tied_gradients,
    tied_parameters,
)
from tests.helpers.distributed import run_distributed

GPT = {"vocab_size": 32, "block_size": 8, "n_layer": 4, "n_head": 2, "n_embd": 16}


def _meta(factory: type[pl.LightningModule], **kwargs: object) -> pl.LightningModule:
    with torch.device("meta"):
        return factory(**kwargs)


def _state(blocks: list[nn.Module], indices: range) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v for i in indices for k, v in blocks[i].state_dict().items()}


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("sizes", [[6], [2, 2, 2], [1, 4, 1], [3, 1, 1, 1]])
def test_each_stage_materialises_the_one_device_weights(sizes: list[int], tie: bool) -> None:
    reference = GPTLanguageModel(**GPT, init_seed=11, tie_weights=tie)
    ref_blocks = list(reference.pipeline_blocks())
    for block_slice in stage_slices(sizes):
        model = _meta(GPTLanguageModel, **GPT, init_seed=11, tie_weights=tie)
        blocks = list(model.pipeline_blocks())
        held = range(block_slice.start, block_slice.stop)
        materialize_blocks(model, blocks, held)
        torch.testing.assert_close(_state(blocks, held), _state(ref_blocks, held), rtol=0, atol=0)
        others = [i for i in range(len(blocks)) if i not in held]
        shared = {id(p) for i in held for p in blocks[i].parameters()}
        for i in others:
            assert all(p.device.type == "meta" for p in blocks[i].parameters() if id(p) not in shared)
        expected = sum(
            p.numel() * 4 for p in {id(p): p for i in held for p in ref_blocks[i].parameters()}.values()
        )
        assert materialized_bytes(blocks) == expected


def test_chimera_like_holdings_share_the_tied_weight_once() -> None:
    model = _meta(GPTLanguageModel, **GPT, init_seed=5, tie_weights=True)
    blocks = list(model.pipeline_blocks())
    materialize_blocks(model, blocks, [0, 5])
    assert blocks[0].token.weight is blocks[5][1].weight
    reference = GPTLanguageModel(**GPT, init_seed=5, tie_weights=True)
    torch.testing.assert_close(blocks[5][1].weight, reference.blocks[0].token.weight, rtol=0, atol=0)


@pytest.mark.parametrize(
    "factory",
    [
        lambda **kw: MLPClassifier(hidden=(8, 8, 8), **kw),
        lambda **kw: ResNetClassifier(widths=(4, 8), norm="batch", **kw),
    ],
    ids=["mlp", "resnet"],
)
def test_example_models_materialise_layout_independently(factory: object) -> None:
    reference = factory(init_seed=3)  # type: ignore[operator]
    ref_blocks = list(reference.pipeline_blocks())
    with torch.device("meta"):
        model = factory(init_seed=3)  # type: ignore[operator]
    blocks = list(model.pipeline_blocks())
    held = range(1, len(blocks))
    materialize_blocks(model, blocks, held)
    torch.testing.assert_close(_state(blocks, held), _state(ref_blocks, held), rtol=0, atol=0)


def test_a_module_without_the_hook_is_reset_with_a_warning() -> None:
    with torch.device("meta"):
        blocks = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), nn.Linear(8, 8))
    with pytest.warns(UserWarning, match="no pipeline_init_weights.*depend on the layout"):
        materialize_blocks(blocks, list(blocks), [0, 1])
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in blocks.parameters())
    torch.testing.assert_close(blocks[0].norm1.weight, torch.ones(8))


def test_free_blocks_releases_what_a_rank_does_not_hold() -> None:
    model = GPTLanguageModel(**GPT, init_seed=1, tie_weights=True)
    blocks = list(model.pipeline_blocks())
    before = {k: v.clone() for k, v in blocks[5].state_dict().items()}
    whole = materialized_bytes(blocks)
    released = free_blocks(blocks, [4, 5])
    # The tied weight is used by the held head: it stays, and it is released from nowhere.
    assert blocks[5][1].weight.device.type == "cpu"
    assert materialized_bytes(blocks) == materialized_bytes(blocks[4:6])
    assert whole - released == materialized_bytes(blocks)
    torch.testing.assert_close(blocks[5].state_dict(), before)
    assert all(p.device.type == "meta" for p in blocks[1].parameters())


def test_tied_parameters_are_found_with_their_names_and_stages() -> None:
    model = GPTLanguageModel(**GPT, tie_weights=True)
    (tied,) = tied_parameters(model, list(model.pipeline_blocks()), [2, 2, 2])
    assert tied.name == "blocks.0.token.weight"
    assert tied.aliases == ("blocks.0.token.weight", "blocks.5.1.weight")
    assert (tied.blocks, tied.stages) == ((0, 5), (0, 2))
    untied = GPTLanguageModel(**GPT)
    assert tied_parameters(untied, list(untied.pipeline_blocks())) == []


def test_summed_tied_gradients_equal_the_one_device_gradient() -> None:
    torch.manual_seed(0)
    idx = torch.randint(0, 32, (3, 8))
    reference = GPTLanguageModel(**GPT, init_seed=2, tie_weights=True)
    F.cross_entropy(reference(idx).reshape(-1, 32), idx.reshape(-1)).backward()
    # Two "ranks", each a meta-built module materialising its own half.
    halves = []
    for held in (range(0, 3), range(3, 6)):
        model = _meta(GPTLanguageModel, **GPT, init_seed=2, tie_weights=True)
        blocks = list(model.pipeline_blocks())
        materialize_blocks(model, blocks, held)
        halves.append(nn.Sequential(*blocks[held.start : held.stop]))
    middle = halves[0](idx).detach().requires_grad_()
    F.cross_entropy(halves[1](middle).reshape(-1, 32), idx.reshape(-1)).backward()
    halves[0](idx).backward(middle.grad)
    copies = [halves[0][0].token.weight, halves[1][-1][1].weight]
    assert copies[0] is not copies[1]
    sum_tied_gradients(copies)
    for copy in copies:
        torch.testing.assert_close(copy.grad, reference.blocks[0].token.weight.grad)
    torch.testing.assert_close(halves[0][1].ln1.weight.grad, reference.blocks[1].ln1.weight.grad)


def _sum_over_ranks(rank: int, world_size: int) -> list[torch.Tensor]:
    copies = [nn.Parameter(torch.zeros(3)) for _ in range(rank + 1)]
    for i, copy in enumerate(copies):
        copy.grad = torch.full((3,), float(10 * rank + i))
    sum_tied_gradients(copies)
    return [copy.grad for copy in copies]


def test_tied_gradients_are_summed_across_ranks() -> None:
    results = run_distributed(_sum_over_ranks, 2, timeout=60)
    expected = torch.full((3,), 0.0 + 10 + 11)
    for grads in results:
        for grad in grads:
            torch.testing.assert_close(grad, expected)


def test_sum_tied_gradients_needs_a_copy() -> None:
    with pytest.raises(ValueError, match="copies is empty"):
        sum_tied_gradients([])
