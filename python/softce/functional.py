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

import numpy as np

from . import _core
from ._common import (
    BCE_WITH_LOGITS,
    CROSS_ENTROPY,
    CROSS_ENTROPY_WITH_PROBS,
    DISTILLATION,
    KL_DIV,
    Loss,
    TopK,
    as_array,
    is_tensor,
    legacy_reduction,
    row_shape,  # noqa: F401  (softce.functional.row_shape: kept for its users)
    run_numpy,
)

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
# dispatch


def _run(loss: Loss, input, target, args: tuple, inplace_backward: bool, return_grad: bool,
         process_group=None):
    """One call of `loss`: `args` are its arguments after input and target, in the order of
    its schema (softce._common). Class-parallel with a process group, torch for a tensor
    input (torch is imported only then), NumPy otherwise."""
    if process_group is not None:
        from . import distributed

        # converts the options itself: a failure there must reach every rank
        return distributed.run(loss, input, target, args, inplace_backward, return_grad,
                               process_group)
    args = loss.convert(args)
    if is_tensor(input):
        return _torch_front().run(loss, input, target, args, inplace_backward, return_grad)
    return run_numpy(loss, input, target, args, inplace_backward, return_grad)


_torch_module = None


def _torch_front():
    """softce._torch, imported on the first tensor call (an import statement on every call
    costs a small call ~1 us)."""
    global _torch_module
    if _torch_module is None:
        from . import _torch

        _torch_module = _torch
    return _torch_module


# ---------------------------------------------------------------------------------------
# the losses (the arguments after input and target are passed in their schema's order)


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
    return _run(CROSS_ENTROPY, input, target,
                (weight, ignore_index, reduction, label_smoothing, mask),
                inplace_backward, return_grad, process_group)


def cross_entropy_with_probs(input, target, weight=None, reduction: str = "mean", *,
                             inplace_backward: bool = False, return_grad: bool = False):
    """Snorkel's cross_entropy_with_probs (probability targets, optional class weights)."""
    return _run(CROSS_ENTROPY_WITH_PROBS, input, target, (weight, reduction),
                inplace_backward, return_grad)


def kl_div(input, target, size_average=None, reduce=None, reduction: str = "mean",
           log_target: bool = False, *, inplace_backward: bool = False,
           return_grad: bool = False):
    """torch.nn.functional.kl_div (``input`` holds log-probabilities); a zero target
    contributes 0 even where the input is -inf."""
    reduction = legacy_reduction(size_average, reduce, reduction)
    return _run(KL_DIV, input, target, (reduction, log_target), inplace_backward, return_grad)


def binary_cross_entropy_with_logits(input, target, weight=None, size_average=None,
                                     reduce=None, reduction: str = "mean", pos_weight=None,
                                     *, inplace_backward: bool = False,
                                     return_grad: bool = False):
    """torch.nn.functional.binary_cross_entropy_with_logits with soft targets in [0, 1];
    ``weight`` and ``pos_weight`` broadcast NumPy-style to the input's shape."""
    reduction = legacy_reduction(size_average, reduce, reduction)
    return _run(BCE_WITH_LOGITS, input, target, (weight, pos_weight, reduction),
                inplace_backward, return_grad)


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
    if is_tensor(x):
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
    values) get a gradient too when they require grad (the teacher logits' from the fused
    kernel, first order; see docs/python.md).
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
        if not (is_tensor(student_logits) or isinstance(student_logits, np.ndarray)):
            student_logits = as_array(student_logits, "student_logits", fn)
        student_logits = _move_class_dim(student_logits, class_dim, 1)
        if not isinstance(teacher, TopK):
            if not (is_tensor(teacher) or isinstance(teacher, np.ndarray)):
                teacher = (as_array(teacher, "teacher", fn) if not is_tensor(student_logits)
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
    return _run(DISTILLATION, student_logits, teacher,
                (temperature, divergence, beta, reduction, mask),
                inplace_backward, return_grad, process_group)
