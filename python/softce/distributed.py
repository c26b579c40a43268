"""Class-parallel losses on torch.distributed: ``process_group=`` of cross_entropy and
distillation_loss.

The class dimension of the logits is split across the ranks of a process group, one
contiguous range of classes per rank, in rank order (shards may be uneven). Probability
targets, class weights and teacher logits are split the same way; index and top-k targets
hold global class ids and are identical on every rank. Every rank gets the global loss
(bitwise the same on all ranks) and the gradient of its own classes (docs/distributed.md).

One call on every rank:
  1. local checks and conversions (no communication)
  2. agreement: one all_gather of a small int64 record per rank (did its checks fail? row
     shape, class count, options, fingerprints of the arrays that must be identical), from
     which every rank makes the same decision: the class offsets, or the same error
  3. the C++ core (_core.class_parallel_*), which validates its arguments and then calls
     back for its all-reduce(s) of the row statistics (one; two for divergence jsd). Its
     first callback starts with a go / no-go all_gather of one flag per rank; a rank whose
     core call raised before that point joins the same all_gather from its except clause.
     So an error on any rank becomes an error on every rank, never a hang.
  4. the all-reduce itself: gloo has no user-defined reduction, so every rank all-gathers
     the records (ranks x rows x width doubles) and merges them in rank order in C++
     (_core.merge_records): the same data merged in the same order gives the same bits.
"""

from __future__ import annotations

import functools
import struct
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import _core
from ._torch import (
    _as_tensor,
    _check_cpu,
    _check_inplace,
    _check_no_grad,
    _dl,
    _eager,
    _prepare_target,
    _wants_grad,
)

__all__ = ["cross_entropy", "distillation_loss"]

# all_gather_into_tensor is deprecated in favour of all_gather_single from torch 2.10 on
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

_MAX_ROW_DIMS = 8
_MAX_OPTIONS = 8
# failed, error kind, call kind, local classes, row ndim, row dims, option count, options,
# target fingerprint, mask fingerprint
_FACTS = 5 + _MAX_ROW_DIMS + 1 + _MAX_OPTIONS + 2
_MESSAGE_BYTES = 1024

_ERROR_KINDS = (RuntimeError, ValueError, IndexError, TypeError, NotImplementedError)
_CALL_NAMES = ("cross_entropy with class-index targets",
               "cross_entropy with probability targets", "cross_entropy with top-k targets",
               "distillation_loss with teacher logits", "distillation_loss with a top-k teacher")
_REDUCTIONS = ("none", "mean", "sum", "batchmean")
_DIVERGENCES = ("kl", "reverse_kl", "jsd")
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _error_kind(error: Optional[BaseException]) -> int:
    for code, kind in enumerate(_ERROR_KINDS):
        if code and isinstance(error, kind):
            return code
    return 0


def _real_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def _format_real(bits: int) -> str:
    text = repr(struct.unpack("<d", struct.pack("<q", bits))[0])
    return text[:-2] if text.endswith(".0") else text


def _format_option(kind: str, value: int) -> str:
    if kind == "real":
        return _format_real(value)
    if kind == "bool":
        return "true" if value else "false"
    if kind == "given":
        return "given" if value else "None"
    if kind in ("reduction", "divergence", "dtype"):
        names = {"reduction": _REDUCTIONS, "divergence": _DIVERGENCES,
                 "dtype": [str(t).replace("torch.", "") for t in _DTYPES]}[kind]
        return repr(names[value]) if 0 <= value < len(names) else "another"
    return str(value)


def _code(name, names) -> int:
    return names.index(name) if name in names else -1


class _Option(NamedTuple):
    name: str
    value: int
    kind: str  # how to print it: int, real, bool, given, reduction, divergence, dtype


class _Call(NamedTuple):
    """What the agreement step compares, and the core call to make afterwards."""

    kind: int                  # index into _CALL_NAMES
    input: Tensor
    options: list
    target_fingerprint: int    # of the arrays that must be identical on every rank
    mask_fingerprint: int
    core: object               # core(class_offset, num_classes, all_reduce, x, grad, losses)


# ---------------------------------------------------------------------------------------
# collectives


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


def _all_gather(group, world: int, tensor: Tensor) -> Tensor:
    """(world, *tensor.shape): every rank's tensor, in rank order."""
    # the concatenated form of the output (gloo does not take the stacked one)
    out = tensor.new_empty((world * tensor.numel(),))
    _all_gather_single(out, tensor.contiguous().view(-1), group=group)
    return out.view((world,) + tuple(tensor.shape))


def _share_failures(function: str, group, world: int, failed: Tensor, kinds: Tensor,
                    failure: Optional[BaseException]) -> None:
    """Collective, taken by every rank once some rank's flag is set: the failing ranks'
    messages go to every rank. Returns on a rank that failed itself (it re-raises its own
    error); raises the first failing rank's error, naming it, on the others."""
    message = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8)
    if failure is not None:
        text = str(failure).encode("utf-8")[:_MESSAGE_BYTES]
        if text:
            message[:len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    messages = _all_gather(group, world, message)
    if failure is not None:
        return
    r = int(failed.nonzero()[0, 0])
    text = bytes(messages[r].tolist()).rstrip(b"\0").decode("utf-8", errors="replace")
    raise _ERROR_KINDS[int(kinds[r])](f"{function}: failed on rank {r}: {text}")


def _facts(call: Optional[_Call], failure: Optional[BaseException]) -> Tensor:
    facts = torch.zeros(_FACTS, dtype=torch.int64)
    if failure is not None:
        facts[0] = 1
        facts[1] = _error_kind(failure)
        return facts  # the arguments may be invalid: read nothing else
    shape = tuple(call.input.shape)
    local_classes = shape[1] if len(shape) >= 2 else (shape[0] if shape else -1)
    rows = shape[:1] + shape[2:] if len(shape) >= 2 else ()
    values = [call.kind, local_classes, len(rows)] + list(rows[:_MAX_ROW_DIMS])
    facts[2:2 + len(values)] = torch.tensor(values, dtype=torch.int64)
    base = 5 + _MAX_ROW_DIMS
    facts[base] = len(call.options)
    for i, option in enumerate(call.options):
        facts[base + 1 + i] = option.value
    facts[-2] = call.target_fingerprint
    facts[-1] = call.mask_fingerprint
    return facts


def _agree(function: str, input_arg: str, target_arg: str, group, rank: int, world: int,
           call: Optional[_Call], failure: Optional[BaseException]):
    """Collective. Returns (class_offset, num_classes) on every rank when all is well;
    raises on every rank otherwise (returns on a rank whose own checks failed: it
    re-raises its own error)."""
    everyone = _all_gather(group, world, _facts(call, failure))
    failed = everyone[:, 0]
    if failed.any():
        _share_failures(function, group, world, failed, everyone[:, 1], failure)
        return None

    def fail(what: str):
        raise ValueError(f"{function}: {what}")

    def pair(r, v0, v):
        return f" (rank 0: {v0}, rank {r}: {v})"

    first = everyone[0].tolist()
    table = [f.tolist() for f in everyone]

    def row_shape(f):
        return tuple(f[5:5 + min(f[4], _MAX_ROW_DIMS)])

    def rows(f):
        n = 1
        for d in row_shape(f):
            n *= d
        return n

    for r, f in enumerate(table):
        if f[2] != first[2]:
            fail("ranks called different functions"
                 + pair(r, _CALL_NAMES[first[2]], _CALL_NAMES[f[2]]))
    for r, f in enumerate(table):
        if rows(f) != rows(first):
            fail(f"{input_arg}: rows differ across ranks" + pair(r, rows(first), rows(f)))
        if f[4] != first[4] or row_shape(f) != row_shape(first):
            fmt = (lambda s: "(" + ", ".join(map(str, s)) + ")")
            fail(f"{input_arg}: row shape differs across ranks"
                 + pair(r, fmt(row_shape(first)), fmt(row_shape(f))))
    base = 5 + _MAX_ROW_DIMS
    for i, option in enumerate(call.options):
        for r, f in enumerate(table):
            if f[base + 1 + i] != first[base + 1 + i]:
                fail(f"{option.name} differs across ranks"
                     + pair(r, _format_option(option.kind, first[base + 1 + i]),
                            _format_option(option.kind, f[base + 1 + i])))
    for r, f in enumerate(table):
        if f[-2] != first[-2]:
            fail(f"{target_arg}: differs between rank 0 and rank {r} (class indices and "
                 "top-k entries are global and must be identical on every rank)")
        if f[-1] != first[-1]:
            fail(f"mask: differs between rank 0 and rank {r} (the row mask must be "
                 "identical on every rank)")
    counts = [f[3] for f in table]
    return sum(counts[:rank]), sum(counts)


class _Exchange:
    """The all_reduce callback of one core call, and the go / no-go step in front of it."""

    def __init__(self, function: str, group, world: int):
        self.function = function
        self.group = group
        self.world = world
        self.agreed = False

    def go(self, failure: Optional[BaseException]) -> None:
        flags = torch.tensor([0 if failure is None else 1, _error_kind(failure)],
                             dtype=torch.int64)
        everyone = _all_gather(self.group, self.world, flags)
        if everyone[:, 0].any():
            _share_failures(self.function, self.group, self.world, everyone[:, 0],
                            everyone[:, 1], failure)

    def all_reduce(self, records, merge) -> None:
        # records: float64 NumPy (rows, width) over the core's buffer; merge: a capsule
        if not self.agreed:
            self.agreed = True
            self.go(None)
        if records.size == 0:
            return  # every rank has the same row count: all skip
        gathered = _all_gather(self.group, self.world, torch.from_numpy(records))
        _core.merge_records(gathered.numpy(), merge, records)

    def run(self, core):
        try:
            value = core(self.all_reduce)
        except Exception as e:
            if self.agreed:
                raise  # past the go / no-go the error is everyone's (or the transport's)
            self.agreed = True
            self.go(e)
            raise
        if not self.agreed:  # the core made no collective call: still take the step
            self.agreed = True
            self.go(None)
        return value


def _run(function: str, input_arg: str, target_arg: str, group, prepare, reduction: str,
         inplace_backward: bool, return_grad: bool):
    rank, world = _group_info(function, group)
    call = failure = None
    try:
        call = prepare()
    except Exception as e:
        failure = e
    shard = _agree(function, input_arg, target_arg, group, rank, world, call, failure)
    if failure is not None:
        raise failure  # this rank's own error; the others got "failed on rank R: ..."
    offset, num_classes = shard

    def run_core(x, grad, losses):
        exchange = _Exchange(function, group, world)
        return exchange.run(
            lambda all_reduce: call.core(offset, num_classes, all_reduce, x, grad, losses))

    return _eager(function, call.input, reduction, True, run_core, inplace_backward,
                  return_grad)


def _check_input(function: str, name: str, input) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"{function}: {name}: expected a torch.Tensor with process_group "
                        f"(class-parallel losses run on torch.distributed), got "
                        f"{type(input).__name__}")
    _check_cpu(function, name, input)


def _dtype_option(name: str, input: Tensor) -> _Option:
    return _Option(f"{name} dtype", _code(input.dtype, _DTYPES), "dtype")


def _fingerprint(*arrays) -> int:
    # as a signed 64-bit value, to travel in an int64 tensor
    h = _core.fingerprint([_dl(a) for a in arrays])
    return h - (1 << 64) if h >= (1 << 63) else h


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


@_eager_only
def cross_entropy(input, target, weight, ignore_index: int, reduction: str,
                  label_smoothing: float, mask, inplace_backward: bool, return_grad: bool,
                  process_group):
    fn = "cross_entropy"

    def prepare() -> _Call:
        _check_input(fn, "input", input)
        t, values, tail = _prepare_target(fn, target, input, "target", _check_no_grad)
        w = _as_tensor(weight, input)
        m = _as_tensor(mask, input)
        for name, a in (("weight", w), ("mask", m)):
            _check_cpu(fn, name, a)
        _check_no_grad(fn, "weight", w)
        if inplace_backward and (return_grad or _wants_grad(input)):
            _check_inplace(fn, input, (("target", t), ("target.values", values),
                                       ("weight", w), ("mask", m)))
        smoothing = float(label_smoothing)
        options = [_Option("reduction", _code(reduction, _REDUCTIONS), "reduction"),
                   _Option("label_smoothing", _real_bits(smoothing), "real"),
                   _Option("weight", int(w is not None), "given"), _dtype_option("input", input)]
        if values is not None:
            kind = 2
            options.append(_Option("target.tail", int(tail), "bool"))
            fingerprint = _fingerprint(t, values)
        elif t.dtype.is_floating_point:
            kind, fingerprint = 1, 0  # probability targets are sharded like the logits
        else:
            kind = 0
            options.append(_Option("ignore_index", int(ignore_index), "int"))
            fingerprint = _fingerprint(t)
        index = int(ignore_index)
        dt, dv, dw, dm = _dl(t), _dl(values), _dl(w), _dl(m)
        if values is None:
            def core(offset, classes, all_reduce, x, grad, losses):
                return _core.class_parallel_cross_entropy(
                    offset, classes, all_reduce, x, dt, dw, index, reduction, smoothing, dm,
                    grad, losses)
        else:
            def core(offset, classes, all_reduce, x, grad, losses):
                return _core.class_parallel_cross_entropy_topk(
                    offset, classes, all_reduce, x, dt, dv, tail, dw, index, reduction,
                    smoothing, dm, grad, losses)
        return _Call(kind, input, options, fingerprint, _fingerprint(m), core)

    return _run(fn, "input", "target", process_group, prepare, reduction, inplace_backward,
                return_grad)


@_eager_only
def distillation_loss(student_logits, teacher, temperature: float, divergence: str,
                      beta: float, reduction: str, mask, inplace_backward: bool,
                      return_grad: bool, process_group):
    fn = "distillation_loss"

    def prepare() -> _Call:
        _check_input(fn, "student_logits", student_logits)
        # Class-parallel: the student only (a teacher that requires grad is refused).
        t, values, tail = _prepare_target(fn, teacher, student_logits, "teacher",
                                          _check_no_grad)
        m = _as_tensor(mask, student_logits)
        _check_cpu(fn, "mask", m)
        if inplace_backward and (return_grad or _wants_grad(student_logits)):
            _check_inplace(fn, student_logits, (("teacher", t), ("teacher.values", values),
                                                ("mask", m)))
        T, b = float(temperature), float(beta)
        options = [_Option("reduction", _code(reduction, _REDUCTIONS), "reduction"),
                   _Option("divergence", _code(divergence, _DIVERGENCES), "divergence"),
                   _Option("beta", _real_bits(b), "real"),
                   _Option("temperature", _real_bits(T), "real"),
                   _dtype_option("student_logits", student_logits)]
        dt, dv, dm = _dl(t), _dl(values), _dl(m)
        # softce.distillation_loss has moved the class dimension to 1 (its dim=)
        core_dim = 1 if student_logits.dim() >= 3 else None
        if values is None:
            kind, fingerprint = 3, 0  # teacher logits are sharded like the student's

            def core(offset, classes, all_reduce, x, grad, losses):
                return _core.class_parallel_distillation_loss(
                    offset, classes, all_reduce, x, dt, T, divergence, b, reduction, dm,
                    grad, losses, core_dim)
        else:
            kind = 4
            options.append(_Option("teacher.tail", int(tail), "bool"))
            fingerprint = _fingerprint(t, values)

            def core(offset, classes, all_reduce, x, grad, losses):
                return _core.class_parallel_distillation_loss_topk(
                    offset, classes, all_reduce, x, dt, dv, tail, T, divergence, b, reduction,
                    dm, grad, losses, core_dim)
        return _Call(kind, student_logits, options, fingerprint, _fingerprint(m), core)

    return _run(fn, "student_logits", "teacher", process_group, prepare, reduction,
                inplace_backward, return_grad)
