"""Never a silently wrong number (issue 9), from Python: NaN reaching a row makes that row's
loss and gradient NaN as in PyTorch (logit, target, teacher logit, a weight the row uses),
and nothing else; overlapping arguments are refused where a result would be written over
them; the examples of the issue, each as a regression test.

Contract: docs/semantics.md. The only deliberate difference from torch is 0 · (−inf) = 0
for a zero target; no NaN is placed there here."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import softce
from conftest import assert_close

N, C = 4, 5
NAN_ROW = 1


def data(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g, dtype=torch.float64).to(dtype)
    p = torch.softmax(torch.randn(N, C, generator=g, dtype=torch.float64) * 2, 1).to(dtype)
    z = (torch.randn(N, C, generator=g, dtype=torch.float64) * 2).to(dtype)
    y = torch.randint(0, C, (N,), generator=g)
    return x, p, z, y


def with_nan(t, row=NAN_ROW, col=2):
    t = t.clone()
    t[row, col] = math.nan
    return t


def loss_and_grad(fn, x):
    x = x.detach().clone().requires_grad_()
    loss = fn(x)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


def kl_rows(student, teacher, divergence, beta=0.5, T=1.0):
    """The distillation divergences per row in plain torch (NaN propagates as torch)."""
    logq = torch.log_softmax(student / T, 1)
    logp = torch.log_softmax(teacher / T, 1)
    kl = lambda a, b: F.kl_div(b, a, reduction="none", log_target=True).sum(1)  # KL(a||b)
    if divergence == "kl":
        return T * T * kl(logp, logq)
    if divergence == "reverse_kl":
        return T * T * kl(logq, logp)
    logm = torch.logaddexp(logp + math.log(beta), logq + math.log(1 - beta))
    return T * T * (beta * kl(logp, logm) + (1 - beta) * kl(logq, logm))


x0, p0, z0, y0 = data()
W = torch.linspace(0.5, 2.0, C, dtype=torch.float64)

# name: (softce per-row loss of x, torch per-row loss of x, input); NaN in one row of one
# argument each. Every case: the NaN row's loss and gradient NaN, the other rows as torch.
CASES = {
    "ce_index_nan_logit": (lambda x: softce.cross_entropy(x, y0, reduction="none"),
                           lambda x: F.cross_entropy(x, y0, reduction="none"), with_nan(x0)),
    "ce_index_smoothing_nan_logit": (
        lambda x: softce.cross_entropy(x, y0, reduction="none", label_smoothing=0.1),
        lambda x: F.cross_entropy(x, y0, reduction="none", label_smoothing=0.1),
        with_nan(x0)),
    "ce_index_nan_used_weight": (
        lambda x: softce.cross_entropy(x, y0, weight=with_nan(W.view(1, C), 0, int(y0[1]))[0],
                                       reduction="none"),
        lambda x: F.cross_entropy(x, y0, weight=with_nan(W.view(1, C), 0, int(y0[1]))[0],
                                  reduction="none"), x0),
    "ce_probs_nan_logit": (lambda x: softce.cross_entropy(x, p0, reduction="none"),
                           lambda x: F.cross_entropy(x, p0, reduction="none"), with_nan(x0)),
    "ce_probs_nan_target": (lambda x: softce.cross_entropy(x, with_nan(p0), reduction="none"),
                            lambda x: F.cross_entropy(x, with_nan(p0), reduction="none"), x0),
    "ce_topk_nan_value": (
        lambda x: softce.cross_entropy(
            x, softce.TopK(torch.tensor([[0, 1]] * N), with_nan(p0[:, :2], NAN_ROW, 1)),
            reduction="none"),
        lambda x: F.cross_entropy(
            x, torch.cat([with_nan(p0[:, :2], NAN_ROW, 1), torch.zeros(N, C - 2,
                          dtype=torch.float64)], 1), reduction="none"), x0),
    "cewp_nan_logit": (lambda x: softce.cross_entropy_with_probs(x, p0, reduction="none"),
                       lambda x: F.cross_entropy(x, p0, reduction="none"), with_nan(x0)),
    "kl_nan_input": (lambda x: softce.kl_div(x, p0, reduction="none").sum(1),
                     lambda x: F.kl_div(x, p0, reduction="none").sum(1),
                     with_nan(torch.log_softmax(x0, 1))),
    "kl_nan_target": (lambda x: softce.kl_div(x, with_nan(p0), reduction="none").sum(1),
                      lambda x: F.kl_div(x, with_nan(p0), reduction="none").sum(1),
                      torch.log_softmax(x0, 1)),
    "kl_log_target_nan_target": (
        lambda x: softce.kl_div(x, with_nan(p0.log()), reduction="none",
                                log_target=True).sum(1),
        lambda x: F.kl_div(x, with_nan(p0.log()), reduction="none", log_target=True).sum(1),
        torch.log_softmax(x0, 1)),
    "bce_nan_logit": (
        lambda x: softce.binary_cross_entropy_with_logits(x, p0, reduction="none").sum(1),
        lambda x: F.binary_cross_entropy_with_logits(x, p0, reduction="none").sum(1),
        with_nan(x0)),
    "bce_nan_target": (
        lambda x: softce.binary_cross_entropy_with_logits(x, with_nan(p0),
                                                          reduction="none").sum(1),
        lambda x: F.binary_cross_entropy_with_logits(x, with_nan(p0), reduction="none").sum(1),
        x0),
    "bce_nan_weight": (
        lambda x: softce.binary_cross_entropy_with_logits(x, p0, weight=with_nan(p0 + 1),
                                                          reduction="none").sum(1),
        lambda x: F.binary_cross_entropy_with_logits(x, p0, weight=with_nan(p0 + 1),
                                                     reduction="none").sum(1), x0),
    **{f"distill_{d}_nan_student": (
        lambda x, d=d: softce.distillation_loss(x, z0, divergence=d, beta=0.3,
                                                temperature=2.0, reduction="none"),
        lambda x, d=d: kl_rows(x, z0, d, beta=0.3, T=2.0), with_nan(x0))
       for d in ["kl", "reverse_kl", "jsd"]},
    **{f"distill_{d}_nan_teacher": (
        lambda x, d=d: softce.distillation_loss(x, with_nan(z0), divergence=d, beta=0.3,
                                                temperature=2.0, reduction="none"),
        lambda x, d=d: kl_rows(x, with_nan(z0), d, beta=0.3, T=2.0), x0)
       for d in ["kl", "reverse_kl", "jsd"]},
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_nan_row_is_nan_as_in_torch(name):
    ours, theirs, x = CASES[name]
    loss, grad = loss_and_grad(ours, x)
    expected, expected_grad = loss_and_grad(theirs, x)
    if name == "kl_nan_input":
        # stricter than torch (docs/semantics.md): torch's gradient −t ignores the input
        expected_grad = torch.where(torch.isnan(x), x, expected_grad)
    assert torch.isnan(expected[NAN_ROW]), "the case must put a NaN in torch's row"
    assert torch.isnan(loss[NAN_ROW]), f"{name}: the NaN row's loss is {loss[NAN_ROW]}"
    # the gradient is NaN where torch's is (the whole row for the row losses)
    assert torch.equal(torch.isnan(grad), torch.isnan(expected_grad)), \
        f"{name}: NaN gradient positions {torch.isnan(grad)} vs torch's " \
        f"{torch.isnan(expected_grad)}"
    others = [r for r in range(N) if r != NAN_ROW]
    assert_close(loss[others], expected[others])
    assert_close(grad[others], expected_grad[others])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", ["ce_index_nan_logit", "ce_probs_nan_target",
                                  "distill_kl_nan_teacher", "kl_log_target_nan_target"])
def test_nan_reaches_the_reduced_loss(name, reduction):
    """A NaN row makes the reduced loss NaN too (never a finite mean over the others)."""
    ours, _, x = CASES[name]
    assert torch.isnan(ours(x).sum())


def test_nan_weight_of_an_unused_class_does_not_matter():
    """Index targets use only their class's weight: torch's loss stays finite."""
    y = torch.tensor([0, 1, 0, 1])
    for bad in [math.nan, math.inf]:
        w = W.clone()
        w[4] = bad  # no row has class 4
        loss, grad = loss_and_grad(lambda x: softce.cross_entropy(x, y, w), x0)
        expected, expected_grad = loss_and_grad(lambda x: F.cross_entropy(x, y, w), x0)
        assert torch.isfinite(expected)
        assert_close(loss, expected)
        assert_close(grad, expected_grad)


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_nan_in_a_masked_row_is_excluded(reduction):
    """A row with mask false is not used: its NaN reaches neither the loss nor the
    gradient (softce's extension: torch has no mask)."""
    mask = torch.tensor([True, False, True, True])
    x = with_nan(x0)
    loss, grad = loss_and_grad(lambda x: softce.cross_entropy(x, p0, mask=mask,
                                                              reduction=reduction), x)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert (grad[~mask] == 0).all()


def test_nan_is_propagated_in_the_numpy_path_too():
    x, p = with_nan(x0).numpy(), p0.numpy()
    loss, grad = softce.cross_entropy(x, p, reduction="none", return_grad=True)
    assert np.isnan(loss[NAN_ROW]) and np.isnan(grad[NAN_ROW]).any()
    assert np.isfinite(np.delete(loss, NAN_ROW)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_is_propagated_in_reduced_precision(dtype):
    x = with_nan(x0).to(dtype)
    loss, grad = loss_and_grad(lambda x: softce.cross_entropy(x, y0, reduction="none"), x)
    assert torch.isnan(loss[NAN_ROW]) and torch.isnan(grad[NAN_ROW]).all()


# ---------------------------------------------------------------------------------------
# aliasing


def test_input_as_its_own_target_in_place_is_refused():
    x = x0.clone().requires_grad_() * 1
    before = x.detach().clone()
    with pytest.raises(ValueError, match="target overlaps the memory of the input"):
        softce.cross_entropy(x, x, inplace_backward=True)
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("threads", [1, 2])
def test_overlapping_input_and_target(threads):
    """big[:-1] and big[1:]: refused in place; read-only use gives torch's result for any
    thread count."""
    g = torch.Generator().manual_seed(3)
    big = torch.rand(257, 64, generator=g, dtype=torch.float64)
    previous = softce.get_num_threads()
    softce.set_num_threads(threads)
    try:
        x = big.clone().requires_grad_() * 1
        with pytest.raises(ValueError, match="target overlaps the memory of the input"):
            softce.cross_entropy(x[:-1], x[1:], inplace_backward=True)
        loss, grad = loss_and_grad(lambda x: softce.cross_entropy(x[:-1], big[1:]), big)
        expected, expected_grad = loss_and_grad(lambda x: F.cross_entropy(x[:-1], big[1:]),
                                                big)
        assert_close(loss, expected)
        assert_close(grad, expected_grad)
    finally:
        softce.set_num_threads(previous)


def test_inplace_on_a_view_of_a_parameter_is_refused_and_leaves_it_intact():
    w = torch.nn.Parameter(x0.clone())
    before = w.detach().clone()
    with pytest.raises(ValueError, match="a view of a leaf tensor that requires grad"):
        softce.cross_entropy(w[:2], y0[:2], inplace_backward=True)
    with pytest.raises(ValueError, match="a leaf tensor that requires grad"):
        softce.cross_entropy(w, y0, inplace_backward=True)
    assert torch.equal(w.detach(), before)


def test_numpy_writable_overlapping_as_strided_is_refused_in_place():
    base = np.arange(30, dtype=np.float64) / 10
    x = np.lib.stride_tricks.as_strided(base, (5, 6), (24, 8))  # rows share elements
    before = base.copy()
    with pytest.raises(ValueError, match="elements do not overlap"):
        softce.cross_entropy(x, np.zeros(5, dtype=np.int64), inplace_backward=True,
                             return_grad=True)
    assert np.array_equal(base, before)
    t = np.ascontiguousarray(np.full((5, 6), 1 / 6))
    with pytest.raises(ValueError, match="target overlaps the memory of the input"):
        softce.cross_entropy(t, t, inplace_backward=True, return_grad=True)


# ---------------------------------------------------------------------------------------
# the other examples of the issue


def test_hessian_is_not_silently_zero():
    y = torch.tensor([1, 2, 0, 4])
    h = torch.autograd.functional.hessian(lambda x: softce.cross_entropy(x, y), x0)
    expected = torch.autograd.functional.hessian(lambda x: F.cross_entropy(x, y), x0)
    assert h.abs().sum() > 0
    assert_close(h, expected)


def test_topk_tail_in_float32_is_finite_for_a_large_logit_gap():
    """The tail bucket −τ·log(1 − Q) with the top k far above the rest (gap ≥ 88): finite
    and equal to the float64 result, not inf."""
    x = torch.zeros(2, 6, dtype=torch.float64)
    x[:, :2] = 100.0  # the top 2 are e^100 times more likely than the rest
    indices = torch.tensor([[0, 1], [0, 1]])
    values = torch.tensor([[0.5, 0.4], [0.45, 0.45]], dtype=torch.float64)
    target = softce.TopK(indices, values, tail=True)
    expected, expected_grad = loss_and_grad(
        lambda x: softce.cross_entropy(x, target, reduction="none"), x)
    assert torch.isfinite(expected).all()
    loss, grad = loss_and_grad(lambda x: softce.cross_entropy(
        x, softce.TopK(indices, values.float(), tail=True), reduction="none"), x.float())
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert_close(loss, expected.float(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_distillation_of_batch_sequence_vocabulary_logits_needs_dim(beta):
    """TRL's own GKD edge-case tensors, (batch, sequence, vocabulary) = (1, 1, 2): taken with
    the classes at dimension 1 (the sequence, of length 1) the loss would be a plausible 0;
    3-d now needs dim=, and dim=-1 gives TRL's generalized JSD."""
    from test_extensions import generalized_jsd_loss

    student = torch.log(torch.tensor([[0.1, 0.9]], dtype=torch.float64)).unsqueeze(0)
    teacher = torch.log(torch.tensor([[0.9, 0.1]], dtype=torch.float64)).unsqueeze(0)
    with pytest.raises(ValueError, match=r"pass dim= .*dim=-1 for \(batch, sequence, "
                                         r"vocabulary\)"):
        softce.distillation_loss(student, teacher, divergence="jsd", beta=beta)
    loss = softce.distillation_loss(student, teacher, divergence="jsd", beta=beta, dim=-1)
    expected = generalized_jsd_loss(student.view(1, 2), teacher.view(1, 2), beta, 1.0,
                                    "batchmean")
    assert_close(loss, expected)
    assert loss > 0.3
    # the same on a (batch, sequence, vocabulary) batch with padding, TRL's label masking
    g = torch.Generator().manual_seed(5)
    s = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    t = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([[1, 2, -100], [-100, 3, 4]])
    keep = labels != -100
    got = softce.distillation_loss(s, t, divergence="jsd", beta=beta, dim=-1, mask=keep)
    assert_close(got, generalized_jsd_loss(s[keep], t[keep], beta, 1.0, "batchmean"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pos_weight", [None, 2.5])
@pytest.mark.parametrize("create_graph", [False, True])
def test_bce_stays_exact_where_torchs_formula_cancels(dtype, pos_weight, create_graph):
    # t = 0 at x << 0: the loss is log1p(exp(x)) ~ exp(x), the gradient sigmoid(x); torch's
    # (1 - t) x + softplus(-x) loses them (float32: 1 % off at x = -10, 0 from -16 down).
    # Through the kernel, and through the differentiable expression that create_graph uses.
    x = torch.tensor([-5.0, -10.0, -16.0, -30.0, -48.0, -80.0], dtype=dtype, requires_grad=True)
    t = torch.zeros_like(x)
    pw = None if pos_weight is None else torch.full_like(x, pos_weight).detach()
    loss = softce.binary_cross_entropy_with_logits(x, t, pos_weight=pw, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), x, create_graph=create_graph)
    x64 = x.detach().double()
    exact_loss, exact_grad = torch.log1p(torch.exp(x64)), torch.sigmoid(x64)
    eps = torch.finfo(dtype).eps
    assert torch.all((loss.detach().double() - exact_loss).abs() <= 4 * eps * exact_loss), loss
    assert torch.all((grad.detach().double() - exact_grad).abs() <= 4 * eps * exact_grad), grad
    if dtype == torch.float32:  # what torch gives there: the case is one torch gets wrong
        torch_loss = F.binary_cross_entropy_with_logits(x.detach(), t, pos_weight=pw, reduction="none")
        assert torch_loss[3:].eq(0).all()


@pytest.mark.parametrize("create_graph", [False, True])
def test_bce_masked_logit_costs_nothing(create_graph):
    # x = -inf at t = 0 (and +inf at t = 1): loss 0, gradients 0 (the target's too, as
    # cross_entropy's at a masked class), where torch gives NaN; +inf at t = 0 is inf with
    # gradient 1 as in torch; a NaN logit stays NaN. First order through the kernel, with
    # create_graph through the differentiable expression.
    inf = math.inf
    x = torch.tensor([-inf, inf, inf, 0.5, math.nan, 0.0], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0, 0.0, 0.3, 1.0, 0.0], dtype=torch.float64, requires_grad=True)
    loss = softce.binary_cross_entropy_with_logits(x, t, reduction="none")
    grad, grad_t = torch.autograd.grad(loss.sum(), (x, t), create_graph=create_graph)
    torch_loss = F.binary_cross_entropy_with_logits(x.detach(), t.detach(), reduction="none")
    assert torch_loss[:2].isnan().all()  # the difference from torch this test pins
    assert loss[:3].tolist() == [0.0, 0.0, inf]
    assert grad[:3].tolist() == [0.0, 0.0, 1.0]
    assert grad_t[:3].tolist() == [0.0, 0.0, -inf]
    xr, tr = x.detach()[3:4].clone().requires_grad_(), t.detach()[3:4].clone().requires_grad_()
    gr, gtr = torch.autograd.grad(F.binary_cross_entropy_with_logits(xr, tr, reduction="sum"), (xr, tr))
    assert_close(loss[3:4], torch_loss[3:4])
    assert_close(grad[3:4], gr)
    assert_close(grad_t[3:4], gtr)
    assert loss[4].isnan() and grad[4].isnan()
    assert grad[5].item() == 0.5  # sigma(0) at a logit of exactly 0
    if create_graph:  # the second derivative (a + b) sigma(x) sigma(-x): 0 at the infinite logits
        (second,) = torch.autograd.grad(grad[:4].sum() + grad[5], x)
        s = torch.sigmoid(torch.tensor(0.5, dtype=torch.float64))
        assert second[:3].tolist() == [0.0, 0.0, 0.0]
        assert_close(second[3], s * (1 - s))
        assert second[5].item() == 0.25
