"""What the fronts of softce's losses share: one argument schema per loss, the TopK type, and
the pieces every runner uses (row shapes, the deprecated-reduction mapping, device checks,
the conversion of arrays, the call of the C++ core, the NumPy runner).

The schema (LOSSES) is the one place that lists a loss's arguments. Every front reads it:
- softce.functional: the public signatures (test_schema checks names and defaults against
  it), the conversion of options (int / float / bool) and the NumPy path;
- softce._torch: the torch.library schema of the softce::* custom operator, its fake
  implementation, the tensors autograd sees and their names in messages, the reference
  expression's arguments (softce._reference takes them in the same order);
- softce.distributed: the class-parallel call and its agreement description;
- softce._core (bindings.cpp): its functions take the same arguments in the same order:
      _core.<name>(input, target, *args, grad, losses[, dim], grad_target=None)
      _core.<name>_topk(input, indices, values, tail, *args, grad, losses[, dim])
      _core.class_parallel_<name>[_topk](class_offset, num_classes, all_reduce, <the same>)
  ([, dim]: the losses with class_dim=True; the fronts pass 1 from 3 dimensions on, having
  moved the classes there).

Nothing here imports torch: `import softce` and the NumPy path stay free of it. The names
without a leading underscore are this package's internal API, imported by the modules above.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, NamedTuple, Optional

import numpy as np

from . import _core

__all__ = [
    "ARRAY",
    "Arg",
    "BCE_WITH_LOGITS",
    "CROSS_ENTROPY",
    "CROSS_ENTROPY_WITH_PROBS",
    "DISTILLATION",
    "KL_DIV",
    "LOSSES",
    "Loss",
    "OPTION",
    "TopK",
    "as_array",
    "check_cpu",
    "core_call",
    "is_tensor",
    "legacy_reduction",
    "row_shape",
    "run_numpy",
]


class TopK(NamedTuple):
    """Sparse top-k targets: per row, K class indices and their probabilities.

    ``indices``: int32/int64 of shape ``(*row_shape, K)``; ``values``: float of the same
    shape. Without ``tail`` the target is exactly the dense one obtained by scattering
    ``values`` into zeros; with ``tail=True`` the mass ``1 - sum(values)`` outside the top k
    is matched against ``1 - sum_k q_k`` (a "bucket" term). Duplicate or out-of-range
    indices are errors.
    """

    indices: Any
    values: Any
    tail: bool = False


# ---------------------------------------------------------------------------------------
# the schema

ARRAY, OPTION = "array", "option"


class Arg(NamedTuple):
    """One argument of a loss after its input and target."""

    name: str
    kind: str                    # ARRAY (an optional array / tensor) or OPTION (a value)
    default: Any = None
    type: Optional[type] = None  # OPTION: int, float, bool or str (str is passed as given)
    differentiable: bool = False  # ARRAY: the loss has a gradient with respect to it


class Loss:
    """The argument schema of one loss: input, target, then `args` in the core's order.
    The positions below are worked out once here, so that a call walks no schema."""

    __slots__ = ("name", "input", "target", "args", "per_row", "topk", "class_dim",
                 "class_parallel", "reduction_at", "array_at", "conversions")

    def __init__(self, name: str, input: str, target: str, args: tuple, *, per_row: bool,
                 topk: bool = False, class_dim: bool = False, class_parallel: bool = False):
        self.name = name              # softce.<name>, _core.<name>, softce::<name>
        self.input = input            # the name of the first argument (the logits)
        self.target = target          # the name of the second ("target", or "teacher")
        self.args = args              # Arg, ...: the loss's own arguments, the core's order
        self.per_row = per_row        # reduction="none" gives one loss per row
        self.topk = topk              # the target may be a TopK (_core.<name>_topk)
        self.class_dim = class_dim    # the core call takes the class dimension after losses
        self.class_parallel = class_parallel  # process_group= (softce.distributed)
        self.reduction_at = self.index("reduction")
        self.array_at = tuple(i for i, a in enumerate(args) if a.kind == ARRAY)
        self.conversions = tuple((i, a.type) for i, a in enumerate(args)
                                 if a.kind == OPTION and a.type not in (None, str))

    def __repr__(self) -> str:
        return f"Loss({self.name!r})"

    def index(self, name: str) -> int:
        return next(i for i, a in enumerate(self.args) if a.name == name)

    def convert(self, values) -> list:
        """The option values as the core takes them (int(), float(), bool() where declared)."""
        values = list(values)
        for i, convert in self.conversions:
            values[i] = convert(values[i])
        return values

    def call_args(self, target, values, tail, args) -> tuple:
        """The arguments after the input, as the custom operator and the reference take
        them: (target, [topk_values, tail,] *args)."""
        return (target, values, tail, *args) if self.topk else (target, *args)

    def core_dim(self, ndim: int) -> tuple:
        """The dim argument of the core call (the class dimension is at 1 by then)."""
        return ((1 if ndim >= 3 else None),) if self.class_dim else ()


def _reduction(default: str) -> Arg:
    return Arg("reduction", OPTION, default, str)


CROSS_ENTROPY = Loss("cross_entropy", "input", "target", (
    Arg("weight", ARRAY, differentiable=True),
    Arg("ignore_index", OPTION, -100, int),
    _reduction("mean"),
    Arg("label_smoothing", OPTION, 0.0, float),
    Arg("mask", ARRAY),
), per_row=True, topk=True, class_parallel=True)

CROSS_ENTROPY_WITH_PROBS = Loss("cross_entropy_with_probs", "input", "target", (
    Arg("weight", ARRAY, differentiable=True),
    _reduction("mean"),
), per_row=True)

KL_DIV = Loss("kl_div", "input", "target", (
    _reduction("mean"),
    Arg("log_target", OPTION, False, bool),
), per_row=False)

BCE_WITH_LOGITS = Loss("binary_cross_entropy_with_logits", "input", "target", (
    Arg("weight", ARRAY, differentiable=True),
    Arg("pos_weight", ARRAY, differentiable=True),
    _reduction("mean"),
), per_row=False)

DISTILLATION = Loss("distillation_loss", "student_logits", "teacher", (
    Arg("temperature", OPTION, 1.0, float),
    Arg("divergence", OPTION, "kl", str),
    Arg("beta", OPTION, 0.5, float),
    _reduction("batchmean"),
    Arg("mask", ARRAY),
), per_row=True, topk=True, class_dim=True, class_parallel=True)

LOSSES = {loss.name: loss for loss in (CROSS_ENTROPY, CROSS_ENTROPY_WITH_PROBS, KL_DIV,
                                       BCE_WITH_LOGITS, DISTILLATION)}


# ---------------------------------------------------------------------------------------
# shared pieces


def is_tensor(x) -> bool:
    """True for a torch.Tensor. A tensor can only exist once torch has been imported;
    checking sys.modules keeps `import softce` and the NumPy path free of the torch import."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def legacy_reduction(size_average, reduce, reduction: str) -> str:
    """torch's mapping of the deprecated size_average / reduce arguments to a reduction."""
    if size_average is None and reduce is None:
        return reduction
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    reduction = ("mean" if size_average else "sum") if reduce else "none"
    warnings.warn(
        "size_average and reduce args will be deprecated, please use "
        f"reduction='{reduction}' instead.",
        stacklevel=3,
    )
    return reduction


def row_shape(shape) -> tuple:
    """Shape of the per-row results: the input's shape without the class dimension (1)."""
    shape = tuple(shape)
    return shape[:1] + shape[2:] if len(shape) >= 2 else ()


def check_cpu(function: str, name: str, t) -> None:
    """A torch tensor must be on the CPU (the core's kernels are CPU kernels)."""
    # is_cpu first: ~40 ns against ~250 for t.device (an object per call); an object
    # without is_cpu (or a tensor elsewhere) takes the device check
    if t is not None and not getattr(t, "is_cpu", False) and t.device.type != "cpu":
        raise TypeError(
            f"{function}: {name}: expected a CPU tensor, got a tensor on '{t.device}'; "
            "softce has no GPU kernels in this build (move the tensors to the CPU with .cpu())"
        )


def core_call(loss: Loss, target, values, tail: bool, args: tuple, dim: tuple = (),
              prefix: str = ""):
    """The core call of `loss` on already converted arguments (NumPy arrays or DLPack
    capsules): call(x, grad, losses[, grad_target]) -> float, or with `prefix`
    "class_parallel_": call(class_offset, num_classes, all_reduce, x, grad, losses)."""
    if values is None:
        function = getattr(_core, prefix + loss.name)
        if prefix:
            return lambda offset, classes, all_reduce, x, grad, losses: function(
                offset, classes, all_reduce, x, target, *args, grad, losses, *dim)
        return lambda x, grad, losses, grad_target=None: function(
            x, target, *args, grad, losses, *dim, grad_target)
    function = getattr(_core, prefix + loss.name + "_topk")
    if prefix:
        return lambda offset, classes, all_reduce, x, grad, losses: function(
            offset, classes, all_reduce, x, target, values, tail, *args, grad, losses, *dim)
    return lambda x, grad, losses: function(x, target, values, tail, *args, grad, losses, *dim)


# ---------------------------------------------------------------------------------------
# the NumPy runner


def as_array(x, name: str, function: str):
    """`x` as a NumPy array (zero-copy from DLPack where it has __dlpack__)."""
    if x is None or isinstance(x, np.ndarray):
        return x
    if is_tensor(x):
        raise TypeError(
            f"{function}: {name}: got a torch.Tensor while input is not a tensor; "
            "pass all arrays as torch tensors or all as NumPy arrays"
        )
    if hasattr(x, "__dlpack__"):
        device = x.__dlpack_device__()[0] if hasattr(x, "__dlpack_device__") else 1
        if device != 1:  # kDLCPU
            raise TypeError(
                f"{function}: {name}: expected a CPU array, got an array on DLPack device "
                f"type {device}; softce has no GPU kernels in this build"
            )
        return np.from_dlpack(x)  # zero-copy (e.g. a JAX CPU array)
    return np.asarray(x)


def _np_internal_overlap(x) -> bool:
    """True if two indices of x may reach the same bytes (conservative, as in _torch)."""
    if x.size == 0:
        return False
    reach = 0
    for stride, size in sorted((abs(st), n) for st, n in zip(x.strides, x.shape) if n > 1):
        if stride < reach + x.itemsize:
            return True
        reach += stride * (size - 1)
    return False


def _np_check_inplace(function: str, x, others) -> None:
    if not x.flags.writeable:
        raise ValueError("inplace_backward=True: input is read-only")
    if _np_internal_overlap(x):
        raise ValueError(
            f"{function}: inplace_backward=True needs an input whose elements do not "
            "overlap (e.g. not a broadcast or as_strided view with repeated elements)"
        )
    for name, other in others:
        if isinstance(other, np.ndarray) and np.may_share_memory(x, other):
            raise ValueError(
                f"{function}: inplace_backward=True: {name} overlaps the memory of the "
                f"input, which the gradient overwrites; pass a copy ({name}.copy())"
            )


def run_numpy(loss: Loss, input, target, args, inplace_backward: bool, return_grad: bool):
    """`loss` on NumPy arrays (or objects with __dlpack__); `args` in the schema's order,
    converted (Loss.convert). Returns the loss, or (loss, grad) with return_grad."""
    fn = loss.name
    x = as_array(input, loss.input, fn)
    if loss.topk and isinstance(target, TopK):
        names = (f"{loss.target}.indices", f"{loss.target}.values")
        t = as_array(target.indices, names[0], fn)
        values = as_array(target.values, names[1], fn)
        tail = bool(target.tail)
        targets = ((names[0], t), (names[1], values))
    else:
        t, values, tail = as_array(target, loss.target, fn), None, False
        targets = ((loss.target, t),)
    args = list(args)
    for i in loss.array_at:
        args[i] = as_array(args[i], loss.args[i].name, fn)
    call = core_call(loss, t, values, tail, args, loss.core_dim(x.ndim))
    reduction = args[loss.reduction_at]

    if inplace_backward and not return_grad:
        raise ValueError("inplace_backward=True needs return_grad=True for NumPy arrays")
    if inplace_backward:
        _np_check_inplace(fn, x, targets + tuple((loss.args[i].name, args[i])
                                                 for i in loss.array_at))
    grad = (x if inplace_backward else np.empty_like(x)) if return_grad else None
    losses = None
    if reduction == "none":
        losses = np.empty(row_shape(x.shape) if loss.per_row else x.shape, dtype=x.dtype)
    value = call(x, grad, losses)
    result = losses if losses is not None else x.dtype.type(value)
    return (result, grad) if return_grad else result
