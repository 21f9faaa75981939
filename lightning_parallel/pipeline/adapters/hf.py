"""HFCausalLMAdapter: a Hugging Face causal LM (GPT-2, the Llama family) held by a LightningModule, as a pipeline.

``ChimeraStrategy(adapter="hf")`` (or no option at all: a module holding a ``PreTrainedModel`` is found by
itself) cuts ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` (and the models laid out like it: Mistral, Qwen2)
into blocks without touching the user's class:

- block 0, the embedding: GPT-2's ``wte`` + ``wpe`` (positions ``0..T-1``) and ``drop``; Llama's
  ``embed_tokens``;
- one block per decoder layer, called as the model calls it: the causal mask is rebuilt on every stage by
  ``transformers.masking_utils.create_causal_mask`` from the sequence length (``None`` for SDPA without
  padding: ``is_causal``), positions are ``0..T-1``, and Llama's rotary ``(cos, sin)`` come from each layer's own rotary module,
  built from the config (nothing of it is sent or saved);
- the last block: the final norm (``ln_f`` / ``norm``) and ``lm_head``.

Only one tensor travels between stages. A batch's padding ``attention_mask`` rides along as one extra
trailing channel of the hidden state (:func:`~.base.pack_channels`; gradient zero), so every stage masks as
the model does.

Batches and the loss: an ``(input_ids, targets)`` pair whose targets are already the next tokens (the
package's text data) gives ``cross_entropy(logits, targets)``; a mapping with ``input_ids`` (and optional
``labels``, default ``input_ids``, and ``attention_mask``) gives the usual shifted cross-entropy (position t
predicts label t+1, ``-100`` ignored), as ``model(input_ids, labels=labels).loss`` computes it.

GPT-2 ties ``lm_head`` to ``wte``: the embedding and the head sit in different stages, which the pipeline
strategies accept with ``stage_local=True`` (each stage keeps its copy, their gradients are summed).

``pretrained=DIR`` (a ``save_pretrained`` directory, safetensors): with the module built on the meta device
(``configure_model`` under ``stage_local=True``) every rank reads, through ``safetensors.safe_open``, only
the tensors of the blocks it materialises (:attr:`HFCausalLMAdapter.read_names` lists them), each once.
Without ``pretrained``, a meta-built block is initialised by the model's own ``_init_weights`` from a stream
seeded by ``(init_seed, block index)``: the same weights under every layout (not an eager build's). A tied
tensor makes the stage-local materialisation initialise its other block too, so that block is read whole
(GPT-2's last stage also reads ``wpe`` with ``wte``); an eagerly built module reads the whole file once in
``setup``.

``transformers`` and ``safetensors`` are imported here only; this module is imported only when the adapter
is used. It imports no Lightning.
"""

from __future__ import annotations

import inspect
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_parallel.pipeline.adapters.base import (
    PipelineAdapter,
    SampleBatch,
    pack_channels,
    resolve_attribute,
    unpack_channels,
)

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
"""``model_type`` values laid out like ``LlamaForCausalLM`` (``model.embed_tokens/layers/norm/rotary_emb``)."""


def _causal_mask(config: Any, hidden: Tensor, padding: Tensor | None, positions: Tensor) -> Any:
    """The mask a decoder layer expects, as the model itself builds it (``None`` when SDPA can be causal)."""
    from transformers.masking_utils import create_causal_mask

    parameters = inspect.signature(create_causal_mask).parameters
    embeds = "inputs_embeds" if "inputs_embeds" in parameters else "input_embeds"
    options: dict[str, Any] = {"config": config, embeds: hidden, "attention_mask": padding, "position_ids": positions}
    if "cache" in parameters:
        options["cache"] = None
    else:  # transformers 4.5x
        options.update(cache_position=positions[0], past_key_values=None)
    return create_causal_mask(**options)


def _split_hidden(x: Tensor, width: int) -> tuple[Tensor, Tensor | None]:
    hidden, extra = unpack_channels(x, x.shape[-1] - width)
    return hidden, (extra[0].long() if extra else None)


class Embedding(nn.Module):
    """Token (+ learned position) embedding: ``(B, T)`` ids, or ``(B, T, 2)`` ids and padding mask -> hidden."""

    def __init__(self, tokens: nn.Module, positions: nn.Module | None, dropout: nn.Module | None) -> None:
        super().__init__()
        self.tokens, self.positions, self.dropout = tokens, positions, dropout

    def forward(self, x: Tensor) -> Tensor:
        ids, mask = (x[..., 0], x[..., 1]) if x.dim() == 3 else (x, None)
        hidden = self.tokens(ids)  # (B, T, C)
        if self.positions is not None:
            hidden = hidden + self.positions(torch.arange(ids.shape[1], device=ids.device))
        if self.dropout is not None:
            hidden = self.dropout(hidden)
        return hidden if mask is None else pack_channels(hidden, mask)


class DecoderLayer(nn.Module):
    """One decoder layer with its causal mask (and rotary tensors) rebuilt from the sequence length.

    The rotary module (``type(model.rotary_emb)``) is this block's own, built from the config on the
    activation's device at the first forward and held outside the block's tensors: nothing of it is shared
    between stages, sent, saved or initialised from a checkpoint (its ``inv_freq`` is a function of the config).
    """

    def __init__(self, layer: nn.Module, config: Any, width: int, rotary: type[nn.Module] | None) -> None:
        super().__init__()
        self.layer, self.width = layer, width
        self.__dict__["config"] = config  # read only, not a module
        self.__dict__["rotary_type"] = rotary
        self.__dict__["rotary"] = None

    def _rotary(self, hidden: Tensor) -> nn.Module:
        rotary: nn.Module | None = self.__dict__["rotary"]
        if rotary is None or next(iter(rotary.buffers()), hidden).device != hidden.device:
            rotary = self.__dict__["rotary_type"](self.config).to(hidden.device)
            self.__dict__["rotary"] = rotary
        return rotary  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:
        hidden, mask = _split_hidden(x, self.width)
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)  # (1, T)
        options: dict[str, Any] = {"attention_mask": _causal_mask(self.config, hidden, mask, positions)}
        if self.__dict__["rotary_type"] is not None:
            options.update(position_ids=positions, position_embeddings=self._rotary(hidden)(hidden, positions))
        out = self.layer(hidden, **options)
        out = out[0] if isinstance(out, tuple) else out  # transformers 4.x returns a tuple
        return out if mask is None else pack_channels(out, mask)


class LMHead(nn.Module):
    """Final norm and ``lm_head``: hidden (with or without the mask channel) -> logits ``(B, T, V)``."""

    def __init__(self, norm: nn.Module, head: nn.Module, width: int) -> None:
        super().__init__()
        self.norm, self.head, self.width = norm, head, width

    def forward(self, x: Tensor) -> Tensor:
        hidden, _ = _split_hidden(x, self.width)
        return self.head(self.norm(hidden))  # type: ignore[no-any-return]


def _find_model(module: nn.Module, attribute: str | None) -> tuple[str, nn.Module]:
    from lightning_parallel.pipeline.adapters import find_hf_model

    name = attribute if attribute is not None else find_hf_model(module)
    if name is None:
        raise ValueError(
            f"adapter='hf' found no Hugging Face PreTrainedModel in {type(module).__name__}; name its attribute: "
            "adapter='hf:ATTRIBUTE' (e.g. 'hf:model'), or use blocks='...' for a sequential trunk."
        )
    target = resolve_attribute(module, name, argument="adapter")
    if not isinstance(target, nn.Module):
        raise ValueError(f"adapter='hf:{name}' names a {type(target).__name__}, not a Hugging Face model.")
    return name, target


class HFCausalLMAdapter(PipelineAdapter):
    """The pipeline protocol of a LightningModule that holds a Hugging Face causal LM.

    Args:
        attribute: dotted name of the ``PreTrainedModel`` in the LightningModule (e.g. ``"model"``); ``None``
            (default) takes the first one found.
        pretrained: a ``save_pretrained`` directory (safetensors) to load the weights from, stage by stage
            when the module is built on the meta device. Default ``None`` (the module's own weights).
    """

    name = "hf"

    def __init__(self, attribute: str | None = None, *, pretrained: str | None = None) -> None:
        self.attribute = attribute
        self.pretrained = pretrained
        self.family = ""
        self.read_names: list[str] = []
        """The file's tensor names this process has read (stage-by-stage loading)."""
        self._model: nn.Module | None = None
        self._blocks: list[nn.Module] = []
        self._fresh = False
        self._written: set[int] = set()
        self._files: dict[str, str] | None = None

    # ------------------------------------------------------------------ the trunk
    def prepare(self, module: nn.Module, *, sample_batch: SampleBatch) -> None:
        self._build_blocks(module)
        self._fresh = False
        self._written = set()
        if self.pretrained is None and not isinstance(getattr(module, "init_seed", None), int):
            # the seed of meta-built blocks' initial weights; the strategy broadcasts it from rank 0
            module.__dict__["init_seed"] = int(torch.initial_seed() % (2**31 - 1))  # draws nothing
        model = self._model
        if self.pretrained is not None and model is not None and not any(t.device.type == "meta" for t in model.parameters()):
            # Built eagerly: the whole model exists on every rank anyway, so read the whole file once.
            for index, block in enumerate(self._blocks):
                self.pipeline_init_weights(module, index, block)

    def _build_blocks(self, module: nn.Module) -> None:
        self.attribute, found = _find_model(module, self.attribute)
        model: Any = found  # a transformers model: its submodules are typed by transformers, not here
        config: Any = getattr(model, "config", None)
        model_type = getattr(config, "model_type", type(model).__name__)
        head = getattr(model, "lm_head", None)
        if model_type == "gpt2" and hasattr(model, "transformer") and head is not None:
            body = model.transformer
            if getattr(config, "add_cross_attention", False):
                raise ValueError("adapter='hf': GPT-2 with add_cross_attention=True (an encoder-decoder) is not supported.")
            width = int(config.n_embd)
            self._blocks = [
                Embedding(body.wte, body.wpe, body.drop),
                *(DecoderLayer(layer, config, width, None) for layer in body.h),
                LMHead(body.ln_f, head, width),
            ]
        elif model_type in LLAMA_LIKE and hasattr(model, "model") and head is not None:
            body = model.model
            width = int(config.hidden_size)
            rotary = type(body.rotary_emb)
            self._blocks = [
                Embedding(body.embed_tokens, None, None),
                *(DecoderLayer(layer, config, width, rotary) for layer in body.layers),
                LMHead(body.norm, head, width),
            ]
        else:
            raise ValueError(
                f"adapter='hf' supports GPT2LMHeadModel and the Llama family {LLAMA_LIKE} (…ForCausalLM); "
                f"{self.attribute} is a {type(model).__name__} (model_type={model_type!r}). Name its layers with "
                "blocks='...' (a sequential trunk) or split it with adapter='traced'."
            )
        self._model, self.family = model, model_type

    def pipeline_blocks(self, module: nn.Module) -> Sequence[nn.Module]:
        if not self._fresh:
            # The precision plugin converts the module after prepare (QAT swaps layers): wrap them again now.
            self._build_blocks(module)
            self._fresh = True
        return self._blocks

    def pipeline_input(self, module: nn.Module, batch: Any) -> Tensor:
        if isinstance(batch, Mapping):
            ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            return ids if mask is None else torch.stack([ids, mask.to(ids.dtype)], dim=-1)  # (B, T, 2)
        if isinstance(batch, (tuple, list)):
            return batch[0]  # type: ignore[no-any-return]
        return batch  # type: ignore[no-any-return]

    def pipeline_loss(self, module: nn.Module, output: Tensor, batch: Any) -> Tensor:
        vocab = output.shape[-1]
        if isinstance(batch, (tuple, list)):  # (input_ids, next-token targets)
            return F.cross_entropy(output.reshape(-1, vocab).float(), batch[1].reshape(-1), ignore_index=-100)
        labels = batch.get("labels", batch["input_ids"]) if isinstance(batch, Mapping) else batch
        # shifted: position t predicts label t + 1
        logits = output[:, :-1].reshape(-1, vocab).float()
        return F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)

    def describe(self) -> str:
        return f"HFCausalLMAdapter({self.attribute!r}, {self.family or 'not prepared'})"

    # ------------------------------------------------------------------ stage-by-stage loading
    def _file_of_names(self) -> dict[str, str]:
        if self._files is None:
            root = Path(str(self.pretrained))
            index = root / "model.safetensors.index.json"
            if index.exists():
                weight_map = json.loads(index.read_text())["weight_map"]
                self._files = {name: str(root / file) for name, file in weight_map.items()}
            elif (root / "model.safetensors").exists():
                from safetensors import safe_open

                path = str(root / "model.safetensors")
                with safe_open(path, framework="pt") as handle:
                    self._files = dict.fromkeys(handle.keys(), path)
            else:
                raise ValueError(
                    f"pretrained={self.pretrained!r} holds no model.safetensors (or its index); write it with "
                    "model.save_pretrained(DIR) (safetensors is the default)."
                )
        return self._files

    def pipeline_init_weights(self, module: nn.Module, index: int, block: nn.Module) -> None:
        """Load block ``index``'s tensors from ``pretrained`` (only those); without it, initialise the block with
        the model's own ``_init_weights`` from a random stream seeded by ``(module.init_seed, index)`` alone, so
        the weights do not depend on the layout (they differ from an eager build's, which draws in module order)."""
        model = self._model
        if model is None:
            raise RuntimeError("HFCausalLMAdapter.prepare was not called.")
        if self.pretrained is None:
            self._random_init(module, model, index, block)
            return
        from safetensors import safe_open

        files = self._file_of_names()
        aliases: dict[int, list[str]] = {}
        for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
            aliases.setdefault(id(tensor), []).append(name)
        wanted: dict[str, list[Tensor]] = {}
        missing: list[str] = []
        for tensor in [*block.parameters(), *block.buffers()]:
            if id(tensor) in self._written:
                continue  # a tied tensor another block of this rank has loaded already
            names = aliases.get(id(tensor), [])
            found = next((n for n in names if n in files), None)
            if found is not None:
                wanted.setdefault(found, []).append(tensor)
            elif names:
                missing.append(names[0])
        if missing:
            warnings.warn(
                f"pretrained={self.pretrained!r} lacks {len(missing)} tensor(s) of block {index} "
                f"({', '.join(missing[:3])}); they keep their current values.",
                stacklevel=2,
            )
        by_file: dict[str, list[str]] = {}
        for name in wanted:
            by_file.setdefault(files[name], []).append(name)
        with torch.no_grad():
            for path, names in by_file.items():
                with safe_open(path, framework="pt") as handle:
                    for name in names:
                        value = handle.get_tensor(name)
                        self.read_names.append(name)
                        for tensor in wanted[name]:
                            tensor.copy_(value.to(device=tensor.device, dtype=tensor.dtype))
                            self._written.add(id(tensor))

    @staticmethod
    def _random_init(module: nn.Module, model: Any, index: int, block: nn.Module) -> None:
        seed = (int(getattr(module, "init_seed", 0)) * 1_000_003 + 7_919 * (index + 1)) % (2**31 - 1)
        devices = [t.device for t in block.parameters() if t.device.type == "cuda"][:1]
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            for sub in block.modules():
                model._init_weights(sub)
