"""softce.linear: linear_cross_entropy / linear_distillation_loss against F.linear + the
PyTorch loss (or softce's dense loss where torch has no counterpart: masks, top-k tails,
reverse KL / JSD) in float64; every gradient (input, weight, bias); randomised shapes (D and V
not multiples of the vector width, V not a multiple of the block, N = 0 / 1); budgets that
force many row blocks and class blocks; gradcheck; bfloat16 against float32; tied weights;
1 vs 2 threads; the NumPy path; errors; torch.compile(fullgraph=True); the nn modules.
"""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import softce
from softce import TopK
from softce.linear import linear_cross_entropy, linear_distillation_loss
from softce.linear_nn import LinearCrossEntropyLoss, LinearDistillationLoss

from conftest import assert_close

F64 = torch.float64


def make(N, D, V, dtype=F64, seed=0, bias=True, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, D, generator=g, dtype=F64)).to(dtype)
    w = (torch.randn(V, D, generator=g, dtype=F64) * 2 / D ** 0.5).to(dtype)
    b = torch.randn(V, generator=g, dtype=F64).to(dtype) if bias else None
    for t in (h, w, b):
        if t is not None:
            t.requires_grad_(requires_grad)
    return h, w, b, g


def grads(loss, tensors, upstream=None):
    tensors = [t for t in tensors if t is not None]
    return torch.autograd.grad(loss, tensors, upstream)


def probs(N, V, g):
    p = torch.rand(N, V, generator=g, dtype=F64)
    p[p < 0.3] = 0
    return p / p.sum(1, keepdim=True).clamp_min(1e-12)


def topk(N, V, K, g, tail=False):
    idx = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)]) if N else torch.empty(0, K, dtype=torch.int64)
    val = torch.rand(N, K, generator=g, dtype=F64) + 0.1
    val = val / val.sum(1, keepdim=True) * (0.8 if tail else 1.0)
    return TopK(idx, val, tail)


SHAPES = [(0, 5, 7), (1, 3, 17), (7, 19, 53), (33, 17, 129), (20, 1, 2)]
BUDGETS = [None, 8 * 53 * 3, 8 * 40]  # one block; blocks of 3 rows (at V = 53); below one row


def check(loss, ref, tensors, rtol=1e-9, atol=1e-11, upstream=None):
    assert_close(loss, ref, rtol=rtol, atol=atol)
    if loss.requires_grad:
        got = grads(loss, tensors, upstream)
        want = grads(ref, tensors, upstream)
        for a, b in zip(got, want):
            assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("N,D,V", SHAPES)
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_index_targets(N, D, V, budget, reduction):
    h, w, b, g = make(N, D, V)
    t = torch.randint(0, V, (N,), generator=g)
    if N > 2:
        t[1] = -100
    cw = torch.rand(V, generator=g, dtype=F64) + 0.5
    for kwargs in [{}, dict(class_weight=cw, label_smoothing=0.2)]:
        loss = linear_cross_entropy(h, w, t, b, reduction=reduction, memory_budget=budget, **kwargs)
        ref = F.cross_entropy(F.linear(h, w, b), t, weight=kwargs.get("class_weight"),
                              reduction=reduction, label_smoothing=kwargs.get("label_smoothing", 0.0))
        up = torch.randn(N, dtype=F64, generator=g) if reduction == "none" else None
        check(loss, ref, (h, w, b), upstream=up)


@pytest.mark.parametrize("N,D,V", SHAPES)
@pytest.mark.parametrize("budget", BUDGETS)
def test_probability_targets_and_mask(N, D, V, budget):
    h, w, b, g = make(N, D, V)
    p = probs(N, V, g)
    loss = linear_cross_entropy(h, w, p, b, label_smoothing=0.1, memory_budget=budget)
    ref = F.cross_entropy(F.linear(h, w, b), p, label_smoothing=0.1)
    check(loss, ref, (h, w, b))
    mask = torch.rand(N, generator=g) < 0.7
    loss = linear_cross_entropy(h, w, p, b, mask=mask, memory_budget=budget)
    rows = F.cross_entropy(F.linear(h, w, b), p, reduction="none")
    ref = (rows * mask).sum() / mask.sum()
    check(loss, ref, (h, w, b))


@pytest.mark.parametrize("N,D,V", SHAPES)
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("tail", [False, True])
def test_topk_targets(N, D, V, budget, tail):
    h, w, b, g = make(N, D, V)
    target = topk(N, V, min(V, 4), g, tail)
    loss = linear_cross_entropy(h, w, target, b, memory_budget=budget)
    # the dense softce loss on materialised logits (itself checked against torch)
    ref = softce.cross_entropy(F.linear(h, w, b), target)
    check(loss, ref, (h, w, b))
    if not tail:  # exactly the scattered dense target
        dense = torch.zeros(N, V, dtype=F64).scatter_(1, target.indices, target.values)
        loss = linear_cross_entropy(h, w, target, b, memory_budget=budget)
        check(loss, F.cross_entropy(F.linear(h, w, b), dense), (h, w, b))


@pytest.mark.parametrize("N,D,V", SHAPES)
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("divergence,beta", [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3),
                                             ("jsd", 0.0), ("jsd", 1.0)])
@pytest.mark.parametrize("teacher_kind", ["logits", "hidden", "topk"])
def test_distillation(N, D, V, budget, divergence, beta, teacher_kind):
    h, w, b, g = make(N, D, V)
    if teacher_kind == "topk" and divergence != "kl":  # a top-k teacher supports kl only
        with pytest.raises(ValueError, match="top-k"):
            linear_distillation_loss(h, w, topk(N, V, min(V, 4), g, False), bias=b,
                                     divergence=divergence, beta=beta, memory_budget=budget)
        return
    th = torch.randn(N, 6, generator=g, dtype=F64)
    tw = torch.randn(V, 6, generator=g, dtype=F64)
    tb = torch.randn(V, generator=g, dtype=F64)
    teacher_logits = F.linear(th, tw, tb)
    mask = torch.rand(N, generator=g) < 0.8
    opts = dict(temperature=2.0, divergence=divergence, beta=beta, mask=mask)
    if teacher_kind == "hidden":
        loss = linear_distillation_loss(h, w, th, teacher_weight=tw, bias=b, teacher_bias=tb,
                                        memory_budget=budget, **opts)
        teacher = teacher_logits
    elif teacher_kind == "logits":
        loss = linear_distillation_loss(h, w, teacher_logits, bias=b, memory_budget=budget, **opts)
        teacher = teacher_logits
    else:
        teacher = topk(N, V, min(V, 3), g)
        loss = linear_distillation_loss(h, w, teacher, bias=b, memory_budget=budget, **opts)
    ref = softce.distillation_loss(F.linear(h, w, b), teacher, **opts)
    check(loss, ref, (h, w, b))


def test_distillation_kl_matches_torch_kl_div():
    h, w, b, g = make(9, 11, 37)
    z = torch.randn(9, 37, generator=g, dtype=F64)
    for reduction in ["batchmean", "sum", "mean"]:
        loss = linear_distillation_loss(h, w, z, bias=b, temperature=3.0, reduction=reduction,
                                        memory_budget=8 * 37 * 2)
        s = F.linear(h, w, b)
        # T^2 KL; torch's "mean" divides by N * V, as softce's (and warns about it)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = F.kl_div(F.log_softmax(s / 3, -1), F.softmax(z / 3, -1), reduction=reduction) * 9
        check(loss, ref, (h, w, b))


def test_leading_dimensions_and_no_bias():
    h, w, _, g = make(6, 13, 29, bias=False)
    h3 = h.detach().reshape(2, 3, 13).requires_grad_()
    t = torch.randint(0, 29, (2, 3), generator=g)
    loss = linear_cross_entropy(h3, w, t, reduction="none")
    ref = F.cross_entropy(F.linear(h3, w).permute(0, 2, 1), t, reduction="none")
    assert loss.shape == (2, 3)
    check(loss, ref, (h3, w), upstream=torch.randn(2, 3, dtype=F64, generator=g))


def test_gradcheck():
    h, w, b, g = make(5, 4, 9)
    t = torch.randint(0, 9, (5,), generator=g)
    p = probs(5, 9, g)
    z = torch.randn(5, 9, generator=g, dtype=F64)
    torch.autograd.gradcheck(lambda h, w, b: linear_cross_entropy(h, w, t, b, label_smoothing=0.1,
                                                                  memory_budget=8 * 9 * 2), (h, w, b))
    torch.autograd.gradcheck(lambda h, w, b: linear_cross_entropy(h, w, p, b, reduction="none"), (h, w, b))
    torch.autograd.gradcheck(lambda h, w, b: linear_distillation_loss(
        h, w, z, bias=b, divergence="jsd", beta=0.3, memory_budget=8 * 16), (h, w, b))


def test_upstream_gradient_scales():
    h, w, b, g = make(7, 5, 11)
    t = torch.randint(0, 11, (7,), generator=g)
    loss = linear_cross_entropy(h, w, t, b)
    ref = F.cross_entropy(F.linear(h, w, b), t)
    (3.5 * loss).backward()
    got = [x.grad.clone() for x in (h, w, b)]
    for x in (h, w, b):
        x.grad = None
    (3.5 * ref).backward()
    for a, x in zip(got, (h, w, b)):
        assert_close(a, x.grad)


def test_tied_weights():
    # the output layer shares the embedding's weight: both gradients add up
    V, D = 31, 8
    g = torch.Generator().manual_seed(3)
    emb = torch.nn.Embedding(V, D).double()
    tokens = torch.randint(0, V, (12,), generator=g)
    t = torch.randint(0, V, (12,), generator=g)
    loss = linear_cross_entropy(torch.tanh(emb(tokens)), emb.weight, t, memory_budget=8 * V * 5)
    got = torch.autograd.grad(loss, emb.weight)[0]
    ref = F.cross_entropy(F.linear(torch.tanh(emb(tokens)), emb.weight), t)
    want = torch.autograd.grad(ref, emb.weight)[0]
    assert_close(got, want)


def test_bfloat16_against_float32():
    h, w, b, g = make(40, 64, 1000, dtype=torch.float32)
    t = torch.randint(0, 1000, (40,), generator=g)
    hb, wb, bb = (x.detach().bfloat16().requires_grad_() for x in (h, w, b))
    # the float32 reference on the same (bf16-rounded) operands
    hf, wf, bf = (x.detach().float().requires_grad_() for x in (hb, wb, bb))
    loss = linear_cross_entropy(hb, wb, t, bb, memory_budget=4 * 1000 * 7)
    ref = F.cross_entropy(F.linear(hf, wf, bf), t)
    assert loss.dtype == torch.float32
    assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for a, x in zip(grads(loss, (hb, wb, bb)), grads(ref, (hf, wf, bf))):
        assert a.dtype == torch.bfloat16
        assert_close(a, x, dtype=torch.bfloat16)


def test_float32_against_float64():
    h, w, b, g = make(50, 37, 301)
    t = torch.randint(0, 301, (50,), generator=g)
    h32, w32, b32 = (x.detach().float().requires_grad_() for x in (h, w, b))
    loss = linear_cross_entropy(h32, w32, t, b32, memory_budget=4 * 301 * 8)
    ref = F.cross_entropy(F.linear(h, w, b), t)
    assert_close(loss, ref, rtol=2e-5, atol=2e-6)
    for a, x in zip(grads(loss, (h32, w32, b32)), grads(ref, (h, w, b))):
        assert_close(a, x, rtol=2e-5, atol=2e-6)


def test_threads_agree():
    h, w, b, g = make(300, 64, 3000, dtype=torch.float32, requires_grad=False)
    t = torch.randint(0, 3000, (300,), generator=g)
    before = softce.get_num_threads()
    out = []
    for threads in (1, 2):
        softce.set_num_threads(threads)
        out.append(linear_cross_entropy(h, w, t, b, return_grad=True, memory_budget=4 * 3000 * 64))
    softce.set_num_threads(before)
    for a, c in zip(out[0], out[1]):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7)


def test_numpy_return_grad():
    h, w, b, g = make(8, 6, 23, requires_grad=False)
    t = torch.randint(0, 23, (8,), generator=g)
    loss, gh, gw, gb = linear_cross_entropy(h.numpy(), w.numpy(), t.numpy(), b.numpy(),
                                            return_grad=True, memory_budget=8 * 40)
    assert isinstance(gh, np.ndarray)
    hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
    ref = F.cross_entropy(F.linear(hh, ww, bb), t)
    want = torch.autograd.grad(ref, (hh, ww, bb))
    assert_close(torch.as_tensor(loss), ref)
    for a, x in zip((gh, gw, gb), want):
        assert_close(torch.from_numpy(a), x)
    losses = linear_distillation_loss(h.numpy(), w.numpy(), np.zeros((8, 23)), reduction="none")
    assert losses.shape == (8,)


def test_torch_return_grad():
    h, w, b, g = make(8, 6, 23, requires_grad=False)
    t = torch.randint(0, 23, (8,), generator=g)
    loss, gh, gw, gb = linear_cross_entropy(h, w, t, b, return_grad=True)
    hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
    ref = F.cross_entropy(F.linear(hh, ww, bb), t)
    for a, x in zip((gh, gw, gb), torch.autograd.grad(ref, (hh, ww, bb))):
        assert_close(a, x)
    assert_close(loss, ref)


def test_all_ignored_is_nan_with_zero_gradients():
    h, w, b, _ = make(4, 3, 5)
    t = torch.full((4,), -100)
    loss = linear_cross_entropy(h, w, t, b)
    assert torch.isnan(loss)
    for x in grads(loss, (h, w, b)):
        assert (x == 0).all()


@pytest.mark.parametrize("call,message,exc", [
    (lambda h, w, b, t: linear_cross_entropy(h, w[:, :2], t, b),
     "linear_cross_entropy: weight: expected shape (V, 3) (D = hidden.shape[-1]), got (5, 2)", ValueError),
    (lambda h, w, b, t: linear_cross_entropy(h, w, t, b[:4]),
     "linear_cross_entropy: bias: expected shape (5) (one value per class), got (4)", ValueError),
    (lambda h, w, b, t: linear_cross_entropy(h, w, t[:3], b),
     "linear_cross_entropy: target: expected shape (4) (the hidden states' rows), got (3)", ValueError),
    (lambda h, w, b, t: linear_cross_entropy(h, w, t + 5, b),
     "linear_cross_entropy: target: class index 5 at row 0 is out of range for 5 classes", IndexError),
    (lambda h, w, b, t: linear_cross_entropy(h * float("nan"), w, t, b),
     "linear_cross_entropy: hidden: expected finite values, got nan at row 0, column 0", ValueError),
    (lambda h, w, b, t: linear_distillation_loss(h, w, torch.zeros(4, 6, dtype=F64), bias=b),
     "linear_distillation_loss: teacher: expected shape (4, 5) (the hidden states' rows, then V), got (4, 6)",
     ValueError),
    (lambda h, w, b, t: linear_cross_entropy(h, w, t, b, memory_budget=10),
     "linear_cross_entropy: memory_budget: expected at least 40 bytes (a block of one row and 5 classes), got 10",
     ValueError),
])
def test_errors(call, message, exc):
    h, w, b, _ = make(4, 3, 5)
    t = torch.arange(4)
    with pytest.raises(exc) as info:
        call(h, w, b, t)
    assert str(info.value) == message
    assert h.grad is None and w.grad is None


def test_nn_modules():
    h, w, b, g = make(6, 5, 13)
    t = torch.randint(0, 13, (6,), generator=g)
    m = LinearCrossEntropyLoss(label_smoothing=0.1)
    check(m(h, w, t, b), F.cross_entropy(F.linear(h, w, b), t, label_smoothing=0.1), (h, w, b))
    th = torch.randn(6, 4, dtype=F64, generator=g)
    tw = torch.randn(13, 4, dtype=F64, generator=g)
    d = LinearDistillationLoss(temperature=2.0, divergence="jsd", beta=0.4)
    ref = softce.distillation_loss(F.linear(h, w, b), F.linear(th, tw), temperature=2.0,
                                   divergence="jsd", beta=0.4)
    check(d(h, w, th, b, teacher_weight=tw), ref, (h, w, b))


def test_compile_fullgraph():
    h, w, b, g = make(10, 8, 21, dtype=torch.float32)
    t = torch.randint(0, 21, (10,), generator=g)
    z = torch.randn(10, 21, generator=g)

    def step(h, w, b):
        return (linear_cross_entropy(h, w, t, b, label_smoothing=0.1)
                + linear_distillation_loss(h, w, z, bias=b, divergence="jsd"))

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(h, w, b)
    want = step(h, w, b)
    assert_close(got, want)
    for a, c in zip(grads(got, (h, w, b)), grads(want, (h, w, b))):
        assert_close(a, c)


# ---------------------------------------------------------------------------------------
# what the fused linear losses do not differentiate is refused, never silently dropped

def test_target_and_teacher_requiring_grad_are_refused():
    h, w, b, g = make(4, 5, 7)
    probs = torch.softmax(torch.randn(4, 7, generator=g, dtype=F64), 1).requires_grad_()
    with pytest.raises(NotImplementedError, match="linear_cross_entropy: target:"):
        linear_cross_entropy(h, w, probs, b)
    with pytest.raises(NotImplementedError, match="linear_distillation_loss: teacher:"):
        linear_distillation_loss(h, w, torch.randn(4, 7, dtype=F64, requires_grad=True))
    tw = torch.randn(7, 3, dtype=F64, requires_grad=True)
    with pytest.raises(NotImplementedError, match="teacher_weight"):
        linear_distillation_loss(h, w, torch.randn(4, 3, dtype=F64), teacher_weight=tw)
    cw = torch.rand(7, dtype=F64, requires_grad=True)
    with pytest.raises(NotImplementedError, match="class_weight"):
        linear_cross_entropy(h, w, torch.randint(0, 7, (4,)), class_weight=cw)
    with torch.no_grad():  # no gradient wanted: fine
        linear_cross_entropy(h, w, probs, b)
    linear_cross_entropy(h, w, probs.detach(), b).backward()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward_is_refused(reduction):
    h, w, b, g = make(4, 5, 7)
    loss = linear_cross_entropy(h, w, torch.randint(0, 7, (4,)), b, reduction=reduction).sum()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, h, create_graph=True)
