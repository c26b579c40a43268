"""The losses as plain, differentiable torch expressions, following softce's semantics
(docs/semantics.md) exactly: 0 · (−inf) = 0 for a zero target, NaN propagated, row masks,
ignore_index, label smoothing, top-k targets with their tail bucket.

The fused kernels compute the loss and the gradient with respect to the input. These
expressions serve backward where that is not enough:
- backward with create_graph=True (double backward: gradient penalties, Hessians,
  meta-learning): the gradient is recomputed as torch.autograd.grad of this expression
  with create_graph=True, so it is itself differentiable;
- gradients with respect to TopK values, class weights and pos_weight, which the C++ core
  does not compute (first order, a dense target's or teacher's gradient is the kernel's
  grad_target).

Every function here takes the class dimension at 1 (or 0 for a 1-d input), as the core,
and its arguments in the order of the loss's schema (softce._common): (x, target,
[topk_values, tail,] *args).
The `where`s are written twice where needed ("safe" operands) so that the masked-out
branch never turns 0 · inf into a NaN gradient.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def _cdim(x: Tensor) -> int:
    return 1 if x.dim() >= 2 else 0


def _class_view(v: Tensor, x: Tensor) -> Tensor:
    """A (C,) per-class vector shaped to broadcast along x's class dimension."""
    if x.dim() <= 1:
        return v
    return v.reshape((1, -1) + (1,) * (x.dim() - 2))


def _reduce(rows: Tensor, reduction: str, denominator) -> Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / denominator


def _row_count(x: Tensor, mask: Optional[Tensor]):
    if mask is not None:
        return mask.sum().to(x.dtype)
    rows = 1
    for i, n in enumerate(x.shape):
        if i != _cdim(x):
            rows *= n
    return float(rows) if x.dim() >= 1 else 1.0


def _masked_rows(rows: Tensor, mask: Optional[Tensor]) -> Tensor:
    return rows if mask is None else torch.where(mask, rows, torch.zeros_like(rows))


def _weighted_neg_log_softmax(x: Tensor, wt: Tensor) -> Tensor:
    """Σ_c wt_c (lse − x_c) per row, a term with wt_c = 0 being 0 even where x_c = −inf."""
    cdim = _cdim(x)
    neg_logp = -torch.log_softmax(x, cdim)  # in [0, +inf], or NaN
    zero = (wt == 0) & (neg_logp == math.inf)
    safe = torch.where(zero, 0.0, neg_logp)
    return (wt * safe).sum(cdim)


def _to_compute(x: Tensor) -> Tensor:
    # 16-bit inputs are computed in float32 by the core; the same here.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _dense_topk(x: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """The dense target obtained by scattering `values` at `indices` along x's class dim."""
    cdim = _cdim(x)
    if x.dim() <= 1:
        return torch.zeros_like(x).scatter(0, indices.long(), values.to(x.dtype))
    moved = torch.zeros_like(x).movedim(cdim, -1)
    dense = moved.scatter(-1, indices.long(), values.to(x.dtype))
    return dense.movedim(-1, cdim)


def _log_rest(x: Tensor, indices: Tensor) -> Tensor:
    """log(1 − Σ_k q_{i_k}) per row, as logsumexp over the classes outside the top k − lse."""
    cdim = _cdim(x)
    if x.dim() <= 1:
        in_topk = torch.zeros_like(x, dtype=torch.bool).scatter(0, indices.long(), True)
    else:
        in_topk = torch.zeros_like(x, dtype=torch.bool).movedim(cdim, -1).scatter(
            -1, indices.long(), True).movedim(-1, cdim)
    rest = torch.where(in_topk, torch.full_like(x, -math.inf), x)
    return torch.logsumexp(rest, cdim) - torch.logsumexp(x, cdim)


def _tail_term(x: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """−τ · log(1 − Q) per row (0 where τ == 0); dropped when the top k covers every class."""
    if indices.shape[-1] >= x.shape[_cdim(x)]:
        return None
    tau = 1 - values.to(x.dtype).sum(-1)
    log_rest = _log_rest(x, indices)
    zero = tau == 0
    safe = torch.where(zero, torch.zeros_like(log_rest), log_rest)
    return torch.where(zero, torch.zeros_like(tau), -tau * safe)


def cross_entropy_probs(x: Tensor, target: Tensor, weight: Optional[Tensor], reduction: str,
                        label_smoothing: float, mask: Optional[Tensor],
                        tail_indices: Optional[Tensor] = None,
                        tail_values: Optional[Tensor] = None) -> Tensor:
    cdim = _cdim(x)
    num_classes = x.shape[cdim]
    t = target.to(x.dtype)
    if label_smoothing:
        t = (1 - label_smoothing) * t + label_smoothing / num_classes
    wt = t if weight is None else _class_view(weight.to(x.dtype), x) * t
    rows = _weighted_neg_log_softmax(x, wt)
    if tail_indices is not None:
        tail = _tail_term(x, tail_indices, tail_values)
        if tail is not None:
            rows = rows + tail
    rows = _masked_rows(rows, mask)
    return _reduce(rows, reduction, _row_count(x, mask))


def cross_entropy_index(x: Tensor, target: Tensor, weight: Optional[Tensor],
                        ignore_index: int, reduction: str, label_smoothing: float) -> Tensor:
    cdim = _cdim(x)
    num_classes = x.shape[cdim]
    valid = target != ignore_index
    y = torch.where(valid, target, torch.zeros_like(target)).long()
    neg_logp = -torch.log_softmax(x, cdim)
    nll = neg_logp.gather(cdim, y.unsqueeze(cdim)).squeeze(cdim)
    if weight is not None:
        w = weight.to(x.dtype)
        wy = w[y]
        nll = nll * wy
    rows = (1 - label_smoothing) * nll if label_smoothing else nll
    if label_smoothing:
        smooth = neg_logp if weight is None else neg_logp * _class_view(w, x)
        rows = rows + (label_smoothing / num_classes) * smooth.sum(cdim)
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction != "mean":
        return _reduce(rows, reduction, None)
    if weight is None:
        denominator = valid.sum().to(x.dtype)
    else:
        denominator = torch.where(valid, wy, torch.zeros_like(wy)).sum()
    return rows.sum() / denominator


def cross_entropy(x, target, topk_values, tail, weight, ignore_index, reduction,
                  label_smoothing, mask):
    x = _to_compute(x)
    if topk_values is not None:
        dense = _dense_topk(x, target, topk_values)
        return cross_entropy_probs(x, dense, weight, reduction, label_smoothing, mask,
                                   target if tail else None, topk_values if tail else None)
    if target.is_floating_point():
        return cross_entropy_probs(x, target, weight, reduction, label_smoothing, mask)
    return cross_entropy_index(x, target, weight, ignore_index, reduction, label_smoothing)


def cross_entropy_with_probs(x, target, weight, reduction):
    x = _to_compute(x)
    t = target.to(x.dtype)
    wt = t if weight is None else _class_view(weight.to(x.dtype), x) * t
    rows = _weighted_neg_log_softmax(x, wt)
    return _reduce(rows, reduction, _row_count(x, None))


def kl_div(x, target, reduction, log_target):
    x = _to_compute(x)
    t = target.to(x.dtype)
    if log_target:
        zero = t == -math.inf
        diff = torch.where(zero, torch.zeros_like(x), t - x)
        elements = torch.exp(t) * diff
    else:
        # torch's own expression (so the target gradient is torch's), with x = −inf
        # replaced where the target is 0 (a zero target contributes 0)
        safe_x = torch.where((t == 0) & (x == -math.inf), torch.zeros_like(x), x)
        elements = torch.xlogy(t, t) - t * safe_x
    # A NaN input makes its element's gradient NaN too (softce is stricter than torch,
    # whose gradient −t ignores the input): 0 · x² adds 0, and a NaN derivative where x is NaN.
    nan_x = torch.where(torch.isnan(x), x, torch.zeros_like(x))
    elements = elements + 0 * nan_x * nan_x
    if reduction == "none":
        return elements
    total = elements.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / x.numel()  # NaN for an empty input, as torch
    # batchmean
    return total / x.shape[0] if x.dim() >= 1 else total


def binary_cross_entropy_with_logits(x, target, weight, pos_weight, reduction):
    x = _to_compute(x)
    t = target.to(x.dtype)
    # a softplus(−x) + b softplus(x), a = pos_weight · t, b = 1 − t: two terms of one sign
    # (no cancellation where the loss is small). A term whose coefficient is zero at an
    # infinite logit (a masked logit: x = −inf at a = 0, +inf at b = 0) is 0 with every
    # derivative: its softplus is taken at a safe 0 there and then zeroed, so no 0 · inf
    # reaches a first or second derivative. softplus as max(v, 0) + log1p(exp(−|v|)) written
    # with where: exact, σ(0) = 1/2 at 0, and second derivative 0 (not NaN, as logaddexp's)
    # at ±inf.
    a = t * pos_weight.to(x.dtype) if pos_weight is not None else t
    b = 1 - t

    def masked_softplus(v, coefficient, masked_at):
        mask = (coefficient == 0) & (x == masked_at)
        safe = torch.where(mask, 0.0, v)
        positive = safe > 0  # not relu / abs: their derivative at 0 is 0, sigma(0) is 1/2
        return torch.where(mask, 0.0, torch.where(positive, safe, 0.0)
                           + torch.log1p(torch.exp(torch.where(positive, -safe, safe))))

    elements = a * masked_softplus(-x, a, -math.inf) + b * masked_softplus(x, b, math.inf)
    elements = torch.where(torch.isnan(x), x, elements)  # pos_weight 0 at t = 1: a = b = 0
    if weight is not None:
        elements = elements * weight.to(x.dtype)
    elements = elements.expand(x.shape) if elements.shape != x.shape else elements
    if reduction == "none":
        return elements
    total = elements.sum()
    return total if reduction == "sum" else total / x.numel()


def _plogp_ratio(p: Tensor, logp: Tensor, logr: Tensor, cdim: int) -> Tensor:
    """Σ p (log p − log r) per row, a term with p = 0 being 0."""
    safe = torch.where(p == 0, 0.0, logp - logr)
    return (p * safe).sum(cdim)


def distillation_loss(x, teacher, topk_values, tail, temperature, divergence, beta,
                      reduction, mask):
    x = _to_compute(x)
    cdim = _cdim(x)
    T = temperature
    logq = torch.log_softmax(x / T, cdim)
    if topk_values is not None:
        # p = the values themselves (no temperature); kl only
        v = topk_values.to(x.dtype)
        indices = teacher.long()
        if x.dim() <= 1:
            logq_k = logq.gather(0, indices)
        else:
            logq_k = logq.movedim(cdim, -1).gather(-1, indices)
        zero = v == 0
        safe_v = torch.where(zero, torch.ones_like(v), v)
        safe_lq = torch.where(zero, torch.zeros_like(logq_k), logq_k)
        rows = (torch.where(zero, torch.zeros_like(v), v * (torch.log(safe_v) - safe_lq))
                .sum(-1))
        if tail and indices.shape[-1] < x.shape[cdim]:
            tau = 1 - v.sum(-1)
            positive = tau > 0
            safe_tau = torch.where(positive, tau, torch.ones_like(tau))
            tau_log_tau = torch.where(positive, tau * torch.log(safe_tau),
                                      torch.zeros_like(tau))
            log_rest = _log_rest(x / T, indices)
            zero_tau = tau == 0
            safe_rest = torch.where(zero_tau, torch.zeros_like(log_rest), log_rest)
            rows = rows + tau_log_tau - torch.where(zero_tau, torch.zeros_like(tau),
                                                    tau * safe_rest)
        rows = T * T * rows
    else:
        z = _to_compute(teacher).to(x.dtype)
        logp = torch.log_softmax(z / T, cdim)
        p, q = torch.exp(logp), torch.exp(logq)
        if divergence == "jsd" and beta == 0.0:
            divergence = "kl"
        if divergence == "jsd" and beta == 1.0:
            divergence = "reverse_kl"
        if divergence == "kl":
            rows = _plogp_ratio(p, logp, logq, cdim)
        elif divergence == "reverse_kl":
            rows = _plogp_ratio(q, logq, logp, cdim)
        else:
            logm = torch.logaddexp(logp + math.log(beta), logq + math.log(1 - beta))
            rows = (beta * _plogp_ratio(p, logp, logm, cdim)
                    + (1 - beta) * _plogp_ratio(q, logq, logm, cdim))
        rows = T * T * rows
    rows = _masked_rows(rows, mask)
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    batch = _row_count(x, mask)
    if reduction == "batchmean":
        return total / batch
    return total / batch / x.shape[cdim]  # mean
