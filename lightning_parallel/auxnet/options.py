"""The options of AuxNet training, validated once (the Lightning strategy passes its arguments through).

This module imports no Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_parallel.auxnet.objective import LossName, RhoSchedule, check_loss


@dataclass(frozen=True)
class AuxNetOptions:
    """How the local losses are formed and how often the auxiliary networks are refitted.

    Args:
        loss: ``"penalty"`` or ``"augmented_lagrangian"`` (see :mod:`lightning_parallel.auxnet.objective`).
            Default ``"penalty"``.
        rho: penalty weight at step 0 (> 0). Default 10.0.
        rho_growth: factor applied to ``rho`` per training step (>= 1; 1 keeps it constant). Default 1.0.
        rho_max: upper bound of ``rho`` (``None``: unbounded). Default ``None``.
        aux_update_interval: refit the auxiliary networks to the stages' true inputs every this many training
            steps, at the start of the step (0: never). Default 10.
        aux_steps: gradient steps per refit, on the step's batch. Default 1.
        aux_lr: learning rate of the refits' Adam optimizer (one per stage). Default 3e-3.
        oracle: replace the auxiliary networks by the true prefix of the model: stage ``s`` waits for stage
            ``s - 1``'s output and trains on it (serial; for tests). Default False.
        stage_input_gradient: differentiate each stage's local loss through the stage into its auxiliary
            input (the exact gradient of the objective for the auxiliary networks; one input-gradient pass per
            stage and micro-batch). ``False``: a stage trains on its auxiliary input as a constant (weight
            gradient only, no input gradient); the auxiliary networks then learn only from the constraint at
            their stage's input and from the refits, i.e. they track the trunk's activations instead of
            bending towards inputs that suit their own stage. Default True.
        true_input_loss: at every refit, the last stage also takes the task loss on its true input (from the
            refit's end-to-end forward), added to the step's gradient: the real forward's last stage then
            trains on the inputs it sees at validation. Costs one forward and weight gradient of the last
            stage per micro-batch and refit. Default False.
    """

    loss: LossName = "penalty"
    rho: float = 10.0
    rho_growth: float = 1.0
    rho_max: float | None = None
    aux_update_interval: int = 10
    aux_steps: int = 1
    aux_lr: float = 3e-3
    oracle: bool = False
    stage_input_gradient: bool = True
    true_input_loss: bool = False

    def __post_init__(self) -> None:
        check_loss(self.loss)
        self.rho_schedule  # noqa: B018 - validates rho, rho_growth and rho_max
        for name, value, low in (
            ("aux_update_interval", self.aux_update_interval, 0),
            ("aux_steps", self.aux_steps, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(
                    f"{name}={value!r} must be an integer >= {low}"
                    + (" (0 never refits the auxiliary networks), e.g. 10." if low == 0 else ", e.g. 1.")
                )
        if isinstance(self.aux_lr, bool) or not isinstance(self.aux_lr, (int, float)) or not self.aux_lr > 0:
            raise ValueError(f"aux_lr={self.aux_lr!r} must be a positive learning rate, e.g. 1e-3.")
        flags = (
            ("oracle", self.oracle),
            ("stage_input_gradient", self.stage_input_gradient),
            ("true_input_loss", self.true_input_loss),
        )
        for name, flag in flags:
            if not isinstance(flag, bool):
                raise ValueError(f"{name}={flag!r} must be True or False.")

    @property
    def rho_schedule(self) -> RhoSchedule:
        """The penalty weight over training steps."""
        return RhoSchedule(self.rho, self.rho_growth, self.rho_max)

    @property
    def uses_multipliers(self) -> bool:
        """Whether the objective has multipliers (the augmented Lagrangian)."""
        return self.loss == "augmented_lagrangian"

    def refits_at(self, step: int) -> bool:
        """Whether the auxiliary networks are refitted at the start of training step ``step``."""
        return not self.oracle and self.aux_update_interval > 0 and step % self.aux_update_interval == 0
