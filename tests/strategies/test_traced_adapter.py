"""Pipelining modules this project did not adapt by hand, split by tracing (``split_points=``/``adapter='traced'``).

Every run is compared with single-device training of the same module on the same global batches (5 steps,
the shuffled order a DistributedSampler(seed=0) gives): losses within 1e-5 relative. The default suite runs
one 2-process world (chimera and 1f1b, 2 stages, nn.TransformerEncoder and our GPT blocks, checkpoint back
into the plain module); the 4-process sweep (4 stages and 2 x 2 stages, chimera and 1f1b, three models
including a Hugging Face GPT-2) is marked slow.
"""

from __future__ import annotations

import math
import os
import warnings
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_parallel.models.gpt import Embedding, TransformerBlock
from lightning_parallel.pipeline.adapters.traced import TracedAdapter
from lightning_parallel.strategies.chimera import ChimeraStrategy
from tests.helpers.callbacks import LossRecorder
from tests.helpers.client_models import EncoderClassifier, token_data
from tests.helpers.distributed import free_port, run_distributed

GLOBAL_BATCH = 16
STEPS = 5
SEQ = 8
VOCAB = 32


# ----------------------------------------------------------------------------- client modules
class PlainGPT(pl.LightningModule):
    """Our GPT's pieces as a user would assemble them: one nn.Sequential, no pipeline hooks."""

    def __init__(self, layers: int = 4, sgd: bool = False) -> None:
        super().__init__()
        self.sgd = sgd
        head = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, VOCAB))
        self.model = nn.Sequential(
            Embedding(VOCAB, SEQ, 16, 0.0), *(TransformerBlock(16, 2, 0.0) for _ in range(layers)), head
        )

    def forward(self, idx: Tensor) -> Tensor:
        return self.model(idx)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        idx, targets = batch
        logits = self(idx)
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))

    def configure_optimizers(self) -> Any:
        if self.sgd:  # Adam turns the rounding noise of zero gradients (attention key biases) into steps
            return torch.optim.SGD(self.parameters(), lr=0.1)
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


class PlainHFGPT2(PlainGPT):
    """A small random Hugging Face GPT-2 (untied head: tied weights across stages are refused)."""

    def __init__(self, layers: int = 4) -> None:
        pl.LightningModule.__init__(self)
        self.sgd = False
        import transformers

        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=layers, n_head=2, tie_word_embeddings=False,
            use_cache=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
        self.model = transformers.GPT2LMHeadModel(config)  # type: ignore[assignment]

    def forward(self, idx: Tensor) -> Tensor:
        return self.model(idx).logits  # type: ignore[no-any-return]


def lm_data(size: int, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (size, SEQ + 1), generator=g)
    return TensorDataset(tokens[:, :-1], tokens[:, 1:])


MODELS: dict[str, Any] = {
    # name: (module factory, data, strategy options)
    "encoder": (lambda: EncoderClassifier(vocab=VOCAB), lambda: token_data(STEPS * GLOBAL_BATCH, vocab=VOCAB), {}),
    "gpt": (PlainGPT, lambda: lm_data(STEPS * GLOBAL_BATCH), {}),
    "hf_gpt2": (PlainHFGPT2, lambda: lm_data(STEPS * GLOBAL_BATCH), {"adapter": "traced:model"}),
}


def fit(name: str, strategy: Any, devices: int, batch: int, *, shuffled: bool = False) -> tuple[Any, list[float]]:
    factory, data_fn, _ = MODELS[name]
    torch.manual_seed(0)
    module = factory()
    recorder = LossRecorder()
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=STEPS, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[recorder],
    )
    data = data_fn()
    if shuffled:  # the order a shuffling DistributedSampler(seed=0) gives the replicas together
        data = Subset(data, torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist())
    trainer.fit(module, DataLoader(data, batch_size=batch))
    return module, recorder.losses


def pipelined(name: str, world: int, stages: int, schedule: str, split_points: Any = "auto") -> list[float]:
    options = dict(MODELS[name][2])
    if "adapter" not in options or split_points != "auto":  # adapter="traced:model" splits "auto" itself
        options["split_points"] = split_points
    strategy = ChimeraStrategy(stages, stages, schedule=schedule, **options)  # type: ignore[arg-type]
    return fit(name, strategy, world, GLOBAL_BATCH * stages // world)[1]


def assert_close(actual: list[float], expected: list[float], rel: float = 1e-5) -> None:
    assert len(actual) == len(expected) == STEPS, (actual, expected)
    for a, e in zip(actual, expected):
        assert math.isclose(a, e, rel_tol=rel), (actual, expected)


# ----------------------------------------------------------------------------- 2 processes (default suite)
def _two(rank: int, world: int, tmp: str) -> dict[str, Any]:
    warnings.filterwarnings("ignore")
    out: dict[str, Any] = {}
    module, out["encoder-chimera"] = fit(
        "encoder", ChimeraStrategy(2, 2, schedule="chimera", split_points=["encoder.layers.2"]), 2, GLOBAL_BATCH
    )
    path = os.path.join(tmp, "encoder.ckpt")
    module.trainer.save_checkpoint(path)
    out["path"] = path
    with torch.no_grad():
        out["probe"] = module(torch.arange(2 * SEQ).view(2, SEQ) % VOCAB).tolist()
    out["gpt-1f1b"] = pipelined("gpt", 2, 2, "1f1b")
    return out


@pytest.fixture(scope="module")
def two_process(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_distributed(_two, 2, str(tmp_path_factory.mktemp("traced")), timeout=400.0)


def reference(name: str) -> list[float]:
    return fit(name, "auto", 1, GLOBAL_BATCH, shuffled=True)[1]


def test_two_stages_match_single_device(two_process: list[dict[str, Any]]) -> None:
    assert_close(two_process[0]["encoder-chimera"], reference("encoder"))
    assert_close(two_process[0]["gpt-1f1b"], reference("gpt"))
    assert two_process[0]["gpt-1f1b"] == two_process[1]["gpt-1f1b"]  # every rank logs the pipeline's loss


def test_checkpoint_loads_into_the_plain_module(two_process: list[dict[str, Any]]) -> None:
    loaded = EncoderClassifier.load_from_checkpoint(two_process[0]["path"], vocab=VOCAB)
    with torch.no_grad():
        probe = loaded(torch.arange(2 * SEQ).view(2, SEQ) % VOCAB)
    assert torch.allclose(probe, torch.tensor(two_process[0]["probe"]), atol=1e-6)
    # ... and it is the trained module, not the initial one
    torch.manual_seed(0)
    initial = EncoderClassifier(vocab=VOCAB)
    with torch.no_grad():
        assert not torch.allclose(initial(torch.arange(2 * SEQ).view(2, SEQ) % VOCAB), probe, atol=1e-4)


# ----------------------------------------------------------------------------- 4 processes (slow)
SWEEP = [(stages, schedule) for stages in (4, 2) for schedule in ("chimera", "1f1b")]


def _four(rank: int, world: int, names: list[str]) -> dict[str, list[float]]:
    warnings.filterwarnings("ignore")
    return {f"{name}-D{stages}-{schedule}": pipelined(name, 4, stages, schedule) for name in names
            for stages, schedule in SWEEP}


@pytest.mark.slow
def test_four_processes_two_and_four_stages_match_single_device() -> None:
    names = ["encoder", "gpt"]
    try:
        import transformers  # noqa: F401

        names.append("hf_gpt2")
    except ModuleNotFoundError:
        pass
    results = run_distributed(_four, 4, names, timeout=1500.0)
    for name in names:
        expected = reference(name)
        for stages, schedule in SWEEP:
            key = f"{name}-D{stages}-{schedule}"
            assert_close(results[0][key], expected)
            assert all(r[key] == results[0][key] for r in results), key


# ----------------------------------------------------------------------------- no processes
def test_strategy_arguments_are_checked() -> None:
    with pytest.raises(TypeError, match=r"split_points='layers' must be 'auto' or a list of submodule names"):
        ChimeraStrategy(2, split_points="layers")
    with pytest.raises(ValueError, match=r"split_points=\['layers.2'\] splits the module by tracing; it cannot be combined"):
        ChimeraStrategy(2, split_points=["layers.2"], blocks="layers")
    with pytest.raises(ValueError, match=r"pre='embed' and post=None describe a sequential trunk"):
        ChimeraStrategy(2, adapter="traced", pre="embed")
    ChimeraStrategy(2, adapter="traced:model", loss="nll")  # loss= applies to the traced split too


def _adapter_for(module: nn.Module, stages: int, micro_batches: int, batch: Any, **options: Any) -> TracedAdapter:
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(num_stages=stages, num_micro_batches=micro_batches))  # type: ignore[assignment]
    adapter = TracedAdapter(**options)
    adapter.prepare(module, sample_batch=lambda: batch)
    return adapter


def test_adapter_traces_one_micro_batch_and_checks_the_stage_count() -> None:
    x, y = token_data(8, vocab=VOCAB).tensors
    module = EncoderClassifier(vocab=VOCAB)
    adapter = _adapter_for(module, 2, 4, (x, y))
    blocks = adapter.pipeline_blocks(module)
    assert len(blocks) == 2
    packed = adapter.pipeline_input(module, (x[:2], y[:2]))  # micro-batches of 8 / 4 = 2 examples
    out = blocks[1](blocks[0](packed))
    assert torch.allclose(out, module(x[:2]), atol=1e-6)
    loss = adapter.pipeline_loss(module, out, (x[:2], y[:2]))
    assert torch.allclose(loss, F.cross_entropy(module(x[:2]), y[:2]), atol=1e-6)
    local = EncoderClassifier(vocab=VOCAB)
    local_adapter = _adapter_for(local, 2, 1, (x, y))
    local._trainer.strategy.stage_local = True  # type: ignore[union-attr]
    with pytest.raises(ValueError, match=r"stage_local=True cannot be combined with a traced split"):
        local_adapter.pipeline_blocks(local)
    other = EncoderClassifier(vocab=VOCAB)
    wrong = _adapter_for(other, 3, 1, (x, y), split_points=["encoder.layers.2"])
    with pytest.raises(ValueError, match=r"cut EncoderClassifier into 2 stages but the strategy has stages=3"):
        wrong.pipeline_blocks(other)


class Branchy(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        if h.mean() > 0:
            h = torch.relu(h)
        return self.b(h)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_untraceable_module_fails_setup_naming_the_operation() -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, strategy=ChimeraStrategy(1, 1, schedule="1f1b", split_points=[]), max_steps=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g))
    with pytest.raises(TypeError, match=r"cannot trace Branchy: data-dependent control flow at .*in forward: `if h.mean\(\) > 0:`"):
        trainer.fit(Branchy(), DataLoader(data, batch_size=4))


def test_interlocking_end_to_end_on_a_traced_split_equals_plain_training() -> None:
    from lightning_parallel.strategies.interlocking import InterlockingBackpropStrategy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    options: dict[str, Any] = {
        "max_steps": STEPS, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
        "enable_model_summary": False, "num_sanity_val_steps": 0, "use_distributed_sampler": False,
    }
    data = DataLoader(lm_data(STEPS * GLOBAL_BATCH), batch_size=GLOBAL_BATCH)
    torch.manual_seed(0)
    model = PlainGPT(sgd=True)
    strategy = InterlockingBackpropStrategy(k=2, stages=2, micro_batches=4, split_points="auto")
    pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, **options).fit(model, data)
    torch.manual_seed(0)
    reference = PlainGPT(sgd=True)
    pl.Trainer(accelerator="cpu", devices=1, **options).fit(reference, data)
    trained = {k: v for k, v in model.state_dict().items() if not k.startswith("interlocking_heads.")}
    assert trained.keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.allclose(trained[key], value, rtol=0, atol=1e-5), (key, (trained[key] - value).abs().max())
    heads = model.interlocking_heads  # the head of stage 0 reads the hidden state out of the packed output
    assert isinstance(heads, nn.ModuleList) and len(heads) == 1


def test_split_points_come_from_yaml() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--strategy", type=ChimeraStrategy)
    config = parser.parse_string(
        "strategy:\n  class_path: lightning_parallel.strategies.ChimeraStrategy\n"
        "  init_args: {stages: 2, split_points: [encoder.layers.2], loss: nll}\n"
    )
    strategy = parser.instantiate_classes(config).strategy
    assert isinstance(strategy, ChimeraStrategy)
    assert (strategy.split_points, strategy.loss) == (["encoder.layers.2"], "nll")


def test_uneven_micro_batches_and_a_short_last_batch_match_plain_training() -> None:
    # 84 examples in batches of 32: micro-batches (11, 11, 10) and, for the last batch of 20, (7, 7, 6); the
    # trace saw 11 examples and kept the batch dimension dynamic.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    options: dict[str, Any] = {
        "max_steps": 3, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
        "enable_model_summary": False, "num_sanity_val_steps": 0,
    }
    data = token_data(84, vocab=VOCAB)
    losses = []
    for strategy in (ChimeraStrategy(1, 3, schedule="gpipe", split_points=[]), "auto"):
        torch.manual_seed(0)
        recorder = LossRecorder()
        trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, callbacks=[recorder], **options)
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
        loader = DataLoader(data, batch_size=32) if strategy != "auto" else DataLoader(data, batch_size=32, sampler=order)
        trainer.fit(EncoderClassifier(vocab=VOCAB), loader)
        losses.append(recorder.losses)
    assert len(losses[0]) == 3
    for a, e in zip(*losses):
        assert math.isclose(a, e, rel_tol=1e-5), losses
