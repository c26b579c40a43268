"""The cases of test_distributed.py, run inside processes spawned by it (one process per
rank, gloo on loopback). Not collected by pytest itself (the name has no test_ prefix).

Every rank builds the same global data from a fixed seed, takes its shard of the class
dimension (uneven shards, ranks in order), and checks, for each case:
- the class-parallel loss against the single-process softce loss (1e-6 relative) and
  torch's result computed in float64 from the same inputs (1e-6 relative);
- the gradient shard (through backward()) against the same slices of theirs (1e-5);
- that every rank got bitwise the same loss.
Error cases check that every rank raises (the right type and message) instead of hanging.
Each rank appends one JSON line per case to <out_dir>/rank<r>.jsonl: the case name and
None or the traceback of its failure.
"""

import datetime
import json
import os
import re
import time
import traceback

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import softce
from _distributed_harness import RankContext

C = 11
SPLITS = {1: [11], 2: [7, 4], 3: [2, 6, 3]}  # classes per rank: uneven shards
DTYPES = {"float32": torch.float32, "float64": torch.float64}
GLOO_TIMEOUT_S = 20  # a collective that waits longer raises: a hang becomes an error

CASES = {}  # name -> function(ctx)


class Context(RankContext):
    def __init__(self, rank, world, dtype=None, splits=None):
        super().__init__(rank, world, dtype, splits or SPLITS)

    def shard(self, v):
        """This rank's classes of a global (class dim 1, or the only dim) tensor."""
        dim = 1 if v.dim() >= 2 else 0
        return v.narrow(dim, self.lo, self.hi - self.lo)

    def gather(self, v):
        v = torch.as_tensor(v).detach().double().reshape(-1)
        out = v.new_empty((self.world * v.numel(),))
        dist.all_gather_into_tensor(out, v.contiguous())
        return out.view(self.world, -1)


def case(*, dtypes=True):
    def register(fn):
        if dtypes:
            for name in DTYPES:
                CASES[f"{fn.__name__}[{name}]"] = (fn, name)
        else:
            CASES[fn.__name__] = (fn, None)
        return fn
    return register


# ---------------------------------------------------------------------------------------
# checking helpers


def loss_and_grad(fn, x, upstream=None):
    x = x.detach().clone().requires_grad_()
    loss = fn(x)
    loss.backward(upstream if upstream is not None else torch.ones_like(loss))
    return loss.detach(), x.grad


def close(actual, expected, rtol, what, atol=0.0):
    actual = torch.as_tensor(actual).double()
    expected = torch.as_tensor(expected).double()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def check(ctx, x, distributed_fn, single_fn, torch_fn, upstream=None):
    """distributed_fn(x_shard) on this rank's shard, single_fn(x) and torch_fn(x in float64)
    on the global logits; the losses and gradient shards must agree."""
    loss, grad = loss_and_grad(distributed_fn, ctx.shard(x), upstream)
    assert loss.dtype == x.dtype and grad.dtype == x.dtype
    single_loss, single_grad = loss_and_grad(single_fn, x, upstream)
    torch_loss, torch_grad = loss_and_grad(
        torch_fn, x.double(), None if upstream is None else upstream.double())
    tol = TOLERANCE[x.dtype]
    close(loss, single_loss, tol["loss vs single"], "loss vs single-process softce")
    close(loss, torch_loss, tol["loss"], "loss vs torch (float64)")
    # gradients: relative to the gradient's scale (elements near 0 have no relative error)
    scale = float(torch_grad.abs().max()) if torch_grad.numel() else 1.0
    scale = scale or 1.0
    close(grad, ctx.shard(single_grad), tol["grad"], "gradient vs single-process softce",
          atol=tol["grad"] * scale)
    close(grad, ctx.shard(torch_grad), tol["grad"], "gradient vs torch (float64)",
          atol=tol["grad"] * scale)
    everyone = ctx.gather(loss).view(torch.int64)  # the bits (NaN included)
    assert (everyone == everyone[0]).all(), \
        f"ranks got different losses: {everyone.view(torch.float64).tolist()}"


# Relative tolerances. float32: 1e-6 for the loss against torch in float64 (softce's float32
# contract); two float32 computations (sharded and single-process, whose sums run in a
# different order) may each be that far off, hence 2e-6 between them. float64: far tighter.
TOLERANCE = {
    torch.float32: {"loss": 1e-6, "loss vs single": 2e-6, "grad": 1e-5},
    torch.float64: {"loss": 1e-10, "loss vs single": 1e-10, "grad": 1e-9},
}


def generator(seed):
    return torch.Generator().manual_seed(seed)


def logits(g, shape, dtype, scale=2.0):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def soft_targets(g, shape, dtype):
    return torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64) * 2, 1).to(dtype)


def random_topk(g, rows, K, total=1.0, dtype=torch.float64):
    n = int(np.prod(rows))
    indices = torch.stack([torch.randperm(C, generator=g)[:K] for _ in range(n)])
    values = torch.rand(n, K, generator=g, dtype=torch.float64) + 0.1
    values = values / values.sum(-1, keepdim=True) * total
    return indices.reshape(*rows, K), values.reshape(*rows, K).to(dtype)


def scatter_dense(indices, values):
    dense = torch.zeros(*indices.shape[:-1], C, dtype=values.dtype)
    dense.scatter_(-1, indices, values)
    return dense.movedim(-1, 1) if dense.dim() >= 2 else dense


def reduce(per_row, reduction, denominator=None):
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / (per_row.numel() if denominator is None else denominator)


# ---------------------------------------------------------------------------------------
# cross-entropy


@case()
def ce_index_weight_ignore_smoothing(ctx):
    g = generator(1)
    x = logits(g, (8, C), ctx.dtype)
    y = torch.randint(0, C, (8,), generator=g)
    y[2] = y[5] = -100
    y[0], y[1], y[3], y[4] = 0, C - 1, 7, 8  # the first and last classes of shards
    w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(ctx.dtype)
    kw = dict(ignore_index=-100, label_smoothing=0.1)
    check(ctx, x,
          lambda xs: softce.cross_entropy(xs, y, ctx.shard(w), process_group=ctx.group, **kw),
          lambda x: softce.cross_entropy(x, y, w, **kw),
          lambda x: F.cross_entropy(x, y, w.double(), **kw))


@case()
def ce_index_3d_none_ignore_valid_class(ctx):
    g = generator(2)
    x = logits(g, (4, C, 3), ctx.dtype)
    y = torch.randint(0, C, (4, 3), generator=g, dtype=torch.int32)
    y[0, 0] = 2
    upstream = torch.rand(4, 3, generator=g, dtype=torch.float64).to(ctx.dtype)
    kw = dict(ignore_index=2, reduction="none")
    check(ctx, x, lambda xs: softce.cross_entropy(xs, y, process_group=ctx.group, **kw),
          lambda x: softce.cross_entropy(x, y, **kw),
          lambda x: F.cross_entropy(x, y.long(), **kw), upstream)


@case()
def ce_index_1d_sum(ctx):
    g = generator(3)
    x = logits(g, (C,), ctx.dtype)
    y = torch.tensor(7)
    check(ctx, x, lambda xs: softce.cross_entropy(xs, y, reduction="sum",
                                                  process_group=ctx.group),
          lambda x: softce.cross_entropy(x, y, reduction="sum"),
          lambda x: F.cross_entropy(x, y, reduction="sum"))


@case()
def ce_probability_weight_mask(ctx):
    g = generator(4)
    x = logits(g, (8, C), ctx.dtype)
    t = soft_targets(g, (8, C), ctx.dtype)
    w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(ctx.dtype)
    mask = torch.tensor([True, False, True, True, False, True, True, True])
    check(ctx, x,
          lambda xs: softce.cross_entropy(xs, ctx.shard(t), ctx.shard(w), mask=mask,
                                          process_group=ctx.group),
          lambda x: softce.cross_entropy(x, t, w, mask=mask),
          lambda x: F.cross_entropy(x[mask], t[mask].double(), w.double()))


@case()
def ce_probability_3d_smoothing_sum(ctx):
    g = generator(5)
    x = logits(g, (4, C, 3), ctx.dtype)
    t = soft_targets(g, (4, C, 3), ctx.dtype)
    kw = dict(label_smoothing=0.2, reduction="sum")
    check(ctx, x, lambda xs: softce.cross_entropy(xs, ctx.shard(t), process_group=ctx.group,
                                                  **kw),
          lambda x: softce.cross_entropy(x, t, **kw),
          lambda x: F.cross_entropy(x, t.double(), **kw))


@case()
def ce_probability_none_masked_minus_inf(ctx):
    g = generator(6)
    x = logits(g, (6, C), ctx.dtype)
    t = soft_targets(g, (6, C), torch.float64)
    x[:, [1, 8]] = -torch.inf  # a masked vocabulary, with zero target there
    t[:, [1, 8]] = 0
    t = (t / t.sum(1, keepdim=True)).to(ctx.dtype)
    upstream = torch.rand(6, generator=g, dtype=torch.float64).to(ctx.dtype)

    def torch_fn(x):
        logq = torch.log_softmax(x, 1)
        return -torch.where(t > 0, t.double() * logq, torch.zeros_like(logq)).sum(1)

    check(ctx, x, lambda xs: softce.cross_entropy(xs, ctx.shard(t), reduction="none",
                                                  process_group=ctx.group),
          lambda x: softce.cross_entropy(x, t, reduction="none"), torch_fn, upstream)


@case()
def ce_topk(ctx):
    g = generator(7)
    x = logits(g, (8, C), ctx.dtype)
    indices, values = random_topk(g, (8,), 3, dtype=ctx.dtype)
    target = softce.TopK(indices, values)
    check(ctx, x, lambda xs: softce.cross_entropy(xs, target, process_group=ctx.group),
          lambda x: softce.cross_entropy(x, target),
          lambda x: F.cross_entropy(x, scatter_dense(indices, values.double())))


@case()
def ce_topk_tail_none(ctx):
    g = generator(8)
    x = logits(g, (6, C), ctx.dtype)
    indices, values = random_topk(g, (6,), 4, total=0.8, dtype=torch.float64)
    values[0] = values[0] / values[0].sum()  # a row without tail mass
    values = values.to(ctx.dtype)
    target = softce.TopK(indices.int(), values, tail=True)
    upstream = torch.rand(6, generator=g, dtype=torch.float64).to(ctx.dtype)

    def torch_fn(x):
        v = values.double()
        logq = torch.log_softmax(x, 1)
        tau = 1 - v.sum(1)
        Q = logq.exp().gather(1, indices).sum(1)
        tail = torch.where(tau > 0, -tau * torch.log1p(-Q), torch.zeros_like(tau))
        return -(v * logq.gather(1, indices)).sum(1) + tail

    check(ctx, x, lambda xs: softce.cross_entropy(xs, target, reduction="none",
                                                  process_group=ctx.group),
          lambda x: softce.cross_entropy(x, target, reduction="none"), torch_fn, upstream)


@case()
def ce_topk_weight_smoothing_mask(ctx):
    g = generator(9)
    x = logits(g, (8, C), ctx.dtype)
    indices, values = random_topk(g, (8,), 3, dtype=ctx.dtype)
    target = softce.TopK(indices, values)
    w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(ctx.dtype)
    mask = torch.tensor([True, True, False, True, True, True, False, True])
    dense = scatter_dense(indices, values.double())
    check(ctx, x,
          lambda xs: softce.cross_entropy(xs, target, ctx.shard(w), label_smoothing=0.1,
                                          mask=mask, process_group=ctx.group),
          lambda x: softce.cross_entropy(x, target, w, label_smoothing=0.1, mask=mask),
          lambda x: F.cross_entropy(x[mask], dense[mask], w.double(), label_smoothing=0.1))


# ---------------------------------------------------------------------------------------
# distillation


def distillation_torch(student, teacher, T, divergence, beta=0.5):
    """Per row: T^2 KL(p||q), T^2 KL(q||p), or T^2 times TRL's generalised JSD."""
    logq = torch.log_softmax(student / T, 1)
    logp = torch.log_softmax(teacher / T, 1)
    if divergence == "kl":
        per_row = (logp.exp() * (logp - logq)).sum(1)
    elif divergence == "reverse_kl":
        per_row = (logq.exp() * (logq - logp)).sum(1)
    else:  # TRL's generalized_jsd_loss, 0 < beta < 1
        b = torch.tensor(beta, dtype=logq.dtype)
        logm = torch.logsumexp(torch.stack([logq + torch.log(1 - b), logp + torch.log(b)]), 0)
        kl_teacher = F.kl_div(logm, logp, reduction="none", log_target=True).sum(1)
        kl_student = F.kl_div(logm, logq, reduction="none", log_target=True).sum(1)
        per_row = beta * kl_teacher + (1 - beta) * kl_student
    return T * T * per_row


def distillation_case(ctx, seed, divergence, reduction, mask=None, upstream=False):
    g = generator(seed)
    student = logits(g, (8, C), ctx.dtype)
    teacher = logits(g, (8, C), ctx.dtype)
    up = torch.rand(8, generator=g, dtype=torch.float64).to(ctx.dtype) if upstream else None
    kw = dict(temperature=2.0, divergence=divergence, beta=0.5, reduction=reduction, mask=mask)

    def torch_fn(x):
        per_row = distillation_torch(x, teacher.double(), 2.0, divergence)
        if mask is not None:
            per_row = per_row * mask
        return reduce(per_row, reduction, None if mask is None else mask.sum())

    check(ctx, student,
          lambda xs: softce.distillation_loss(xs, ctx.shard(teacher), process_group=ctx.group,
                                              **kw),
          lambda x: softce.distillation_loss(x, teacher, **kw), torch_fn, up)


@case()
def distillation_kl(ctx):
    distillation_case(ctx, 10, "kl", "batchmean")
    # torch's own distillation idiom
    g = generator(10)
    student, teacher = logits(g, (8, C), ctx.dtype), logits(g, (8, C), ctx.dtype)
    idiom = 4.0 * F.kl_div(torch.log_softmax(student.double() / 2, 1),
                           torch.softmax(teacher.double() / 2, 1), reduction="batchmean")
    loss = softce.distillation_loss(ctx.shard(student), ctx.shard(teacher), temperature=2.0,
                                    process_group=ctx.group)
    close(loss, idiom, 1e-6, "loss vs T^2 F.kl_div(batchmean)")


@case()
def distillation_reverse_kl_sum(ctx):
    distillation_case(ctx, 11, "reverse_kl", "sum")


@case()
def distillation_jsd(ctx):
    distillation_case(ctx, 12, "jsd", "batchmean")


@case()
def distillation_jsd_mask_none(ctx):
    mask = torch.tensor([True, False, True, True, True, False, True, True])
    distillation_case(ctx, 13, "jsd", "none", mask=mask, upstream=True)


@case()
def distillation_kl_mask_mean(ctx):
    mask = torch.tensor([True, True, True, False, True, True, True, True])
    g = generator(14)
    student, teacher = logits(g, (8, C), ctx.dtype), logits(g, (8, C), ctx.dtype)
    kw = dict(temperature=2.0, reduction="mean", mask=mask)
    check(ctx, student,
          lambda xs: softce.distillation_loss(xs, ctx.shard(teacher), process_group=ctx.group,
                                              **kw),
          lambda x: softce.distillation_loss(x, teacher, **kw),
          lambda x: (distillation_torch(x, teacher.double(), 2.0, "kl") * mask).sum()
          / (mask.sum() * C))


def topk_teacher_case(ctx, seed, tail):
    g = generator(seed)
    student = logits(g, (8, C), ctx.dtype)
    indices, values = random_topk(g, (8,), 4, total=0.9 if tail else 1.0, dtype=ctx.dtype)
    teacher = softce.TopK(indices, values, tail)

    def torch_fn(x):
        v = values.double()
        logq = torch.log_softmax(x / 2.0, 1)
        per_row = (v * (v.log() - logq.gather(1, indices))).sum(1)
        if tail:
            tau = 1 - v.sum(1)
            Q = logq.exp().gather(1, indices).sum(1)
            per_row = per_row + tau * tau.log() - tau * torch.log1p(-Q)
        return 4.0 * per_row.mean()

    check(ctx, student,
          lambda xs: softce.distillation_loss(xs, teacher, temperature=2.0,
                                              process_group=ctx.group),
          lambda x: softce.distillation_loss(x, teacher, temperature=2.0), torch_fn)


@case()
def distillation_topk_teacher_kl(ctx):
    topk_teacher_case(ctx, 15, tail=False)


@case()
def distillation_topk_teacher_kl_tail(ctx):
    topk_teacher_case(ctx, 16, tail=True)


# ---------------------------------------------------------------------------------------
# edge cases: no rows, a shard without classes


@case()
def no_rows(ctx):
    x = torch.zeros(0, C, dtype=ctx.dtype)
    y = torch.zeros(0, dtype=torch.int64)
    check(ctx, x, lambda xs: softce.cross_entropy(xs, y, process_group=ctx.group),
          lambda x: softce.cross_entropy(x, y), lambda x: F.cross_entropy(x, y))
    check(ctx, x, lambda xs: softce.distillation_loss(xs, xs.detach(), divergence="jsd",
                                                      process_group=ctx.group),
          lambda x: softce.distillation_loss(x, x.detach(), divergence="jsd"),
          lambda x: x.sum() * float("nan"))


@case()
def empty_first_shard(ctx):
    ctx = Context(ctx.rank, ctx.world, ctx.dtype, splits={2: [0, 11], 3: [0, 5, 6]})
    g = generator(18)
    x = logits(g, (8, C), ctx.dtype)
    t = soft_targets(g, (8, C), ctx.dtype)
    y = torch.randint(0, C, (8,), generator=g)
    check(ctx, x, lambda xs: softce.cross_entropy(xs, y, label_smoothing=0.1,
                                                  process_group=ctx.group),
          lambda x: softce.cross_entropy(x, y, label_smoothing=0.1),
          lambda x: F.cross_entropy(x, y, label_smoothing=0.1))
    check(ctx, x, lambda xs: softce.distillation_loss(xs, ctx.shard(t.log()), divergence="jsd",
                                                      temperature=2.0, process_group=ctx.group),
          lambda x: softce.distillation_loss(x, t.log(), divergence="jsd", temperature=2.0),
          lambda x: distillation_torch(x, t.double().log(), 2.0, "jsd").mean())


# ---------------------------------------------------------------------------------------
# the other ways in: return_grad, inplace_backward, no_grad, the default group


@case()
def return_grad_inplace_no_grad(ctx):
    g = generator(17)
    x = logits(g, (8, C), ctx.dtype)
    t = soft_targets(g, (8, C), ctx.dtype)
    single_loss, single_grad = softce.cross_entropy(x, t, return_grad=True)
    loss, grad = softce.cross_entropy(ctx.shard(x), ctx.shard(t), return_grad=True,
                                      process_group=ctx.group)
    close(loss, single_loss, 1e-6, "return_grad loss")
    close(grad, ctx.shard(single_grad), 1e-5, "return_grad gradient", atol=1e-7)
    # inplace_backward: the gradient overwrites the (non-leaf) logits
    leaf = ctx.shard(x).clone().requires_grad_()
    logits_ = leaf * 1.0
    loss = softce.cross_entropy(logits_, ctx.shard(t), inplace_backward=True,
                                process_group=ctx.group)
    loss.backward()
    close(leaf.grad, ctx.shard(single_grad), 1e-5, "inplace_backward gradient", atol=1e-7)
    close(logits_.detach(), ctx.shard(single_grad), 1e-5, "inplace_backward buffer",
          atol=1e-7)
    with torch.no_grad():
        loss = softce.distillation_loss(ctx.shard(x), ctx.shard(t.log()), divergence="jsd",
                                        process_group=ctx.group)
    close(loss, softce.distillation_loss(x, t.log(), divergence="jsd"), 1e-6, "no_grad jsd")
    # the default group given as torch.distributed.group.WORLD, and a sub-group of all ranks
    group = dist.new_group(list(range(ctx.world)))
    loss = softce.cross_entropy(ctx.shard(x), ctx.shard(t), process_group=group)
    close(loss, single_loss, 1e-6, "loss on a new_group")


# ---------------------------------------------------------------------------------------
# errors: every rank raises, none hangs


def expect_error(kind, message, fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        assert type(e) is kind, f"expected {kind.__name__}, got {type(e).__name__}: {e}"
        assert str(e) == message, f"message:\n  {e}\nexpected:\n  {message}"
        return
    raise AssertionError(f"expected {kind.__name__}: {message}")


def error_data(ctx):
    g = generator(20)
    x = logits(g, (8, C), torch.float32)
    y = torch.randint(0, C, (8,), generator=g)
    return ctx.shard(x), y


@case(dtypes=False)
def error_rows_differ(ctx):
    xs, y = error_data(ctx)
    last = ctx.world - 1
    if ctx.rank == last:
        xs, y = xs[:7], y[:7]
    expect_error(ValueError,
                 f"cross_entropy: input: rows differ across ranks (rank 0: 8, rank {last}: 7)",
                 lambda: softce.cross_entropy(xs, y, process_group=ctx.group))


@case(dtypes=False)
def error_row_shape_differs(ctx):
    # 24 rows everywhere, but (4, 6) on rank 1 and (8, 3) elsewhere
    g = generator(21)
    shape = (8, C, 3) if ctx.rank == 1 else (4, C, 6)
    student = ctx.shard(logits(g, shape, torch.float32))
    expect_error(ValueError,
                 "distillation_loss: student_logits: row shape differs across ranks "
                 "(rank 0: (4, 6), rank 1: (8, 3))",
                 lambda: softce.distillation_loss(student, student.detach(), dim=1,
                                                  process_group=ctx.group))


@case(dtypes=False)
def error_class_id_outside_every_shard(ctx):
    xs, y = error_data(ctx)
    y[3] = C
    expect_error(IndexError,
                 f"cross_entropy: target: class index {C} at row 3 is out of range for {C} "
                 "classes", lambda: softce.cross_entropy(xs, y, process_group=ctx.group))


@case(dtypes=False)
def error_topk_id_outside_every_shard(ctx):
    xs, _ = error_data(ctx)
    indices = torch.tensor([[0, 5], [C + 2, 1]] * 4)
    values = torch.full((8, 2), 0.5)
    expect_error(IndexError,
                 f"distillation_loss: teacher.indices: index {C + 2} at row 1 is out of range "
                 f"for {C} classes",
                 lambda: softce.distillation_loss(xs, softce.TopK(indices, values),
                                                  process_group=ctx.group))


@case(dtypes=False)
def error_on_one_rank_only(ctx):
    # a bad class-weight shard on rank 1 only: the core rejects it there, before any
    # collective; the others must not wait for it
    xs, y = error_data(ctx)
    size = xs.shape[1] + (1 if ctx.rank == 1 else 0)
    classes = SPLITS[ctx.world][1]
    own = (f"cross_entropy: weight: expected shape ({classes}) (one value per class), "
           f"got ({classes + 1})")
    message = own if ctx.rank == 1 else f"cross_entropy: failed on rank 1: {own}"
    expect_error(ValueError, message,
                 lambda: softce.cross_entropy(xs, y, torch.ones(size), process_group=ctx.group))


@case(dtypes=False)
def error_python_check_on_one_rank_only(ctx):
    # rank 1 fails before the core is reached (a target that requires grad)
    xs, _ = error_data(ctx)
    t = torch.softmax(torch.zeros(8, xs.shape[1]), 1)
    if ctx.rank == 1:
        t.requires_grad_()
    own = ("cross_entropy: the gradient with respect to target is not implemented for the "
           "class-parallel losses (process_group=), which differentiate the input only; pass "
           "target.detach() if target needs no gradient")
    message = own if ctx.rank == 1 else f"cross_entropy: failed on rank 1: {own}"
    expect_error(NotImplementedError, message,
                 lambda: softce.cross_entropy(xs, t, process_group=ctx.group))


@case(dtypes=False)
def error_targets_differ(ctx):
    xs, y = error_data(ctx)
    if ctx.rank == 1:
        y = y.clone()
        y[0] = (y[0] + 1) % C
    expect_error(ValueError,
                 "cross_entropy: target: differs between rank 0 and rank 1 (class indices and "
                 "top-k entries are global and must be identical on every rank)",
                 lambda: softce.cross_entropy(xs, y, process_group=ctx.group))


@case(dtypes=False)
def error_options_differ(ctx):
    xs, y = error_data(ctx)
    smoothing = 0.1 if ctx.rank == 0 else 0.0
    expect_error(ValueError,
                 "cross_entropy: label_smoothing differs across ranks (rank 0: 0.1, rank 1: 0)",
                 lambda: softce.cross_entropy(xs, y, label_smoothing=smoothing,
                                              process_group=ctx.group))
    expect_error(ValueError,
                 "distillation_loss: student_logits dtype differs across ranks (rank 0: "
                 "'float32', rank 1: 'float64')",
                 lambda: softce.distillation_loss(xs if ctx.rank == 0 else xs.double(),
                                                  xs, process_group=ctx.group))
    mask = torch.ones(8, dtype=torch.bool)
    mask[ctx.rank] = False
    t = torch.softmax(torch.zeros(8, xs.shape[1]), 1)
    expect_error(ValueError,
                 "cross_entropy: mask: differs between rank 0 and rank 1 (the row mask must be "
                 "identical on every rank)",
                 lambda: softce.cross_entropy(xs, t, mask=mask, process_group=ctx.group))


@case(dtypes=False)
def error_different_functions(ctx):
    xs, y = error_data(ctx)
    names = ("cross_entropy with class-index targets", "distillation_loss with teacher logits")
    if ctx.rank == 1:
        fn = "distillation_loss"
        call = lambda: softce.distillation_loss(xs, xs, process_group=ctx.group)  # noqa: E731
    else:
        fn = "cross_entropy"
        call = lambda: softce.cross_entropy(xs, y, process_group=ctx.group)  # noqa: E731
    expect_error(ValueError, f"{fn}: ranks called different functions (rank 0: {names[0]}, "
                 f"rank 1: {names[1]})", call)


@case(dtypes=False)
def error_numpy_input_and_bad_group(ctx):
    xs, y = error_data(ctx)
    expect_error(TypeError,
                 "cross_entropy: process_group: expected a torch.distributed.ProcessGroup "
                 "(e.g. torch.distributed.group.WORLD), got str",
                 lambda: softce.cross_entropy(xs, y, process_group="world"))
    x_np = xs.numpy() if ctx.rank == 0 else xs
    own = ("cross_entropy: input: expected a torch.Tensor with process_group (class-parallel "
           "losses run on torch.distributed), got ndarray")
    expect_error(TypeError, own if ctx.rank == 0 else f"cross_entropy: failed on rank 0: {own}",
                 lambda: softce.cross_entropy(x_np, y, process_group=ctx.group))


# The disagreements both fronts must reject with the same message (the core's protocol):
# tests/mpi/agreement_cases.txt, also run by tests/mpi/mpi_test.cpp on softce::mpi. Each
# name below does what the MPI test's case of that name does: every rank the same call,
# the last rank changing the one thing named.
AGREEMENT_CASES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests",
                               "mpi", "agreement_cases.txt")


def read_agreement_cases():
    cases = []
    with open(AGREEMENT_CASES) as f:
        for line in f:
            line = line.rstrip("\n")
            if line and not line.startswith("#") and "\t" in line:
                cases.append(tuple(line.split("\t", 1)))
    return cases


def agreement_calls(ctx):
    """name -> (function, the call on this rank)."""
    xs, y = error_data(ctx)
    changes = ctx.rank == ctx.world - 1
    g = ctx.group
    probs = torch.softmax(torch.zeros(8, xs.shape[1]), 1)
    mask = torch.ones(8, dtype=torch.bool)
    mask[0] = False
    indices = torch.tensor([[0, C - 1]] * 8)
    values = torch.full((8, 2), 0.4)
    ce, kd = "cross_entropy", "distillation_loss"

    def changed_indices():
        i = indices.clone()
        if changes:
            i[4, 0] = 1
        return softce.TopK(i, values)

    def changed_mask():
        m = mask.clone()
        if changes:
            m[2] = False
        return m

    x_or_double = xs.double() if changes else xs
    # the fused output layer: hidden (8, 4) replicated, weight rows (local classes, 4)
    cl = xs.shape[1]
    hidden, layer = torch.full((8, 4), 0.25), torch.full((cl, 4), 0.5)
    lce, lkd = "linear_cross_entropy", "linear_distillation_loss"

    def changed_hidden():
        h = hidden.clone()
        if changes:
            h[1, 1] = 0.75
        return h

    def linear_teacher_form():
        if changes:
            return softce.linear_distillation_loss(hidden, layer, torch.full((8, 3), 0.5),
                                                   teacher_weight=torch.full((cl, 3), 0.1),
                                                   process_group=g)
        return softce.linear_distillation_loss(hidden, layer, probs, process_group=g)

    d = 5 if changes else 4
    linear = {
        "linear_hidden_values": (lce, lambda: softce.linear_cross_entropy(
            changed_hidden(), layer, y, process_group=g)),
        "linear_D": (lce, lambda: softce.linear_cross_entropy(
            torch.full((8, d), 0.25), torch.full((cl, d), 0.5), y, process_group=g)),
        "linear_bias_on_one_rank": (lce, lambda: softce.linear_cross_entropy(
            hidden, layer, y, None if changes else torch.zeros(cl), process_group=g)),
        "linear_class_weight_on_one_rank": (lce, lambda: softce.linear_cross_entropy(
            hidden, layer, y, class_weight=None if changes else torch.ones(cl), process_group=g)),
        "linear_memory_budget": (lce, lambda: softce.linear_cross_entropy(
            hidden, layer, y, memory_budget=4096 if changes else 8192, process_group=g)),
        "linear_teacher_form": (lkd, linear_teacher_form),
    }
    return linear | {
        "weight_on_one_rank": (ce, lambda: softce.cross_entropy(
            xs, y, None if changes else torch.ones(xs.shape[1]), process_group=g)),
        "input_dtype": (ce, lambda: softce.cross_entropy(x_or_double, y, process_group=g)),
        "student_dtype": (kd, lambda: softce.distillation_loss(x_or_double, x_or_double,
                                                               process_group=g)),
        "rows": (ce, lambda: softce.cross_entropy(xs[:7] if changes else xs,
                                                  y[:7] if changes else y, process_group=g)),
        "label_smoothing": (ce, lambda: softce.cross_entropy(
            xs, y, label_smoothing=0.0 if changes else 0.1, process_group=g)),
        "ignore_index": (ce, lambda: softce.cross_entropy(
            xs, y, ignore_index=3 if changes else -100, process_group=g)),
        "reduction": (ce, lambda: softce.cross_entropy(
            xs, y, reduction="sum" if changes else "mean", process_group=g)),
        "temperature": (kd, lambda: softce.distillation_loss(
            xs, xs, temperature=2.5 if changes else 2.0, process_group=g)),
        "divergence": (kd, lambda: softce.distillation_loss(
            xs, xs, divergence="kl" if changes else "jsd", process_group=g)),
        "function": (ce, lambda: softce.cross_entropy(xs, probs if changes else y,
                                                      process_group=g)),
        "index_target": (ce, lambda: softce.cross_entropy(
            xs, torch.where(torch.arange(8) == 5, (y + 1) % C, y) if changes else y, process_group=g)),
        "topk_teacher": (kd, lambda: softce.distillation_loss(xs, changed_indices(),
                                                              process_group=g)),
        "mask_on_one_rank": (ce, lambda: softce.cross_entropy(
            xs, probs, mask=None if changes else mask, process_group=g)),
        "mask_values": (ce, lambda: softce.cross_entropy(xs, probs, mask=changed_mask(),
                                                         process_group=g)),
    }


@case(dtypes=False)
def error_disagreements_shared_with_mpi(ctx):
    calls = agreement_calls(ctx)
    cases = read_agreement_cases()
    assert sorted(name for name, _ in cases) == sorted(calls), \
        "tests/mpi/agreement_cases.txt and agreement_calls() name different cases"
    last = str(ctx.world - 1)
    for name, message in cases:
        function, call = calls[name]
        try:
            expect_error(ValueError, f"{function}: " + message.replace("{last}", last), call)
        except AssertionError as e:
            raise AssertionError(f"case {name}: {e}") from None


@case()
def commutative_reduce_mode(ctx):
    # softce.distributed.reduce_mode("commutative"): MAX of the shifts, SUM of the rescaled
    # records; the same checks as the ordered merge (not bitwise equal to it)
    import softce.distributed

    g = generator(23)
    x = logits(g, (8, C), ctx.dtype)
    y = torch.randint(0, C, (8,), generator=g)
    w = torch.rand(C, generator=g, dtype=ctx.dtype) + 0.5
    teacher = logits(g, (8, C), ctx.dtype)
    with softce.distributed.reduce_mode("commutative"):
        check(ctx, x, lambda xs: softce.cross_entropy(xs, y, ctx.shard(w), label_smoothing=0.1,
                                                      process_group=ctx.group),
              lambda x: softce.cross_entropy(x, y, w, label_smoothing=0.1),
              lambda x: F.cross_entropy(x, y, w.double(), label_smoothing=0.1))
        for divergence in ("kl", "reverse_kl", "jsd"):
            check(ctx, x, lambda xs: softce.distillation_loss(
                      xs, ctx.shard(teacher), divergence=divergence, process_group=ctx.group),
                  lambda x: softce.distillation_loss(x, teacher, divergence=divergence),
                  lambda x: softce.distillation_loss(x, teacher.double(), divergence=divergence))


@case(dtypes=False)
def after_errors_the_group_still_works(ctx):
    g = generator(22)
    x = logits(g, (8, C), torch.float64)
    y = torch.randint(0, C, (8,), generator=g)
    check(ctx, x, lambda xs: softce.cross_entropy(xs, y, process_group=ctx.group),
          lambda x: softce.cross_entropy(x, y), lambda x: F.cross_entropy(x, y))


# ---------------------------------------------------------------------------------------
# the example of docs/distributed.md, run as torchrun would (env:// rendezvous)

DOC_CASE = "docs/distributed.md example"
CASES[DOC_CASE] = (None, None)


def run_doc_example(rank, world, port, doc_path):
    text = open(doc_path).read()
    blocks = re.findall(r"^```py-distributed\n(.*?)^```", text, re.S | re.M)
    assert len(blocks) == 1, f"expected one py-distributed block in {doc_path}"
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    exec(compile(blocks[0], doc_path, "exec"), {"__name__": "__main__"})
    assert not dist.is_initialized(), "the example should end with destroy_process_group()"


# ---------------------------------------------------------------------------------------
# the spawned process


def worker(rank, world, port, out_dir, doc_port=None, doc_path=None):
    start = time.perf_counter()
    torch.set_num_threads(1)
    softce.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world,
                            timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))
    path = os.path.join(out_dir, f"rank{rank}.jsonl")
    try:
        with open(path, "w") as out:
            setup = round(time.perf_counter() - start, 4)
            out.write(json.dumps({"case": "(setup)", "error": None, "seconds": setup}) + "\n")
            for name, (fn, dtype) in CASES.items():
                if fn is None:
                    continue
                start = time.perf_counter()
                try:
                    fn(Context(rank, world, DTYPES.get(dtype)))
                    error = None
                except Exception:  # noqa: BLE001
                    error = traceback.format_exc()
                seconds = round(time.perf_counter() - start, 4)
                out.write(json.dumps({"case": name, "error": error, "seconds": seconds}) + "\n")
                out.flush()
            dist.destroy_process_group()
            if doc_path is not None:
                start = time.perf_counter()
                try:
                    run_doc_example(rank, world, doc_port, doc_path)
                    error = None
                except Exception:  # noqa: BLE001
                    error = traceback.format_exc()
                seconds = round(time.perf_counter() - start, 4)
                out.write(json.dumps({"case": DOC_CASE, "error": error, "seconds": seconds})
                          + "\n")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
