"""The cache of released gradient buffers (softce._gradient_cache, issue 13): a buffer is
handed out again only when nothing else refers to it, and every gradient stays exact
whatever the caller keeps, accumulates or frees."""

import pytest
import torch
import torch.nn.functional as F

import softce
from softce import _gradient_cache

# big enough for the cache (>= 1 MiB of float32)
N, C = 64, 8192


@pytest.fixture(autouse=True)
def fresh_cache():
    softce.set_gradient_cache(0)
    softce.set_gradient_cache(4)
    yield
    softce.set_gradient_cache(4)


def soft_target(n=N, c=C, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, c, generator=g), 1)


def torch_grad(x, t):
    x = x.detach().requires_grad_()
    F.cross_entropy(x, t).backward()
    return x.grad


def test_training_loop_reuses_the_buffer_and_stays_exact():
    torch.manual_seed(0)
    x = torch.randn(N, C, requires_grad=True)
    opt = torch.optim.SGD([x], lr=10.0)
    pointers = []
    for step in range(4):
        t = soft_target(seed=step)
        expected = torch_grad(x, t)
        opt.zero_grad(set_to_none=True)
        softce.cross_entropy(x, t).backward()
        torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-7)
        pointers.append(x.grad.data_ptr())
        opt.step()
    # once the optimizer's zero_grad has released the previous gradient, it is reused: the
    # same cached buffer every step (not merely the same address from the allocator)
    cached = {buffer.data_ptr() for buffer, _ in _gradient_cache._slots}
    assert set(pointers) <= cached and len(set(pointers)) == 1


def test_a_held_gradient_is_never_overwritten():
    x = torch.randn(N, C, requires_grad=True)
    t1, t2 = soft_target(seed=1), soft_target(seed=2)
    softce.cross_entropy(x, t1).backward()
    held = x.grad
    expected1 = torch_grad(x, t1)
    x.grad = None  # the caller keeps `held`; autograd no longer does
    softce.cross_entropy(x, t2).backward()
    assert x.grad.data_ptr() != held.data_ptr()
    torch.testing.assert_close(held, expected1, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad, torch_grad(x, t2), rtol=1e-5, atol=1e-7)


def test_gradient_accumulation_sums_exactly():
    x = torch.randn(N, C, requires_grad=True)
    targets = [soft_target(seed=s) for s in range(3)]
    for t in targets:  # no zero_grad: autograd adds into x.grad
        softce.cross_entropy(x, t).backward()
    expected = sum(torch_grad(x, t) for t in targets)
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-6)


def test_return_grad_hands_out_a_buffer_the_caller_owns():
    x = torch.randn(N, C)
    t = soft_target()
    _, g1 = softce.cross_entropy(x, t, return_grad=True)
    copy = g1.clone()
    _, g2 = softce.cross_entropy(x + 1, soft_target(seed=5), return_grad=True)
    assert g1.data_ptr() != g2.data_ptr()
    torch.testing.assert_close(g1, copy, rtol=0, atol=0)


def test_a_numpy_view_of_the_gradient_keeps_it():
    x = torch.randn(N, C, requires_grad=True)
    softce.cross_entropy(x, soft_target(seed=3)).backward()
    view = x.grad.numpy()
    before = view.copy()
    x.grad = None
    softce.cross_entropy(x, soft_target(seed=4)).backward()
    assert (view == before).all()


def test_other_shapes_and_dtypes_get_their_own_buffers():
    a = torch.randn(N, C, requires_grad=True)
    b = torch.randn(N, C, dtype=torch.float64, requires_grad=True)
    softce.cross_entropy(a, soft_target()).backward()
    softce.cross_entropy(b, soft_target().double()).backward()
    assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.float64
    torch.testing.assert_close(b.grad, torch_grad(b, soft_target().double()), rtol=1e-10, atol=1e-12)


def test_cache_off_and_bad_sizes():
    softce.set_gradient_cache(0)
    x = torch.randn(N, C, requires_grad=True)
    softce.cross_entropy(x, soft_target()).backward()
    torch.testing.assert_close(x.grad, torch_grad(x, soft_target()), rtol=1e-5, atol=1e-7)
    assert _gradient_cache._slots == []
    with pytest.raises(ValueError, match="set_gradient_cache: buffers: expected an integer >= 0, got -1"):
        softce.set_gradient_cache(-1)
    with pytest.raises(ValueError, match="expected an integer"):
        softce.set_gradient_cache(1.5)


# the fused linear losses: weight gradient (V, D) and block of logits from the cache
LN, LD, LV = 64, 64, 8192  # grad_weight and a block of 64 rows: 2 MiB each


def linear_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(LN, LD, generator=g)
    w = torch.randn(LV, LD, generator=g) / LD ** 0.5
    y = torch.randint(0, LV, (LN,), generator=g)
    return h, w, y


def torch_linear_grads(h, w, y):
    h = h.detach().requires_grad_()
    w = w.detach().requires_grad_()
    F.cross_entropy(F.linear(h, w), y).backward()
    return h.grad, w.grad


def cached_pointers():
    return {buffer.data_ptr() for buffer, _ in _gradient_cache._slots}


def test_linear_training_loop_reuses_its_buffers_and_stays_exact():
    h, w0, _ = linear_problem()
    w = w0.clone().requires_grad_()
    hh = h.clone().requires_grad_()
    opt = torch.optim.SGD([w, hh], lr=1.0)
    pointers = []
    for step in range(4):
        y = linear_problem(seed=step)[2]
        expected_h, expected_w = torch_linear_grads(hh, w, y)
        opt.zero_grad(set_to_none=True)
        softce.linear_cross_entropy(hh, w, y).backward()
        torch.testing.assert_close(w.grad, expected_w, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(hh.grad, expected_h, rtol=1e-4, atol=1e-6)
        pointers.append(w.grad.data_ptr())
        opt.step()
    # the weight gradient comes back in the same cached buffer once zero_grad released it
    assert set(pointers) <= cached_pointers() and len(set(pointers)) == 1


def test_linear_held_weight_gradient_is_never_overwritten():
    h, w0, y1 = linear_problem(seed=1)
    y2 = linear_problem(seed=2)[2]
    w = w0.clone().requires_grad_()
    softce.linear_cross_entropy(h, w, y1).backward()
    held = w.grad
    expected1 = torch_linear_grads(h, w, y1)[1]
    w.grad = None  # the caller keeps `held`
    softce.linear_cross_entropy(h, w, y2).backward()
    assert w.grad.data_ptr() != held.data_ptr()
    torch.testing.assert_close(held, expected1, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad, torch_linear_grads(h, w, y2)[1], rtol=1e-4, atol=1e-6)


def test_linear_gradient_accumulation_and_tied_weights_sum_exactly():
    h, w0, _ = linear_problem(seed=3)
    w = w0.clone().requires_grad_()
    targets = [linear_problem(seed=s)[2] for s in (4, 5, 6)]
    for y in targets:  # no zero_grad: autograd adds into w.grad
        softce.linear_cross_entropy(h, w, y).backward()
    expected = sum(torch_linear_grads(h, w, y)[1] for y in targets)
    torch.testing.assert_close(w.grad, expected, rtol=1e-4, atol=1e-6)
    # two losses on one weight in one graph: both gradients are live together
    w.grad = None
    (softce.linear_cross_entropy(h, w, targets[0]) + softce.linear_cross_entropy(h, w, targets[1])).backward()
    expected = torch_linear_grads(h, w, targets[0])[1] + torch_linear_grads(h, w, targets[1])[1]
    torch.testing.assert_close(w.grad, expected, rtol=1e-4, atol=1e-6)


def test_linear_with_the_cache_off_allocates_fresh_buffers():
    softce.set_gradient_cache(0)
    h, w0, y = linear_problem(seed=7)
    w = w0.clone().requires_grad_()
    softce.linear_cross_entropy(h, w, y).backward()
    torch.testing.assert_close(w.grad, torch_linear_grads(h, w, y)[1], rtol=1e-4, atol=1e-6)
    assert _gradient_cache._slots == []
