"""The functional API of softce: fused soft-label losses for PyTorch tensors and NumPy arrays.

Each function has the name, arguments and results of its torch.nn.functional counterpart
where torch has one (cross_entropy, kl_div, binary_cross_entropy_with_logits), plus
distillation_loss and cross_entropy_with_probs (Snorkel's). The exact formulas, edge cases
and errors are in docs/semantics.md.

Dispatch: a torch.Tensor input goes to softce._torch (autograd, torch.compile custom
operators); anything else is treated as an array (NumPy, or any object with __dlpack__, e.g.
a JAX CPU array) and gets NumPy results. torch is imported only when a tensor is seen, so
the package works without torch installed.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, NamedTuple

import numpy as np

from . import _core

__all__ = [
    "TopK",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "cross_entropy_with_probs",
    "distillation_loss",
    "get_num_threads",
    "kl_div",
    "set_num_threads",
    "simd_target",
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


def set_num_threads(threads: int) -> None:
    """Sets the number of threads the losses use (results are identical for any count)."""
    _core.set_num_threads(int(threads))


def get_num_threads() -> int:
    """Returns the number of threads the losses use."""
    return _core.get_num_threads()


def simd_target() -> str:
    """Returns the SIMD target chosen at run time (e.g. "AVX2", "AVX3")."""
    return _core.simd_target()


# ---------------------------------------------------------------------------------------
# dispatch helpers


def _is_tensor(x) -> bool:
    # A torch.Tensor can only exist once torch has been imported; checking sys.modules
    # keeps `import softce` and the NumPy path free of the torch import.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _torch_backend():
    from . import _torch

    return _torch


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


# ---------------------------------------------------------------------------------------
# NumPy path


def _as_array(x, name: str, function: str):
    if x is None or isinstance(x, np.ndarray):
        return x
    if _is_tensor(x):
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


def _np_forward(call, x, reduction: str, per_row: bool, return_grad: bool,
                inplace_backward: bool, function: str = "", others=()):
    """Runs `call(grad, losses) -> float` with NumPy output buffers; returns NumPy results.
    `others`: (name, array) of the call's other arrays, checked against an in-place
    gradient."""
    if inplace_backward and not return_grad:
        raise ValueError("inplace_backward=True needs return_grad=True for NumPy arrays")
    if inplace_backward and not x.flags.writeable:
        raise ValueError("inplace_backward=True: input is read-only")
    if inplace_backward:
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
    grad = (x if inplace_backward else np.empty_like(x)) if return_grad else None
    losses = None
    if reduction == "none":
        losses = np.empty(row_shape(x.shape) if per_row else x.shape, dtype=x.dtype)
    value = call(grad, losses)
    loss = losses if losses is not None else x.dtype.type(value)
    return (loss, grad) if return_grad else loss


# ---------------------------------------------------------------------------------------
# the losses


def cross_entropy(
    input,
    target,
    weight=None,
    size_average=None,
    ignore_index: int = -100,
    reduce=None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    mask=None,
    inplace_backward: bool = False,
    return_grad: bool = False,
    process_group=None,
):
    """torch.nn.functional.cross_entropy, fused, with soft-label extensions.

    ``target``: class indices (int, the row shape), class probabilities (float, the
    input's shape) or a :class:`TopK`. ``mask`` (bool per row) excludes rows for
    probability / top-k targets; ``mean`` then divides by the number of unmasked rows.
    ``inplace_backward=True`` writes the gradient over ``input`` (see docs/python.md).
    ``return_grad=True`` returns ``(loss, grad)`` without building an autograd graph.
    ``process_group`` (a torch.distributed ProcessGroup): class-parallel; ``input``,
    probability targets and ``weight`` hold this rank's contiguous range of classes (ranks
    in order), index and top-k targets global class ids; every rank gets the global loss
    and the gradient of its own classes (see docs/distributed.md).
    """
    reduction = legacy_reduction(size_average, reduce, reduction)
    if process_group is not None:
        from . import distributed

        return distributed.cross_entropy(input, target, weight, ignore_index, reduction,
                                         label_smoothing, mask, inplace_backward,
                                         return_grad, process_group)
    if _is_tensor(input):
        return _torch_backend().cross_entropy(
            input, target, weight, int(ignore_index), reduction, float(label_smoothing),
            mask, inplace_backward, return_grad)
    fn = "cross_entropy"
    x = _as_array(input, "input", fn)
    weight = _as_array(weight, "weight", fn)
    mask = _as_array(mask, "mask", fn)
    if isinstance(target, TopK):
        indices = _as_array(target.indices, "target.indices", fn)
        values = _as_array(target.values, "target.values", fn)
        tail = bool(target.tail)

        def call(grad, losses):
            return _core.cross_entropy_topk(
                x, indices, values, tail, weight, int(ignore_index), reduction,
                float(label_smoothing), mask, grad, losses)
    else:
        t = _as_array(target, "target", fn)

        def call(grad, losses):
            return _core.cross_entropy(
                x, t, weight, int(ignore_index), reduction, float(label_smoothing), mask,
                grad, losses)
    others = ((("target.indices", indices), ("target.values", values))
              if isinstance(target, TopK) else (("target", t),))
    return _np_forward(call, x, reduction, True, return_grad, inplace_backward, fn,
                       others + (("weight", weight), ("mask", mask)))


def cross_entropy_with_probs(input, target, weight=None, reduction: str = "mean", *,
                             inplace_backward: bool = False, return_grad: bool = False):
    """Snorkel's cross_entropy_with_probs (probability targets, optional class weights)."""
    if _is_tensor(input):
        return _torch_backend().cross_entropy_with_probs(
            input, target, weight, reduction, inplace_backward, return_grad)
    fn = "cross_entropy_with_probs"
    x = _as_array(input, "input", fn)
    t = _as_array(target, "target", fn)
    weight = _as_array(weight, "weight", fn)

    def call(grad, losses):
        return _core.cross_entropy_with_probs(x, t, weight, reduction, grad, losses)

    return _np_forward(call, x, reduction, True, return_grad, inplace_backward, fn,
                       (("target", t), ("weight", weight)))


def kl_div(input, target, size_average=None, reduce=None, reduction: str = "mean",
           log_target: bool = False, *, inplace_backward: bool = False,
           return_grad: bool = False):
    """torch.nn.functional.kl_div (``input`` holds log-probabilities); a zero target
    contributes 0 even where the input is -inf."""
    reduction = legacy_reduction(size_average, reduce, reduction)
    if _is_tensor(input):
        return _torch_backend().kl_div(
            input, target, reduction, bool(log_target), inplace_backward, return_grad)
    fn = "kl_div"
    x = _as_array(input, "input", fn)
    t = _as_array(target, "target", fn)

    def call(grad, losses):
        return _core.kl_div(x, t, reduction, bool(log_target), grad, losses)

    return _np_forward(call, x, reduction, False, return_grad, inplace_backward, fn,
                       (("target", t),))


def binary_cross_entropy_with_logits(input, target, weight=None, size_average=None,
                                     reduce=None, reduction: str = "mean", pos_weight=None,
                                     *, inplace_backward: bool = False,
                                     return_grad: bool = False):
    """torch.nn.functional.binary_cross_entropy_with_logits with soft targets in [0, 1];
    ``weight`` and ``pos_weight`` broadcast NumPy-style to the input's shape."""
    reduction = legacy_reduction(size_average, reduce, reduction)
    if _is_tensor(input):
        return _torch_backend().binary_cross_entropy_with_logits(
            input, target, weight, pos_weight, reduction, inplace_backward, return_grad)
    fn = "binary_cross_entropy_with_logits"
    x = _as_array(input, "input", fn)
    t = _as_array(target, "target", fn)
    weight = _as_array(weight, "weight", fn)
    pos_weight = _as_array(pos_weight, "pos_weight", fn)

    def call(grad, losses):
        return _core.binary_cross_entropy_with_logits(
            x, t, weight, pos_weight, reduction, grad, losses)

    return _np_forward(call, x, reduction, False, return_grad, inplace_backward, fn,
                       (("target", t), ("weight", weight), ("pos_weight", pos_weight)))


def _class_dim(function: str, ndim: int, dim) -> int:
    """The class dimension of an ndim-d input, normalised; 3-d and more must say it."""
    if dim is None:
        if ndim >= 3:
            raise ValueError(
                f"{function}: student_logits has {ndim} dimensions: pass dim= to say which "
                "one holds the classes (dim=1 for PyTorch's (N, C, d1, ...) layout, dim=-1 "
                "for (batch, sequence, vocabulary) logits as in TRL and Hugging Face)"
            )
        return max(ndim - 1, 0)
    d = int(dim)
    if not -max(ndim, 1) <= d < max(ndim, 1):
        raise IndexError(
            f"{function}: dim: expected a dimension in [{-max(ndim, 1)}, {max(ndim, 1) - 1}], "
            f"got {d}"
        )
    return d % max(ndim, 1)


def _move_class_dim(x, source: int, destination: int):
    """A zero-copy view of x with dimension `source` moved to `destination`."""
    if source == destination or x is None:
        return x
    if _is_tensor(x):
        return x.movedim(source, destination)
    return np.moveaxis(x, source, destination)


def distillation_loss(student_logits, teacher, *, temperature: float = 1.0,
                      divergence: str = "kl", beta: float = 0.5,
                      reduction: str = "batchmean", mask=None,
                      inplace_backward: bool = False, return_grad: bool = False,
                      process_group=None, dim=None):
    """Knowledge-distillation loss between student logits and a teacher (logits of the same
    shape, or a :class:`TopK` of probabilities).

    With p = softmax(teacher / T), q = softmax(student / T): ``"kl"`` is T²·KL(p‖q),
    ``"reverse_kl"`` T²·KL(q‖p), ``"jsd"`` T²·(β KL(p‖m) + (1−β) KL(q‖m)) with
    m = βp + (1−β)q (TRL's GKD convention, β = 0 / 1 being kl / reverse_kl).
    ``batchmean`` divides by the number of unmasked rows. The teacher logits (and TopK
    values) get a gradient too when they require grad (computed by a torch expression,
    not the fused kernel; see docs/python.md).
    ``dim``: the class dimension; 1-d and 2-d inputs default to the last one, 3-d and more
    must give it (1 for (N, C, d1, ...), -1 for (batch, sequence, vocabulary)). Rows are
    the positions of the other dimensions, in their order (``mask``, TopK and ``none``
    results are shaped like them).
    ``process_group`` (a torch.distributed ProcessGroup): class-parallel; the student and
    teacher logits hold this rank's contiguous range of classes (ranks in order), a top-k
    teacher global class ids (see docs/distributed.md).
    """
    fn = "distillation_loss"
    shape = getattr(student_logits, "shape", None)
    ndim = len(shape if shape is not None else np.shape(student_logits))
    class_dim = _class_dim(fn, ndim, dim)
    if ndim >= 2 and class_dim != 1:
        # the core takes the classes at dimension 1: move them there (a view) and the
        # gradient back; autograd does the latter for tensors
        if not (_is_tensor(student_logits) or isinstance(student_logits, np.ndarray)):
            student_logits = _as_array(student_logits, "student_logits", fn)
        student_logits = _move_class_dim(student_logits, class_dim, 1)
        if not isinstance(teacher, TopK):
            if not (_is_tensor(teacher) or isinstance(teacher, np.ndarray)):
                teacher = (_as_array(teacher, "teacher", fn) if not _is_tensor(student_logits)
                           else student_logits.new_tensor(teacher))
            if len(teacher.shape) == ndim:
                teacher = _move_class_dim(teacher, class_dim, 1)
        result = distillation_loss(
            student_logits, teacher, temperature=temperature, divergence=divergence,
            beta=beta, reduction=reduction, mask=mask, inplace_backward=inplace_backward,
            return_grad=return_grad, process_group=process_group, dim=1)
        if return_grad:
            loss, grad = result
            return loss, _move_class_dim(grad, 1, class_dim)
        return result
    if process_group is not None:
        from . import distributed

        return distributed.distillation_loss(student_logits, teacher, temperature, divergence,
                                             beta, reduction, mask, inplace_backward,
                                             return_grad, process_group)
    if _is_tensor(student_logits):
        return _torch_backend().distillation_loss(
            student_logits, teacher, float(temperature), divergence, float(beta), reduction,
            mask, inplace_backward, return_grad)
    x = _as_array(student_logits, "student_logits", fn)
    mask = _as_array(mask, "mask", fn)
    core_dim = 1 if x.ndim >= 3 else None  # the class dimension is at 1 by now
    if isinstance(teacher, TopK):
        indices = _as_array(teacher.indices, "teacher.indices", fn)
        values = _as_array(teacher.values, "teacher.values", fn)
        tail = bool(teacher.tail)

        def call(grad, losses):
            return _core.distillation_loss_topk(
                x, indices, values, tail, float(temperature), divergence, float(beta),
                reduction, mask, grad, losses, core_dim)
    else:
        t = _as_array(teacher, "teacher", fn)

        def call(grad, losses):
            return _core.distillation_loss(
                x, t, float(temperature), divergence, float(beta), reduction, mask, grad,
                losses, core_dim)
    others = ((("teacher.indices", indices), ("teacher.values", values))
              if isinstance(teacher, TopK) else (("teacher", t),))
    return _np_forward(call, x, reduction, True, return_grad, inplace_backward, fn,
                       others + (("mask", mask),))
