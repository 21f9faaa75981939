"""The K-FAC state of one linear-like layer (one :class:`~lightning_parallel.layers.registry.LinearTarget`).

Design decisions:

- Hook data is folded into unnormalised sums as it arrives (``a^T a`` in the forward hook,
  ``g^T g`` in the output-gradient hook), so no activation is kept alive until the step.
- Factors, their sums and decompositions are float32 (or the layer's dtype when wider), and are
  computed with autocast off.
- Damping is factored Tikhonov: ``(A + pi sqrt(lambda) I)^-1 kron (G + sqrt(lambda)/pi I)^-1``
  with ``pi = sqrt((tr A / dim A) / (tr G / dim G))`` (``pi = 1`` when ``factored_damping`` is
  off). The eigen method applies it in the eigenbases, which gives exactly the same matrix as the
  inverse method, so both can be checked against one dense reference.
- A decomposition that fails or is not finite keeps the layer's previous decomposition (the
  gradient passes through unchanged if there is none); a batch factor that is not finite is not
  folded into the running average.
- Truncated eigenbases (``rank``): a factor wider than ``rank`` keeps its ``rank`` largest
  eigenpairs ``Q_k, d_k``; the rest of its spectrum is taken as 0, so those directions get the
  damping alone: ``(A + r I)^-1 = Q_k diag(1 / (d_k + r) - 1 / r) Q_k^T + I / r``. Applied as
  ``M / r + ((M Q_k) * (1 / (d_k + r) - 1 / r)) Q_k^T``: ``2 out in k`` multiply-adds on the ``A``
  side instead of the dense inverse's ``out in^2`` (a 513-input layer at ``k = 64``: 4x fewer).
  The first decomposition is a full ``eigh``; later ones refine the previous basis by subspace
  iteration (:func:`top_eigenpairs`), ``dim^2 k`` instead of ``dim^3``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from lightning_parallel.kfac import recording
from lightning_parallel.kfac.factors import as_target, from_triu, input_gram, layer_dims, output_grad_gram
from lightning_parallel.layers.registry import LinearTarget

Method = Literal["eigen", "inverse"]


class KFACLayer:
    """Factors, running averages and the decomposition of one layer.

    Args:
        name: The layer's qualified name in the model.
        module: The layer's target (an ``nn.Linear`` or ``nn.Conv2d`` module stands for its own target).
        subsample: Build the factors from every ``subsample``-th example of each forward call
            (``G`` rescaled to the whole batch); 1 uses every example.
        position_subsample: Build them from every ``position_subsample``-th sequence position (a
            Linear input with more than two dimensions: dimension 1) or output row (a Conv2d);
            ``G`` is rescaled to all positions. 1 uses every position.
        rank: Keep the ``rank`` largest eigenpairs of a factor wider than that (eigen method); ``None``
            keeps all.
    """

    def __init__(
        self,
        name: str,
        module: nn.Module | LinearTarget,
        subsample: int = 1,
        *,
        position_subsample: int = 1,
        rank: int | None = None,
    ) -> None:
        self.name = name
        self.target = as_target(module)
        self.module = self.target.module  # the module whose forward applies the weight
        self.weight = self.target.weight
        self.subsample = subsample  # factor statistics from every subsample-th example
        self.position_subsample = position_subsample  # ... and every position_subsample-th position
        self.rank = rank  # eigenpairs kept per factor (None: all)
        self.has_positions: bool | None = None  # whether its inputs have positions to subsample (once seen)
        self.in_dim, self.out_dim = layer_dims(self.target)
        self.dtype = torch.promote_types(self.weight.dtype, torch.float32)
        self.reset_accumulators()
        self.a_factor: torch.Tensor | None = None  # running A, (in_dim, in_dim)
        self.g_factor: torch.Tensor | None = None  # running G, (out_dim, out_dim)
        self.decomposition: dict[str, torch.Tensor] = {}  # eigen: qa, da, qg, dg; inverse: a_inv, g_inv
        self.pi = 1.0  # factored-damping ratio at the last decomposition
        # eigen method: the damped inverses for the last damping value, so that a step costs one
        # (G + .)^-1 M (A + .)^-1 product instead of four eigenbasis products
        self._inverses: tuple[float, torch.Tensor | None, torch.Tensor | None] | None = None
        self._reused = False  # whether the current decomposition has preconditioned once already
        self.rows_per_step = 0  # rows of the last recorded step, for the cost model

    @property
    def device(self) -> torch.device:
        """The device of the layer's weight."""
        return self.weight.device

    def has_grad(self) -> bool:
        """Whether the layer's weight has a gradient."""
        return self.weight.grad is not None

    # ------------------------------------------------------------------ hook data
    def reset_accumulators(self) -> None:
        """Forgets the hook data of the current step."""
        self.a_sum: torch.Tensor | None = None
        self.a_rows = 0
        self.examples = 0  # examples of the step's forward calls
        self.examples_used = 0  # of which the factor statistics saw
        self._examples_scope: object | None = None  # the shared-weights scope whose examples are counted
        self.g_sum: torch.Tensor | None = None

    def accumulate_input(self, x: torch.Tensor) -> None:
        """Adds a forward call's input to the current step's ``A`` sum.

        Args:
            x: The layer's input tensor.
        """
        used = x[:: self.subsample] if self.subsample > 1 else x
        if self.has_positions is None:  # a Conv2d's output rows, or dimension 1 of a Linear input
            self.has_positions = self.target.conv is not None or (x.dim() > 2 and x.shape[1] > 1)
        contribution, rows = input_gram(self.target, used.to(self.dtype), self.position_subsample)
        self.a_sum = contribution if self.a_sum is None else self.a_sum + contribution
        self.a_rows += rows
        scope = recording.current_scope()
        if scope is None or scope is not self._examples_scope:  # repeated calls in a scope: examples once
            self.examples += x.shape[0]
            self.examples_used += used.shape[0]
            self._examples_scope = scope

    def accumulate_grad(self, grad: torch.Tensor) -> None:
        """Adds the gradient of a forward call's output to the current step's ``G`` sum.

        Args:
            grad: The gradient of the layer's output.
        """
        used = grad[:: self.subsample] if self.subsample > 1 else grad
        contribution = output_grad_gram(self.target, used.to(self.dtype), self.position_subsample)
        self.g_sum = contribution if self.g_sum is None else self.g_sum + contribution

    def batch_factors(
        self, grad_scale: float = 1.0, per_example: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The current step's ``A`` and ``G`` on the per-example Fisher scale, normalised in place
        (the step's sums become them).

        Args:
            grad_scale: The loss scale the recorded gradients carry (the AMP scaler's scale); it is
                divided out so that it never reaches ``G``.
            per_example: Whether the recorded gradients are already those of each example's own
                loss (the sampled Fisher): ``G`` is then their mean over the examples, not ``n`` times
                their sum.

        Returns:
            ``(A, G)``, or ``None`` when the forward or the backward hook did not fire this step.
        """
        if self.a_sum is None or self.g_sum is None or self.a_rows == 0:
            return None
        self.rows_per_step = self.a_rows
        # in place: the sums are this step's own tensors, dropped at the end of the step, and a fresh
        # factor-sized result would cost a new allocation (page faults) per layer
        a_new = self.a_sum.div_(self.a_rows)
        if per_example:
            g_new = self.g_sum.div_(self.examples_used)
        else:  # n * sum over all n examples, estimated from the ones used: n * (n / used) * their sum
            scale = self.examples * (self.examples / self.examples_used)
            g_new = self.g_sum.mul_(scale / (grad_scale * grad_scale))
        return a_new, g_new

    # ------------------------------------------------------------------ factors
    def update_factors(self, a_new: torch.Tensor, g_new: torch.Tensor, decay: float) -> None:
        """Folds a step's factors into the running averages (the first ones are taken as they are).

        Args:
            a_new: The step's ``A``.
            g_new: The step's ``G``.
            decay: Weight of the old running average, in ``[0, 1)``.
        """
        if self.a_factor is None or self.g_factor is None:
            self.a_factor, self.g_factor = a_new.clone(), g_new.clone()
            return
        self.a_factor.mul_(decay).add_(a_new, alpha=1.0 - decay)
        self.g_factor.mul_(decay).add_(g_new, alpha=1.0 - decay)

    def decompose(self, method: Method, damping: float, factored_damping: bool) -> None:
        """Decomposes the running factors.

        Args:
            method: ``"eigen"`` (eigendecomposition, damping applied at preconditioning time) or
                ``"inverse"`` (damped inverses at the damping of this call).
            damping: The Tikhonov damping ``lambda`` (only used by ``"inverse"``).
            factored_damping: Whether to split the damping between the factors by ``pi``.

        Raises:
            RuntimeError: If there are no factors, or the decomposition fails or is not finite; the
                previous decomposition is kept.
        """
        if self.a_factor is None or self.g_factor is None:
            raise RuntimeError(f"layer {self.name!r} has no factors to decompose")
        a, g = self.a_factor, self.g_factor
        pi = 1.0
        if factored_damping:
            ratio = (torch.trace(a).item() / self.in_dim) / max(torch.trace(g).item() / self.out_dim, 1e-30)
            pi = math.sqrt(ratio) if math.isfinite(ratio) and ratio > 0 else 1.0
        if method == "eigen":
            previous = self.decomposition
            da, qa = top_eigenpairs(a, self.rank, previous.get("qa"))
            dg, qg = top_eigenpairs(g, self.rank, previous.get("qg"))
            result = {"qa": qa, "da": da.clamp_min(0.0), "qg": qg, "dg": dg.clamp_min(0.0)}
        else:
            root = math.sqrt(damping)
            eye_a = torch.eye(self.in_dim, dtype=a.dtype, device=a.device)
            eye_g = torch.eye(self.out_dim, dtype=g.dtype, device=g.device)
            result = {
                "a_inv": _spd_inverse(a + pi * root * eye_a),
                "g_inv": _spd_inverse(g + (root / pi) * eye_g),
            }
        if not all(bool(torch.isfinite(t).all()) for t in result.values()):
            raise RuntimeError(f"the decomposition of layer {self.name!r} is not finite")
        self.decomposition = result
        self.pi = pi
        self._inverses = None
        self._reused = False

    @property
    def truncated(self) -> bool:
        """Whether the current eigen decomposition keeps fewer eigenpairs than a factor has."""
        d = self.decomposition
        return "qa" in d and (d["qa"].shape[1] < self.in_dim or d["qg"].shape[1] < self.out_dim)

    def _precondition_truncated(self, m: torch.Tensor, damping: float) -> torch.Tensor:
        """``(G + r/pi I)^-1 m (A + pi r I)^-1`` from truncated eigenbases (see the module docstring).

        Per decomposition and damping, each side caches either its damped inverse (a side that keeps
        every eigenpair) or its basis scaled by ``1 / (d + r) - 1 / r``, so that a step is one
        ``addmm`` per truncated side: ``M / r + (M Q_k S) Q_k^T``."""
        d = self.decomposition
        if self._inverses is None or self._inverses[0] != damping:
            root = math.sqrt(damping)
            ra, rg = self.pi * root, root / self.pi
            sides = []
            for q, values, shift, dim in ((d["qa"], d["da"], ra, self.in_dim), (d["qg"], d["dg"], rg, self.out_dim)):
                if q.shape[1] == dim:  # every eigenpair: the damped inverse
                    sides.append((q / (values + shift).unsqueeze(0)) @ q.t())
                else:  # the scaled basis Q_k S
                    sides.append(q * (1.0 / (values + shift) - 1.0 / shift).unsqueeze(0))
            self._inverses = (damping, sides[0], sides[1])
        _, a_side, g_side = self._inverses
        assert a_side is not None and g_side is not None
        root = math.sqrt(damping)
        qa, qg = d["qa"], d["qg"]
        if qa.shape[1] == self.in_dim:
            m = m @ a_side
        else:  # 2 out in k_a
            m = torch.addmm(m, m @ a_side, qa.t(), beta=1.0 / (self.pi * root))
        if qg.shape[1] == self.out_dim:
            return g_side @ m
        return torch.addmm(m, g_side, qg.t() @ m, beta=self.pi / root)  # 2 out k_g in

    def precondition(self, mat: torch.Tensor, damping: float) -> torch.Tensor:
        """``(A + pi r I)^-1 kron (G + r/pi I)^-1`` applied to ``vec(mat)``, ``r = sqrt(damping)``.

        Args:
            mat: The layer's ``(out_dim, in_dim)`` gradient matrix.
            damping: The Tikhonov damping ``lambda`` (ignored by the inverse method, which fixed it
                when it decomposed).

        Returns:
            The preconditioned matrix ``(G + r/pi I)^-1 mat (A + pi r I)^-1``, in ``mat``'s dtype;
            ``mat`` itself when the layer has no decomposition.
        """
        d = self.decomposition
        if not d:
            return mat
        m = mat if mat.dtype == self.dtype else mat.to(self.dtype)
        if self.truncated:
            out = self._precondition_truncated(m, damping)
            return out if out.dtype == mat.dtype else out.to(mat.dtype)
        if "qa" in d and (self._inverses is None or self._inverses[0] != damping) and not self._reused:
            # first use of this decomposition: the four eigenbasis products are cheaper than
            # building the inverses (in^3 + out^3), which pay off only when the decomposition is reused
            self._reused = True
            root = math.sqrt(damping)
            v = d["qg"].t() @ m @ d["qa"]  # (out, in) in the eigenbases
            v = v / ((d["dg"] + root / self.pi).unsqueeze(1) * (d["da"] + self.pi * root).unsqueeze(0))
            return (d["qg"] @ v @ d["qa"].t()).to(mat.dtype)
        a_inv: torch.Tensor | None
        g_inv: torch.Tensor | None
        if "qa" in d:
            if self._inverses is None or self._inverses[0] != damping:
                root = math.sqrt(damping)
                a_inv = (d["qa"] / (d["da"] + self.pi * root).unsqueeze(0)) @ d["qa"].t()
                g_inv = (d["qg"] / (d["dg"] + root / self.pi).unsqueeze(0)) @ d["qg"].t()
                self._inverses = (damping, a_inv, g_inv)
            _, a_inv, g_inv = self._inverses
        else:
            a_inv, g_inv = d["a_inv"], d["g_inv"]
        assert a_inv is not None and g_inv is not None
        out = g_inv @ m @ a_inv
        return out if out.dtype == mat.dtype else out.to(mat.dtype)

    def decomposition_tensors(self, method: Method) -> list[torch.Tensor]:
        """The decomposition as the flat pieces an owner broadcasts (zeros when there is none), each
        once: eigen ``qa, da, qg, dg``; inverse the upper triangles of ``a_inv, g_inv`` (symmetric).

        Args:
            method: The decomposition method.

        Returns:
            1-D tensors in the layer's dtype, of sizes fixed by the layer's dimensions.
        """
        d = self.decomposition
        i, o = self.in_dim, self.out_dim
        zeros = not d
        if method == "eigen":
            ka, kg = self.kept(i), self.kept(o)
            shapes = [(i, ka), (ka,), (o, kg), (kg,)]
            keys = ["qa", "da", "qg", "dg"]
            return [
                torch.zeros(shape, dtype=self.dtype, device=self.device).reshape(-1)
                if zeros
                else d[key].reshape(-1)
                for key, shape in zip(keys, shapes)
            ]
        out = []
        for key, dim in (("a_inv", i), ("g_inv", o)):
            rows, cols = torch.triu_indices(dim, dim, device=self.device)
            out.append(
                torch.zeros(rows.numel(), dtype=self.dtype, device=self.device) if zeros else d[key][rows, cols]
            )
        return out

    def set_decomposition(self, method: Method, pieces: list[torch.Tensor], pi: float) -> None:
        """Installs a decomposition from :meth:`decomposition_tensors`'s pieces (a broadcast's).

        Args:
            method: The decomposition method.
            pieces: The flat pieces.
            pi: The factored-damping ratio they were computed with.
        """
        i, o = self.in_dim, self.out_dim
        if method == "eigen":
            qa, da, qg, dg = pieces
            self.decomposition = {
                "qa": qa.reshape(i, self.kept(i)).clone(),
                "da": da.clone(),
                "qg": qg.reshape(o, self.kept(o)).clone(),
                "dg": dg.clone(),
            }
        else:
            self.decomposition = {"a_inv": from_triu(pieces[0], i), "g_inv": from_triu(pieces[1], o)}
        self.pi = pi
        self._inverses = None
        self._reused = False

    def kept(self, dim: int) -> int:
        """Eigenpairs the eigen method keeps of a factor of size ``dim``."""
        return dim if self.rank is None else min(dim, self.rank)

    def drop_factors(self) -> None:
        """Frees the running factors and hook data but keeps the decomposition (a non-owner that
        preconditions with the owner's decomposition)."""
        self.reset_accumulators()
        self.a_factor = self.g_factor = None

    # ------------------------------------------------------------------ bookkeeping
    def curvature_bytes(self) -> int:
        """Bytes of curvature state this layer holds (running factors and decomposition)."""
        tensors = [self.a_factor, self.g_factor, *self.decomposition.values()]
        if self._inverses is not None:
            tensors += [self._inverses[1], self._inverses[2]]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def drop_state(self) -> None:
        """Frees the layer's curvature state and hook data (the layer is owned by another rank)."""
        self.reset_accumulators()
        self.a_factor = self.g_factor = None
        self.decomposition = {}
        self.pi = 1.0
        self._inverses = None

    def state_dict(self) -> dict[str, Any]:
        """The layer's running factors and decomposition (on CPU)."""
        return {
            "a_factor": None if self.a_factor is None else self.a_factor.cpu(),
            "g_factor": None if self.g_factor is None else self.g_factor.cpu(),
            "decomposition": {k: v.cpu() for k, v in self.decomposition.items()},
            "pi": self.pi,
            "rows_per_step": self.rows_per_step,
            # the cached inverses are rebuilt from the decomposition; whether it was already used
            # decides which (bit-different) path the next step takes, so resume stays exact
            "reused": self._reused,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned.

        Args:
            state: The saved state.
        """
        device = self.weight.device

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=self.dtype)

        self.a_factor = move(state["a_factor"])
        self.g_factor = move(state["g_factor"])
        self.decomposition = {
            k: v.to(device=device, dtype=self.dtype) for k, v in state["decomposition"].items()
        }
        self.pi = float(state["pi"])
        self._inverses = None
        self._reused = bool(state.get("reused", False))
        self.rows_per_step = int(state["rows_per_step"])


def top_eigenpairs(
    mat: torch.Tensor, rank: int | None, start: torch.Tensor | None = None, iterations: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``rank`` largest eigenpairs of a symmetric matrix, ascending like ``torch.linalg.eigh``.

    Without ``start`` (or when every eigenpair is kept), a full ``eigh``, truncated. With ``start``,
    the previous decomposition's ``(dim, rank)`` basis, ``iterations`` steps of subspace iteration
    from it (``Q <- qr(mat Q)``) and a Rayleigh-Ritz ``eigh`` of ``Q^T mat Q``: ``dim^2 rank`` per
    iteration instead of a full ``eigh``'s ``~dim^3``. Factors change slowly between decompositions,
    so the warm start keeps the basis converged (each decomposition adds ``iterations`` steps).

    Args:
        mat: The ``(dim, dim)`` symmetric matrix.
        rank: Eigenpairs to keep; ``None`` keeps all.
        start: The previous basis, or ``None``.
        iterations: Subspace-iteration steps from ``start``.

    Returns:
        ``(values, vectors)``: ``(k,)`` and ``(dim, k)``, ``k = min(rank, dim)``.
    """
    dim = mat.shape[0]
    if rank is None or dim <= rank:
        return torch.linalg.eigh(mat)
    if start is None or start.shape != (dim, rank):
        values, vectors = torch.linalg.eigh(mat)
        return values[-rank:], vectors[:, -rank:].contiguous()
    basis = start
    for _ in range(iterations):
        basis, _ = torch.linalg.qr(mat @ basis)  # (dim, rank)
    values, rotation = torch.linalg.eigh(basis.t() @ mat @ basis)  # Rayleigh-Ritz, (rank, rank)
    return values, basis @ rotation


def _spd_inverse(mat: torch.Tensor) -> torch.Tensor:
    """The inverse of a symmetric positive-definite matrix through its Cholesky factor (about 3x
    cheaper than a general inverse); a general inverse when the factorisation fails."""
    chol, info = torch.linalg.cholesky_ex(mat)
    if int(info) == 0:
        return torch.cholesky_inverse(chol)
    return torch.linalg.inv(mat)
