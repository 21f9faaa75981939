"""Output gradients of the sampled (true) Fisher (pure torch).

For a model whose prediction defines a likelihood, the Fisher is the expected outer product of
the gradient of the negative log-likelihood at targets drawn from the model itself. One sample
per example gives an unbiased estimate; for a Gaussian with unit variance it is the Gauss-Newton
matrix of ``0.5 ||output - y||^2``, for a softmax the Gauss-Newton matrix of the cross-entropy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def sampled_output_grad(output: torch.Tensor, fisher: str, generator: torch.Generator) -> torch.Tensor:
    """The gradient of each example's negative log-likelihood at targets sampled from the model.

    Args:
        output: The prediction (detached).
        fisher: ``"gaussian"``: targets ``output + eps``, ``eps ~ N(0, I)``, so the gradient of
            ``0.5 ||output - y||^2`` is ``-eps`` (``eps`` is returned: the sign does not matter in
            ``G``). ``"categorical"``: classes along the last dimension sampled from
            ``softmax(output)`` (inverse CDF, one uniform number per row); the gradient of the
            cross-entropy is ``softmax(output) - onehot``.
        generator: The random generator, on ``output``'s device.

    Returns:
        A tensor shaped like ``output``: the gradient of the loss summed over the examples.
    """
    return output_grad_from_noise(output, fisher, sample_noise(output.shape, output, fisher, generator))


def sample_noise(shape: Sequence[int], like: torch.Tensor, fisher: str, generator: torch.Generator) -> torch.Tensor:
    """The random numbers :func:`output_grad_from_noise` turns into sampled-target gradients.

    Drawn in one call for a whole batch, so a pipeline that sees the batch in micro-batches slices
    the same numbers along dimension 0 as one device draws (``torch`` generators are not
    split-invariant: two draws of half the size do not give one draw's numbers).

    Args:
        shape: The shape of the batch's prediction.
        like: A tensor with the prediction's device and dtype.
        fisher: ``"gaussian"`` (one normal number per entry) or ``"categorical"`` (one uniform
            number per row of the last dimension).
        generator: The random generator, on ``like``'s device.

    Returns:
        ``shape`` for ``"gaussian"``, ``shape[:-1]`` for ``"categorical"``.
    """
    if fisher == "gaussian":
        return torch.randn(tuple(shape), generator=generator, device=like.device, dtype=like.dtype)
    dtype = torch.promote_types(like.dtype, torch.float32)
    return torch.rand(tuple(shape[:-1]), generator=generator, device=like.device, dtype=dtype)


def output_grad_from_noise(output: torch.Tensor, fisher: str, noise: torch.Tensor) -> torch.Tensor:
    """The sampled-target gradient of ``output`` (see :func:`sampled_output_grad`) from drawn ``noise``.

    Args:
        output: The prediction (detached).
        fisher: ``"gaussian"`` or ``"categorical"``.
        noise: :func:`sample_noise`'s numbers for ``output`` (or its rows of a batch's draw).

    Returns:
        A tensor shaped like ``output``.
    """
    if fisher == "gaussian":
        return noise
    probs = torch.softmax(output.to(torch.promote_types(output.dtype, torch.float32)), dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    cdf = flat.cumsum(-1)
    uniform = noise.reshape(-1, 1).to(cdf.dtype) * cdf[:, -1:]
    classes = (cdf < uniform).sum(-1, keepdim=True).clamp_max(flat.shape[-1] - 1)
    grad = flat.clone()
    grad.scatter_add_(1, classes, torch.full_like(classes, -1.0, dtype=grad.dtype))
    return grad.reshape(output.shape).to(output.dtype)


def prediction_module(model: nn.Module, name: str | None, default: nn.Module) -> nn.Module:
    """The module whose output is the prediction.

    Args:
        model: The model.
        name: The module's qualified name, or ``None`` for ``default``.
        default: The module used when ``name`` is ``None`` (the last preconditioned layer).

    Returns:
        The module.

    Raises:
        ValueError: If ``name`` names no module of ``model``.
    """
    if name is None:
        return default
    modules = dict(model.named_modules())
    if name not in modules:
        linear = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d))]
        raise ValueError(
            f"`fisher_output={name!r}` names no module of {type(model).__name__}; pass the qualified name of"
            f" the module whose output is the prediction (for example {linear[-1:]!r}) or None for the last"
            " preconditioned layer."
        )
    return modules[name]
