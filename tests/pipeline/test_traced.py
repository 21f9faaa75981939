"""The traced split (torch.distributed.pipelining.pipeline) as stages: packing, wiring, gradients, refusals.

Single process: the stages are run one after the other, each on a detached copy of the previous stage's
packed output (as a pipeline rank receives it), and compared with the module's own forward and backward.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_parallel.pipeline.traced import TracedSplit, auto_split_points, pack, split_traced, unpack


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)


class SkipNet(nn.Module):
    """Two inputs, a keyword tensor, a constant keyword, a skip over every layer, a dict output."""

    def __init__(self, tie: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(8, 20, bias=False)
        self.register_buffer("scale", torch.tensor(0.5))
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, x: Tensor, y: Tensor, *, mask: Tensor, factor: float = 1.0) -> dict[str, Tensor]:
        h = self.emb(x)
        skip = h
        for layer in self.layers:
            h = torch.relu(layer(h)) + skip * self.scale
        return {"logits": self.head(self.drop(h)) * factor + mask, "aux": y.float().mean()}


def _sample() -> tuple[tuple[Tensor, Tensor], dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 20, (4, 5), generator=g), torch.randint(0, 20, (4, 5), generator=g)
    return (x, y), {"mask": torch.randn(4, 5, 20, generator=g), "factor": 2.0}


def _run(split: TracedSplit, module: nn.Module, args: Any, kwargs: Any) -> tuple[Any, list[tuple[Tensor, Any]]]:
    """Stage by stage; each stage gets a detached, grad-requiring copy of the previous packed output."""
    x: Any = split.stage_input(args, kwargs, forward=module.forward)
    pairs = []
    for stage in split.stages:
        out = stage(x)
        pairs.append((x, out))
        if isinstance(out, Tensor):
            x = out.detach().requires_grad_(True)
    return out, pairs


def _backward(pairs: list[tuple[Tensor, Any]], loss: Tensor) -> None:
    loss.backward()
    for (_, out), (received, _) in zip(reversed(pairs[:-1]), reversed(pairs[1:])):
        out.backward(received.grad)


def test_pack_round_trip_is_exact_for_mixed_dtypes() -> None:
    values = [
        torch.randn(2, 3, dtype=torch.bfloat16),
        torch.tensor([1, -5, 2**40 + 3]),
        torch.tensor([[True, False]]),
        torch.randn(3, dtype=torch.float16),
        torch.arange(6, dtype=torch.int32).view(2, 3),
    ]
    packed = pack(values)
    assert packed.dtype == torch.float32  # bf16 and fp16 promote to fp32 (exactly)
    back = unpack(packed)
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(values, back))
    assert pack([torch.randn(2, dtype=torch.float64), torch.tensor([7])]).dtype == torch.float64
    odd = [torch.randn(3, dtype=torch.bfloat16), torch.tensor([True, False, True]), torch.tensor([-(2**62)])]
    assert all(torch.equal(a, b) for a, b in zip(odd, unpack(pack(odd))))  # bytes padded to whole bf16 words
    mask = torch.ones(4, 1, 8, 8, dtype=torch.bool)
    assert pack([mask]).numel() < mask.numel()  # a bool mask costs a byte per value, not a float


def test_gradient_flows_through_pack_to_each_float_value() -> None:
    a, b = torch.randn(2, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    packed = pack([a, torch.tensor([3, 4]), b])
    received = packed.detach().requires_grad_(True)
    ua, ids, ub = unpack(received)
    (ua.sum() * 2 + (ub * ub).sum() + ids.sum()).backward()
    packed.backward(received.grad)
    assert a.grad is not None and b.grad is not None
    assert torch.equal(a.grad, torch.full_like(a, 2.0)) and torch.allclose(b.grad, 2 * b.detach())


def test_stages_reproduce_forward_and_gradients_with_the_modules_own_parameters() -> None:
    torch.manual_seed(0)
    module = SkipNet()
    args, kwargs = _sample()
    points = auto_split_points(module, 3)
    assert points == ["layers.1", "layers.2"]
    split = split_traced(module, args, kwargs, split_points=points)
    assert not any("forward" in m.__dict__ for m in module.modules())  # torch's annotations undone
    # Values cross boundaries they are not produced next to: the skip, the keyword mask, the second input.
    assert len(split.stages[1].live_in) >= 3
    expected = module(*args, **kwargs)
    (expected["logits"].square().mean() + expected["aux"]).backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    module.zero_grad()
    out, pairs = _run(split, module, args, kwargs)
    assert set(out) == {"logits", "aux"} and torch.equal(out["logits"], expected["logits"])
    _backward(pairs, out["logits"].square().mean() + out["aux"])
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.allclose(p.grad, grads[name], atol=1e-7), name
    held = {name: p for stage in split.stages for name, p in stage.graph.named_parameters()}
    assert {n: id(p) for n, p in held.items()} == {n: id(p) for n, p in module.named_parameters()}
    buffers = {name: b for stage in split.stages for name, b in stage.graph.named_buffers()}
    assert buffers["scale"] is module.scale


def test_chimera_copy_of_a_stage_has_its_own_parameters() -> None:
    module = SkipNet()
    args, kwargs = _sample()
    split = split_traced(module, args, kwargs, split_points=["layers.2"])
    twin = copy.deepcopy(split.stages[1])
    own = {id(p) for p in module.parameters()}
    assert not any(id(p) in own for p in twin.parameters())
    x = split.stages[0](split.stage_input(args, kwargs, forward=module.forward))
    assert torch.equal(twin(x)["logits"], split.stages[1](x)["logits"])


def test_dropout_module_is_traced_for_eval_too() -> None:
    torch.manual_seed(0)
    module = SkipNet(dropout=0.5)
    args, kwargs = _sample()
    split = split_traced(module, args, kwargs, split_points=["layers.2"])
    assert all(stage.eval_graph is not None for stage in split.stages)
    module.eval()
    out, _ = _run(split, module, args, kwargs)
    assert torch.equal(out["logits"], module(*args, **kwargs)["logits"])
    module.train()
    out, _ = _run(split, module, args, kwargs)
    assert not torch.equal(out["logits"], module(*args, **kwargs)["logits"])  # dropout acts in training


def test_batch_dimension_is_dynamic_and_fixed_dimensions_are_checked() -> None:
    module = SkipNet()
    args, kwargs = _sample()
    split = split_traced(module, args, kwargs, split_points=["layers.2"])
    assert [shape for _, _, shape in split.inputs] == [(None, 5), (None, 5), (None, 5, 20)]
    smaller = (args[0][:3], args[1][:3]), {"mask": kwargs["mask"][:3], "factor": 2.0}
    out, _ = _run(split, module, *smaller)
    assert torch.allclose(out["logits"], module(*smaller[0], **smaller[1])["logits"], atol=1e-6)
    with pytest.raises(ValueError, match=r"traced with input 'x' of shape \(None, 5\).*gives \(4, 3\).*same length"):
        split.stage_input((args[0][:, :3], args[1][:, :3]), {"mask": kwargs["mask"][:, :3]}, forward=module.forward)
    with pytest.raises(ValueError, match=r"gives \(1, 5\).*at least 2 examples per micro-batch"):
        split.stage_input((args[0][:1], args[1][:1]), {"mask": kwargs["mask"][:1]}, forward=module.forward)


def test_tied_weights_across_stages_are_refused() -> None:
    args, kwargs = _sample()
    with pytest.raises(ValueError, match=r"emb.weight = head.weight is used by stages \[0, 1\].*train apart"):
        split_traced(SkipNet(tie=True), args, kwargs, split_points=["layers.2"])


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        if h.sum() > 0:  # data-dependent control flow
            h = -h
        return self.b(h)  # type: ignore[no-any-return]


def test_untraceable_module_names_the_operation() -> None:
    with pytest.raises(
        TypeError,
        match=r"cannot trace Branchy: data-dependent control flow at .*test_traced.py:\d+ in forward: `if h.sum\(\) > 0:",
    ):
        split_traced(Branchy(), (torch.randn(2, 4),), split_points=["b"])


def test_lightning_demo_transformer_is_refused_naming_the_causal_mask_check() -> None:
    from lightning.pytorch.demos import Transformer

    module = Transformer(vocab_size=40, ninp=16, nhead=2, nhid=32, nlayers=2, dropout=0.0)
    x = torch.randint(0, 40, (4, 8))
    with pytest.raises(TypeError, match=r"cannot trace Transformer: data-dependent control flow at .*transformer.py:\d+ in _detect_is_causal_mask"):
        split_traced(module, (x, x), split_points=["transformer.decoder"])


def test_bad_split_points_are_refused() -> None:
    args, kwargs = _sample()
    with pytest.raises(ValueError, match=r"SkipNet has no submodule 'layers.9'"):
        split_traced(SkipNet(), args, kwargs, split_points=["layers.9"])
    with pytest.raises(ValueError, match=r"split_points='auto' needs an nn.ModuleList/nn.Sequential of at least stages=8"):
        auto_split_points(SkipNet(), 8)


@pytest.mark.slow
def test_hugging_face_gpt2_traces_untied_and_refuses_tied() -> None:
    transformers = pytest.importorskip("transformers")
    options = {"vocab_size": 64, "n_positions": 16, "n_embd": 32, "n_layer": 2, "n_head": 4, "use_cache": False,
               "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(tie_word_embeddings=False, **options))
    x = torch.randint(0, 64, (2, 16))
    with pytest.warns(UserWarning, match=r"could not keep the batch dimension of GPT2LMHeadModel dynamic.*\[2\] examples"):
        split = split_traced(model, (x,), split_points=auto_split_points(model, 2))
    assert split.inputs[0][2] == (2, 16)  # torch.export cannot keep GPT-2's batch dynamic: pipeline() traced it
    out, _ = _run(split, model, (x,), {})
    assert torch.allclose(out.logits, model(x).logits, atol=1e-6)
    tied = transformers.GPT2LMHeadModel(transformers.GPT2Config(**options))
    with pytest.raises(ValueError, match=r"lm_head.weight = transformer.wte.weight is used by stages \[0, 1\]"):
        split_traced(tied, (x,), split_points=["transformer.h.1"])
