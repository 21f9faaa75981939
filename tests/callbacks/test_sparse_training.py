"""SparseTraining under the Trainer: same as the pure engine, exact resume, plain-module loading, errors."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_parallel.callbacks import DPKFAC, SparseTraining
from lightning_parallel.sparse import SparseEngine, SparseLinear


class SparseNet(pl.LightningModule):
    def __init__(self, lr: float = 0.01, conv: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        layers: list[nn.Module] = [nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 48)] if conv else [
            nn.Flatten(), nn.Linear(64, 48)]
        self.net = nn.Sequential(*layers, nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 10))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)


def _loader(batches: int = 4) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16 * batches, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (16 * batches,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=16)


def _trainer(tmp_path: Path, callbacks: list[pl.Callback], max_steps: int, **kwargs: Any) -> pl.Trainer:
    kwargs.setdefault("max_epochs", 1)
    kwargs.setdefault("devices", 1)
    return pl.Trainer(
        max_steps=max_steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
        enable_checkpointing=False, **kwargs,
    )


def _fit(
    tmp_path: Path, model: SparseNet, callback: SparseTraining, max_steps: int, ckpt: str | None = None
) -> pl.Trainer:
    # whole epochs (4 steps each): Lightning resumes a checkpoint taken at the end of an epoch exactly
    trainer = _trainer(tmp_path, [callback], max_steps=-1, max_epochs=max(1, max_steps // 4))
    trainer.fit(model, _loader(), ckpt_path=ckpt)
    return trainer


def test_masked_training_equals_the_pure_engine(tmp_path: Path) -> None:
    model = SparseNet()
    callback = SparseTraining("rigl", sparsity=0.8, update_interval=3, stop_at=10, seed=1)
    _fit(tmp_path, model, callback, max_steps=12)
    reference = SparseNet()
    engine = SparseEngine(reference, method="rigl", sparsity=0.8, seed=1)
    opt = reference.configure_optimizers()
    for step, (x, y) in enumerate(list(_loader()) * 3):
        opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        if engine.is_update_step(step, update_interval=3, stop_at=10):
            engine.update(step, stop_at=10, optimizer=opt)
        engine.mask_gradients()
        opt.step()
        engine.apply_masks()
    assert callback.engine is not None
    for name, mask in engine.masks.items():
        assert torch.equal(callback.engine.masks[name], mask), name
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    assert callback.engine.nnz() == engine.nnz()


@pytest.mark.parametrize(("method", "execution"), [("set", "masked"), ("rigl", "masked"), ("rigl", "sparse")])
def test_resume_is_exact_and_the_checkpoint_loads_into_a_plain_module(
    tmp_path: Path, method: str, execution: str
) -> None:
    options: dict[str, Any] = dict(sparsity=0.8, update_interval=3, stop_at=14, execution=execution, seed=2)
    conv = execution == "masked"
    straight = SparseNet(conv=conv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fit(tmp_path / "a", straight, SparseTraining(method, **options), max_steps=16)
        first = SparseNet(conv=conv)
        trainer = _fit(tmp_path / "b", first, SparseTraining(method, **options), max_steps=8)
        path = tmp_path / "half.ckpt"
        trainer.save_checkpoint(path)
        resumed = SparseNet(conv=conv)
        callback = SparseTraining(method, **options)
        _fit(tmp_path / "c", resumed, callback, max_steps=16, ckpt=str(path))
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    plain = SparseNet.load_from_checkpoint(path, conv=conv)  # the dense-with-zeros model
    assert all(type(m) is not SparseLinear for m in plain.modules())
    state = torch.load(path, weights_only=False)["callbacks"]
    saved = next(v for k, v in state.items() if k.startswith("SparseTraining"))
    for name, mask in saved["masks"].items():
        weight = plain.get_submodule(name).weight
        assert not weight[~mask].any()
    for name, pattern in saved["patterns"].items():
        weight = plain.get_submodule(name).weight.detach().flatten()
        assert torch.equal(weight[pattern["indices"]], pattern["values"])
        assert int((weight != 0).sum()) <= pattern["indices"].numel()
    if execution == "sparse":
        assert isinstance(resumed.net[1], SparseLinear)
        opt_params = sum(p.numel() for p in resumed.parameters())
        assert opt_params < sum(p.numel() for p in plain.parameters()) * 0.5


def test_warns_once_with_counts_about_uncovered_layers(tmp_path: Path) -> None:
    class WithEmbedding(SparseNet):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(5, 3)

    with pytest.warns(UserWarning, match=r"leaves 1 weighted module\(s\) dense: Embedding x1"):
        _fit(tmp_path, WithEmbedding(), SparseTraining(sparsity=0.5), max_steps=1)
    with pytest.warns(UserWarning, match=r"runs 3 nn.Linear layer\(s\) sparse and keeps 1 other layer\(s\) masked"):
        _fit(tmp_path, SparseNet(), SparseTraining(sparsity=0.5, distribution="uniform", execution="sparse"), max_steps=1)


def test_bad_input_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"`sparsity=1.2` must be in \[0, 1\)"):
        SparseTraining(sparsity=1.2)
    with pytest.raises(ValueError, match=r"`method='prune'` is not one of \['rigl', 'set', 'static'\]"):
        SparseTraining("prune")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`execution='csr'` is not one of \['masked', 'sparse'\]"):
        SparseTraining(execution="csr")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`update_interval=0` must be >= 1"):
        SparseTraining(update_interval=0)
    with pytest.raises(ValueError, match=r"`stop_at=0` must be > 0"):
        SparseTraining(stop_at=0)
    with pytest.raises(ValueError, match=r"`checkpoint_weights='csr'` is not one of"):
        SparseTraining(checkpoint_weights="csr")  # type: ignore[arg-type]

    class ConvOnly(SparseNet):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(1, 10, 8), nn.Flatten())

    with pytest.raises(ValueError, match=r"`execution='sparse'` runs plain nn.Linear layers only"):
        _fit(tmp_path, ConvOnly(), SparseTraining(sparsity=0.5, execution="sparse"), max_steps=1)
    trainer = _trainer(tmp_path, [SparseTraining(), DPKFAC()], max_steps=1)
    with pytest.raises(ValueError, match=r"DPKFAC is listed after SparseTraining"):
        trainer.fit(SparseNet(), _loader())


@pytest.mark.parametrize("execution", ["masked", "sparse"])
def test_neuron_pruning_shrinks_layers_and_resumes_exactly(tmp_path: Path, execution: str) -> None:
    from lightning_parallel.sparse.export import densify_state_dict, resize_to_state_dict

    options: dict[str, Any] = dict(
        sparsity=0.5, distribution="uniform", update_interval=3, stop_at=14, execution=execution,
        prune_neurons=0.25, prune_neurons_every=1, prune_neurons_after=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        straight = SparseNet(conv=False)
        callback = SparseTraining("set", **options)
        _fit(tmp_path / "a", straight, callback, max_steps=16)
        trainer = _fit(tmp_path / "b", SparseNet(conv=False), SparseTraining("set", **options), max_steps=8)
        path = tmp_path / "half.ckpt"
        trainer.save_checkpoint(path)
        resumed = SparseNet(conv=False)
        _fit(tmp_path / "c", resumed, SparseTraining("set", **options), max_steps=16, ckpt=str(path))
    # epochs 2, 3, 4 end with a pruning of a quarter of each hidden layer: 48 -> 36 -> 27 -> 20
    assert straight.net[1].out_features == 20 and straight.net[3].in_features == 20
    assert straight.net[5].in_features == 20
    assert callback.neurons_removed == {"net.1": 28, "net.3": 28}
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    plain = SparseNet(conv=False)
    state = densify_state_dict(torch.load(path, weights_only=False)["state_dict"])
    resize_to_state_dict(plain, state)
    plain.load_state_dict(state)
    assert plain.net[1].out_features == 36


def test_unsupported_strategy_and_neuron_pruning_under_ddp_are_refused() -> None:
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy

    from lightning_parallel.strategies import ChimeraStrategy, InterlockingBackpropStrategy

    interlocking = SimpleNamespace(
        strategy=InterlockingBackpropStrategy.__new__(InterlockingBackpropStrategy), world_size=4, callbacks=[]
    )
    with pytest.raises(ValueError, match=r"runs on one device, under DDP or under ChimeraStrategy; got Interlocking"):
        SparseTraining().setup(interlocking, SparseNet(), "fit")  # type: ignore[arg-type]
    chimera = SimpleNamespace(strategy=ChimeraStrategy.__new__(ChimeraStrategy), world_size=4, callbacks=[])
    local = ChimeraStrategy.__new__(ChimeraStrategy)
    local.stage_local = True
    with pytest.raises(ValueError, match=r"execution='sparse'\) is not supported under ChimeraStrategy\(stage_local"):
        SparseTraining(execution="sparse").setup(  # type: ignore[arg-type]
            SimpleNamespace(strategy=local, world_size=4, callbacks=[]), SparseNet(), "fit"
        )
    with pytest.raises(ValueError, match=r"SparseTraining\('set', execution='sparse'\) is not supported under Chimera"):
        SparseTraining("set", execution="sparse").setup(chimera, SparseNet(), "fit")  # type: ignore[arg-type]
    ddp = SimpleNamespace(strategy=DDPStrategy(), world_size=2, callbacks=[])
    with pytest.raises(ValueError, match=r"`prune_neurons=0.2` changes layer shapes, which DDP cannot follow"):
        SparseTraining(prune_neurons=0.2).setup(ddp, SparseNet(), "fit")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`prune_neurons=1.0` must be in \[0, 1\)"):
        SparseTraining(prune_neurons=1.0)
    with pytest.raises(ValueError, match=r"`prune_neurons_every=0` must be >= 1"):
        SparseTraining(prune_neurons_every=0)
