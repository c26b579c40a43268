"""Modules for the fused output layer + loss (softce.linear): the loss takes hidden states
and an output layer's weight, so that the N x V logits never exist.

    head = torch.nn.Linear(D, V, bias=False)
    loss_fn = softce.nn.LinearCrossEntropyLoss()
    loss = loss_fn(hidden, head.weight, target)            # = F.cross_entropy(head(hidden), target)

A weight shared with an embedding (tied) works: pass ``embedding.weight``; autograd adds the
two gradients.
"""

import torch

from . import linear as _linear

_linear._register()  # the custom operator, before any torch.compile

__all__ = ["LinearCrossEntropyLoss", "LinearDistillationLoss"]


class LinearCrossEntropyLoss(torch.nn.Module):
    """``cross_entropy(F.linear(input, weight, bias), target)`` fused (see
    :func:`softce.linear_cross_entropy`). ``class_weight`` is a buffer, as torch's
    ``CrossEntropyLoss.weight``. ``process_group``: vocabulary-parallel (weight rows per
    rank)."""

    def __init__(self, class_weight=None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, memory_budget=None,
                 process_group=None) -> None:
        super().__init__()
        self.process_group = process_group
        self.register_buffer("class_weight", class_weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.memory_budget = memory_budget

    def forward(self, input, weight, target, bias=None, mask=None):
        return _linear.linear_cross_entropy(
            input, weight, target, bias, class_weight=self.class_weight,
            ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, mask=mask, memory_budget=self.memory_budget,
            process_group=self.process_group)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, memory_budget={self.memory_budget}")


class LinearDistillationLoss(torch.nn.Module):
    """``distillation_loss(F.linear(input, weight, bias), teacher)`` fused (see
    :func:`softce.linear_distillation_loss`); the teacher is logits, a TopK, or hidden
    states with ``teacher_weight`` (and ``teacher_bias``)."""

    def __init__(self, temperature: float = 1.0, divergence: str = "kl", beta: float = 0.5,
                 reduction: str = "batchmean", *, memory_budget=None,
                 process_group=None) -> None:
        super().__init__()
        self.process_group = process_group
        self.temperature = temperature
        self.divergence = divergence
        self.beta = beta
        self.reduction = reduction
        self.memory_budget = memory_budget

    def forward(self, input, weight, teacher, bias=None, teacher_weight=None, teacher_bias=None,
                mask=None):
        return _linear.linear_distillation_loss(
            input, weight, teacher, teacher_weight=teacher_weight, bias=bias,
            teacher_bias=teacher_bias, temperature=self.temperature, divergence=self.divergence,
            beta=self.beta, reduction=self.reduction, mask=mask, memory_budget=self.memory_budget,
            process_group=self.process_group)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, divergence={self.divergence!r}, beta={self.beta}, "
                f"reduction={self.reduction!r}, memory_budget={self.memory_budget}")
