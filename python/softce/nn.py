"""Loss modules: drop-in replacements for torch.nn's, backed by softce's fused kernels.

CrossEntropyLoss, KLDivLoss and BCEWithLogitsLoss subclass their torch.nn counterparts (same
constructor arguments, buffers and state_dict keys; isinstance checks keep working) and only
replace forward. DistillationLoss has no torch counterpart. Every module also takes the
keyword-only ``inplace_backward`` (see docs/python.md).
"""

from __future__ import annotations

import torch

from . import functional as F
from ._common import DISTILLATION

_DEFAULT = {a.name: a.default for a in DISTILLATION.args}  # the schema's defaults

from .linear_nn import LinearCrossEntropyLoss, LinearDistillationLoss  # noqa: E402

__all__ = ["BCEWithLogitsLoss", "CrossEntropyLoss", "DistillationLoss", "KLDivLoss",
           "LinearCrossEntropyLoss", "LinearDistillationLoss"]


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """torch.nn.CrossEntropyLoss on softce; forward also takes a row ``mask`` and TopK
    targets."""

    def __init__(self, weight=None, size_average=None, ignore_index: int = -100, reduce=None,
                 reduction: str = "mean", label_smoothing: float = 0.0, *,
                 inplace_backward: bool = False) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction,
                         label_smoothing)
        self.inplace_backward = inplace_backward

    def forward(self, input, target, mask=None):
        return F.cross_entropy(input, target, weight=self.weight,
                               ignore_index=self.ignore_index, reduction=self.reduction,
                               label_smoothing=self.label_smoothing, mask=mask,
                               inplace_backward=self.inplace_backward)


class KLDivLoss(torch.nn.KLDivLoss):
    """torch.nn.KLDivLoss on softce (a zero target contributes 0 even at -inf input)."""

    def __init__(self, size_average=None, reduce=None, reduction: str = "mean",
                 log_target: bool = False, *, inplace_backward: bool = False) -> None:
        super().__init__(size_average, reduce, reduction, log_target)
        self.inplace_backward = inplace_backward

    def forward(self, input, target):
        return F.kl_div(input, target, reduction=self.reduction, log_target=self.log_target,
                        inplace_backward=self.inplace_backward)


class BCEWithLogitsLoss(torch.nn.BCEWithLogitsLoss):
    """torch.nn.BCEWithLogitsLoss on softce (soft targets in [0, 1])."""

    def __init__(self, weight=None, size_average=None, reduce=None, reduction: str = "mean",
                 pos_weight=None, *, inplace_backward: bool = False) -> None:
        super().__init__(weight, size_average, reduce, reduction, pos_weight)
        self.inplace_backward = inplace_backward

    def forward(self, input, target):
        return F.binary_cross_entropy_with_logits(
            input, target, weight=self.weight, reduction=self.reduction,
            pos_weight=self.pos_weight, inplace_backward=self.inplace_backward)


class DistillationLoss(torch.nn.Module):
    """Knowledge-distillation loss; see softce.distillation_loss. forward(student_logits,
    teacher, mask=None), where teacher is logits or a softce.TopK of probabilities. ``dim``:
    the class dimension (required for 3-d and more: 1 for (N, C, ...), -1 for (B, S, V))."""

    def __init__(self, temperature: float = _DEFAULT["temperature"],
                 divergence: str = _DEFAULT["divergence"], beta: float = _DEFAULT["beta"],
                 reduction: str = _DEFAULT["reduction"], *, inplace_backward: bool = False,
                 dim=None) -> None:
        super().__init__()
        self.temperature = temperature
        self.divergence = divergence
        self.beta = beta
        self.reduction = reduction
        self.inplace_backward = inplace_backward
        self.dim = dim

    def forward(self, student_logits, teacher, mask=None):
        return F.distillation_loss(student_logits, teacher, temperature=self.temperature,
                                   divergence=self.divergence, beta=self.beta,
                                   reduction=self.reduction, mask=mask,
                                   inplace_backward=self.inplace_backward, dim=self.dim)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, divergence={self.divergence!r}, "
                f"beta={self.beta}, reduction={self.reduction!r}"
                + ("" if self.dim is None else f", dim={self.dim}"))
