"""The PyTorch side of softce: autograd and torch.compile support around the C++ kernels.

The gradient is computed in the forward pass, in the same fused kernel as the loss, into a
buffer allocated here; backward only scales it by the upstream gradient (and returns it
untouched when that is 1, the usual `loss.backward()`). Tensors reach the C++ core
zero-copy through DLPack, so this module is not compiled against torch.

Two paths share the kernels:
- eager: a torch.autograd.Function (lowest overhead, supports inplace_backward);
- torch.compile: custom operators softce::* (torch.library.custom_op) with fake
  implementations and registered autograd, so graphs using the losses compile with
  fullgraph=True. inplace_backward is ignored there (custom ops may not alias their inputs).

Both paths have a second, slower backward for what the fused kernel does not give: with
create_graph=True (double backward) and for arguments other than the input that require
grad (probability targets, kl_div targets, BCE targets, teacher logits, TopK values, class
weights), backward recomputes the loss as a plain torch expression of the saved arguments
(softce._reference, the same semantics) and differentiates it with torch.autograd.grad.
Without either, backward is the fast one: it scales the stored gradient. For the slow one
the node keeps references to the input and the other tensor arguments (not with
inplace_backward, where the input holds the gradient and create_graph is refused).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _core, _gradient_cache
from . import _reference
from .functional import TopK, row_shape

# ---------------------------------------------------------------------------------------
# argument checks and conversion


def _as_tensor(x, like: Tensor):
    if x is None or isinstance(x, Tensor):
        return x
    return torch.as_tensor(x, device=like.device)


def _check_cpu(function: str, name: str, t: Optional[Tensor]) -> None:
    if t is not None and t.device.type != "cpu":
        raise TypeError(
            f"{function}: {name}: expected a CPU tensor, got a tensor on '{t.device}'; "
            "softce has no GPU kernels in this build (move the tensors to the CPU with .cpu())"
        )


def _check_no_grad(function: str, name: str, t: Optional[Tensor]) -> None:
    """The class-parallel losses (process_group=) differentiate the input only."""
    if t is not None and t.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            f"{function}: the gradient with respect to {name} is not implemented for the "
            f"class-parallel losses (process_group=), which differentiate the input only; "
            f"pass {name}.detach() if {name} needs no gradient"
        )


# A DLPack capsule straight from torch's C function is several microseconds cheaper per
# array than nanobind calling Tensor.__dlpack__; fall back to the latter if it goes away.
_to_dlpack = getattr(torch.utils.dlpack, "to_dlpack", None) or (lambda t: t.__dlpack__())


def _dl(t: Optional[Tensor]):
    """A zero-copy DLPack capsule of `t` for softce._core (consumed by one call)."""
    # detach(): DLPack export refuses tensors that require grad; it is a free alias.
    return None if t is None else _to_dlpack(t.detach())


def _wants_grad(input: Tensor) -> bool:
    return input.requires_grad and torch.is_grad_enabled()


def _has_internal_overlap(t: Tensor) -> bool:
    """True if two indices of `t` may reach the same element (conservative: strides are
    sorted and each must step past everything the smaller ones reach)."""
    if t.numel() == 0:
        return False
    reach = 0
    for stride, size in sorted((abs(st), n) for st, n in zip(t.stride(), t.shape) if n > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def _byte_range(t: Tensor):
    low = high = 0
    for stride, size in zip(t.stride(), t.shape):
        if stride >= 0:
            high += stride * (size - 1)
        else:
            low += stride * (size - 1)
    start = t.data_ptr() + low * t.element_size()
    return start, t.data_ptr() + (high + 1) * t.element_size()


def _overlap(a: Tensor, b: Tensor) -> bool:
    """True if the memory spans of a and b intersect (conservative for interleaved views)."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    a0, a1 = _byte_range(a)
    b0, b1 = _byte_range(b)
    return a0 < b1 and b0 < a1


def _check_inplace(function: str, input: Tensor, others=()) -> None:
    """inplace_backward=True overwrites `input` with the gradient: refuse it where that
    would destroy something autograd or the caller still needs. `others`: (name, tensor)
    of the other arguments of the call."""
    t = input
    while t is not None:
        if t.is_leaf and t.requires_grad:
            what = "a leaf tensor" if t is input else "a view of a leaf tensor"
            raise ValueError(
                f"{function}: inplace_backward=True would overwrite {what} that requires "
                "grad; it is meant for logits produced by the model (e.g. a Linear layer's "
                "output)"
            )
        t = t._base  # a view's base is the tensor that owns the memory (one level)
    if _has_internal_overlap(input):
        raise ValueError(
            f"{function}: inplace_backward=True needs an input whose elements do not overlap "
            "(e.g. not an expanded tensor)"
        )
    for name, other in others:
        if not isinstance(other, Tensor):
            continue
        if _overlap(input, other):
            raise ValueError(
                f"{function}: inplace_backward=True: {name} overlaps the memory of the input, "
                "which the gradient overwrites; pass a copy (e.g. {name}.clone())"
                .replace("{name}", name)
            )
        if other.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"{function}: inplace_backward=True cannot be combined with a {name} that "
                f"requires grad: its gradient is computed from the input, which the "
                "in-place gradient overwrites"
            )


# ---------------------------------------------------------------------------------------
# forward: allocate the outputs, run the kernel


def _forward(call, input: Tensor, reduction: str, per_row: bool, compute_grad: bool,
             inplace: bool = False, cached: bool = False, target: Optional[Tensor] = None):
    """Runs call(x, grad, losses[, grad_target]) -> float on DLPack capsules of the input
    and of the output buffers allocated here; returns (loss tensor, grad tensor or None,
    target gradient or None). `cached`: the gradient may come from the cache of released
    buffers (eager autograd only: a custom operator's outputs are left to the compiler's
    own allocation). `target`: also compute d loss / d target in the same pass."""
    x = input.detach()
    # a fresh gradient comes from the cache of released buffers (no page faults on reuse)
    if not compute_grad:
        grad = None
    elif inplace:
        grad = x
    else:
        grad = _gradient_cache.empty_like(x) if cached else torch.empty_like(x)
    losses = None
    if reduction == "none":
        losses = x.new_empty(row_shape(x.shape) if per_row else x.shape)
    if target is None:
        grad_target = None
        value = call(_dl(x), _dl(grad), _dl(losses))
    else:
        grad_target = torch.empty_like(target.detach())
        value = call(_dl(x), _dl(grad), _dl(losses), _dl(grad_target))
    loss = losses if losses is not None else torch.tensor(value, dtype=x.dtype)
    return loss, grad, grad_target


def _scale(grad: Tensor, grad_loss: Tensor, per_row: bool, eager: bool) -> Tensor:
    """d loss / d input from the stored gradient and the upstream gradient."""
    if grad_loss.dim() == 0:
        # loss.backward() passes a 1: nothing to do (checked only in eager mode, where
        # reading the value is free; a traced graph always multiplies).
        if eager and grad_loss.item() == 1.0:
            return grad
        return grad * grad_loss
    if per_row and grad.dim() >= 2:
        grad_loss = grad_loss.unsqueeze(1)  # per-row upstream gradient over the class dim
    return grad * grad_loss


class _FusedLoss(torch.autograd.Function):
    """Eager autograd: forward runs the fused kernel (loss and gradient), backward scales.

    apply(input, run, meta, *args): `run()` -> (loss, grad, grad_target) runs the kernel
    (grad_target: d loss / d args[0] from the same pass, or None); `meta` = (function name,
    per_row, reference, inplace), reference(input, *args) being the loss as a
    differentiable torch expression (None where there is none); `args` are the call's
    other tensors (targets, teacher, TopK values, weights). First order, the input and
    args[0] take the kernel's gradients; every other case (another argument, or
    create_graph=True) differentiates the reference."""

    @staticmethod
    def forward(ctx, input, run, meta, *args):
        loss, grad, grad_target = run()
        ctx.meta = meta
        # With inplace_backward the input now holds the gradient: not saved (backward
        # refuses what would need it).
        ctx.save_for_backward(grad, None if meta[3] else input, grad_target, *args)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        needs = ctx.needs_input_grad  # (input, run, meta, *args)
        saved = ctx.saved_tensors
        grad_target = saved[2]
        if (not torch.is_grad_enabled() and not any(needs[4:])
                and (len(needs) < 4 or not needs[3] or grad_target is not None)):
            # the fast path, first order: the kernel's gradients of the input and target
            per_row = ctx.meta[1]
            g_input = _scale(saved[0], grad_loss, per_row, eager=True) if needs[0] else None
            g_target = (_scale(grad_target, grad_loss, per_row, eager=True)
                        if len(needs) > 3 and needs[3] else None)
            rest = (g_target,) + (None,) * (len(needs) - 4) if len(needs) > 3 else ()
            return g_input, None, None, *rest
        wanted = (needs[0],) + tuple(needs[3:])
        grads = _reference_backward(ctx.meta, saved[0], saved[1], saved[3:], grad_loss, wanted)
        return grads[0], None, None, *grads[1:]


def _reference_backward(meta, grad, input, args, grad_loss, needs):
    """Gradients for `needs` (input, *args) through the reference expression: the slow
    backward, for create_graph=True and for arguments other than the input."""
    function, per_row, reference, inplace = meta[:4]
    eager = len(meta) < 5  # the custom operators' backward adds a fifth entry: traced
    create_graph = torch.is_grad_enabled()
    if reference is None:
        raise RuntimeError(
            f"{function}: {'double backward (create_graph=True)' if create_graph else 'a gradient with respect to an argument other than the input'} "
            "is not supported here (the class-parallel losses differentiate the input "
            "only, first order)"
        )
    if inplace:
        raise RuntimeError(
            f"{function}: backward with create_graph=True needs the logits, which "
            "inplace_backward=True overwrote with the gradient; call it without "
            "inplace_backward"
        )
    leaves, targets = [], []

    def prepare(t, need, position):
        if t is None or not need:
            return None if t is None else t.detach()
        # create_graph: a view, so that the gradient stays connected to t (and the same
        # tensor passed twice, e.g. student and teacher, gets each part separately)
        a = t.view_as(t) if create_graph else t.detach().requires_grad_()
        leaves.append(a)
        targets.append(position)
        return a

    # Without create_graph the input's gradient is the fused kernel's (scaled below).
    x = prepare(input, needs[0] and create_graph, 0)
    rest = [prepare(a, n, i + 1) for i, (a, n) in enumerate(zip(args, needs[1:]))]
    result = [None] * len(needs)
    if leaves:
        with torch.enable_grad():
            loss = reference(x, *rest)
            computed = torch.autograd.grad(loss, leaves, grad_loss.to(loss.dtype),
                                           create_graph=create_graph, allow_unused=True)
        for position, g in zip(targets, computed):
            result[position] = g
    if needs[0] and not create_graph:
        result[0] = _scale(grad, grad_loss, per_row, eager=eager)
    return result


def _eager(function: str, input: Tensor, reduction: str, per_row: bool, call,
           inplace_backward: bool, return_grad: bool, reference=None, args=(),
           names=(), others=(), fused_target: bool = False):
    """The eager call. `args` (with their `names`, for messages) are the other tensors of
    the call, which the reference differentiates when they require grad; `others` (name,
    tensor) pairs are only checked for overlap with an in-place gradient. `fused_target`:
    `call` also computes d loss / d args[0] (a dense target or teacher), used when args[0]
    requires grad."""
    grad_mode = torch.is_grad_enabled()
    wants_input = input.requires_grad and grad_mode
    compute_grad = return_grad or wants_input
    inplace = inplace_backward and compute_grad
    if inplace:
        _check_inplace(function, input, list(zip(names, args)) + list(others))
    target = args[0] if fused_target and grad_mode and args and args[0] is not None \
        and args[0].requires_grad else None

    def run():
        loss, grad, grad_target = _forward(call, input, reduction, per_row, compute_grad,
                                           inplace, cached=True, target=target)
        if inplace:
            # The logits now hold the gradient: bump their version so that autograd
            # reports any other use of them in backward instead of silently using it.
            torch.autograd.graph.increment_version(input)
        return loss, grad, grad_target

    if return_grad:
        loss, grad, _ = run()
        return loss, grad
    if not wants_input and (not grad_mode or not any(
            a is not None and a.requires_grad for a in args)):
        return run()[0]
    return _FusedLoss.apply(input, run, (function, per_row, reference, inplace), *args)


def _compiled(op, input: Tensor, args: tuple, return_grad: bool):
    loss, grad = op(input, *args, return_grad or _wants_grad(input))
    return (loss, grad.detach()) if return_grad else loss


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


# ---------------------------------------------------------------------------------------
# custom operators for torch.compile


def _fake(input: Tensor, reduction: str, per_row: bool, compute_grad: bool):
    if reduction == "none":
        loss = input.new_empty(row_shape(input.shape) if per_row else input.shape)
    else:
        loss = input.new_empty(())
    grad = torch.empty_like(input) if compute_grad else input.new_empty(0)
    return loss, grad


def _register_autograd(op, per_row: bool, num_args: int, reference):
    """Autograd of a softce::* operator. `reference(*inputs without compute_grad)` is the
    loss as a torch expression, for create_graph=True and for gradients of arguments other
    than the input (see _FusedLoss)."""
    def setup_context(ctx, inputs, output):
        tensors = [i for i, a in enumerate(inputs) if isinstance(a, Tensor)]
        ctx.tensor_positions = tensors
        ctx.inputs = [None if isinstance(a, Tensor) else a for a in inputs]
        ctx.save_for_backward(output[1], *(inputs[i] for i in tensors))
        ctx.compute_grad = inputs[-1]

    def backward(ctx, grad_loss, _grad_of_grad):
        needs = ctx.needs_input_grad
        if not torch.is_grad_enabled() and not any(needs[1:]):
            if not ctx.compute_grad:
                raise RuntimeError(
                    f"{op._qualname}: called with compute_grad=False, so no gradient was "
                    "computed in the forward pass; call it with compute_grad=True to "
                    "backpropagate"
                )
            grad = ctx.saved_tensors[0]
            return (_scale(grad, grad_loss, per_row, eager=False),) + (None,) * (num_args - 1)
        saved = ctx.saved_tensors
        positions = ctx.tensor_positions
        # the reference sees every tensor argument; those that need no gradient detached
        inputs = list(ctx.inputs)
        for position, t in zip(positions, saved[1:]):
            inputs[position] = t
        tensor_args = [inputs[i] for i in positions[1:]]

        def call(x, *rest):
            full = list(inputs)
            full[0] = x
            for position, t in zip(positions[1:], rest):
                full[position] = t
            return reference(*full[:-1])

        meta = (op._qualname, per_row, call, False, "traced")
        if not ctx.compute_grad and needs[0] and not torch.is_grad_enabled():
            raise RuntimeError(
                f"{op._qualname}: called with compute_grad=False, so no gradient was "
                "computed in the forward pass; call it with compute_grad=True to "
                "backpropagate"
            )
        grads = _reference_backward(meta, saved[0], inputs[0], tensor_args, grad_loss,
                                    (needs[0],) + tuple(needs[i] for i in positions[1:]))
        result = [None] * num_args
        result[0] = grads[0]
        for position, g in zip(positions[1:], grads[1:]):
            result[position] = g
        return tuple(result)

    op.register_autograd(backward, setup_context=setup_context)


def _op_result(loss: Tensor, grad: Optional[Tensor], input: Tensor):
    return loss, (grad if grad is not None else input.new_empty(0))


def _ce_call(target, topk_values, tail, weight, ignore_index, reduction, label_smoothing,
             mask):
    if topk_values is None:
        return lambda x, grad, losses, grad_target=None: _core.cross_entropy(
            x, target, weight, ignore_index, reduction, label_smoothing, mask, grad, losses,
            grad_target)
    return lambda x, grad, losses: _core.cross_entropy_topk(
        x, target, topk_values, tail, weight, ignore_index, reduction, label_smoothing, mask,
        grad, losses)


@torch.library.custom_op("softce::cross_entropy", mutates_args=())
def _cross_entropy_op(input: Tensor, target: Tensor, topk_values: Optional[Tensor],
                      tail: bool, weight: Optional[Tensor], ignore_index: int,
                      reduction: str, label_smoothing: float, mask: Optional[Tensor],
                      compute_grad: bool) -> tuple[Tensor, Tensor]:
    call = _ce_call(_dl(target), _dl(topk_values), tail, _dl(weight), ignore_index,
                    reduction, label_smoothing, _dl(mask))
    return _op_result(*_forward(call, input, reduction, True, compute_grad)[:2], input)


@_cross_entropy_op.register_fake
def _(input, target, topk_values, tail, weight, ignore_index, reduction, label_smoothing,
      mask, compute_grad):
    return _fake(input, reduction, True, compute_grad)


_register_autograd(_cross_entropy_op, per_row=True, num_args=10,
                   reference=_reference.cross_entropy)


def _cewp_call(target, weight, reduction):
    return lambda x, grad, losses, grad_target=None: _core.cross_entropy_with_probs(
        x, target, weight, reduction, grad, losses, grad_target)


@torch.library.custom_op("softce::cross_entropy_with_probs", mutates_args=())
def _cross_entropy_with_probs_op(input: Tensor, target: Tensor, weight: Optional[Tensor],
                                 reduction: str, compute_grad: bool) -> tuple[Tensor, Tensor]:
    call = _cewp_call(_dl(target), _dl(weight), reduction)
    return _op_result(*_forward(call, input, reduction, True, compute_grad)[:2], input)


@_cross_entropy_with_probs_op.register_fake
def _(input, target, weight, reduction, compute_grad):
    return _fake(input, reduction, True, compute_grad)


_register_autograd(_cross_entropy_with_probs_op, per_row=True, num_args=5,
                   reference=_reference.cross_entropy_with_probs)


def _kl_call(target, reduction, log_target):
    return lambda x, grad, losses, grad_target=None: _core.kl_div(
        x, target, reduction, log_target, grad, losses, grad_target)


@torch.library.custom_op("softce::kl_div", mutates_args=())
def _kl_div_op(input: Tensor, target: Tensor, reduction: str, log_target: bool,
               compute_grad: bool) -> tuple[Tensor, Tensor]:
    call = _kl_call(_dl(target), reduction, log_target)
    return _op_result(*_forward(call, input, reduction, False, compute_grad)[:2], input)


@_kl_div_op.register_fake
def _(input, target, reduction, log_target, compute_grad):
    return _fake(input, reduction, False, compute_grad)


_register_autograd(_kl_div_op, per_row=False, num_args=5, reference=_reference.kl_div)


def _bce_call(target, weight, pos_weight, reduction):
    return lambda x, grad, losses, grad_target=None: _core.binary_cross_entropy_with_logits(
        x, target, weight, pos_weight, reduction, grad, losses, grad_target)


@torch.library.custom_op("softce::binary_cross_entropy_with_logits", mutates_args=())
def _bce_op(input: Tensor, target: Tensor, weight: Optional[Tensor],
            pos_weight: Optional[Tensor], reduction: str,
            compute_grad: bool) -> tuple[Tensor, Tensor]:
    call = _bce_call(_dl(target), _dl(weight), _dl(pos_weight), reduction)
    return _op_result(*_forward(call, input, reduction, False, compute_grad)[:2], input)


@_bce_op.register_fake
def _(input, target, weight, pos_weight, reduction, compute_grad):
    return _fake(input, reduction, False, compute_grad)


_register_autograd(_bce_op, per_row=False, num_args=6,
                   reference=_reference.binary_cross_entropy_with_logits)


def _distill_call(teacher, topk_values, tail, temperature, divergence, beta, reduction,
                  mask, ndim):
    # softce.distillation_loss has moved the class dimension to 1 (from the caller's dim=);
    # the core needs it said from 3 dimensions on
    dim = 1 if ndim >= 3 else None
    if topk_values is None:
        return lambda x, grad, losses, grad_target=None: _core.distillation_loss(
            x, teacher, temperature, divergence, beta, reduction, mask, grad, losses, dim,
            grad_target)
    return lambda x, grad, losses: _core.distillation_loss_topk(
        x, teacher, topk_values, tail, temperature, divergence, beta, reduction, mask, grad,
        losses, dim)


@torch.library.custom_op("softce::distillation_loss", mutates_args=())
def _distillation_op(student_logits: Tensor, teacher: Tensor, topk_values: Optional[Tensor],
                     tail: bool, temperature: float, divergence: str, beta: float,
                     reduction: str, mask: Optional[Tensor],
                     compute_grad: bool) -> tuple[Tensor, Tensor]:
    call = _distill_call(_dl(teacher), _dl(topk_values), tail, temperature, divergence, beta,
                         reduction, _dl(mask), student_logits.dim())
    return _op_result(*_forward(call, student_logits, reduction, True, compute_grad)[:2],
                      student_logits)


@_distillation_op.register_fake
def _(student_logits, teacher, topk_values, tail, temperature, divergence, beta, reduction,
      mask, compute_grad):
    return _fake(student_logits, reduction, True, compute_grad)


_register_autograd(_distillation_op, per_row=True, num_args=10,
                   reference=_reference.distillation_loss)


# ---------------------------------------------------------------------------------------
# the losses (called by softce.functional for tensor inputs)


def _prepare_target(function: str, target, input: Tensor, name: str, differentiable_check):
    """Returns (target or indices, topk values or None, tail), converted and checked."""
    if isinstance(target, TopK):
        indices = _as_tensor(target.indices, input)
        values = _as_tensor(target.values, input)
        for sub, t in ((f"{name}.indices", indices), (f"{name}.values", values)):
            _check_cpu(function, sub, t)
        differentiable_check(function, f"{name}.values", values)
        return indices, values, bool(target.tail)
    target = _as_tensor(target, input)
    _check_cpu(function, name, target)
    differentiable_check(function, name, target)
    return target, None, False


def _ignore(function, name, t):
    pass


def cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, mask,
                  inplace_backward, return_grad):
    fn = "cross_entropy"
    _check_cpu(fn, "input", input)
    target, values, tail = _prepare_target(fn, target, input, "target", _ignore)
    weight = _as_tensor(weight, input)
    mask = _as_tensor(mask, input)
    _check_cpu(fn, "weight", weight)
    _check_cpu(fn, "mask", mask)
    if _is_compiling():
        return _compiled(_cross_entropy_op, input,
                         (target, values, tail, weight, ignore_index, reduction,
                          label_smoothing, mask), return_grad)
    call = _ce_call(_dl(target), _dl(values), tail, _dl(weight), ignore_index, reduction,
                    label_smoothing, _dl(mask))

    def reference(x, target, values, weight):
        return _reference.cross_entropy(x, target, values, tail, weight, ignore_index,
                                        reduction, label_smoothing, mask)

    names = ("target.indices" if values is not None else "target", "target.values",
             "weight")
    return _eager(fn, input, reduction, True, call, inplace_backward, return_grad,
                  reference, (target, values, weight), names, (("mask", mask),),
                  fused_target=values is None and target.is_floating_point())


def cross_entropy_with_probs(input, target, weight, reduction, inplace_backward, return_grad):
    fn = "cross_entropy_with_probs"
    _check_cpu(fn, "input", input)
    target = _as_tensor(target, input)
    weight = _as_tensor(weight, input)
    for name, t in (("target", target), ("weight", weight)):
        _check_cpu(fn, name, t)
    if _is_compiling():
        return _compiled(_cross_entropy_with_probs_op, input, (target, weight, reduction),
                         return_grad)
    call = _cewp_call(_dl(target), _dl(weight), reduction)

    def reference(x, target, weight):
        return _reference.cross_entropy_with_probs(x, target, weight, reduction)

    return _eager(fn, input, reduction, True, call, inplace_backward, return_grad,
                  reference, (target, weight), ("target", "weight"), fused_target=True)


def kl_div(input, target, reduction, log_target, inplace_backward, return_grad):
    fn = "kl_div"
    _check_cpu(fn, "input", input)
    target = _as_tensor(target, input)
    _check_cpu(fn, "target", target)
    if _is_compiling():
        return _compiled(_kl_div_op, input, (target, reduction, log_target), return_grad)
    call = _kl_call(_dl(target), reduction, log_target)

    def reference(x, target):
        return _reference.kl_div(x, target, reduction, log_target)

    return _eager(fn, input, reduction, False, call, inplace_backward, return_grad,
                  reference, (target,), ("target",), fused_target=True)


def binary_cross_entropy_with_logits(input, target, weight, pos_weight, reduction,
                                     inplace_backward, return_grad):
    fn = "binary_cross_entropy_with_logits"
    _check_cpu(fn, "input", input)
    target = _as_tensor(target, input)
    weight = _as_tensor(weight, input)
    pos_weight = _as_tensor(pos_weight, input)
    for name, t in (("target", target), ("weight", weight), ("pos_weight", pos_weight)):
        _check_cpu(fn, name, t)
    if _is_compiling():
        return _compiled(_bce_op, input, (target, weight, pos_weight, reduction), return_grad)
    call = _bce_call(_dl(target), _dl(weight), _dl(pos_weight), reduction)

    def reference(x, target, weight, pos_weight):
        return _reference.binary_cross_entropy_with_logits(x, target, weight, pos_weight,
                                                            reduction)

    return _eager(fn, input, reduction, False, call, inplace_backward, return_grad,
                  reference, (target, weight, pos_weight), ("target", "weight", "pos_weight"),
                  fused_target=True)


def distillation_loss(student_logits, teacher, temperature, divergence, beta, reduction, mask,
                      inplace_backward, return_grad):
    fn = "distillation_loss"
    _check_cpu(fn, "student_logits", student_logits)
    teacher, values, tail = _prepare_target(fn, teacher, student_logits, "teacher", _ignore)
    mask = _as_tensor(mask, student_logits)
    _check_cpu(fn, "mask", mask)
    if _is_compiling():
        return _compiled(_distillation_op, student_logits,
                         (teacher, values, tail, temperature, divergence, beta, reduction,
                          mask), return_grad)
    call = _distill_call(_dl(teacher), _dl(values), tail, temperature, divergence, beta,
                         reduction, _dl(mask), student_logits.dim())

    def reference(x, teacher, values):
        return _reference.distillation_loss(x, teacher, values, tail, temperature,
                                            divergence, beta, reduction, mask)

    names = ("teacher.indices" if values is not None else "teacher", "teacher.values")
    return _eager(fn, student_logits, reduction, True, call, inplace_backward, return_grad,
                  reference, (teacher, values), names, (("mask", mask),),
                  fused_target=values is None)
