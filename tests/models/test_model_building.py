"""Example models: seeded per-block initial weights, tied GPT weights, building in ``configure_model``."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_parallel.models import GPTLanguageModel, MLPClassifier
from lightning_parallel.models.base import block_seed

GPT = {"vocab_size": 16, "block_size": 8, "n_layer": 2, "n_head": 2, "n_embd": 8}


def _tokens(n: int = 16) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 16, (n, 8), generator=g)
    return TensorDataset(idx, idx.roll(-1, dims=1))


def _trainer(tmp_path: Path, **kwargs: object) -> pl.Trainer:
    options: dict = {"max_steps": 2, **kwargs}
    return pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path), **options,
    )


def test_the_same_seed_gives_the_same_weights_and_leaves_the_random_stream_alone() -> None:
    pl.seed_everything(4)
    a = GPTLanguageModel(**GPT)
    after_a = torch.rand(3)
    pl.seed_everything(4)
    b = GPTLanguageModel(**GPT)
    torch.testing.assert_close(a.state_dict(), b.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(torch.rand(3), after_a)  # building consumed one draw, not one per layer
    c = GPTLanguageModel(**GPT, init_seed=a.init_seed + 1)
    assert not torch.equal(a.blocks[1].attn.qkv.weight, c.blocks[1].attn.qkv.weight)


def test_a_block_depends_on_its_index_and_the_seed_only() -> None:
    model = GPTLanguageModel(**{**GPT, "n_layer": 3}, init_seed=9)
    blocks = list(model.pipeline_blocks())
    copy = {k: v.clone() for k, v in blocks[2].state_dict().items()}
    torch.manual_seed(123)  # the caller's stream does not matter
    with torch.no_grad():
        for p in blocks[2].parameters():
            p.fill_(7.0)
    model.pipeline_init_weights(2, blocks[2])
    torch.testing.assert_close(blocks[2].state_dict(), copy, rtol=0, atol=0)
    # Blocks 1 and 2 have the same shapes but their own streams.
    assert not torch.equal(blocks[1].attn.qkv.weight, blocks[2].attn.qkv.weight)
    assert len({block_seed(9, i) for i in range(1000)}) == 1000


def test_gpt_init_statistics() -> None:
    model = GPTLanguageModel(**{**GPT, "n_embd": 64}, init_seed=0)
    weight = model.blocks[1].mlp[0].weight
    assert abs(float(weight.detach().std()) - 0.02) < 0.002
    assert torch.count_nonzero(model.blocks[1].mlp[0].bias) == 0
    torch.testing.assert_close(model.blocks[1].ln1.weight, torch.ones(64))


def test_tied_weights_share_one_parameter_and_match_a_dense_reference(tmp_path: Path) -> None:
    tied = GPTLanguageModel(**GPT, tie_weights=True, init_seed=0)
    untied = GPTLanguageModel(**GPT, init_seed=0)
    head = tied.blocks[-1][1]
    assert head.weight is tied.blocks[0].token.weight
    vocab, width = GPT["vocab_size"], GPT["n_embd"]
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters()) == vocab * width
    idx = torch.randint(0, vocab, (2, 8))
    hidden = idx
    for block in tied.blocks[:-1]:
        hidden = block(hidden)
    logits = tied.blocks[-1][0](hidden) @ tied.blocks[0].token.weight.T + head.bias
    torch.testing.assert_close(tied(idx), logits)
    _trainer(tmp_path, enable_checkpointing=False).fit(tied, DataLoader(_tokens(), batch_size=4))
    assert tied.blocks[-1][1].weight is tied.blocks[0].token.weight


def test_building_in_configure_model(tmp_path: Path) -> None:
    model = GPTLanguageModel(**GPT, build_in_configure_model=True, init_seed=2)
    assert "blocks" not in model._modules
    with torch.device("meta"):
        model.configure_model()
    assert all(p.device.type == "meta" for p in model.parameters())

    model = GPTLanguageModel(**GPT, build_in_configure_model=True, init_seed=2)
    trainer = _trainer(tmp_path, max_steps=0)
    trainer.fit(model, DataLoader(_tokens(), batch_size=4))
    eager = GPTLanguageModel(**GPT, init_seed=2)
    torch.testing.assert_close(model.state_dict(), eager.state_dict(), rtol=0, atol=0)
    model.configure_model()  # idempotent
    torch.testing.assert_close(model.state_dict(), eager.state_dict(), rtol=0, atol=0)

    _trainer(tmp_path).fit(model, DataLoader(_tokens(), batch_size=4))
    path = tmp_path / "deferred.ckpt"
    trainer = _trainer(tmp_path)
    trainer.fit(model, DataLoader(_tokens(), batch_size=4))
    trainer.save_checkpoint(path)
    loaded = GPTLanguageModel.load_from_checkpoint(path)
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())
    idx = torch.randint(0, 16, (2, 8))
    torch.testing.assert_close(F.softmax(loaded(idx), -1), F.softmax(model(idx), -1))


def test_mlp_builds_in_configure_model_too() -> None:
    model = MLPClassifier(hidden=(8,), build_in_configure_model=True, init_seed=1)
    assert "blocks" not in model._modules
    model.configure_model()
    torch.testing.assert_close(model.state_dict(), MLPClassifier(hidden=(8,), init_seed=1).state_dict())


@pytest.mark.parametrize("tie", [False, True])
def test_tied_gpt_has_the_expected_blocks(tie: bool) -> None:
    model = GPTLanguageModel(**GPT, tie_weights=tie)
    assert len(model.pipeline_blocks()) == GPT["n_layer"] + 2
