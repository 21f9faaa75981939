"""Pipelines without hand-written hooks, exact against single-device training of the user's own module.

Every model here is written as users write them (tests/helpers/client_models.py: no pipeline protocol); the
strategy reaches them only through ``blocks=`` (a sequential trunk) or the Hugging Face adapter. Each case
trains 5 steps under the pipeline and compares every step's loss with the same module trained on one device
by its own ``training_step`` (relative 1e-5). The default suite runs a 2-process subset (tied GPT-2 under
Chimera with stage-local weights, the nn.TransformerEncoder trunk under 1F1B, stage-by-stage loading of a
``save_pretrained`` directory, both checkpoints back into the user's class); ``--run-slow`` runs every model
under Chimera and 1F1B with 2 and 4 stages.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_parallel.pipeline.consolidate import consolidated_checkpoint
from lightning_parallel.strategies import ChimeraStrategy, InterlockingBackpropStrategy
from tests.helpers.callbacks import LossRecorder
from tests.helpers.client_models import (
    EncoderClassifier,
    HFCausalLM,
    SequentialCNN,
    cnn_data,
    lm_data,
    token_data,
)
from tests.helpers.distributed import run_distributed

STEPS = 5
BATCH = 16
SIZE = STEPS * BATCH
REL = 1e-5

# model -> (factory, data, adapter options of the strategy)
MODELS: dict[str, tuple[Any, Any, dict[str, Any]]] = {
    "cnn": (SequentialCNN, lambda: cnn_data(SIZE), {"blocks": "net"}),
    "encoder": (
        EncoderClassifier,
        lambda: token_data(SIZE),
        {"blocks": "encoder.layers", "pre": "embed", "post": ["pool", "head"]},
    ),
    "gpt2": (lambda: HFCausalLM("gpt2"), lambda: lm_data("gpt2", SIZE), {"stage_local": True}),  # found, tied
    "llama": (lambda: HFCausalLM("llama"), lambda: lm_data("llama", SIZE), {"adapter": "hf"}),
}
HF = ("gpt2", "llama")


def _trainer(strategy: Any, devices: int, **kwargs: Any) -> tuple[pl.Trainer, LossRecorder]:
    recorder = LossRecorder()
    options: dict[str, Any] = {
        "max_steps": STEPS, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
        "enable_model_summary": False, **kwargs,
    }
    options["callbacks"] = [recorder, *options.get("callbacks", [])]
    return pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, **options), recorder


def _model(name: str) -> pl.LightningModule:
    torch.manual_seed(0)
    return MODELS[name][0]()  # type: ignore[no-any-return]


def pipeline_fit(name: str, schedule: str, stages: int, world: int, checkpoint_dir: str | None = None) -> list[float]:
    _, data, options = MODELS[name]
    micro = stages if schedule != "gpipe" else 2 * stages
    strategy = ChimeraStrategy(stages, micro, schedule=schedule, **options)  # type: ignore[arg-type]
    extra: dict[str, Any] = {}
    if checkpoint_dir is not None:
        extra = {"enable_checkpointing": True,
                 "callbacks": [ModelCheckpoint(dirpath=checkpoint_dir, save_last=True, save_top_k=0)]}
    model = _model(name)
    trainer, recorder = _trainer(strategy, world, **extra)
    trainer.fit(model, DataLoader(data(), batch_size=BATCH))
    return recorder.losses


@functools.cache
def reference_fit(name: str) -> tuple[pl.LightningModule, list[float]]:
    """The user's module on one device, on the batches a shuffling DistributedSampler(seed=0) gives (once per
    model: the tests only read it)."""
    data = MODELS[name][1]()
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    model = _model(name)
    trainer, recorder = _trainer("auto", 1)
    trainer.fit(model, DataLoader(data, batch_size=BATCH, sampler=order))
    return model, recorder.losses


def assert_close(actual: list[float], expected: list[float]) -> None:
    assert len(actual) == len(expected) == STEPS, (actual, expected)
    for a, e in zip(actual, expected):
        assert math.isclose(a, e, rel_tol=REL), (actual, expected)


# ----------------------------------------------------------------------------- stage-by-stage loading
def _pretrained_fit(rank: int, directory: str) -> dict[str, Any]:
    """Llama built on meta in configure_model, weights read from ``directory`` by each rank for its stages."""
    from lightning_parallel.pipeline.adapters.hf import HFCausalLMAdapter

    adapter = HFCausalLMAdapter(pretrained=directory)
    strategy = ChimeraStrategy(2, 2, schedule="1f1b", stage_local=True, adapter=adapter)
    model = HFCausalLM("llama", build_in_configure_model=True)
    trainer, recorder = _trainer(strategy, 2)
    trainer.fit(model, DataLoader(lm_data("llama", SIZE), batch_size=BATCH))
    held = {
        name for name, t in model.model.state_dict(keep_vars=True).items()
        if t.device.type != "meta"
    }
    return {"read": sorted(adapter.read_names), "held": sorted(held), "losses": recorder.losses}


# ----------------------------------------------------------------------------- the 2-process subset
def _quick_world(rank: int, world: int, tmp: str, pretrained: str) -> dict[str, Any]:
    warnings.filterwarnings("ignore")
    return {
        "gpt2-chimera-D2": pipeline_fit("gpt2", "chimera", 2, 2, checkpoint_dir=os.path.join(tmp, "gpt2")),
        "encoder-1f1b-D2": pipeline_fit("encoder", "1f1b", 2, 2, checkpoint_dir=os.path.join(tmp, "encoder")),
        "pretrained": _pretrained_fit(rank, pretrained),
    }


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("llama_pretrained")
    torch.manual_seed(123)  # other weights than HFCausalLM's seed-0 initialisation
    HFCausalLM("llama").model.save_pretrained(str(directory))
    return str(directory)


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory, pretrained_dir: str) -> tuple[str, list[dict[str, Any]]]:
    pytest.importorskip("transformers")
    tmp = str(tmp_path_factory.mktemp("adapters"))
    return tmp, run_distributed(_quick_world, 2, tmp, pretrained_dir, timeout=300.0)


@pytest.mark.parametrize("case", ["gpt2-chimera-D2", "encoder-1f1b-D2"])
def test_two_stage_losses_match_single_device(quick: tuple[str, list[dict[str, Any]]], case: str) -> None:
    expected = reference_fit(case.split("-")[0])[1]
    for result in quick[1]:
        assert_close(result[case], expected)


def test_trunk_checkpoint_loads_into_the_users_class(quick: tuple[str, list[dict[str, Any]]]) -> None:
    reference, _ = reference_fit("encoder")
    loaded = EncoderClassifier.load_from_checkpoint(os.path.join(quick[0], "encoder", "last.ckpt"), map_location="cpu")
    probe = token_data(4, seed=9).tensors[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(probe), reference(probe), rtol=1e-5, atol=1e-6)


def test_stage_local_gpt2_consolidates_into_the_users_class(quick: tuple[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    reference, _ = reference_fit("gpt2")
    out = tmp_path / "gpt2.ckpt"
    torch.save(consolidated_checkpoint(os.path.join(quick[0], "gpt2", "last.ckpt")), out)
    loaded = HFCausalLM.load_from_checkpoint(str(out), map_location="cpu")
    assert loaded.model.lm_head.weight is loaded.model.transformer.wte.weight  # still tied
    probe = lm_data("gpt2", 4, seed=9).tensors[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(probe).logits, reference.model(probe).logits, rtol=1e-5, atol=1e-6)


def test_each_rank_reads_only_its_stages_tensors(quick: tuple[str, list[dict[str, Any]]], pretrained_dir: str) -> None:
    from safetensors import safe_open

    with safe_open(os.path.join(pretrained_dir, "model.safetensors"), framework="pt") as handle:
        stored = set(handle.keys())
    results = [r["pretrained"] for r in quick[1]]
    for result in results:
        assert set(result["read"]) == set(result["held"]) & stored  # its stages' tensors, and only those
        assert len(result["read"]) == len(set(result["read"]))  # each tensor read once
        assert len(result["read"]) < len(stored)  # 1F1B, 2 stages: each rank holds half the model
    assert set(results[0]["read"]) | set(results[1]["read"]) == set(stored)
    assert "model.embed_tokens.weight" in results[0]["read"] and "lm_head.weight" in results[1]["read"]
    # the weights equal the file's: training from them gives the single-device losses of the loaded model
    import transformers

    model = HFCausalLM("llama")
    model.model = transformers.LlamaForCausalLM.from_pretrained(pretrained_dir)
    data = lm_data("llama", SIZE)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    trainer, recorder = _trainer("auto", 1)
    trainer.fit(model, DataLoader(data, batch_size=BATCH, sampler=order))
    for result in results:
        assert_close(result["losses"], recorder.losses)


# ----------------------------------------------------------------------------- interlocking, one process
@pytest.mark.parametrize("name", ["cnn", pytest.param("llama", marks=pytest.mark.slow)])
def test_interlocking_end_to_end_matches_single_device(name: str) -> None:
    if name in HF:
        pytest.importorskip("transformers")
    options = {k: v for k, v in MODELS[name][2].items() if k != "stage_local"}
    warnings.filterwarnings("ignore")
    expected = reference_fit(name)[1]
    # k = stages: every stage is trained by the final loss (end-to-end backprop), in one process
    trainer, recorder = _trainer(InterlockingBackpropStrategy(k=2, stages=2, micro_batches=2, **options), 1)
    trainer.fit(_model(name), DataLoader(MODELS[name][1](), batch_size=BATCH))
    assert_close(recorder.losses, expected)


# ----------------------------------------------------------------------------- every model, 2 and 4 stages
FULL = [(m, s, d) for m in MODELS for s in ("chimera", "1f1b") for d in (2, 4)]


def _full_world(rank: int, world: int, stages: int) -> dict[str, list[float]]:
    warnings.filterwarnings("ignore")
    return {f"{m}-{s}-D{d}": pipeline_fit(m, s, d, world) for m, s, d in FULL if d == stages}


@pytest.mark.slow
@pytest.mark.parametrize("stages", [2, 4])
def test_every_model_and_schedule_matches_single_device(stages: int) -> None:
    pytest.importorskip("transformers")
    results = run_distributed(_full_world, stages, stages, timeout=900.0)
    for model in MODELS:
        expected = reference_fit(model)[1]
        for schedule in ("chimera", "1f1b"):
            for result in results:
                assert_close(result[f"{model}-{schedule}-D{stages}"], expected)


def _interlocking_world(rank: int, world: int) -> dict[str, list[float]]:
    warnings.filterwarnings("ignore")
    out = {}
    for name in ("cnn", "llama"):
        options = {k: v for k, v in MODELS[name][2].items() if k != "stage_local"}
        strategy = InterlockingBackpropStrategy(k=2, stages=2, micro_batches=2, synchronous=True, **options)
        trainer, recorder = _trainer(strategy, world)
        trainer.fit(_model(name), DataLoader(MODELS[name][1](), batch_size=BATCH))
        out[name] = recorder.losses
    return out


@pytest.mark.slow
def test_interlocking_end_to_end_over_two_processes_matches_single_device() -> None:
    pytest.importorskip("transformers")
    results = run_distributed(_interlocking_world, 2, timeout=600.0)
    for name in ("cnn", "llama"):
        expected = reference_fit(name)[1]
        for result in results:
            assert_close(result[name], expected)


def _meta_gpt2(init_seed: int) -> HFCausalLM:
    model = HFCausalLM("gpt2", build_in_configure_model=True)
    model.init_seed = init_seed  # type: ignore[assignment]
    return model


def _meta_world(rank: int, world: int) -> dict[str, list[float]]:
    warnings.filterwarnings("ignore")
    out = {}
    for schedule in ("1f1b", "chimera"):
        trainer, recorder = _trainer(ChimeraStrategy(2, 2, schedule=schedule, stage_local=True), world)
        trainer.fit(_meta_gpt2(5), DataLoader(lm_data("gpt2", SIZE), batch_size=BATCH))
        out[schedule] = recorder.losses
    return out


@pytest.mark.slow
def test_meta_built_gpt2_without_pretrained_matches_one_device_from_the_same_init() -> None:
    """Built on meta in configure_model, each rank initialises its blocks (tied wte included) by block index."""
    pytest.importorskip("transformers")
    from lightning_parallel.pipeline.adapters import install_adapter
    from lightning_parallel.pipeline.adapters.hf import HFCausalLMAdapter
    from lightning_parallel.pipeline.stage_local import materialize_blocks

    results = run_distributed(_meta_world, 2, timeout=600.0)
    reference = _meta_gpt2(5)
    with torch.device("meta"):
        reference.configure_model()
    install_adapter(reference, HFCausalLMAdapter(), sample_batch=lambda: None)
    blocks = list(reference.pipeline_blocks())  # type: ignore[operator]
    materialize_blocks(reference, blocks, range(len(blocks)), device="cpu")  # the whole model, same values
    data = lm_data("gpt2", SIZE)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    trainer, recorder = _trainer("auto", 1)
    trainer.fit(reference, DataLoader(data, batch_size=BATCH, sampler=order))
    for result in results:
        for schedule in ("1f1b", "chimera"):
            assert_close(result[schedule], recorder.losses)
