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

import functools
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

__all__ = ["run"]

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

