"""The adapter interface and the sequential-trunk adapter, in one process: options, hooks, errors.

The reference is the user's own ``forward``: the adapter's blocks run in order must give the same output.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from lightning_parallel.models.mlp import MLPClassifier
from lightning_parallel.pipeline.adapters import (
    ADAPTER_ATTRIBUTE,
    PipelineAdapter,
    adapted_by,
    check_adapter_options,
    install_adapter,
    pack_channels,
    resolve_adapter,
    unpack_channels,
)
from lightning_parallel.pipeline.adapters.trunk import SequentialTrunkAdapter
from lightning_parallel.pipeline.protocol import check_pipeline_protocol, missing_pipeline_hooks, run_blocks
from lightning_parallel.strategies import ChimeraStrategy, InterlockingBackpropStrategy
from tests.helpers.client_models import EncoderClassifier, SequentialCNN, cnn_data, token_data


def no_batch() -> Any:
    raise AssertionError("the trunk adapter needs no sample batch")


def adapt(module: nn.Module, **options: Any) -> PipelineAdapter:
    adapter = resolve_adapter(module, **options)
    assert adapter is not None
    install_adapter(module, adapter, sample_batch=no_batch)
    return adapter


def test_trunk_blocks_reproduce_the_users_forward_and_loss() -> None:
    torch.manual_seed(0)
    model = EncoderClassifier().eval()
    adapt(model, blocks="encoder.layers", pre="embed", post=["pool", "head"])
    x, y = token_data(6).tensors
    blocks = model.pipeline_blocks()  # type: ignore[operator]
    assert len(blocks) == 1 + 4 + 2
    with torch.no_grad():
        out = run_blocks(blocks, model.pipeline_input((x, y)))  # type: ignore[operator]
        torch.testing.assert_close(out, model(x))
        loss = model.pipeline_loss(out, (x, y))  # type: ignore[operator]
    torch.testing.assert_close(loss, nn.functional.cross_entropy(model(x), y))
    # the method step holds no parameters: every parameter sits in exactly one block
    ids = [id(p) for b in blocks for p in b.parameters()]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert "pipeline_blocks" not in model.state_dict() and adapted_by(model) is not None


def test_trunk_losses_by_name_criterion_and_method() -> None:
    class WithLosses(SequentialCNN):
        def __init__(self) -> None:
            super().__init__()
            self.criterion = nn.CrossEntropyLoss(label_smoothing=0.1)

        def my_loss(self, output: torch.Tensor, batch: Any) -> torch.Tensor:
            return output.square().mean() + 0 * batch[1].sum()

    x, y = cnn_data(4).tensors
    for loss, expected in (
        ("criterion", lambda out: nn.functional.cross_entropy(out, y, label_smoothing=0.1)),
        ("my_loss", lambda out: out.square().mean()),
        ("nll", lambda out: nn.functional.nll_loss(out, y)),
    ):
        model = WithLosses()
        adapt(model, blocks="net", loss=loss)
        out = model(x)
        torch.testing.assert_close(model.pipeline_loss(out, (x, y)), expected(out))  # type: ignore[operator]


def test_a_module_with_the_protocol_needs_no_adapter() -> None:
    model = MLPClassifier(4, (8,), 2, optimizer="sgd", lr=0.1)
    assert resolve_adapter(model) is None
    with pytest.raises(TypeError, match="implements pipeline_blocks, pipeline_input, pipeline_loss itself"):
        adapt(model, blocks="blocks")


def test_the_protocol_error_names_the_adapter_options() -> None:
    model = SequentialCNN()
    assert resolve_adapter(model) is None and missing_pipeline_hooks(model)
    with pytest.raises(TypeError, match=r"blocks='model.layers'.*adapter='hf'.*adapter='traced'"):
        check_pipeline_protocol(model, who="ChimeraStrategy")


def test_a_second_adapter_replaces_the_first() -> None:
    model = SequentialCNN()
    adapt(model, blocks="net")
    first = model.pipeline_blocks()  # type: ignore[operator]
    adapt(model, blocks="net", post="net.6")  # the hooks were the adapter's: replaced, not refused
    assert len(model.pipeline_blocks()) == len(first) + 1  # type: ignore[operator]
    assert resolve_adapter(model) is model.__dict__[ADAPTER_ATTRIBUTE]  # set up again: the same adapter


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"adapter": 3}, TypeError, r"adapter=3 must be a name"),
        ({"adapter": "onnx"}, ValueError, r"adapter='onnx' is not one of \['hf', 'traced'\]"),
        ({"blocks": ["a"]}, TypeError, r"blocks=\['a'\] must be the dotted name"),
        ({"blocks": "net", "pre": 1}, TypeError, r"pre=1 must be a dotted name"),
        ({"blocks": "net", "post": ["ok", ""]}, TypeError, r"post=\['ok', ''\] must be a dotted name"),
        ({"blocks": "net", "loss": 2}, TypeError, r"loss=2 must be a name"),
        ({"loss": "mse"}, ValueError, r"need blocks='ATTRIBUTE'"),
        ({"blocks": "net", "adapter": "hf"}, ValueError, r"both given; give one of them"),
    ],
)
def test_adapter_options_are_checked_in_the_strategy(options: dict[str, Any], error: type, match: str) -> None:
    full = {"adapter": None, "blocks": None, "pre": None, "post": None, "loss": None, **options}
    with pytest.raises(error, match=match):
        check_adapter_options(**full)
    with pytest.raises(error, match=match):
        ChimeraStrategy(2, **options)
    with pytest.raises(error, match=match):
        InterlockingBackpropStrategy(2, 2, **options)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"blocks": "trunk"}, r"blocks='trunk': SequentialCNN has no attribute 'trunk' \(its submodules: net\)"),
        ({"blocks": "net.0"}, r"blocks='net.0' is a Conv2d; it must name an nn.Sequential or nn.ModuleList"),
        ({"blocks": "net.9"}, r"blocks='net.9': net has 7 entries, no index 9"),
        ({"blocks": "net", "pre": "lr"}, r"pre='lr' is a float; name an nn.Module or a method"),
        ({"blocks": "net", "loss": "hinge"}, r"loss='hinge'.*Built-in losses: \['cross_entropy', 'mse', 'nll'\]"),
        ({"blocks": "net", "loss": "lr"}, r"loss='lr' is a float; name a built-in loss or a method"),
    ],
)
def test_trunk_errors_name_the_argument(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        adapt(SequentialCNN(), **options)


def test_an_empty_trunk_is_refused() -> None:
    model = SequentialCNN()
    model.net = nn.Sequential()
    with pytest.raises(ValueError, match="blocks='net' is empty"):
        adapt(model, blocks="net")


def test_batch_forms_of_the_trunk() -> None:
    adapter = SequentialTrunkAdapter("net")
    x, y = torch.randn(2, 3), torch.tensor([0, 1])
    assert adapter.pipeline_input(nn.Module(), {"x": x, "y": y}) is x
    assert adapter.pipeline_input(nn.Module(), x) is x
    with pytest.raises(ValueError, match=r"looked for under \['input_ids', 'inputs', 'input', 'x'\]"):
        adapter.pipeline_input(nn.Module(), {"image": x})
    with pytest.raises(ValueError, match="needs an \\(inputs, targets\\) pair or a mapping"):
        adapter.pipeline_input(nn.Module(), 3)


def test_pack_and_unpack_channels_round_trip() -> None:
    hidden = torch.randn(2, 5, 4, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    packed = pack_channels(hidden, mask)
    assert packed.shape == (2, 5, 5)
    back, (carried,) = unpack_channels(packed, 1)
    torch.testing.assert_close(back, hidden)
    assert torch.equal(carried.long(), mask) and not carried.requires_grad
    assert pack_channels(hidden) is hidden and unpack_channels(hidden, 0) == (hidden, [])


def test_layers_swapped_after_setup_are_the_ones_in_the_blocks() -> None:
    # The precision plugin converts the module after the adapter is installed (QAT replaces layers).
    model = SequentialCNN()
    adapt(model, blocks="net")
    replacement = nn.Linear(32, 4)
    model.net[6] = replacement
    assert model.pipeline_blocks()[6] is replacement  # type: ignore[operator]
    assert model.pipeline_blocks() is model.pipeline_blocks()  # type: ignore[operator]  # then kept
