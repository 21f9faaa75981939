"""The Hugging Face causal-LM adapter in one process: its blocks are the model, its loss is the model's.

References: the model's own forward (``model(input_ids, attention_mask=...).logits``) and its own loss
(``model(input_ids, labels=...).loss``); for loading, the tensors of the ``save_pretrained`` file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_parallel.pipeline.adapters import install_adapter, resolve_adapter
from lightning_parallel.pipeline.protocol import run_blocks
from lightning_parallel.pipeline.stage_local import free_blocks, materialize_blocks
from tests.helpers.client_models import HFCausalLM, SequentialCNN

transformers = pytest.importorskip("transformers")
from lightning_parallel.pipeline.adapters.hf import HFCausalLMAdapter  # noqa: E402


def adapted(family: str, **kwargs: Any) -> HFCausalLM:
    torch.manual_seed(0)
    module = HFCausalLM(family, **kwargs)
    adapter = resolve_adapter(module)  # found by itself: the module holds a PreTrainedModel
    assert isinstance(adapter, HFCausalLMAdapter)
    install_adapter(module, adapter, sample_batch=lambda: None)
    assert adapter.attribute == "model" and adapter.family == family
    return module


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("padded", [False, True])
def test_blocks_give_the_models_logits(family: str, padded: bool) -> None:
    module = adapted(family).eval()
    ids = torch.randint(0, 32, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0  # right padding
    mask[1, :2] = 0  # left padding
    batch: dict[str, torch.Tensor] = {"input_ids": ids, **({"attention_mask": mask} if padded else {})}
    blocks = module.pipeline_blocks()  # type: ignore[operator]
    assert len(blocks) == 4 + 2
    with torch.no_grad():
        out = run_blocks(blocks, module.pipeline_input(batch))  # type: ignore[operator]
        expected = module.model(ids, attention_mask=mask if padded else None).logits
    if padded:
        keep = mask.bool()
        torch.testing.assert_close(out[keep], expected[keep], rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_shifted_loss_is_the_models_loss() -> None:
    module = adapted("llama")
    ids = torch.randint(0, 32, (4, 9), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :3] = -100  # ignored positions
    out = run_blocks(module.pipeline_blocks(), module.pipeline_input({"input_ids": ids}))  # type: ignore[operator]
    loss = module.pipeline_loss(out, {"input_ids": ids, "labels": labels})  # type: ignore[operator]
    torch.testing.assert_close(loss, module.model(ids, labels=labels).loss)


def test_gpt2_blocks_share_the_tied_embedding() -> None:
    module = adapted("gpt2")
    blocks = module.pipeline_blocks()  # type: ignore[operator]
    assert blocks[-1].head.weight is blocks[0].tokens.weight is module.model.transformer.wte.weight


def test_unsupported_models_and_missing_models_are_refused(tmp_path: Path) -> None:
    class Body(SequentialCNN):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = transformers.GPT2Model(transformers.GPT2Config(n_embd=8, n_layer=1, n_head=2))

    with pytest.raises(ValueError, match=r"backbone is a GPT2Model \(model_type='gpt2'\).*blocks='...'"):
        install_adapter(Body(), HFCausalLMAdapter(), sample_batch=lambda: None)
    with pytest.raises(ValueError, match="adapter='hf' found no Hugging Face PreTrainedModel in SequentialCNN"):
        install_adapter(SequentialCNN(), HFCausalLMAdapter(), sample_batch=lambda: None)
    with pytest.raises(ValueError, match=f"pretrained='{tmp_path}' holds no model.safetensors"):
        install_adapter(HFCausalLM("llama"), HFCausalLMAdapter("model", pretrained=str(tmp_path)), sample_batch=lambda: None)


def test_meta_built_blocks_read_only_their_tensors(tmp_path: Path) -> None:
    torch.manual_seed(5)
    saved = HFCausalLM("llama")
    saved.model.save_pretrained(str(tmp_path))
    with torch.device("meta"):
        module = HFCausalLM("llama")
    adapter = HFCausalLMAdapter(pretrained=str(tmp_path))
    install_adapter(module, adapter, sample_batch=lambda: None)
    blocks = list(module.pipeline_blocks())  # type: ignore[operator]
    materialize_blocks(module, blocks, [0, 1], device="cpu")  # the embedding and the first layer
    expected = {n for n in saved.model.state_dict() if n.startswith(("model.embed_tokens.", "model.layers.0."))}
    assert set(adapter.read_names) == expected
    held = {n: t for n, t in module.model.state_dict().items() if t.device.type != "meta"}
    assert set(held) == expected
    for name, tensor in held.items():
        torch.testing.assert_close(tensor, saved.model.state_dict()[name], rtol=0, atol=0)


def test_meta_built_without_pretrained_gets_the_same_weights_under_every_layout() -> None:
    def build(held: list[list[int]]) -> dict[str, torch.Tensor]:
        with torch.device("meta"):
            module = HFCausalLM("gpt2")
        module.init_seed = 11
        install_adapter(module, HFCausalLMAdapter(), sample_batch=lambda: None)
        blocks = list(module.pipeline_blocks())  # type: ignore[operator]
        values: dict[str, torch.Tensor] = {}
        for stage in held:  # each "rank" materialises its own blocks, then keeps their values
            materialize_blocks(module, blocks, stage, device="cpu")
            values.update({n: t.clone() for n, t in module.model.state_dict().items() if t.device.type != "meta"})
            free_blocks(blocks, [])  # the next "rank" starts from meta again
        return values

    one = build([[0, 1, 2, 3, 4, 5]])
    split = build([[3, 4, 5], [0, 1, 2]])
    assert set(one) == set(split) and len(one) == len(HFCausalLM("gpt2").model.state_dict())
    for name in one:
        torch.testing.assert_close(one[name], split[name], rtol=0, atol=0)
    assert 0.015 < float(one["transformer.wte.weight"].std()) < 0.025  # GPT-2's own init: normal(0, initializer_range=0.02)
    torch.testing.assert_close(one["transformer.h.0.ln_1.weight"], torch.ones(16))


def test_tied_gpt2_across_stages_without_stage_local_names_the_way_out() -> None:
    from lightning_parallel.pipeline.partition import stage_slices
    from lightning_parallel.strategies._pipeline_steps import PipelineSteps
    from lightning_parallel.strategies.set_aside import SetAsideGradients

    module = adapted("gpt2")
    steps = PipelineSteps(
        module, SetAsideGradients(), micro_batches=2, replicas=1, device=torch.device("cpu"), timeout_s=1.0
    )
    steps.sizes = [3, 3]
    with pytest.raises(ValueError, match=r"lm_head.weight is shared by stages 0 and 1.*stage_local=True"):
        steps._check_blocks(stage_slices([3, 3]))
    steps._check_blocks(stage_slices([3, 3]), allow_tied=True)  # what stage_local=True does


def test_named_attribute_and_no_search_without_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_parallel.pipeline.adapters import find_hf_model

    module = HFCausalLM("llama")
    adapter = resolve_adapter(module, adapter="hf:model")
    assert isinstance(adapter, HFCausalLMAdapter) and adapter.attribute == "model"
    assert find_hf_model(module) == "model"  # the outer LlamaForCausalLM, not its inner LlamaModel
    monkeypatch.delitem(__import__("sys").modules, "transformers")
    assert find_hf_model(module) is None  # never imported by the search itself


def test_hf_layers_swapped_after_setup_are_the_ones_in_the_blocks() -> None:
    module = adapted("llama")
    replacement = nn.Linear(16, 32, bias=False)
    module.model.lm_head = replacement
    assert module.pipeline_blocks()[-1].head is replacement  # type: ignore[operator]


def test_meta_built_gpt2_last_stage_loads_the_tied_head_from_the_embedding(tmp_path: Path) -> None:
    torch.manual_seed(6)
    saved = HFCausalLM("gpt2")
    saved.model.save_pretrained(str(tmp_path))  # lm_head.weight is not stored: it is wte
    with torch.device("meta"):
        module = HFCausalLM("gpt2")
    adapter = HFCausalLMAdapter(pretrained=str(tmp_path))
    install_adapter(module, adapter, sample_batch=lambda: None)
    blocks = list(module.pipeline_blocks())  # type: ignore[operator]
    materialize_blocks(module, blocks, [len(blocks) - 1], device="cpu")  # the last stage: ln_f + lm_head
    assert sorted(adapter.read_names) == sorted(
        ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"]
    )  # wte once (the embedding block runs too, for the tie), wpe with it
    torch.testing.assert_close(module.model.lm_head.weight, saved.model.transformer.wte.weight, rtol=0, atol=0)
    assert module.model.transformer.wpe.weight.device.type == "meta"  # freed again: not held
