"""Common base of the fake quantizers: state kept out of the module ``state_dict``.

Design decision: a quantizer's tensors (step sizes, flags) are excluded from ``Module.state_dict()`` and
travel separately (:func:`~lightning_parallel.quantization.state.quantizer_state_dict`). A QAT model's
``state_dict`` therefore has exactly the keys of the original float model, which is what Lightning needs:
when resuming with ``ckpt_path`` the Trainer loads the model weights *before* the precision plugin converts
the model, and ``LightningModule.load_from_checkpoint`` builds an unconverted model. Both would fail on extra
quantizer keys (the problem that made Lightning drop its QAT callback). The precision plugin stores the
quantizer state in its own checkpoint entry and restores it after conversion.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override


class QuantizerBase(nn.Module):
    """A module whose parameters and buffers are quantizer state, not model weights."""

    @override
    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        return None

    @override
    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        return None

    def quantizer_state(self) -> dict[str, Tensor]:
        """This quantizer's own parameters and buffers, detached (keys without a prefix)."""
        state = {name: p.detach().clone() for name, p in self.named_parameters(recurse=False)}
        state.update({name: b.detach().clone() for name, b in self.named_buffers(recurse=False)})
        return state

    def load_quantizer_state(self, state: dict[str, Tensor]) -> None:
        """Copy ``state`` (as returned by :meth:`quantizer_state`) into this quantizer.

        Args:
            state: tensors keyed by parameter or buffer name; shapes must match.
        """
        own: dict[str, Tensor] = dict(self.named_parameters(recurse=False))
        own.update(dict(self.named_buffers(recurse=False)))
        if set(own) != set(state):
            raise ValueError(
                f"quantizer state has keys {sorted(state)} but {type(self).__name__} expects {sorted(own)}; "
                "was the checkpoint written in another quantization mode?"
            )
        with torch.no_grad():
            for name, tensor in own.items():
                if tensor.shape != state[name].shape:
                    raise ValueError(
                        f"quantizer state {name!r} has shape {tuple(state[name].shape)} but "
                        f"{type(self).__name__} expects {tuple(tensor.shape)}; check bits and group_size."
                    )
                tensor.copy_(state[name])
