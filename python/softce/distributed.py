"""Class-parallel losses on torch.distributed: ``process_group=`` of cross_entropy and
distillation_loss (run(), called by softce.functional with the loss's schema).

The class dimension of the logits is split across the ranks of a process group, one
contiguous range of classes per rank, in rank order (shards may be uneven). Probability
targets, class weights and teacher logits are split the same way; index and top-k targets
hold global class ids and are identical on every rank. Every rank gets the global loss
(bitwise the same on all ranks) and the gradient of its own classes (docs/distributed.md).

The protocol is the C++ core's (include/softce/class_parallel.hpp, the same code softce::mpi
runs); this module is its transport over torch.distributed (_Transport) and the Python
checks in front of it. One call on every rank:
  1. local checks and conversions in Python (no communication)
  2. the shard: one all_gather of (failed?, error code, class count) per rank
     (_core.agreement_shard_from_local_classes): every rank learns its class offset, or the
     same error when some rank's Python checks failed
  3. the core call (_core.agreement_run around _core.class_parallel_*): the core validates its
     arguments, then, in front of its first all-reduce of the row statistics, the core's
     agreement: one all_gather of a fixed int64 record per rank (did its validation fail?
     the call, shard, row shape, options, dtype, fingerprints of the arrays that must be
     identical), from which every rank takes the same decision. A rank whose core call
     raised joins the same all_gather from the core's catch handler. So an error on any
     rank becomes an error on every rank, never a hang.
  4. the all-reduce itself: gloo has no user-defined reduction, so every rank all-gathers
     the records (ranks x rows x width doubles) and merges them in rank order in C++
     (_core.merge_records): the same data merged in the same order gives the same bits.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from . import _core
from ._common import ARRAY, Loss, check_cpu, core_call
from ._torch import (
    check_inplace,
    check_no_grad,
    dl,
    eager,
    prepare_args,
    prepare_target,
    wants_grad,
)

__all__ = ["run", "run_linear", "reduce_mode"]

_MODES = {"ordered": 0, "commutative": 1}
_mode = threading.local()


@contextlib.contextmanager
def reduce_mode(mode: str):
    """How the class-parallel calls made inside combine the ranks' row statistics:
    ``"ordered"`` (default): every rank all-gathers every rank's records and merges them in
    rank order, bitwise the single-process merge order; the traffic per rank grows with the
    rank count. ``"commutative"``: an all-reduce MAX of the records' shifts, then an
    all-reduce SUM of the rescaled records (built-in operations, per-rank cost independent
    of the rank count); the same on every rank, not bitwise the ordered result. Every rank
    must use the same mode (a difference is an error on every rank)."""
    if mode not in _MODES:
        raise ValueError(f"softce.distributed.reduce_mode: mode: expected 'ordered' or "
                         f"'commutative', got {mode!r}")
    previous = getattr(_mode, "value", 0)
    _mode.value = _MODES[mode]
    try:
        yield
    finally:
        _mode.value = previous

# all_gather_into_tensor is deprecated in favour of all_gather_single from torch 2.10 on
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _Call(NamedTuple):
    """One prepared call: its agreement description (_core.AgreementCall) and the core call."""

    input: Tensor
    agreement: object          # _core.agreement_describe_*(...)
    core: object               # core(class_offset, num_classes, all_reduce, x, grad, losses)


# ---------------------------------------------------------------------------------------
# the transport (class_parallel.hpp) over torch.distributed


def _group_info(function: str, group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{function}: process_group: torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{function}: process_group: expected a torch.distributed.ProcessGroup "
                        f"(e.g. torch.distributed.group.WORLD), got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{function}: process_group: this process is not a member of the group")
    return rank, dist.get_world_size(group)


class _Transport:
    """The collectives the core's protocol calls (on this thread, GIL held), over `group`."""

    def __init__(self, group, rank: int, size: int):
        self.group, self.rank, self.size = group, rank, size
        self.mode = getattr(_mode, "value", 0)  # reduce_mode(): 0 ordered, 1 commutative

    def _gather(self, tensor: Tensor) -> Tensor:
        """(size, *tensor.shape): every rank's tensor, in rank order."""
        # the concatenated form of the output (gloo does not take the stacked one)
        out = tensor.new_empty((self.size * tensor.numel(),))
        _all_gather_single(out, tensor.contiguous().view(-1), group=self.group)
        return out.view((self.size,) + tuple(tensor.shape))

    def all_gather(self, mine: np.ndarray) -> np.ndarray:
        # mine: int64 (count,) viewing the core's record; returns (size * count,)
        return self._gather(torch.from_numpy(mine.copy())).view(-1).numpy()

    def broadcast(self, data: np.ndarray, root: int) -> None:
        # data: uint8 (count,) viewing the core's buffer, replaced in place by root's
        dist.broadcast(torch.from_numpy(data), src=dist.get_global_rank(self.group, root),
                       group=self.group)

    def all_reduce_max(self, values: np.ndarray) -> None:
        # values: float64 (count,) over the core's buffer, replaced in place (commutative mode)
        dist.all_reduce(torch.from_numpy(values), op=dist.ReduceOp.MAX, group=self.group)

    def all_reduce_sum(self, values: np.ndarray) -> None:
        dist.all_reduce(torch.from_numpy(values), op=dist.ReduceOp.SUM, group=self.group)

    def all_reduce(self, records: np.ndarray, merge) -> None:
        # records: float64 (rows, width) over the core's buffer; merge: a capsule
        if records.size == 0:
            return  # every rank has the same row count: all skip
        gathered = self._gather(torch.from_numpy(records))
        _core.merge_records(gathered.numpy(), merge, records)


def _run(function: str, group, prepare, reduction: str, per_row: bool,
         inplace_backward: bool, return_grad: bool):
    rank, world = _group_info(function, group)
    transport = _Transport(group, rank, world)
    call = failure = None
    try:
        call = prepare()
    except Exception as e:
        failure = e
    local_classes = 0
    if call is not None and call.input.dim() >= 1:
        local_classes = call.input.shape[1 if call.input.dim() >= 2 else 0]
    offset, num_classes = _core.agreement_shard_from_local_classes(
        transport, function, local_classes, failure)
    if failure is not None:
        raise failure  # this rank's own error; the others got "failed on rank R: ..."

    def run_core(x, grad, losses):
        return _core.agreement_run(
            transport, call.agreement, offset, num_classes,
            lambda all_reduce: call.core(offset, num_classes, all_reduce, x, grad, losses))

    return eager(function, call.input, reduction, per_row, run_core, inplace_backward,
                 return_grad)


def _check_input(function: str, name: str, input) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"{function}: {name}: expected a torch.Tensor with process_group "
                        f"(class-parallel losses run on torch.distributed), got "
                        f"{type(input).__name__}")
    check_cpu(function, name, input)


def _detached(t):
    """`t` as the agreement reads it (DLPack refuses tensors that require grad)."""
    return None if t is None else t.detach()


def _eager_only(fn):
    """Runs `fn` outside torch.compile's graphs (its collectives and C++ callbacks cannot
    be traced): under compilation, a call is a graph break. torch.compiler.disable is
    applied at the first compiled call only, since it imports torch._dynamo (seconds), which
    is loaded anyway once something is being compiled."""
    disabled = []

    @functools.wraps(fn)
    def wrapper(*args):
        if torch.compiler.is_compiling():
            if not disabled:
                disabled.append(torch.compiler.disable(fn))
            return disabled[0](*args)
        return fn(*args)

    return wrapper


# ---------------------------------------------------------------------------------------
# the losses (called by softce.functional when process_group is given)

# the core's description of a call, for the agreement (agreement_bindings.cpp)
_DESCRIBE = {"cross_entropy": "agreement_describe_cross_entropy",
             "distillation_loss": "agreement_describe_distillation"}


@_eager_only
def run(loss: Loss, input, target, args: tuple, inplace_backward: bool, return_grad: bool,
        process_group):
    """`loss` class-parallel over `process_group`; `args` in the schema's order
    (softce._common), converted here, inside the checks every rank agrees on."""
    fn = loss.name

    def prepare() -> _Call:
        _check_input(fn, loss.input, input)
        # Class-parallel: the input only (a target or teacher that requires grad is refused).
        t, values, tail = prepare_target(loss, target, input, check_no_grad)
        a = prepare_args(loss, loss.convert(args), input)
        for arg, v in zip(loss.args, a):
            if arg.kind == ARRAY:
                check_no_grad(fn, arg.name, v)
        if inplace_backward and (return_grad or wants_grad(input)):
            check_inplace(fn, input, [(loss.target, t), (f"{loss.target}.values", values)]
                          + [(arg.name, v) for arg, v in zip(loss.args, a)
                             if arg.kind == ARRAY])
        dim = loss.core_dim(input.dim())  # softce.distillation_loss has moved the classes to 1
        agreement = getattr(_core, _DESCRIBE[fn])(
            fn, _detached(input), _detached(t), _detached(values), tail,
            *(_detached(v) if arg.kind == ARRAY else v for arg, v in zip(loss.args, a)), *dim)
        core = core_call(loss, dl(t), dl(values), tail,
                         tuple(dl(v) if arg.kind == ARRAY else v for arg, v in zip(loss.args, a)),
                         dim, prefix="class_parallel_")
        return _Call(input, agreement, core)

    reduction = args[loss.reduction_at]
    return _run(fn, process_group, prepare, reduction, loss.per_row, inplace_backward,
                return_grad)



# ---------------------------------------------------------------------------------------
# the fused output layer (called by softce.linear_* when process_group is given)
#
# Vocabulary-parallel as in Megatron: `weight` (V_local, D) holds this rank's rows of the
# output layer, in rank order (V_local may be 0), and so do the bias, class weights,
# probability targets, teacher logits and a teacher's weight and bias; the hidden states
# (and a teacher's) are replicated. Every rank gets the global loss (bitwise the same), the
# gradients of its own rows of weight and bias, and the FULL gradient of the input: the
# core sums the ranks' partial input gradients through the same ordered all-reduce as the
# row statistics, so it is the same bits on every rank and autograd needs no further
# collective (docs/linear.md, "Class-parallel").

_LINEAR_ARRAYS = ("target", "topk_values", "teacher_weight", "teacher_bias", "class_weight", "mask")


def _linear_budget(input: Tensor, num_classes: int, a: dict) -> int:
    """The row-block budget: the caller's, or the single-process default computed from the
    global class count (every rank must plan the same row blocks; the budget is agreed)."""
    if a["memory_budget"] is not None:
        return int(a["memory_budget"])
    from .linear import DEFAULT_MEMORY_BUDGET

    rows = input.numel() // max(input.shape[-1], 1) if input.dim() else 1
    itemsize = 8 if input.dtype == torch.float64 else 4
    blocks = 2 if a["teacher_weight"] is not None else 1
    return max(DEFAULT_MEMORY_BUDGET, min(rows, 512) * num_classes * itemsize * blocks)


class _LinearParallel(torch.autograd.Function):
    """Gradients computed in forward (one collective call), scaled in backward."""

    @staticmethod
    def forward(ctx, input, weight, bias, compute):
        loss, gi, gw, gb = compute()
        ctx.per_row = loss.dim() > 0
        ctx.has = (gi is not None, gw is not None, gb is not None)
        ctx.fn = compute.function
        ctx.save_for_backward(*(g for g in (gi, gw, gb) if g is not None))
        ctx.set_materialize_grads(False)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"{ctx.fn}: double backward (create_graph=True) is not supported by the fused "
                "linear losses with process_group; compute the sharded logits and use "
                "softce.cross_entropy / distillation_loss with process_group")
        saved = iter(ctx.saved_tensors)
        gi, gw, gb = (next(saved) if has else None for has in ctx.has)
        if grad_loss is None:
            return None, None, None, None
        if ctx.per_row:
            g = grad_loss
            if gi is not None:
                gi = gi * g.unsqueeze(-1).to(gi.dtype)
            if gw is not None or gb is not None:
                # weight and bias gradients sum over rows: only a uniform upstream scales them
                flat = g.reshape(-1)
                if flat.numel() and not bool((flat == flat[0]).all()):
                    raise NotImplementedError(
                        f"{ctx.fn}: reduction='none' with process_group: the weight and bias "
                        "gradients support an upstream gradient that is the same for every "
                        "row (e.g. losses.sum()); weight the rows with mask or reduce first")
                scale = flat[0] if flat.numel() else flat.new_zeros(())
                gw = None if gw is None else gw * scale.to(gw.dtype)
                gb = None if gb is None else gb * scale.to(gb.dtype)
        elif not (grad_loss.numel() == 1 and float(grad_loss) == 1.0):
            gi, gw, gb = (None if g is None else g * grad_loss.to(g.dtype) for g in (gi, gw, gb))
        needs = ctx.needs_input_grad
        return (gi if needs[0] else None, gw if needs[1] else None,
                gb if needs[2] else None, None)


@_eager_only
def run_linear(family: str, input, weight, bias, a: dict, return_grad: bool, process_group):
    """softce.linear_cross_entropy / linear_distillation_loss (family "ce" / "distill")
    vocabulary-parallel over `process_group`; `a` as softce.linear builds it."""
    fn = "linear_cross_entropy" if family == "ce" else "linear_distillation_loss"
    rank, world = _group_info(fn, process_group)
    transport = _Transport(process_group, rank, world)
    grad_mode = torch.is_grad_enabled()
    prepared = failure = None
    try:
        for name, t in (("input", input), ("weight", weight), ("bias", bias)):
            if t is not None or name != "bias":
                _check_input(fn, name, t)
        side = "target" if family == "ce" else "teacher"
        names = {"target": side, "topk_values": f"{side}.values"}
        for key in _LINEAR_ARRAYS:
            v = a[key]
            if v is None:
                continue
            name = names.get(key, key)
            if not isinstance(v, Tensor):
                raise TypeError(f"{fn}: {name}: expected a torch.Tensor with process_group, got "
                                f"{type(v).__name__}")
            check_cpu(fn, name, v)
            if grad_mode and v.requires_grad:
                raise NotImplementedError(
                    f"{fn}: {name}: a gradient with respect to it is not supported by the "
                    "fused linear losses (only input, weight and bias); detach it")
        wants = (return_grad or (grad_mode and input.requires_grad),
                 return_grad or (grad_mode and weight.requires_grad),
                 bias is not None and (return_grad or (grad_mode and bias.requires_grad)))
        prepared = {k: (_detached(v) if isinstance(v, Tensor) else v) for k, v in a.items()}
    except Exception as e:
        failure = e
    local_classes = weight.shape[0] if prepared is not None and weight.dim() == 2 else 0
    offset, num_classes = _core.agreement_shard_from_local_classes(
        transport, fn, local_classes, failure)
    if failure is not None:
        raise failure  # this rank's own error; the others got "failed on rank R: ..."

    p = prepared
    h, w, b = input.detach(), weight.detach(), _detached(bias)
    budget = _linear_budget(h, num_classes, p)
    if family == "ce":
        agreement = _core.agreement_describe_linear_cross_entropy(
            fn, h, w, b, p["target"], p["topk_values"], p["tail"], p["class_weight"],
            p["ignore_index"], p["reduction"], p["label_smoothing"], p["mask"], budget, wants[0])
    else:
        agreement = _core.agreement_describe_linear_distillation(
            fn, h, w, b, p["target"], p["topk_values"], p["tail"], p["teacher_weight"],
            p["teacher_bias"], p["temperature"], p["divergence"], p["beta"], p["reduction"],
            p["mask"], budget, wants[0])
    cdt = torch.float64 if h.dtype == torch.float64 else torch.float32

    def compute():
        losses = torch.empty(h.shape[:-1], dtype=cdt) if p["reduction"] == "none" else None
        gi = torch.empty(h.shape, dtype=cdt) if wants[0] else None
        gw = torch.empty(w.shape, dtype=cdt) if wants[1] else None
        gb = torch.empty(b.shape, dtype=cdt) if wants[2] else None

        def core(all_reduce):
            if family == "ce":
                return _core.class_parallel_linear_cross_entropy(
                    offset, num_classes, all_reduce, h, w, b, p["target"], p["topk_values"],
                    p["tail"], p["class_weight"], p["ignore_index"], p["reduction"],
                    p["label_smoothing"], p["mask"], budget, losses, gi, gw, gb)
            return _core.class_parallel_linear_distillation_loss(
                offset, num_classes, all_reduce, h, w, b, p["target"], p["topk_values"],
                p["tail"], p["teacher_weight"], p["teacher_bias"], p["temperature"],
                p["divergence"], p["beta"], p["reduction"], p["mask"], budget, losses, gi, gw,
                gb)

        value = _core.agreement_run(transport, agreement, offset, num_classes, core)
        loss = losses if losses is not None else torch.tensor(value, dtype=cdt)
        return (loss,
                None if gi is None else gi.to(input.dtype),
                None if gw is None else gw.to(weight.dtype),
                None if gb is None else gb.to(bias.dtype))

    compute.function = fn
    if return_grad:
        return compute()
    if not any(wants):
        return compute()[0]
    return _LinearParallel.apply(input, weight, bias, compute)
