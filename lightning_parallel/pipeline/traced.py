"""Split a traceable module into pipeline stages with ``torch.distributed.pipelining.pipeline``.

:func:`split_traced` traces ``module(*args, **kwargs)`` with torch's own ``pipeline(module, mb_args,
mb_kwargs, split_spec)`` (``torch.export``), cutting before each named submodule, and turns the split graph
(``pipe.split_gm``: ``submod_pp_0``, ``submod_pp_1``, ...) into one :class:`TracedStage` per stage that the
runtime of this package can run.

Design decisions:

- Parameters and buffers stay the module's own objects: torch moves them into the stage graphs under their
  original dotted names (``encoder.layers.2.linear1.weight``), so the module's ``state_dict``, checkpoints
  and ``load_from_checkpoint`` are the user's; nothing is copied.
- Exactly one tensor travels between stages (the runtime's contract). A split graph passes several values
  across a boundary (a skip connection, a mask, a later stage's use of an input such as the targets): every
  value produced at or before stage i and used after it is *live* at boundary i and is packed into one flat
  tensor (:func:`pack`). Floats are promoted to the widest floating dtype among them (exact), integers and
  booleans travel as their own bytes reinterpreted as words of that dtype (exact; they get no gradient),
  and a small header of int64 values carried the same way records each value's dtype and shape. The receiving stage unpacks
  by slicing, so autograd carries each float value's gradient back through the packed tensor.
- Dimension 0 of every input is traced as dynamic (``torch.export`` with ``Dim.AUTO``: torch's own
  ``pipeline()`` steps, ``annotate_split_points`` and ``Pipe._from_traced``, given ``dynamic_shapes``), so
  micro-batches of any size >= 2 run (uneven micro-batches, a short last batch). Where export cannot keep it
  dynamic, ``torch.distributed.pipelining.pipeline`` itself traces the sample's shapes. Every dimension the
  trace fixed is checked on stage 0's input: another shape is refused with the fix, never run on a graph
  that may not fit it. The graph also fixes the train/eval behaviour of the sample's mode; a module with dropout or
  batch norm is traced a second time in eval mode for validation and test.
- A parameter used by two stages (tied weights): torch copies it into each stage (``Pipe.replicated_params``),
  so the copies would train apart. That is refused with the parameter's name and the stages; keep its users
  in one stage or untie it.
- ``pipeline`` leaves the split submodules' ``forward`` patched (``annotate_split_points``); it is restored
  before anything else happens, also when tracing fails.
- When ``torch.export`` fails, :func:`untraceable_message` names the operation it stopped at (the innermost
  frame outside torch's tracing machinery, and the user's own line that led there).

This module imports no Lightning.
"""

from __future__ import annotations

import functools
import inspect
import traceback
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.utils import _pytree as pytree

__all__ = [
    "TracedSplit",
    "TracedStage",
    "auto_split_points",
    "pack",
    "split_traced",
    "unpack",
    "untraceable_message",
]

_CODES = [
    torch.float32, torch.float16, torch.bfloat16, torch.float64,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
]
_MODE_DEPENDENT = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._NormBase)
# Frames of torch's tracing machinery; the op that stopped the trace is the innermost frame outside them.
_MACHINERY = (
    "/torch/fx/", "/torch/_export/", "/torch/export/", "/torch/_subclasses/", "/torch/_dynamo/",
    "/torch/_ops.py", "/torch/_refs/", "/torch/_prims", "/torch/_decomp/", "/torch/utils/", "/torch/overrides.py",
    "/torch/nn/modules/module.py", "/torch/_meta_registrations.py", "/torch/_library/", "/torch/_higher_order_ops/",
    "/torch/distributed/pipelining/", "/torch/_tensor.py", "/torch/_functorch/", "/torch/_guards.py",
    "/lightning_parallel/pipeline/traced.py",
)


# ---------------------------------------------------------------------------------------------- packing
def _words(values: Tensor, dtype: torch.dtype) -> Tensor:
    """The bytes of ``values`` (any dtype) as ``dtype`` words, zero-padded to a whole word."""
    raw = values.detach().reshape(-1).contiguous().view(torch.uint8)
    pad = (-raw.numel()) % dtype.itemsize
    if pad:
        raw = torch.cat([raw, raw.new_zeros(pad)])
    return raw.view(dtype)


def _word_count(numel: int, source: torch.dtype, dtype: torch.dtype) -> int:
    return -(-numel * source.itemsize // dtype.itemsize)


def _from_words(words: Tensor, source: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    """Reverse :func:`_words` (a copy: the slice's offset need not suit ``source``'s alignment)."""
    numel = 1
    for size in shape:
        numel *= size
    raw = words.detach().clone().view(torch.uint8)[: numel * source.itemsize]
    return raw.view(source).view(shape)


_INT = len(_CODES)  # the header's code of a Python int (a size a dynamic trace passes between stages)


def pack(values: Sequence[Tensor | int]) -> Tensor:
    """Flatten ``values`` into one 1-D floating tensor that :func:`unpack` reverses exactly.

    Floats are converted to the widest floating dtype among them (float32 when there are none); integers and
    booleans travel as their own bytes (a bool mask costs one byte per value); a header of int64 values (count,
    then dtype code, ndim and shape of each) leads.
    """
    device = next((v.device for v in values if isinstance(v, Tensor)), None)
    tensors = [v if isinstance(v, Tensor) else torch.tensor(int(v), device=device) for v in values]
    floats = [t.dtype for t in tensors if t.is_floating_point()]
    dtype = functools.reduce(torch.promote_types, floats) if floats else torch.float32
    header = [len(tensors)]
    for v, t in zip(values, tensors):
        header += [_CODES.index(t.dtype) if isinstance(v, Tensor) else _INT, t.dim(), *t.shape]
    parts = [_words(torch.tensor(header, dtype=torch.int64, device=device), dtype)]
    for t in tensors:
        parts.append(t.reshape(-1).to(dtype) if t.is_floating_point() else _words(t, dtype))
    return torch.cat(parts)


_Specs = Sequence[tuple["torch.dtype | None", tuple[int, ...]]]  # dtype (None: a Python int) and shape of each


def _specs(packed: Tensor) -> list[tuple[torch.dtype | None, tuple[int, ...]]]:
    per = 8 // packed.element_size()
    words = packed.detach()
    count = int(_from_words(words[:per], torch.int64, (1,))[0])
    # The header's length depends on the ndims: read at most 16 values per tensor (on the CPU, once per size).
    head = words[: per * (1 + 16 * max(count, 1))].cpu()
    values = _from_words(head, torch.int64, (head.numel() // per,)).tolist()
    specs: list[tuple[torch.dtype | None, tuple[int, ...]]] = []
    at = 1
    for _ in range(count):
        code, ndim = values[at], values[at + 1]
        specs.append((None if code == _INT else _CODES[code], tuple(values[at + 2 : at + 2 + ndim])))
        at += 2 + ndim
    return specs


def unpack(packed: Tensor, specs: _Specs | None = None) -> list[Any]:
    """The values :func:`pack` flattened into ``packed`` (floats keep their gradient path)."""
    specs = _specs(packed) if specs is None else specs
    at = _word_count(1 + sum(2 + len(shape) for _, shape in specs), torch.int64, packed.dtype)
    out: list[Any] = []
    for dtype, shape in specs:
        numel = 1
        for size in shape:
            numel *= size
        if dtype is not None and dtype.is_floating_point:
            out.append(packed[at : at + numel].view(shape).to(dtype))
            at += numel
        else:
            source = torch.int64 if dtype is None else dtype
            count = _word_count(numel, source, packed.dtype)
            value = _from_words(packed[at : at + count], source, shape)
            out.append(int(value) if dtype is None else value)
            at += count
    return out


# ---------------------------------------------------------------------------------------------- split points
def auto_split_points(module: nn.Module, stages: int) -> list[str]:
    """Names of the submodules to cut before: an even split of the module's longest ``nn.ModuleList`` /
    ``nn.Sequential`` (ties: the one with most parameters) into ``stages`` runs.

    Raises:
        ValueError: if no list of at least ``stages`` entries exists.
    """
    candidates = [
        (len(sub), sum(p.numel() for p in sub.parameters()), name)
        for name, sub in module.named_modules()
        if isinstance(sub, (nn.ModuleList, nn.Sequential)) and len(sub) >= stages
    ]
    if not candidates:
        lists = {n: len(m) for n, m in module.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential))}
        raise ValueError(
            f"split_points='auto' needs an nn.ModuleList/nn.Sequential of at least stages={stages} entries in "
            f"{type(module).__name__}; its lists: {lists or 'none'}. Name the split points instead, e.g. "
            "split_points=['encoder.layers.2']."
        )
    length, _, name = max(candidates)
    prefix = f"{name}." if name else ""  # the module itself may be the list
    return [f"{prefix}{(k * length) // stages}" for k in range(1, stages)]


# ---------------------------------------------------------------------------------------------- errors
def untraceable_message(module: nn.Module, error: BaseException) -> str:
    """Why ``torch.export`` could not trace ``module``: the operation it stopped at and the user's line."""
    cause: BaseException = error
    while cause.__cause__ is not None and "cannot capture your model" in str(cause):
        cause = cause.__cause__
    frames = traceback.extract_tb(cause.__traceback__)
    outside = [
        f for f in frames
        if not f.filename.startswith("<") and not any(part in f.filename.replace("\\", "/") for part in _MACHINERY)
    ]
    where = ""
    if outside:
        op = outside[-1]
        where = f" at {op.filename}:{op.lineno} in {op.name}: `{(op.line or '').strip()}`"
        users = [f for f in outside if "/torch/" not in f.filename.replace("\\", "/")]
        if users and users[-1] is not op:
            user = users[-1]
            where += f" (called from {user.filename}:{user.lineno}: `{(user.line or '').strip()}`)"
    first = (str(cause).strip().splitlines() or [""])[0]
    kind = "data-dependent control flow" if "data-dependent" in str(cause) else "an untraceable operation"
    return (
        f"torch.export cannot trace {type(module).__name__}: {kind}{where}. {type(cause).__name__}: {first} "
        "Make that code traceable (tensor ops instead of Python branches on tensor values, e.g. torch.where), or "
        "pipeline the module through its trunk (blocks='ATTRIBUTE') or the pipeline protocol; see docs/models.md."
    )


# ---------------------------------------------------------------------------------------------- stages
@dataclass
class _StageCall:
    """What one stage does in the split graph's root: which values it reads and which it produces."""

    submodule: str
    reads: list[str]
    produces: list[tuple[str, int | None]]  # (value name, index in the submodule's output tuple or None)


class TracedStage(nn.Module):
    """Stage ``index`` of a traced split: one packed tensor in, one packed tensor out (the last: the output).

    Args:
        index: the stage's position.
        graph: the stage's graph module from ``pipe.split_gm`` (holds the module's own parameters).
        call: what the stage reads and produces in the split graph.
        live_in: names of the values packed into the input, in order.
        live_out: names of the values to pack into the output (``None`` for the last stage).
        outputs: the last stage's output values, in the order of the module's flattened output.
        output_spec: the pytree spec that rebuilds the module's output from ``outputs``.
        eval_graph: the same stage traced in eval mode (``None`` when train and eval behave alike).
        owner: the traced module, whose ``training`` flag picks the graph (the stages are not its submodules,
            so ``owner.eval()`` does not reach them). Default: the stage's own flag.
    """

    eval_graph: nn.Module | None
    owner: nn.Module | None

    def __init__(
        self,
        index: int,
        graph: nn.Module,
        call: _StageCall,
        *,
        live_in: list[str],
        live_out: list[str] | None,
        outputs: list[str],
        output_spec: pytree.TreeSpec | None,
        eval_graph: nn.Module | None = None,
        owner: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.__dict__["owner"] = owner
        self.index = index
        self.graph = graph
        self.__dict__["eval_graph"] = eval_graph  # shares the parameters; not a second registration
        self.call = call
        self.live_in, self.live_out, self.outputs, self.output_spec = live_in, live_out, outputs, output_spec
        self._specs: dict[int, list[tuple[torch.dtype | None, tuple[int, ...]]]] = {}

    def forward(self, packed: Tensor) -> Any:
        specs = self._specs.get(packed.numel())
        if specs is None:
            specs = self._specs[packed.numel()] = _specs(packed)
        env = dict(zip(self.live_in, unpack(packed, specs)))
        training = self.training if self.owner is None else self.owner.training
        graph = self.graph if training or self.eval_graph is None else self.eval_graph
        result = graph(*(env[name] for name in self.call.reads))
        for name, position in self.call.produces:
            env[name] = result if position is None else result[position]
        if self.live_out is not None:
            return pack([env[name] for name in self.live_out])
        flat = [env[name] for name in self.outputs]
        if self.output_spec is None:
            return flat[0] if len(flat) == 1 else tuple(flat)
        return pytree.tree_unflatten(flat, self.output_spec)

    def __deepcopy__(self, memo: dict[int, Any]) -> TracedStage:
        # Chimera's second-pipeline copy: copies of the graphs' parameters, the same wiring.
        import copy

        graph = copy.deepcopy(self.graph, memo)
        eval_graph = None if self.eval_graph is None else _rebind(copy.deepcopy(self.eval_graph, memo), graph)
        twin = TracedStage(
            self.index, graph, self.call, live_in=self.live_in, live_out=self.live_out, outputs=self.outputs,
            output_spec=self.output_spec, eval_graph=eval_graph, owner=self.owner,
        )
        twin.train(self.training)
        return twin

    def extra_repr(self) -> str:
        return f"index={self.index}, in={len(self.live_in)} values, out={'output' if self.live_out is None else len(self.live_out)}"


def _rebind(eval_graph: nn.Module, graph: nn.Module) -> nn.Module:
    """Point ``eval_graph``'s parameters and buffers at ``graph``'s (same names: the module's own)."""
    own: dict[str, Tensor] = dict(graph.named_parameters())
    own.update(dict(graph.named_buffers()))
    for name, _ in [*eval_graph.named_parameters(), *eval_graph.named_buffers()]:
        if name in own:
            parent = eval_graph.get_submodule(name.rpartition(".")[0]) if "." in name else eval_graph
            leaf = name.rpartition(".")[2]
            if isinstance(own[name], nn.Parameter):
                parent._parameters[leaf] = own[name]  # type: ignore[assignment]
            else:
                parent._buffers[leaf] = own[name]
    return eval_graph


@dataclass
class TracedSplit:
    """The stages of a traced module and how its inputs enter stage 0."""

    stages: list[TracedStage]
    inputs: list[tuple[str, torch.dtype, tuple[int | None, ...]]]  # stage 0's placeholders: name, dtype, shape
    # (``None``: a dimension the trace kept dynamic; a micro-batch of 0 or 1 examples is still refused there,
    # since torch.export assumes such sizes are >= 2)
    input_positions: list[int]  # where each packed placeholder sits among the flattened (args, kwargs)
    split_points: list[str]
    sample_output: Tensor | None = None  # the module's first output tensor on the sample (e.g. logits)

    def stage_input(self, args: Sequence[Any], kwargs: Mapping[str, Any], *, forward: Any) -> Tensor:
        """Pack the flattened ``(args, kwargs)`` of one micro-batch for stage 0, checking the traced shapes."""
        leaves = _flat_inputs(forward, args, kwargs)
        values = []
        for (name, dtype, shape), position in zip(self.inputs, self.input_positions):
            value = leaves[position]
            if not isinstance(value, Tensor) or value.dtype != dtype or not _fits(tuple(value.shape), shape):
                got = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"The traced pipeline was traced with input {name!r} of shape {shape} {dtype} (None: any size "
                    f"of at least 2); this micro-batch gives {got}. The trace is specialised on the sample's other "
                    "dimensions (and on its batch size where torch.export could not keep it dynamic): keep every "
                    "sequence the same length and at least 2 examples per micro-batch, or, for a fixed batch size, "
                    "a batch size that is a multiple of micro_batches and drop_last=True on the dataloaders."
                )
            values.append(value)
        return pack(values)


def _fits(shape: tuple[int, ...], traced: tuple[int | None, ...]) -> bool:
    return len(shape) == len(traced) and all(t == s if t is not None else s >= 2 for s, t in zip(shape, traced))


def _flat_inputs(forward: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[Any]:
    """The leaves of ``(args, kwargs)`` in ``torch.export``'s placeholder order (keyword arguments in the order
    of the signature)."""
    try:
        bound = inspect.signature(forward).bind(*args, **kwargs)
        values = list(bound.arguments.values())
    except (TypeError, ValueError):
        values = [*args, *kwargs.values()]
    return pytree.tree_leaves(values)


def _restore_forwards(module: nn.Module, names: Sequence[str]) -> None:
    for name in names:
        try:
            sub = module.get_submodule(name)
        except AttributeError:
            continue
        sub.__dict__.pop("forward", None)
        sub.__dict__.pop("_orig_forward", None)


def _batch_dynamic(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``dynamic_shapes`` for ``torch.export``: dimension 0 of every tensor input may vary (``Dim.AUTO``: torch
    keeps it symbolic where the model allows, else specialises it)."""
    from torch.export import Dim

    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in inspect.signature(module.forward).parameters.values()):
        raise TypeError("variadic forward")
    return {
        name: pytree.tree_map(lambda v: {0: Dim.AUTO} if isinstance(v, Tensor) and v.dim() > 0 else None, value)
        for name, value in bound.arguments.items()
    }


def _trace(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], split_points: Sequence[str]) -> Any:
    """The ``Pipe`` of ``module`` cut before ``split_points``: traced with a dynamic batch dimension when
    ``torch.export`` allows it (``pipeline()``'s own steps, with ``dynamic_shapes``), else by
    ``torch.distributed.pipelining.pipeline`` itself (shapes of the sample)."""
    from torch.distributed.pipelining import SplitPoint, pipeline
    from torch.distributed.pipelining._IR import MultiUseParameterConfig, Pipe, annotate_split_points

    for name in split_points:
        try:
            module.get_submodule(name)
        except AttributeError as err:
            raise ValueError(
                f"split_points={list(split_points)!r}: {type(module).__name__} has no submodule {name!r} ({err})."
            ) from None
    spec = {name: SplitPoint.BEGINNING for name in split_points}
    try:
        annotate_split_points(module, spec)
        exported = torch.export.export(module, args, kwargs, dynamic_shapes=_batch_dynamic(module, args, kwargs))
        return Pipe._from_traced(module, exported, MultiUseParameterConfig.REPLICATE)
    except Exception as err:  # retried below without dynamic shapes; that error is the one reported
        dynamic_error = err
    finally:
        _restore_forwards(module, split_points)
    try:
        pipe = pipeline(module, args, kwargs, split_spec=spec)
        sizes = sorted({int(v.shape[0]) for v in pytree.tree_leaves((args, kwargs)) if isinstance(v, Tensor) and v.dim()})
        warnings.warn(
            f"torch.export could not keep the batch dimension of {type(module).__name__} dynamic "
            f"({type(dynamic_error).__name__}: {(str(dynamic_error).strip().splitlines() or [''])[0][:200]}); it is "
            f"traced for micro-batches of {sizes} examples only: use equal micro-batches and drop_last=True.",
            stacklevel=3,
        )
        return pipe
    except Exception as err:  # torch.export raises many kinds; all mean "not traceable"
        raise TypeError(untraceable_message(module, err)) from err
    finally:
        _restore_forwards(module, split_points)


def _stage_calls(graph: fx.Graph) -> tuple[list[str], list[_StageCall], list[str], dict[str, int]]:
    """Placeholders, the stages' calls, the output's value names and where each value is produced."""
    placeholders: list[str] = []
    calls: list[_StageCall] = []
    produced_at: dict[str, int] = {}
    outputs: list[str] = []
    call_of: dict[str, _StageCall] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            placeholders.append(node.name)
            produced_at[node.name] = -1
        elif node.op == "call_module":
            reads = [a.name if isinstance(a, fx.Node) else _refuse_constant(node, a) for a in node.args]
            call = _StageCall(node.target, reads, [])
            call_of[node.name] = call
            calls.append(call)
            produced_at[node.name] = len(calls) - 1
            if not any(user.target is _getitem() for user in node.users):
                call.produces.append((node.name, None))
        elif node.op == "call_function" and node.target is _getitem():
            source, position = node.args
            call_of[source.name].produces.append((node.name, int(position)))
            produced_at[node.name] = produced_at[source.name]
        elif node.op == "output":
            outputs = [a.name for a in pytree.tree_leaves(node.args) if isinstance(a, fx.Node)]
    return placeholders, calls, outputs, produced_at


def _getitem() -> Any:
    import operator

    return operator.getitem


def _refuse_constant(node: fx.Node, value: Any) -> str:
    raise TypeError(f"Stage {node.target} of the traced split takes a constant {value!r}; expected graph values only.")


def _mode_dependent(module: nn.Module) -> bool:
    return any(
        isinstance(m, _MODE_DEPENDENT) and (not isinstance(m, nn.modules.dropout._DropoutNd) or m.p > 0)
        for m in module.modules()
    )


def _check_tied(pipe: Any, module: nn.Module) -> None:
    replicated = list(getattr(pipe, "replicated_params", []))
    if not replicated:
        return
    mapping = replicated[0]
    stages = sorted(int(name.rsplit("_", 1)[1]) for name in mapping)
    names = sorted(set(mapping.values()))
    raise ValueError(
        f"{type(module).__name__}'s parameter {' = '.join(names)} is used by stages {stages} of the traced split "
        f"({len(replicated)} tied parameter(s) in all); torch would give each stage its own copy and the copies "
        "would train apart. Choose split_points that keep its users in one stage, or untie the weights; a "
        "Hugging Face causal LM with tied embeddings can use adapter='hf'."
    )


def split_traced(
    module: nn.Module,
    args: Sequence[Any],
    kwargs: Mapping[str, Any] | None = None,
    *,
    split_points: Sequence[str],
) -> TracedSplit:
    """Trace ``module(*args, **kwargs)`` and cut it before each of ``split_points`` into runnable stages.

    Args:
        module: the module to split (its parameters are shared with the stages, never copied).
        args: positional inputs of one micro-batch (the sample the trace is specialised on).
        kwargs: keyword inputs of one micro-batch. Default none.
        split_points: dotted names of submodules that start a new stage, in execution order.

    Raises:
        TypeError: if ``torch.export`` cannot trace the module (the message names the operation).
        ValueError: for a split point that names no submodule, or a parameter used by two stages.
    """
    args, kwargs = tuple(args), dict(kwargs or {})
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        out_leaves, spec = pytree.tree_flatten(module(*args, **kwargs))
    output_spec: pytree.TreeSpec | None = spec
    pipe = _trace(module, args, kwargs, split_points)
    _check_tied(pipe, module)
    eval_pipe = None
    if module.training and _mode_dependent(module):
        module.eval()
        try:
            eval_pipe = _trace(module, args, kwargs, split_points)
        finally:
            module.train()
    split_gm = pipe.split_gm
    placeholders, calls, outputs, produced_at = _stage_calls(split_gm.graph)
    if len(calls) != len(split_points) + 1:
        raise ValueError(
            f"split_points={list(split_points)!r} gave {len(calls)} stages, not {len(split_points) + 1}: a split "
            "point that is never called, or two with nothing between them; list submodules that run in that order."
        )
    if len([x for x in out_leaves if isinstance(x, Tensor)]) != len(outputs) or len(out_leaves) != len(outputs):
        output_spec = None  # non-tensor leaves were burned into the graph: hand back the flat tensors
    uses: dict[str, int] = {}
    for index, call in enumerate(calls):
        for name in call.reads:
            uses[name] = max(uses.get(name, -1), index)
    for name in outputs:
        uses[name] = len(calls)
    order = {name: i for i, name in enumerate(n.name for n in split_gm.graph.nodes)}
    live = [
        sorted((n for n, last in uses.items() if produced_at[n] <= b < last), key=order.__getitem__)
        for b in range(-1, len(calls) - 1)
    ]
    metas = {n.name: n.meta.get("val") for n in split_gm.graph.nodes if n.op == "placeholder"}
    inputs: list[tuple[str, torch.dtype, tuple[int | None, ...]]] = []
    for name in live[0]:
        value = metas.get(name)
        if not isinstance(value, Tensor):
            raise TypeError(f"Input {name!r} of the traced module is a {type(value).__name__}; stage inputs must be tensors.")
        inputs.append((name, value.dtype, tuple(s if isinstance(s, int) else None for s in value.shape)))
    stages = []
    for index, call in enumerate(calls):
        eval_graph = None
        if eval_pipe is not None:
            eval_graph = _rebind(eval_pipe.split_gm.get_submodule(call.submodule), split_gm.get_submodule(call.submodule))
        stages.append(
            TracedStage(
                index, split_gm.get_submodule(call.submodule), call,
                live_in=live[index], live_out=live[index + 1] if index + 1 < len(calls) else None,
                outputs=outputs, output_spec=output_spec, eval_graph=eval_graph, owner=module,
            )
        )
    positions = [placeholders.index(name) for name, _, _ in inputs]
    first = next((t for t in out_leaves if isinstance(t, Tensor)), None)
    split = TracedSplit(stages, inputs, positions, list(split_points), first)
    _check_against(split, module, args, kwargs)
    return split


def _check_against(split: TracedSplit, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Run the stages on the sample and compare with the module's own forward, in eval mode (deterministic; the
    eval graphs where there are any): nothing silently wrong."""
    training = module.training
    module.eval()
    try:
        with torch.no_grad():
            expected = [t for t in pytree.tree_leaves(module(*args, **kwargs)) if isinstance(t, Tensor)]
            x: Any = split.stage_input(args, kwargs, forward=module.forward)
            for stage in split.stages:
                x = stage(x)
    finally:
        module.train(training)
    got = [t for t in pytree.tree_leaves(x) if isinstance(t, Tensor)]
    if len(expected) != len(got) or not all(
        a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5) for a, b in zip(expected, got)
    ):
        raise ValueError(
            f"The traced stages of {type(module).__name__} do not reproduce its forward on the sample (split_points="
            f"{split.split_points}); the module may keep state between calls or branch on values. Use blocks= or the "
            "pipeline protocol instead."
        )
