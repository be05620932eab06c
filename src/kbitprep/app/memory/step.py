"""A training step run on the meta device: every tensor it would allocate, sized, none filled.

The memory model (`kbitprep.app.memory.estimate`) builds the quantized skeleton (`kbitprep.sizing`),
prepares it and attaches LoRA with the command's own code, then runs one steady-state
training step on it under `LiveBytes`: the forward pass, the loss, the backward pass with
its recomputation. Meta tensors have shapes and dtypes but no data, so the step costs
milliseconds per layer and no memory, and every storage the real step allocates is
counted with its real size. Three things differ from a run on a real device, and are
put right here:

- attention: `scaled_dot_product_attention` on meta tensors takes the math path and
  materialises (sequence x sequence) scores; on a device it runs a fused kernel. The
  call is routed to the fused kernel's own meta function;
- custom operators (bitsandbytes): a real device runs their Python bodies, whose
  temporaries (the dequantized weight of a 4-bit matmul) are live tensors; here the body
  runs too, on meta tensors, where it can;
- data-dependent reads: transformers asks `mask.all()` to skip building a mask; on meta
  there is no value, so `all()` answers True and `any()` False (no padding, no packing);
- grouped matmul (the experts of a mixture-of-experts layer): its meta function takes only
  bfloat16, as CUDA's kernel once did, while a CPU computes it in float32 too. In another
  dtype the call gets its output and input gradients sized in that dtype, which is what a
  device allocates for them.

Each allocation is tagged with where the step is: which layer, before the layers, or
after them (final norm, LM head, loss), and whether forward or backward. Stacks of
identical layers are simulated shortened (2 and 3 layers) and extrapolated to the full
depth: every peak of a step is linear in the number of layers (activations kept grow with
the layers before it, gradients with the layers after it), so two depths fix each line.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ...errors import KbitPrepError
from .live_bytes import Allocation, LiveBytes, model_tensors

__all__ = ["SimulationError", "StepProfile", "cannot_simulate", "checkpointed_blocks", "simulate_step"]

BEFORE, AFTER = "embeddings", "head and loss"
FORWARD, BACKWARD, BATCH = "forward", "backward", "batch"
STATIC = "static"  # the model's own tensors: counted from the start, so that views of them are not new


class SimulationError(KbitPrepError, RuntimeError):
    """The model's training step cannot be run on the meta device; the message says why."""


# --- where the step is --------------------------------------------------------------------


def checkpointed_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The model's stack of repeated layers (the units gradient checkpointing wraps).

    transformers 5 marks them as `GradientCheckpointingLayer`; older models are found as
    the longest `ModuleList` whose entries share one class.
    """
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers 4
        GradientCheckpointingLayer = None  # type: ignore[misc, assignment]  # the class is absent there
    best: nn.ModuleList | None = None
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if GradientCheckpointingLayer is not None and all(isinstance(c, GradientCheckpointingLayer) for c in module):
            return module
        if len(kinds) == 1 and (best is None or len(module) > len(best)):
            best = module
    return best


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class _Where:
    """Tags the counter's phase with the step's position, from hooks on the layers and parameters."""

    def __init__(self, counter: LiveBytes, blocks: nn.ModuleList | None) -> None:
        self.counter = counter
        self.last = len(blocks) - 1 if blocks is not None else -1
        self.region = BEFORE
        self.handles: list[Any] = []
        for index, block in enumerate(blocks or ()):
            self.handles.append(block.register_forward_pre_hook(self._enter(index)))
            self.handles.append(block.register_forward_hook(self._leave(index)))
            # transformers recomputes a checkpointed layer by calling its forward function, not the
            # module, so the layer's own hooks stay silent in the backward pass; its parts' hooks do not
            for part in block.children():
                self.handles.append(part.register_forward_pre_hook(self._enter(index)))
            for param in block.parameters():
                if param.requires_grad:  # its gradient lands while the step is in this layer's backward
                    self.handles.append(param.register_post_accumulate_grad_hook(self._grad(index)))
        self.set(FORWARD, BEFORE)

    def set(self, direction: str, region: str | None = None) -> None:
        self.region = region or self.region
        self.counter.phase = f"{direction}: {self.region}"

    def _enter(self, index: int) -> Callable:
        def hook(module, args):
            self.set(BACKWARD if _in_backward() else FORWARD, f"layer {index}")
        return hook

    def _leave(self, index: int) -> Callable:
        def hook(module, args, output):
            if not _in_backward() and index == self.last:
                self.set(FORWARD, AFTER)
        return hook

    def _grad(self, index: int) -> Callable:
        def hook(param):
            if self.region != f"layer {index}":
                self.set(BACKWARD, f"layer {index}")
        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


# --- running on meta ----------------------------------------------------------------------


class _MetaStep(LiveBytes):
    """`LiveBytes` on meta tensors: answers data-dependent reads and runs custom operators' bodies."""

    _ANSWERS: Mapping[Any, bool] = MappingProxyType({torch.ops.aten.all: True, torch.ops.aten.any: False})
    _READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)

    def __init__(self) -> None:
        super().__init__(record=True)
        self._answers: dict[int, bool] = {}
        self._bodies: dict[Any, bool] = {}  # operator -> whether it runs a composite body here

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._READS:
            return self._answer(args[0])
        body = self._bodies.get(func)
        if body is None:
            body = self._bodies[func] = _has_composite_body(func)
        out = self._run_body(func, args, kwargs) if body else func(*args, **kwargs)
        answer = self._ANSWERS.get(func.overloadpacket)
        if answer is not None and isinstance(out, torch.Tensor):
            self._answers[id(out.untyped_storage())] = answer
        self._count_outputs(out)
        return out

    def _answer(self, tensor: torch.Tensor) -> Any:
        answer = self._answers.get(id(tensor.untyped_storage()))
        if answer is None:
            raise SimulationError(
                "the model's forward pass reads the value of a tensor (Tensor.item() or a data-dependent shape), "
                "which a step simulated from config.json alone cannot know; measure this model with real weights "
                "(kbitprep finetune records its peak in report.json)")
        return answer

    def _run_body(self, func, args, kwargs):
        """A custom operator's composite body on meta tensors, so its temporaries count; else its meta kernel."""
        try:
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        except Exception:  # noqa: BLE001 - the body reads data: the meta kernel sizes the output alone
            return func(*args, **kwargs)

    def _count_outputs(self, out: Any) -> None:
        from torch.utils._pytree import tree_leaves

        for leaf in (out,) if isinstance(out, torch.Tensor) else tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._count(leaf)


def _has_composite_body(func: Any) -> bool:
    """Whether a custom operator runs, on a CPU, a body made of other operators (never a C kernel:
    that would be handed meta pointers)."""
    if func.namespace in ("aten", "prims", "prim"):
        return False
    name = func.name()
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return not has(name, "CPU") and has(name, "CompositeExplicitAutograd")


@contextlib.contextmanager
def _fused_attention() -> Iterator[None]:
    """Sends `scaled_dot_product_attention` on meta tensors to the fused kernel a device would run.

    The fused (flash) kernel keeps the output and a log-sum-exp per query, where the math
    path that meta tensors take would hold every (query, key) score. The function is
    replaced for the block rather than intercepted by a mode, because the recomputation of
    a checkpointed layer runs on the autograd engine's thread, where no mode is active.
    """
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        # Values of another head size than the queries' (DeepSeek's MLA: 192 for queries and keys,
        # 128 for values) are no case for the fused CPU kernel: torch takes the math path there too.
        if query.device.type != "meta" or value.shape[-1] != query.shape[-1]:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)
        # The kernel reads grouped key/value heads as they are (enable_gqa), as it does on a device.
        output, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)
        return output

    functional.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


class _GroupedMatmul(torch.autograd.Function):
    """A grouped matmul in a dtype its meta function refuses: outputs sized, inputs kept, as on a device."""

    @staticmethod
    def forward(ctx, original, input, weight, offs, kwargs):
        ctx.save_for_backward(input, weight)
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes(), torch.no_grad():  # the shape alone, from bf16 stand-ins nobody counts
            shape = original(input.to(torch.bfloat16), weight.to(torch.bfloat16), offs=offs, **kwargs).shape
        return input.new_empty(shape, dtype=kwargs.get("out_dtype") or input.dtype)

    @staticmethod
    def backward(ctx, grad):
        input, weight = ctx.saved_tensors
        return (None, torch.empty_like(input) if ctx.needs_input_grad[1] else None,
                torch.empty_like(weight) if ctx.needs_input_grad[2] else None, None, None)


@contextlib.contextmanager
def _grouped_matmul() -> Iterator[None]:
    """Lets torch's grouped matmul (`grouped_mm`, `_grouped_mm`) run on meta tensors in any float dtype.

    Replaced for the block, as `_fused_attention` is, so that a checkpointed layer's
    recomputation on the autograd engine's thread sees it too.
    """
    owners = [(owner, name) for owner, name in ((torch.nn.functional, "grouped_mm"), (torch, "_grouped_mm"))
              if hasattr(owner, name)]
    originals = [getattr(owner, name) for owner, name in owners]

    def wrap(original: Callable) -> Callable:
        def grouped(input, weight, *args, offs=None, **kwargs):
            if args:  # offs given by position
                offs, args = args[0], args[1:]
            if (input.device.type != "meta" or args or kwargs.get("bias") is not None
                    or (input.dtype == weight.dtype == torch.bfloat16 and kwargs.get("out_dtype") is None)):
                return original(input, weight, *args, offs=offs, **kwargs)
            return _GroupedMatmul.apply(original, input, weight, offs, kwargs)
        return grouped

    for (owner, name), original in zip(owners, originals, strict=True):
        setattr(owner, name, wrap(original))
    try:
        yield
    finally:
        for (owner, name), original in zip(owners, originals, strict=True):
            setattr(owner, name, original)


# --- the profile of one step -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Moment:
    """The live dynamic bytes at one point of the step, by kind.

    Args:
        where (str): the phase, e.g. "backward: layer 0".
        gradients (int): LoRA gradients alive.
        activations (int): tensors made in the forward pass and still alive.
        batch (int): the batch's token ids, labels and mask.
        transient (int): everything else: the working set of `where`.
    """

    where: str
    gradients: int
    activations: int
    batch: int
    transient: int

    @property
    def total(self) -> int:
        return self.gradients + self.activations + self.batch + self.transient

    def scaled(self, other: Moment, steps: float) -> Moment:
        """The moment extrapolated along the line from `self` through `other`, `steps` times their distance."""
        def line(a: int, b: int) -> int:
            return max(0, round(a + (b - a) * steps))
        return Moment(self.where, line(self.gradients, other.gradients), line(self.activations, other.activations),
                      line(self.batch, other.batch), line(self.transient, other.transient))


@dataclasses.dataclass(frozen=True)
class StepProfile:
    """The peak of each phase of one simulated step (the most live bytes there, and their kinds).

    Args:
        moments (dict[str, Moment]): phase -> its peak moment; phases name layers by position
            ("layer first", "layer last") so profiles of different depths line up.
        gradient_bytes (int): all LoRA gradients at the end of the backward pass.
    """

    moments: Mapping[str, Moment]
    gradient_bytes: int

    @property
    def peak(self) -> Moment:
        return max(self.moments.values(), key=lambda moment: moment.total)


def _position_name(phase: str, last: int) -> str:
    """ "backward: layer 3" -> "backward: layer last" (first, middle or last), for lining up depths."""
    direction, _, region = phase.partition(": ")
    if not region.startswith("layer "):
        return phase
    index = int(region.removeprefix("layer "))
    position = "first" if index == 0 else "last" if index == last else "middle"
    return f"{direction}: layer {position}"


def _at_depth(name: str, depth: int) -> str:
    """ "backward: layer last" -> "backward: layer 79" for a stack of 80 layers."""
    return name.replace("layer first", "layer 0").replace("layer last", f"layer {depth - 1}")


def _classify(allocation: Allocation, grads: set[int]) -> str:
    if allocation.phase == STATIC:
        return STATIC
    if id(allocation) in grads:
        return "gradients"
    if allocation.phase == BATCH:
        return "batch"
    return "activations" if allocation.phase.startswith(FORWARD) else "transient"


def _profile(counter: LiveBytes, events: list[tuple[int, str]], grads: set[int], last: int) -> StepProfile:
    """Each phase's peak moment, replayed from the counter's log."""
    births = {allocation.born: allocation for allocation in counter.allocations}
    live = 0
    best: dict[str, tuple[int, int, str]] = {}
    deaths = {allocation.died: allocation for allocation in counter.allocations if allocation.died is not None}
    for index, phase in events:
        if index in births:
            live += births[index].nbytes
        elif index in deaths:
            live -= deaths[index].nbytes
        name = _position_name(phase, last)
        if name not in best or live > best[name][0]:
            best[name] = (live, index, phase)
    moments = {}
    for name, (_, index, phase) in best.items():
        kinds = {"gradients": 0, "activations": 0, "batch": 0, "transient": 0, STATIC: 0}
        for allocation in counter.allocations:
            if allocation.alive_at(index):
                kinds[_classify(allocation, grads)] += allocation.nbytes
        del kinds[STATIC]
        moments[name] = Moment(phase, **kinds)
    gradient_bytes = sum(a.nbytes for a in counter.allocations if id(a) in grads)
    return StepProfile(moments, gradient_bytes)


class _EventLog(_MetaStep):
    """`_MetaStep` that also notes the phase of every event (allocation or release)."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[int, str]] = []

    def _change(self, delta: int) -> None:
        super()._change(delta)
        self.events.append((self._events, self.phase))


def _run(model: nn.Module, blocks: nn.ModuleList | None, batch: Callable[[], dict[str, torch.Tensor]],
         loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]) -> StepProfile:
    """One forward + backward under the event log; the LoRA gradients are dropped afterwards."""
    counter = _EventLog()
    where = _Where(counter, blocks)
    trainable = [param for param in model.parameters() if param.requires_grad]
    try:
        with counter, _fused_attention(), _grouped_matmul():
            counter.phase = STATIC
            counter.add(model_tensors(model))
            counter.phase = BATCH
            inputs = batch()
            where.set(FORWARD, BEFORE)
            loss = loss_fn(model, inputs)
            where.set(BACKWARD)
            loss.backward()
            del loss
        grads = {id(a) for a in (counter.allocation_of(p.grad) for p in trainable if p.grad is not None) if a}
        return _profile(counter, counter.events, grads, len(blocks) - 1 if blocks is not None else -1)
    finally:
        where.close()
        for param in trainable:
            param.grad = None


@contextlib.contextmanager
def _depth(blocks: nn.ModuleList, depth: int) -> Iterator[nn.ModuleList]:
    """The stack cut to its first `depth` layers for the block, then restored."""
    kept = list(blocks)
    try:
        while len(blocks) > depth:
            del blocks[len(blocks) - 1]
        yield blocks
    finally:
        blocks.extend(kept[depth:])


def _signature(block: nn.Module) -> tuple:
    return (type(block).__name__,
            tuple((name, tuple(p.shape), p.dtype, p.requires_grad) for name, p in block.named_parameters()))


def simulate_step(model: nn.Module, batch: Callable[[], dict[str, torch.Tensor]],
                  loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]) -> StepProfile:
    """The profile of one training step of a meta-device model, at its full depth.

    A stack of more than three identical layers is simulated at depths 2 and 3 and each
    phase's peak extrapolated along the line through them.

    Args:
        model (nn.Module): the prepared model with its adapters, on the meta device, in train mode.
        batch (Callable): makes the batch (meta tensors).
        loss_fn (Callable): (model, batch) -> the loss, as the training loop computes it.

    Raises:
        SimulationError: the step cannot run on meta tensors.
    """
    blocks = checkpointed_blocks(model)
    if blocks is None or len(blocks) <= 3 or len({_signature(b) for b in blocks}) > 1:
        return _guarded(lambda: _run(model, blocks, batch, loss_fn))
    depth = len(blocks)
    with _depth(blocks, 2):
        short = _guarded(lambda: _run(model, blocks, batch, loss_fn))
    with _depth(blocks, 3):
        longer = _guarded(lambda: _run(model, blocks, batch, loss_fn))
    steps = depth - 2
    moments = {name: dataclasses.replace(moment.scaled(longer.moments[name], steps), where=_at_depth(name, depth))
               for name, moment in short.moments.items() if name in longer.moments}
    gradients = round(short.gradient_bytes + (longer.gradient_bytes - short.gradient_bytes) * steps)
    return StepProfile(moments, gradients)


def _guarded(run: Callable[[], StepProfile]) -> StepProfile:
    try:
        return run()
    except SimulationError:
        raise
    except (RuntimeError, NotImplementedError, TypeError, ValueError, AttributeError, KeyError,
            AssertionError) as error:
        raise SimulationError(f"the training step cannot be simulated on the meta device: {cannot_simulate(error)}; "
                              "measure this model with real weights instead "
                              "(kbitprep finetune records its peak in report.json)") from error


# (words in the library's error, what kbitprep cannot simulate): the reason shown instead of the library's text
_KNOWN = (
    ("Expected inputs of BF16 type", "its mixture-of-experts layers multiply with torch's grouped matmul, which takes "
     "only bfloat16, and this run computes them in float32 (a config saved in bfloat16 with --upcast norms may run)"),
    ("is not differentiable", "its attention passes arguments the fused attention kernel cannot differentiate"),
    ("in-place operation", "it writes into a weight in place in its forward pass"),
    ("must match shape", "its default config's sizes do not fit together (a matmul's sizes disagree)"),
    ("same reduction dim", "its default config's sizes do not fit together (a matmul's sizes disagree)"),
    ("broadcast", "its default config's sizes do not fit together (two tensors' shapes disagree)"),
    ("expected scalar type", "it mixes the dtypes of quantized and unquantized weights in one operation"),
)


def cannot_simulate(error: BaseException) -> str:
    """What of a model's step the meta device cannot run, in kbitprep's words: the kind of operation when it is
    a known one, else the exception's type and the module of the library it was raised in."""
    import traceback

    text = str(error)
    known = next((reason for words, reason in _KNOWN if words in text), None)
    if known is not None:
        return known
    frames = traceback.extract_tb(error.__traceback__)
    where = next((frame.filename for frame in reversed(frames) if "site-packages" in frame.filename), None)
    module = where.split("site-packages/")[-1].removesuffix(".py").replace("/", ".") if where else "the model"
    return f"{type(error).__name__} raised in {module}"
