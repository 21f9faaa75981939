"""The sampled (true) Fisher: G from a backward pass on targets drawn from the model's prediction.

References are computed independently: one example at a time, with autograd on the negative
log-likelihood of targets drawn from a generator seeded as the documented ``fisher_seed``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_parallel.kfac import KFACOptions, KFACPreconditioner, PipelineKFACPreconditioner


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(inplace=True),  # in-place after the layer: the output gradient must still be the layer's
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 5),
        nn.Tanh(),
        nn.Linear(5, 3),
    ).double()


def _per_example_g(model: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> list[torch.Tensor]:
    """G of each K-FAC layer: mean over examples of (d nll_i / d s)(d nll_i / d s)^T, the rows of a
    conv summed within an example; ``grad_out[i]`` is d nll_i / d output_i."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    sums = [torch.zeros(m.weight.shape[0], m.weight.shape[0], dtype=x.dtype) for m in layers]
    for i in range(x.shape[0]):
        h, outs = x[i : i + 1], []
        for module in model:  # the ReLU out of place, so each layer's output stays its own
            h = torch.relu(h) if isinstance(module, nn.ReLU) else module(h)
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                outs.append(h)
        grads = torch.autograd.grad(h, outs, grad_outputs=grad_out[i : i + 1])
        for k, (layer, g) in enumerate(zip(layers, grads)):
            rows = g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1]) if isinstance(layer, nn.Conv2d) else g
            sums[k] += rows.t() @ rows
    return [s / x.shape[0] for s in sums]


def _one_step(
    fisher: object, x: torch.Tensor, y: torch.Tensor, seed: int = 3
) -> tuple[nn.Module, KFACPreconditioner]:
    model = _model()
    kfac = KFACPreconditioner(model, KFACOptions(kl_clip=None, fisher=fisher, fisher_seed=seed))  # type: ignore[arg-type]
    F.cross_entropy(model(x), y).backward()
    kfac.step()
    return model, kfac


def test_gaussian_g_equals_per_example_reference() -> None:
    x, y = torch.randn(6, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    _, kfac = _one_step("gaussian", x, y)
    eps = torch.randn((6, 3), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    # d/d out of 0.5 ||out - (out + eps)||^2 is -eps; G does not see the sign
    expected = _per_example_g(_model(), x, eps)
    for layer, g in zip(kfac.layers, expected):
        torch.testing.assert_close(layer.g_factor, g, rtol=1e-10, atol=1e-12)


def test_categorical_g_equals_per_example_reference() -> None:
    x, y = torch.randn(6, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    _, kfac = _one_step("categorical", x, y, seed=5)
    reference = _model()
    with torch.no_grad():
        probs = torch.softmax(reference(x), dim=-1)
    # inverse-CDF sampling with one uniform number per example, drawn in one call for the batch
    uniform = torch.rand(6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    sampled = torch.searchsorted(probs.cumsum(-1), uniform.unsqueeze(-1)).squeeze(1).clamp_max(2)
    grad_out = probs - F.one_hot(sampled, 3).double()  # d CE(out_i, sampled_i) / d out_i
    expected = _per_example_g(reference, x, grad_out)
    for layer, g in zip(kfac.layers, expected):
        torch.testing.assert_close(layer.g_factor, g, rtol=1e-10, atol=1e-12)


def test_categorical_samples_follow_the_softmax() -> None:
    """The sampled classes' frequencies match ``softmax(output)`` (a chi-square-sized tolerance)."""
    from lightning_parallel.kfac.fisher import sampled_output_grad

    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5]]).expand(200_000, 4)
    grad = sampled_output_grad(logits, "categorical", torch.Generator().manual_seed(0))
    probs = torch.softmax(logits[0], dim=-1)
    frequencies = (probs - grad).mean(0)  # the one-hot of each sample, averaged
    torch.testing.assert_close(frequencies, probs, rtol=0, atol=5e-3)


def test_callable_fisher_equals_the_builtin_gaussian() -> None:
    x, y = torch.randn(6, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    gen = torch.Generator().manual_seed(3)

    def nll(output: torch.Tensor) -> torch.Tensor:
        target = output.detach() + torch.randn(output.shape, generator=gen, dtype=output.dtype)
        return 0.5 * (output - target).pow(2).sum()

    _, builtin = _one_step("gaussian", x, y)
    _, custom = _one_step(nll, x, y)
    for a, b in zip(builtin.layers, custom.layers):
        torch.testing.assert_close(a.g_factor, b.g_factor, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(a.a_factor, b.a_factor, rtol=0, atol=0)


def test_sampled_pass_leaves_the_training_gradient_alone() -> None:
    x, y = torch.randn(6, 1, 4, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    model = _model()
    kfac = KFACPreconditioner(model, KFACOptions(kl_clip=None, fisher="gaussian"))
    F.cross_entropy(model(x), y).backward()
    plain = _model()
    F.cross_entropy(plain(x), y).backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    kfac.remove_hooks()


def test_gaussian_fisher_of_the_output_layer_is_the_identity_on_average() -> None:
    """Unit-variance targets: the output layer's G is E[eps eps^T] = I (the per-example scale)."""
    model = nn.Linear(4, 3).double()
    kfac = KFACPreconditioner(model, KFACOptions(kl_clip=None, fisher="gaussian"))
    model(torch.randn(20_000, 4, dtype=torch.float64)).sum().backward()
    kfac.step()
    g = kfac.layers[0].g_factor
    assert g is not None
    torch.testing.assert_close(g, torch.eye(3, dtype=torch.float64), rtol=0, atol=0.05)


def test_fisher_output_names_the_prediction_module() -> None:
    """The prediction is the Tanh after the last Linear: G of that Linear carries tanh'."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh()).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    kfac = KFACPreconditioner(model, KFACOptions(kl_clip=None, fisher="gaussian", fisher_output="1"))
    model(x).pow(2).sum().backward()
    kfac.step()
    eps = torch.randn((5, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = eps * (1 - model(x).detach() ** 2)
    torch.testing.assert_close(kfac.layers[0].g_factor, rows.t() @ rows / 5, rtol=1e-10, atol=1e-12)


def test_hooks_run_only_before_factor_update_steps() -> None:
    model = _model()
    kfac = KFACPreconditioner(model, KFACOptions(kl_clip=None, factor_update_steps=3, fisher="gaussian"))
    counts = []
    for _ in range(4):
        counts.append(sum(len(m._forward_hooks) for m in model.modules()))
        F.cross_entropy(
            model(torch.randn(4, 1, 4, 4, dtype=torch.float64)), torch.zeros(4, dtype=torch.long)
        ).backward()
        kfac.step()
    assert counts == [4, 0, 0, 4]  # three layers and the prediction's sampling hook
    kfac.remove_hooks()
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_resume_with_a_sampled_fisher_is_exact() -> None:
    def train(model: nn.Module, kfac: KFACPreconditioner, opt: torch.optim.Optimizer, steps: range) -> None:
        for step in steps:
            gen = torch.Generator().manual_seed(step)
            x, y = (
                torch.randn(6, 1, 4, 4, generator=gen, dtype=torch.float64),
                torch.randint(0, 3, (6,), generator=gen),
            )
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            kfac.step(opt)
            opt.step()

    options = KFACOptions(fisher="categorical", inv_update_steps=2)
    model = _model()
    kfac, opt = KFACPreconditioner(model, options), torch.optim.SGD(model.parameters(), lr=0.1)
    train(model, kfac, opt, range(5))
    first = _model()
    kfac1, opt1 = KFACPreconditioner(first, options), torch.optim.SGD(first.parameters(), lr=0.1)
    train(first, kfac1, opt1, range(3))
    state = kfac1.state_dict()
    kfac1.remove_hooks()
    resumed = KFACPreconditioner(first, options)
    resumed.load_state_dict(state)
    train(first, resumed, opt1, range(3, 5))
    for p, q in zip(model.parameters(), first.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_unknown_fisher_is_refused() -> None:
    with pytest.raises(ValueError, match=r"`fisher='true'` is unknown; use 'empirical'"):
        KFACOptions(fisher="true")


def test_fisher_output_naming_no_module_is_refused() -> None:
    with pytest.raises(ValueError, match=r"`fisher_output='head'` names no module"):
        KFACPreconditioner(_model(), KFACOptions(fisher="gaussian", fisher_output="head"))


def test_fisher_output_under_a_pipeline_is_refused() -> None:
    """Under a pipeline the sampled Fisher's prediction is the last stage's output: no ``fisher_output``."""
    with pytest.raises(ValueError, match=r"`fisher_output='head'` is not supported under a pipeline"):
        PipelineKFACPreconditioner({(0, 0): _model()}, KFACOptions(fisher="categorical", fisher_output="head"))
    kfac = PipelineKFACPreconditioner({(0, 0): _model()}, KFACOptions(fisher="categorical"))
    assert kfac.sampled_pass is not None  # the pass rides the schedule: no forward hook on a prediction
    assert kfac._output_module is None


def test_pipeline_rules_live_in_one_function() -> None:
    """``check_pipeline_options`` is the one place of the pipeline refusals (DPKFAC calls it at setup,
    the preconditioner when built): ``fisher_output`` with a sampled Fisher, and ``dp`` over several pipeline replicas."""
    from lightning_parallel.kfac.pipeline import check_pipeline_options

    with pytest.raises(ValueError, match=r"`fisher_output='x'` is not supported under ChimeraStrategy"):
        check_pipeline_options(KFACOptions(fisher="gaussian", fisher_output="x"), "ChimeraStrategy")
    check_pipeline_options(KFACOptions(fisher="gaussian"), "ChimeraStrategy")  # the sampled Fisher runs
    with pytest.raises(ValueError, match=r"`assignment='dp'` with 2 data-parallel pipeline replicas"):
        check_pipeline_options(KFACOptions(), "ChimeraStrategy", data_parallel_size=2)
    check_pipeline_options(KFACOptions(assignment="replicated"), "ChimeraStrategy", data_parallel_size=2)
