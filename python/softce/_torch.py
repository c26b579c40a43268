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

First order, both paths take the input's gradient and that of a dense target (probability
targets, kl_div and BCE targets, teacher logits) from the kernel (its grad_target output,
computed in the same pass when the target requires grad); backward only scales them. Both
have a second, slower backward for what the kernel does not give: with create_graph=True
(double backward) and for the other arguments that require grad (TopK values, class
weights, pos_weight), backward recomputes the loss as a plain torch expression of the saved
arguments (softce._reference, the same semantics) and differentiates it with
torch.autograd.grad. For the slow one the node keeps references to the input and the other
tensor arguments (not with inplace_backward, where the input holds the gradient and
create_graph is refused).

Every loss's arguments come from its schema (softce._common): the custom operators, their
fake implementations and the reference's arguments are made from it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _gradient_cache, _reference
from ._common import ARRAY, LOSSES, Loss, TopK, check_cpu, core_call, row_shape

# The names softce.distributed uses (this module's internal API); the rest is private.
__all__ = ["as_tensor", "check_inplace", "check_no_grad", "dl", "eager", "prepare_args",
           "prepare_target", "run", "wants_grad"]

# ---------------------------------------------------------------------------------------
# argument checks and conversion


def as_tensor(x, like: Tensor):
    if x is None or isinstance(x, Tensor):
        return x
    return torch.as_tensor(x, device=like.device)


def check_no_grad(function: str, name: str, t: Optional[Tensor]) -> None:
    """The class-parallel losses (process_group=) differentiate the input only."""
    if t is not None and t.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            f"{function}: the gradient with respect to {name} is not implemented for the "
            f"class-parallel losses (process_group=), which differentiate the input only; "
            f"pass {name}.detach() if {name} needs no gradient"
        )


# A DLPack capsule straight from torch's C function is several microseconds cheaper per
# array than nanobind calling Tensor.__dlpack__, and it exports a tensor that requires grad
# as it is (the capsule only reads or writes the memory; autograd is this module's job), so
# the small-call path needs no detach() per array. Tensor.__dlpack__ refuses such tensors:
# the fallback, should the C function go away, detaches first.
_to_dlpack = getattr(torch._C, "_to_dlpack", None)
if _to_dlpack is None:  # pragma: no cover (torch without the C function)
    def _to_dlpack(t):
        return t.detach().__dlpack__()


def dl(t: Optional[Tensor]):
    """A zero-copy DLPack capsule of `t` for softce._core (consumed by one call)."""
    return None if t is None else _to_dlpack(t)


def wants_grad(input: Tensor) -> bool:
    return input.requires_grad and torch.is_grad_enabled()


def _has_internal_overlap(t: Tensor) -> bool:
    """True if two indices of `t` may reach the same element (conservative: strides are
    sorted and each must step past everything the smaller ones reach)."""
    if t.is_contiguous() or t.numel() == 0:  # (the common case, without the walk below)
        return False
    reach = 0
    for stride, size in sorted((abs(st), n) for st, n in zip(t.stride(), t.shape) if n > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def _byte_range(t: Tensor):
    if t.is_contiguous():  # (the common case, without the walk below)
        start = t.data_ptr()
        return start, start + t.nbytes
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


def check_inplace(function: str, input: Tensor, others=()) -> None:
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
    # (torch.empty_like and new_empty never make a tensor that requires grad; only the
    # in-place gradient, an alias of the input, needs detach())
    # a fresh gradient comes from the cache of released buffers (no page faults on reuse)
    if not compute_grad:
        grad = None
    elif inplace:
        grad = input.detach()
    else:
        grad = _gradient_cache.empty_like(input) if cached else torch.empty_like(input)
    losses = None
    if reduction == "none":
        losses = input.new_empty(row_shape(input.shape) if per_row else input.shape)
    if target is None:
        grad_target = None
        value = call(_to_dlpack(input), dl(grad), dl(losses))
    else:
        grad_target = torch.empty_like(target)
        value = call(_to_dlpack(input), dl(grad), dl(losses), _to_dlpack(grad_target))
    loss = losses if losses is not None else torch.scalar_tensor(value, dtype=input.dtype)
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
        if not any(needs[3:]) and not torch.is_grad_enabled():
            # the common case, first order, the input's gradient only: the kernel's
            return (_scale(ctx.saved_tensors[0], grad_loss, ctx.meta[1], eager=True)
                    if needs[0] else None, *((None,) * (len(needs) - 1)))
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


def eager(function: str, input: Tensor, reduction: str, per_row: bool, call,
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
        check_inplace(function, input, list(zip(names, args)) + list(others))
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


def _compiled(op, input: Tensor, args: tuple, return_grad: bool, target_grad: bool = False):
    """The custom operator's call; `target_grad`: it also computes d loss / d args[0] (a dense
    target or teacher that requires grad) in the kernel, for the first-order backward."""
    loss, grad, _ = op(input, *args, return_grad or wants_grad(input), target_grad)
    return (loss, grad.detach()) if return_grad else loss


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


# ---------------------------------------------------------------------------------------
# custom operators for torch.compile: one softce::<name> per loss, defined from its schema
# (softce._common):
#   (input, target, [topk_values, tail,] *args, compute_grad, compute_target_grad=False)
#     -> (loss, grad, grad_target)
# grad / grad_target are empty (0 elements) where not computed; compute_target_grad needs a
# dense floating-point target (or teacher logits): the kernel's outputs.grad_target.


def _fake(input: Tensor, reduction: str, per_row: bool, compute_grad: bool):
    if reduction == "none":
        loss = input.new_empty(row_shape(input.shape) if per_row else input.shape)
    else:
        loss = input.new_empty(())
    grad = torch.empty_like(input) if compute_grad else input.new_empty(0)
    return loss, grad


def _register_autograd(op, per_row: bool, num_args: int, reference):
    """Autograd of a softce::* operator. First order, the input's and a dense target's
    gradients are the kernel's (outputs grad and grad_target); `reference(*inputs without
    compute_grad, compute_target_grad)` is the loss as a torch expression, for
    create_graph=True and for gradients of the other arguments (see _FusedLoss)."""
    def setup_context(ctx, inputs, output):
        tensors = [i for i, a in enumerate(inputs) if isinstance(a, Tensor)]
        ctx.tensor_positions = tensors
        ctx.inputs = [None if isinstance(a, Tensor) else a for a in inputs]
        ctx.save_for_backward(output[1], output[2], *(inputs[i] for i in tensors))
        ctx.compute_grad, ctx.compute_target_grad = inputs[-2], inputs[-1]

    def backward(ctx, grad_loss, _grad_of_grad, _grad_of_grad_target):
        needs = ctx.needs_input_grad
        if (not torch.is_grad_enabled() and not any(needs[2:])
                and (not needs[1] or ctx.compute_target_grad)):
            # first order: the kernel's gradients of the input and of a dense target
            if needs[0] and not ctx.compute_grad:
                raise RuntimeError(
                    f"{op._qualname}: called with compute_grad=False, so no gradient was "
                    "computed in the forward pass; call it with compute_grad=True to "
                    "backpropagate"
                )
            grad, grad_target = ctx.saved_tensors[:2]
            result = [None] * num_args
            if needs[0]:
                result[0] = _scale(grad, grad_loss, per_row, eager=False)
            if needs[1]:
                result[1] = _scale(grad_target, grad_loss, per_row, eager=False)
            return tuple(result)
        saved = ctx.saved_tensors
        positions = ctx.tensor_positions
        # the reference sees every tensor argument; those that need no gradient detached
        inputs = list(ctx.inputs)
        for position, t in zip(positions, saved[2:]):
            inputs[position] = t
        tensor_args = [inputs[i] for i in positions[1:]]

        def call(x, *rest):
            full = list(inputs)
            full[0] = x
            for position, t in zip(positions[1:], rest):
                full[position] = t
            return reference(*full[:-2])

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


_SCHEMA_TYPES = {int: "SymInt", float: "float", bool: "bool", str: "str"}


def _op_schema(loss: Loss) -> str:
    """The torch.library schema of softce::<loss.name>, e.g. "(Tensor input, Tensor target,
    Tensor? topk_values, bool tail, Tensor? weight, SymInt ignore_index, ...) -> ..."."""
    parameters = [f"Tensor {loss.input}", f"Tensor {loss.target}"]
    if loss.topk:
        parameters += ["Tensor? topk_values", "bool tail"]
    parameters += [f"Tensor? {a.name}" if a.kind == ARRAY else f"{_SCHEMA_TYPES[a.type]} {a.name}"
                   for a in loss.args]
    parameters += ["bool compute_grad", "bool compute_target_grad=False"]
    return f"({', '.join(parameters)}) -> (Tensor, Tensor, Tensor)"


def _split(loss: Loss, call_args) -> tuple:
    """(target, topk values or None, tail, args) of Loss.call_args(...)."""
    if loss.topk:
        return call_args[0], call_args[1], call_args[2], tuple(call_args[3:])
    return call_args[0], None, False, tuple(call_args[1:])


def _dl_args(loss: Loss, args) -> list:
    args = list(args)
    for i in loss.array_at:
        args[i] = dl(args[i])
    return args


def _define_op(loss: Loss):
    reduction_at = loss.reduction_at
    num_args = 4 + (2 if loss.topk else 0) + len(loss.args)

    def unpack(rest):
        # the implementations get the arguments as given: without the defaulted last one
        if len(rest) < num_args - 1:
            rest = (*rest, False)
        *call_args, compute_grad, compute_target_grad = rest
        return _split(loss, call_args), compute_grad, compute_target_grad

    def check_target_grad(target: Tensor, values) -> None:
        if values is not None or not target.is_floating_point():
            raise ValueError(
                f"softce::{loss.name}: compute_target_grad=True needs a dense floating-point "
                f"{loss.target} (the kernel computes no gradient of top-k values or class "
                "indices)"
            )

    def impl(input: Tensor, *rest):
        (target, values, tail, args), compute_grad, compute_target_grad = unpack(rest)
        if compute_target_grad:
            check_target_grad(target, values)
        call = core_call(loss, dl(target), dl(values), tail, _dl_args(loss, args),
                         loss.core_dim(input.dim()))
        result, grad, grad_target = _forward(call, input, args[reduction_at], loss.per_row,
                                             compute_grad,
                                             target=target if compute_target_grad else None)
        return (result, grad if grad is not None else input.new_empty(0),
                grad_target if grad_target is not None else input.new_empty(0))

    def fake(input: Tensor, *rest):
        (target, values, _, args), compute_grad, compute_target_grad = unpack(rest)
        if compute_target_grad:
            check_target_grad(target, values)
        result, grad = _fake(input, args[reduction_at], loss.per_row, compute_grad)
        return result, grad, (torch.empty_like(target) if compute_target_grad
                              else input.new_empty(0))

    def reference(*call_args):
        # looked up at each use, as in the eager path
        return getattr(_reference, loss.name)(*call_args)

    op = torch.library.custom_op(f"softce::{loss.name}", impl, mutates_args=(),
                                 schema=_op_schema(loss))
    op.register_fake(fake)
    _register_autograd(op, loss.per_row, num_args, reference)
    return op


_OPS = {name: _define_op(loss) for name, loss in LOSSES.items()}


# ---------------------------------------------------------------------------------------
# the losses (called by softce.functional for tensor inputs)


def prepare_target(loss: Loss, target, input: Tensor, differentiable_check=None):
    """Returns (target or indices, topk values or None, tail), converted and checked;
    `differentiable_check(function, name, tensor)` is called on what could take a gradient."""
    function, name = loss.name, loss.target
    if loss.topk and isinstance(target, TopK):
        indices = as_tensor(target.indices, input)
        values = as_tensor(target.values, input)
        for sub, t in ((f"{name}.indices", indices), (f"{name}.values", values)):
            check_cpu(function, sub, t)
        if differentiable_check is not None:
            differentiable_check(function, f"{name}.values", values)
        return indices, values, bool(target.tail)
    target = as_tensor(target, input)
    check_cpu(function, name, target)
    if differentiable_check is not None:
        differentiable_check(function, name, target)
    return target, None, False


def prepare_args(loss: Loss, args, input: Tensor) -> list:
    """`args` (the schema's order) with the arrays as CPU tensors (checked)."""
    args = list(args)
    for i in loss.array_at:
        args[i] = t = as_tensor(args[i], input)
        check_cpu(loss.name, loss.args[i].name, t)
    return args


def _autograd_layout(loss: Loss):
    """For the eager call of `loss`: the positions in Loss.call_args(...) of the tensors
    autograd differentiates, their names (with a dense target, with a TopK), and the other
    array arguments (position in args, name), only checked against an in-place gradient."""
    offset = 3 if loss.topk else 1
    slots = [0, 1] if loss.topk else [0]
    names = [f"{loss.target}.values"] if loss.topk else []
    others = []
    for i in loss.array_at:
        if loss.args[i].differentiable:
            slots.append(offset + i)
            names.append(loss.args[i].name)
        else:
            others.append((i, loss.args[i].name))
    # the names with a dense target, and with a TopK one
    return (tuple(slots), (loss.target, *names), (f"{loss.target}.indices", *names),
            tuple(others))


_LAYOUTS = {name: _autograd_layout(loss) for name, loss in LOSSES.items()}


def run(loss: Loss, input: Tensor, target, args, inplace_backward: bool, return_grad: bool):
    """`loss` on tensors; `args` in the schema's order, converted (Loss.convert)."""
    fn = loss.name
    check_cpu(fn, loss.input, input)
    target, values, tail = prepare_target(loss, target, input)
    args = prepare_args(loss, args, input)
    full = loss.call_args(target, values, tail, args)
    fused_target = values is None and target.is_floating_point()
    if _is_compiling():
        target_grad = fused_target and target.requires_grad and torch.is_grad_enabled()
        return _compiled(_OPS[fn], input, full, return_grad, target_grad)
    call = core_call(loss, dl(target), dl(values), tail, _dl_args(loss, args),
                     loss.core_dim(input.dim()))
    slots, dense_names, topk_names, others = _LAYOUTS[fn]

    def reference(x, *tensors):
        arguments = list(full)
        for slot, t in zip(slots, tensors):
            arguments[slot] = t
        return getattr(_reference, fn)(x, *arguments)

    return eager(fn, input, args[loss.reduction_at], loss.per_row, call, inplace_backward,
                 return_grad, reference, tuple(map(full.__getitem__, slots)),
                 dense_names if values is None else topk_names,
                 tuple([(name, args[i]) for i, name in others]) if others else (),
                 fused_target=fused_target)


# The names the tests use for the internal API.
_check_cpu, _dl, _eager = check_cpu, dl, eager
