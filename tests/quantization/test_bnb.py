"""bitsandbytes paths on the CPU: frozen int8/NF4 layers, 8-bit optimizers, and the lazy import."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from lightning_parallel.quantization import convert_to_bnb, require_bitsandbytes, to_8bit_optimizer
from lightning_parallel.quantization.bnb import optimizer_state_bytes

bnb = pytest.importorskip("bitsandbytes")


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.LayerNorm(32))


def test_lightning_parallel_import_does_not_import_bitsandbytes() -> None:
    code = (
        "import sys, lightning_parallel, lightning_parallel.plugins, lightning_parallel.quantization; "
        "assert 'bitsandbytes' not in sys.modules; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_missing_bitsandbytes_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ModuleNotFoundError, match=r'pip install "lightning-parallel\[quant\]"'):
        require_bitsandbytes()
    with pytest.raises(ModuleNotFoundError, match=r"quant_type='nf4' requires the bitsandbytes package"):
        convert_to_bnb(_mlp(), quant_type="nf4")
    with pytest.raises(
        ModuleNotFoundError, match=r'optimizer=\'adam8bit\'.*pip install "lightning-parallel\[quant\]"'
    ):
        to_8bit_optimizer(torch.optim.Adam(_mlp().parameters()))


@pytest.mark.parametrize(
    ("quant_type", "bytes_per_weight", "tolerance"), [("int8", 1.0, 0.01), ("nf4", 0.5, 0.12)]
)
def test_frozen_layers_on_cpu(quant_type: str, bytes_per_weight: float, tolerance: float) -> None:
    model = _mlp()
    x = torch.randn(16, 64)
    fp32_bytes = sum(m.weight.numel() * 4 for m in model if isinstance(m, nn.Linear))
    q = convert_to_bnb(copy.deepcopy(model), quant_type=quant_type)  # type: ignore[arg-type]
    linears = [m for m in q if isinstance(m, nn.Linear)]
    assert len(linears) == 2 and all(type(m).__module__.endswith("bnb_layers") for m in linears)
    stored = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    assert stored == pytest.approx(fp32_bytes * bytes_per_weight / 4)
    out = q(x)
    # the layers compute with exactly their dequantized weights ...
    dense = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in ((0, linears[0]), (2, linears[1])):
            dense[i].weight.copy_(layer.float_weight())
            rel = (layer.float_weight() - model[i].weight).norm() / model[i].weight.norm()
            assert 0 < rel < tolerance  # ... which are close to the float weights
    torch.testing.assert_close(out, dense(x), atol=1e-4, rtol=1e-3)
    # the frozen weights get no gradient; biases and the LayerNorm train
    out.pow(2).mean().backward()
    for name, p in q.named_parameters():
        assert (p.grad is not None) == name.endswith(("bias", "3.weight")), name
    frozen_before = linears[0].float_weight().clone()
    opt = torch.optim.SGD([p for p in q.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    torch.testing.assert_close(linears[0].float_weight(), frozen_before)


@pytest.mark.parametrize("quant_type", ["int8", "nf4"])
def test_frozen_layers_state_dict_is_float_and_round_trips(quant_type: str) -> None:
    model = _mlp()
    q = convert_to_bnb(copy.deepcopy(model), quant_type=quant_type)  # type: ignore[arg-type]
    x = torch.randn(4, 64)
    expected = q(x)
    state = q.state_dict()
    assert set(state) == set(model.state_dict())
    assert state["0.weight"].dtype == torch.float32 and state["0.weight"].shape == (128, 64)
    plain = _mlp()
    plain.load_state_dict(state)  # a float model takes it as is
    torch.testing.assert_close(plain(x), expected, atol=1e-5, rtol=1e-4)
    again = convert_to_bnb(_mlp(), quant_type=quant_type)  # type: ignore[arg-type]
    again.load_state_dict(state)
    torch.testing.assert_close(again(x), expected, atol=1e-3, rtol=1e-3)


def test_bnb_conversion_errors() -> None:
    with pytest.raises(ValueError, match=r"quant_type='int2' is not supported"):
        convert_to_bnb(_mlp(), quant_type="int2")  # type: ignore[arg-type]
    convs = nn.Sequential(nn.Conv2d(1, 4, 3))
    with pytest.raises(ValueError, match=r"model Sequential has no Linear layer to quantize"):
        convert_to_bnb(convs, quant_type="int8")


@pytest.mark.parametrize(
    ("torch_cls", "bnb_name"), [(torch.optim.Adam, "Adam8bit"), (torch.optim.AdamW, "AdamW8bit")]
)
def test_8bit_adam_state_is_8bit_and_tracks_torch(torch_cls: type, bnb_name: str) -> None:
    torch.manual_seed(0)
    big = nn.Linear(128, 64)  # 8,192 weights: 8-bit state; the 64 biases stay 32-bit (under 4,096)
    ref = copy.deepcopy(big)
    start = big.weight.detach().clone()
    wd = 0.0 if torch_cls is torch.optim.Adam else 0.05  # bitsandbytes decays weights AdamW-style only
    hyper = {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-7, "weight_decay": wd}
    opt = to_8bit_optimizer(torch_cls(big.parameters(), **hyper))
    ref_opt = torch_cls(ref.parameters(), **hyper)
    assert type(opt) is getattr(bnb.optim, bnb_name)
    group = opt.param_groups[0]
    assert {k: group[k] for k in hyper} == hyper
    target = torch.randn(32, 64)
    for _ in range(20):
        x = torch.randn(32, 128)
        for model, o in ((big, opt), (ref, ref_opt)):
            o.zero_grad()
            nn.functional.mse_loss(model(x), target).backward()
            o.step()
    state = opt.state[big.weight]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    assert opt.state[big.bias]["state1"].dtype == torch.float32
    drift = (big.weight - ref.weight).norm() / (ref.weight - start).norm()
    assert drift < 0.05  # measured about 0.01: the 8-bit moments follow the 32-bit ones closely
    assert optimizer_state_bytes(ref_opt) / optimizer_state_bytes(opt) > 3.0


def test_adam_with_weight_decay_warns_about_decoupling() -> None:
    with pytest.warns(UserWarning, match=r"applies weight_decay=0.1 decoupled"):
        to_8bit_optimizer(torch.optim.Adam(_mlp().parameters(), weight_decay=0.1))


def test_adamw_and_sgd_map_to_counterparts_and_others_fail() -> None:
    params = list(_mlp().parameters())
    assert isinstance(to_8bit_optimizer(torch.optim.AdamW(params, lr=1e-3)), bnb.optim.AdamW8bit)
    assert isinstance(to_8bit_optimizer(torch.optim.SGD(params, lr=0.1, momentum=0.9)), bnb.optim.SGD8bit)
    with pytest.raises(ValueError, match=r"cannot replace SGD: bitsandbytes 8-bit counterparts exist for"):
        to_8bit_optimizer(torch.optim.SGD(params, lr=0.1))
    with pytest.raises(ValueError, match=r"cannot replace RMSprop"):
        to_8bit_optimizer(torch.optim.RMSprop(params, lr=0.1))
    with pytest.raises(ValueError, match=r"cannot replace Adam with maximize or amsgrad set"):
        to_8bit_optimizer(torch.optim.Adam(params, amsgrad=True))
