"""The extensions beyond torch: masked -inf logits, row masks, top-k targets, distillation
(against direct PyTorch formulations, including TRL's generalized_jsd_loss) and Snorkel's
cross_entropy_with_probs (against its looped formula, written out here)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import softce
from conftest import assert_close

torch.manual_seed(0)


def grad_of(fn, x, upstream=None):
    """(loss, d loss / d x) of fn at a fresh copy of x, with an optional upstream grad."""
    x = x.detach().clone().requires_grad_()
    loss = fn(x)
    loss.backward(upstream if upstream is not None else torch.ones_like(loss))
    return loss.detach(), x.grad


def soft_ce_torch(x, t, weight=None):
    """Per-row -sum_c w_c t_c log softmax(x)_c with 0 * (-inf) = 0 (torch's own math)."""
    logq = torch.log_softmax(x, 1)
    w = 1.0 if weight is None else weight.view(1, -1, *([1] * (x.dim() - 2)))
    return -torch.where(t > 0, w * t * logq, torch.zeros_like(logq)).sum(1)


# ---------------------------------------------------------------------------------------
# masked logits


def test_masked_minus_inf_logits_with_zero_target():
    x = torch.randn(6, 9, dtype=torch.float64)
    t = torch.softmax(torch.randn(6, 9, dtype=torch.float64), 1)
    blocked = torch.rand(6, 9) < 0.4
    blocked[:, 0] = False  # every row keeps a class
    x[blocked] = -torch.inf
    t[blocked] = 0.0
    t /= t.sum(1, keepdim=True)
    assert torch.isnan(F.cross_entropy(x, t)), "torch turns 0 * (-inf) into NaN"
    for reduction in ["mean", "sum", "none"]:
        loss, grad = grad_of(lambda x: softce.cross_entropy(x, t, reduction=reduction), x)
        expected, expected_grad = grad_of(
            lambda x: {"mean": torch.mean, "sum": torch.sum, "none": lambda v: v}[reduction](
                soft_ce_torch(x, t)), x)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        assert_close(loss, expected)
        assert_close(grad, expected_grad)
        assert (grad[blocked] == 0).all()


def test_masked_minus_inf_in_kl_div_and_distillation():
    logq = torch.log_softmax(torch.randn(4, 7, dtype=torch.float64), 1)
    p = torch.softmax(torch.randn(4, 7, dtype=torch.float64), 1)
    logq[:, 3] = -torch.inf
    p[:, 3] = 0.0
    assert torch.isnan(F.kl_div(logq, p, reduction="sum"))
    loss, grad = grad_of(lambda x: softce.kl_div(x, p, reduction="sum"), logq)
    keep = torch.arange(7) != 3
    assert_close(loss, F.kl_div(logq[:, keep], p[:, keep], reduction="sum"))
    assert_close(grad, -p)
    # log_target: a -inf log-target contributes 0
    logp = torch.log(p)
    assert torch.isnan(F.kl_div(logq, logp, reduction="sum", log_target=True))
    assert_close(softce.kl_div(logq, logp, reduction="sum", log_target=True), loss)
    # distillation: the teacher and the student both block class 3 (masked vocabulary)
    student = torch.randn(4, 7, dtype=torch.float64)
    teacher = torch.randn(4, 7, dtype=torch.float64)
    student[:, 3] = teacher[:, 3] = -torch.inf
    for divergence in ["kl", "reverse_kl", "jsd"]:
        loss, grad = grad_of(lambda x: softce.distillation_loss(x, teacher,
                                                                divergence=divergence), student)
        expected, expected_grad = grad_of(
            lambda x: softce.distillation_loss(x, teacher[:, keep], divergence=divergence),
            student[:, keep])
        assert_close(loss, expected)
        assert_close(grad[:, keep], expected_grad)
        assert (grad[:, 3] == 0).all()


# ---------------------------------------------------------------------------------------
# row mask


@pytest.mark.parametrize("shape", [(7, 5), (4, 5, 3)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_weight", [False, True])
def test_row_mask_equals_torch_on_selected_rows(shape, reduction, with_weight):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), 1)
    weight = torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5 if with_weight else None
    mask = torch.rand(shape[:1] + shape[2:], generator=g) < 0.6
    mask.view(-1)[0] = True
    loss, grad = grad_of(lambda x: softce.cross_entropy(x, t, weight, reduction=reduction,
                                                        mask=mask), x)

    # torch on the selected rows only: class dimension last, rows flattened, then selected
    def rows(v):
        return v.movedim(1, -1).reshape(-1, shape[1])[mask.reshape(-1)]

    expected, expected_rows_grad = grad_of(
        lambda xs: F.cross_entropy(xs, rows(t), weight, reduction=reduction), rows(x))
    if reduction == "none":
        assert_close(loss[mask], expected)
        assert (loss[~mask] == 0).all()
    else:
        assert_close(loss, expected)
    assert_close(rows(grad), expected_rows_grad)
    assert (grad.movedim(1, -1)[~mask] == 0).all()


# ---------------------------------------------------------------------------------------
# top-k targets


def random_topk(g, row_shape, C, K, total=1.0):
    indices = torch.stack([torch.randperm(C, generator=g)[:K]
                           for _ in range(int(np.prod(row_shape)))]).reshape(*row_shape, K)
    values = torch.rand(*row_shape, K, generator=g, dtype=torch.float64) + 0.1
    values = values / values.sum(-1, keepdim=True) * total
    return indices, values


def scatter_dense(indices, values, C):
    """The dense (class dim 1) target of a top-k target (row shape..., K)."""
    dense = torch.zeros(*indices.shape[:-1], C, dtype=values.dtype)
    dense.scatter_(-1, indices, values)
    return dense.movedim(-1, 1) if dense.dim() >= 2 else dense


@pytest.mark.parametrize("shape", [(9,), (5, 9), (3, 9, 4)])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("options", [
    dict(), dict(reduction="sum"), dict(reduction="none"), dict(label_smoothing=0.2),
    dict(weight=True), dict(mask=True)])
def test_topk_equals_dense_scatter(shape, index_dtype, options):
    g = torch.Generator().manual_seed(2)
    C = shape[0] if len(shape) == 1 else shape[1]
    rows = shape[:1] + shape[2:] if len(shape) >= 2 else ()
    indices, values = random_topk(g, rows, C, K=3)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    kwargs = dict(options)
    if kwargs.get("weight"):
        kwargs["weight"] = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    if kwargs.get("mask"):
        kwargs["mask"] = torch.rand(rows, generator=g) < 0.7
    dense = scatter_dense(indices, values, C)
    loss, grad = grad_of(lambda x: softce.cross_entropy(
        x, softce.TopK(indices.to(index_dtype), values), **kwargs), x)
    dense_loss, dense_grad = grad_of(lambda x: softce.cross_entropy(x, dense, **kwargs), x)
    assert_close(loss, dense_loss)
    assert_close(grad, dense_grad)
    if "mask" not in kwargs:  # torch has no mask; compare with its dense function too
        torch_loss, torch_grad = grad_of(lambda x: F.cross_entropy(x, dense, **kwargs), x)
        assert_close(loss, torch_loss)
        assert_close(grad, torch_grad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_topk_tail_bucket(reduction):
    g = torch.Generator().manual_seed(3)
    N, C, K = 6, 11, 4
    indices, values = random_topk(g, (N,), C, K, total=0.8)
    values[0] = values[0] / values[0].sum()  # a row without tail mass
    x = torch.randn(N, C, generator=g, dtype=torch.float64)

    def expected_fn(x):
        q = torch.softmax(x, 1)
        tau = 1 - values.sum(1)
        Q = q.gather(1, indices).sum(1)
        tail = torch.where(tau > 0, -tau * torch.log1p(-Q), torch.zeros_like(tau))
        per_row = soft_ce_torch(x, scatter_dense(indices, values, C)) + tail
        return {"mean": torch.mean, "sum": torch.sum, "none": lambda v: v}[reduction](per_row)

    loss, grad = grad_of(lambda x: softce.cross_entropy(
        x, softce.TopK(indices, values, tail=True), reduction=reduction), x)
    expected, expected_grad = grad_of(expected_fn, x)
    assert_close(loss, expected)
    assert_close(grad, expected_grad)


# ---------------------------------------------------------------------------------------
# distillation


def generalized_jsd_loss(student_logits, teacher_logits, beta=0.5, temperature=1.0,
                         reduction="batchmean"):
    """TRL's GKDTrainer.generalized_jsd_loss (trl/trainer/gkd_trainer.py), without labels;
    logits are (rows, vocabulary)."""
    student_logits = student_logits / temperature
    teacher_logits = teacher_logits / temperature
    student_log_probs = F.log_softmax(student_logits, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta = torch.tensor(beta, dtype=student_log_probs.dtype)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log(1 - beta),
                         teacher_log_probs + torch.log(beta)]), dim=0)
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none",
                              log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none",
                              log_target=True)
        jsd = beta * kl_teacher + (1 - beta) * kl_student
    if reduction == "batchmean":
        return jsd.sum() / jsd.size(0)
    if reduction == "sum":
        return jsd.sum()
    if reduction == "mean":
        return jsd.mean()
    return jsd


def distillation_torch(student, teacher, temperature, divergence, reduction):
    """The contract written directly in PyTorch: T^2 * KL(p || q) or T^2 * KL(q || p)."""
    logq = torch.log_softmax(student / temperature, 1)
    logp = torch.log_softmax(teacher / temperature, 1)
    if divergence == "kl":
        per_row = (logp.exp() * (logp - logq)).sum(1)
    else:
        per_row = (logq.exp() * (logq - logp)).sum(1)
    per_row = temperature ** 2 * per_row
    C = student.shape[1]
    return {"batchmean": per_row.sum() / per_row.numel(), "sum": per_row.sum(),
            "mean": per_row.sum() / (per_row.numel() * C), "none": per_row}[reduction]


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
@pytest.mark.parametrize("temperature", [1.0, 2.5, 0.5])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_distillation_against_pytorch(divergence, temperature, reduction):
    g = torch.Generator().manual_seed(4)
    student = torch.randn(5, 13, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(5, 13, generator=g, dtype=torch.float64) * 3
    loss, grad = grad_of(lambda x: softce.distillation_loss(
        x, teacher, temperature=temperature, divergence=divergence, reduction=reduction),
        student)
    expected, expected_grad = grad_of(lambda x: distillation_torch(
        x, teacher, temperature, divergence, reduction), student)
    assert_close(loss, expected)
    assert_close(grad, expected_grad)
    # the same through F.kl_div, torch's distillation idiom (batchmean, T^2 factor)
    if divergence == "kl" and reduction == "batchmean":
        idiom = temperature ** 2 * F.kl_div(torch.log_softmax(student / temperature, 1),
                                            torch.softmax(teacher / temperature, 1),
                                            reduction="batchmean")
        assert_close(loss, idiom)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_jsd_against_trl_generalized_jsd_loss(beta, temperature, reduction):
    g = torch.Generator().manual_seed(5)
    B, T, V = 2, 3, 17  # (batch, sequence, vocabulary) flattened to rows as in TRL
    student = torch.randn(B * T, V, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(B * T, V, generator=g, dtype=torch.float64) * 2
    loss, grad = grad_of(lambda x: softce.distillation_loss(
        x, teacher, temperature=temperature, divergence="jsd", beta=beta,
        reduction=reduction), student)
    trl_reduction = "none" if reduction == "none" else reduction
    expected, expected_grad = grad_of(
        lambda x: temperature ** 2 * (lambda v: v.sum(1) if reduction == "none" else v)(
            generalized_jsd_loss(x, teacher, beta, temperature, trl_reduction)), student)
    assert_close(loss, expected)
    assert_close(grad, expected_grad)


def test_distillation_teacher_gradient_and_mask():
    g = torch.Generator().manual_seed(6)
    student = torch.randn(6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([True, False, True, True, False, True])
    loss = softce.distillation_loss(student, teacher, mask=mask, divergence="jsd")
    loss.backward()
    # the teacher gets the gradient of TRL's generalised JSD (masked rows: 0)
    expected_teacher = torch.autograd.grad(
        generalized_jsd_loss(student.detach()[mask], teacher[mask], 0.5, 1.0, "sum")
        / mask.sum(), teacher)[0]
    assert_close(teacher.grad, expected_teacher)
    expected, expected_grad = grad_of(
        lambda x: softce.distillation_loss(x, teacher.detach()[mask], divergence="jsd"),
        student[mask])
    assert_close(loss, expected)
    assert_close(student.grad[mask], expected_grad)
    assert (student.grad[~mask] == 0).all()


@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_topk_teacher(tail, temperature):
    g = torch.Generator().manual_seed(7)
    N, C, K = 5, 12, 4
    indices, values = random_topk(g, (N,), C, K, total=0.9 if tail else 1.0)
    student = torch.randn(N, C, generator=g, dtype=torch.float64)

    def expected_fn(x):
        logq = torch.log_softmax(x / temperature, 1)
        per_row = (values * (values.log() - logq.gather(1, indices))).sum(1)
        if tail:
            tau = 1 - values.sum(1)
            Q = logq.exp().gather(1, indices).sum(1)
            per_row = per_row + tau * tau.log() - tau * torch.log1p(-Q)
        return temperature ** 2 * per_row.mean()

    loss, grad = grad_of(lambda x: softce.distillation_loss(
        x, softce.TopK(indices, values, tail), temperature=temperature), student)
    expected, expected_grad = grad_of(expected_fn, student)
    assert_close(loss, expected)
    assert_close(grad, expected_grad)


# ---------------------------------------------------------------------------------------
# Snorkel


def snorkel_cross_entropy_with_probs(input, target, weight=None, reduction="mean"):
    """snorkel.classification.loss.cross_entropy_with_probs, as Snorkel writes it."""
    num_points, num_classes = input.shape
    cum_losses = input.new_zeros(num_points)
    for y in range(num_classes):
        target_temp = input.new_full((num_points,), y, dtype=torch.long)
        y_loss = F.cross_entropy(input, target_temp, reduction="none")
        if weight is not None:
            y_loss = y_loss * weight[y]
        cum_losses += target[:, y].float() * y_loss
    if reduction == "none":
        return cum_losses
    elif reduction == "mean":
        return cum_losses.mean()
    elif reduction == "sum":
        return cum_losses.sum()
    raise ValueError("Keyword 'reduction' must be one of ['none', 'mean', 'sum']")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_weight", [False, True])
def test_cross_entropy_with_probs_against_snorkel(reduction, with_weight):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(7, 4, generator=g)
    t = torch.softmax(torch.randn(7, 4, generator=g) * 2, 1)
    weight = torch.rand(4, generator=g) + 0.5 if with_weight else None
    upstream = torch.rand(7) if reduction == "none" else None
    loss, grad = grad_of(lambda x: softce.cross_entropy_with_probs(x, t, weight, reduction),
                         x, upstream)
    expected, expected_grad = grad_of(
        lambda x: snorkel_cross_entropy_with_probs(x, t, weight, reduction), x, upstream)
    assert_close(loss, expected)
    assert_close(grad, expected_grad)
    # and the module form of the same loss
    assert_close(softce.cross_entropy(x, t, weight, reduction=reduction), loss)
