"""The cases of test_linear_distributed.py, run inside processes spawned by it (one process
per rank, gloo on loopback). Not collected by pytest itself.

softce.linear_cross_entropy / linear_distillation_loss with process_group=: every rank
builds the same global problem from a fixed seed (hidden states, an output layer of V = 29
classes, every target kind and teacher form), takes its rows of the output layer (uneven
splits, an empty shard), and checks, for each case, through backward():
- the loss against the single-process softce result on float64 copies (1e-6 relative in
  float32, 1e-10 in float64);
- the full input gradient and this rank's rows of the weight and bias gradients against
  the same reference (1e-5 of the gradient's scale in float32, 1e-9 in float64);
- that every rank got bitwise the same loss and the same input gradient.
The `small` budget holds one row of 16 classes: the 17- and 19-class shards then split
their classes into blocks (16 + the rest), merged in process before the cross-rank
all-reduce. Error cases check that every rank raises (type and message) instead of hanging.
"""

import datetime
import json
import os
import re
import time
import traceback

import torch
import torch.distributed as dist

import softce
import softce.distributed
from _distributed_harness import RankContext
from softce import TopK

V, D, DT, K = 29, 6, 5, 4
SPLITS = {1: [29], 2: [17, 12], 3: [0, 19, 10]}       # rows of the output layer per rank
OTHER_SPLITS = {1: [29], 2: [0, 29], 3: [11, 0, 18]}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
GLOO_TIMEOUT_S = 20
TOL = {torch.float32: (1e-6, 1e-5), torch.float64: (1e-10, 1e-9)}

CASES = {}


class Context(RankContext):
    def __init__(self, rank, world, dtype=None, splits=None):
        super().__init__(rank, world, dtype, splits or SPLITS)

    def rows(self, v, dim=0):
        """This rank's classes of a global tensor (classes in `dim`)."""
        return None if v is None else v.narrow(dim, self.lo, self.hi - self.lo)

    def gather_bits(self, v):
        v = torch.as_tensor(v).detach().double().reshape(-1).contiguous()
        out = v.new_empty((self.world * v.numel(),))
        dist.all_gather_into_tensor(out, v)
        return out.view(self.world, -1).view(torch.int64)


def case(*, dtypes=True, splits=None):
    def register(fn):
        if dtypes:
            for name in DTYPES:
                CASES[f"{fn.__name__}[{name}]"] = (fn, name, splits)
        else:
            CASES[fn.__name__] = (fn, None, splits)
        return fn
    return register


def problem(dtype, rows=(10,), seed=0):
    g = torch.Generator().manual_seed(seed)
    n = 1
    for r in rows:
        n *= r

    def rand(*shape, lo=-1.0, hi=1.0):
        return (lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)).to(dtype)

    p = dict(
        hidden=rand(*rows, D), weight=rand(V, D, lo=-1.5, hi=1.5), bias=rand(V, lo=-0.5, hi=0.5),
        class_weight=rand(V, lo=0.5, hi=2.0), teacher=rand(*rows, V, lo=-3, hi=3),
        teacher_hidden=rand(*rows, DT), teacher_weight=rand(V, DT, lo=-1.5, hi=1.5),
        teacher_bias=rand(V, lo=-0.5, hi=0.5),
        probs=torch.softmax(rand(*rows, V, lo=-2, hi=2).double(), -1).to(dtype),
        index=torch.randint(0, V, rows, generator=g),
        mask=torch.rand(*rows, generator=g) > 0.3,
    )
    p["index"].view(-1)[1::4] = -100
    p["mask"].view(-1)[0] = True
    top = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(n)]).view(*rows, K)
    vals = torch.rand(*rows, K, generator=g, dtype=torch.float64) + 0.1
    p["topk"] = TopK(top, (0.9 * vals / vals.sum(-1, keepdim=True)).to(dtype))
    return p


def small_budget(dtype, hidden_teacher=False):
    item = 8 if dtype == torch.float64 else 4
    logits = item * (2 if hidden_teacher else 1)
    return 16 * logits + item * (2 * D + (DT if hidden_teacher else 0))


def mb(kw, dtype, hidden_teacher=False):
    """The small budget for the class-parallel call, the default for the reference."""
    return small_budget(dtype, hidden_teacher) if "process_group" in kw else None


def compare(ctx, call, p, sharded, upstream=None, bias=True):
    """call(input, weight, bias, sharded_kwargs) on this rank's rows and on float64 copies of
    the whole layer in one process; compares loss and gradients."""
    dtype = p["hidden"].dtype
    rtol, gtol = TOL[dtype]

    def run(h, w, b, kwargs, **extra):
        h = h.detach().clone().requires_grad_()
        w = w.detach().clone().requires_grad_()
        b = b.detach().clone().requires_grad_() if (bias and b is not None) else None
        loss = call(h, w, b, kwargs, **extra)
        (loss * (upstream if upstream is not None else 1.0)).sum().backward()
        return loss.detach(), h.grad, w.grad, (b.grad if b is not None else None)

    local = {k: (ctx.rows(v, -1 if k in ("teacher", "probs") else 0) if k in sharded else v)
             for k, v in p.items() if k != "topk"}
    local["topk"] = p["topk"]
    loss, gh, gw, gb = run(p["hidden"], ctx.rows(p["weight"]), ctx.rows(p["bias"]), local,
                           process_group=ctx.group)
    p64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
           for k, v in p.items() if k != "topk"}
    p64["topk"] = TopK(p["topk"].indices, p["topk"].values.double(), p["topk"].tail)
    rloss, rgh, rgw, rgb = run(p64["hidden"], p64["weight"], p64["bias"], p64)
    assert loss.dtype == dtype and gh.dtype == dtype and gw.dtype == dtype
    torch.testing.assert_close(loss.double(), rloss, rtol=rtol, atol=0.0, equal_nan=True)

    def grad_close(got, want, what):
        scale = float(want.abs().max()) if want.numel() else 1.0
        torch.testing.assert_close(got.double(), want, rtol=0.0, atol=gtol * (scale or 1.0),
                                   msg=lambda m: f"{what}: {m}")

    grad_close(gh, rgh, "input gradient (full)")
    grad_close(gw, ctx.rows(rgw), "weight gradient rows")
    if bias:
        grad_close(gb, ctx.rows(rgb), "bias gradient rows")
    for what, t in (("loss", loss), ("input gradient", gh)):
        bits = ctx.gather_bits(t)
        assert (bits == bits[0]).all(), f"ranks got different {what}"


# ---------------------------------------------------------------------------------------
# comparison cases


@case()
def ce_index_weights_smoothing_ignore(ctx):
    p = problem(ctx.dtype, seed=1)
    def call(h, w, b, a, **kw):
        return softce.linear_cross_entropy(h, w, a["index"], b, class_weight=a["class_weight"],
                                           label_smoothing=0.1,
                                           memory_budget=mb(kw, ctx.dtype), **kw)
    compare(ctx, call, p, {"class_weight"})


@case(splits=OTHER_SPLITS)
def ce_index_sum_default_budget(ctx):
    p = problem(ctx.dtype, seed=2)
    def call(h, w, b, a, **kw):
        return softce.linear_cross_entropy(h, w, a["index"], reduction="sum", **kw)
    compare(ctx, call, p, set(), bias=False)


@case()
def ce_index_none_3d(ctx):
    p = problem(ctx.dtype, rows=(2, 5), seed=3)
    def call(h, w, b, a, **kw):
        return softce.linear_cross_entropy(h, w, a["index"], b, reduction="none",
                                           memory_budget=mb(kw, ctx.dtype), **kw)
    compare(ctx, call, p, set())


@case()
def ce_index_none_row_upstream(ctx):
    # per-row upstream weights: the input gradient scales per row; weight and bias not asked
    p = problem(ctx.dtype, seed=4)
    up = torch.linspace(0.5, 2.0, 10, dtype=ctx.dtype)
    h = p["hidden"].clone().requires_grad_()
    loss = softce.linear_cross_entropy(h, ctx.rows(p["weight"]), p["index"], reduction="none",
                                       process_group=ctx.group)
    (loss * up).sum().backward()
    h64 = p["hidden"].double().clone().requires_grad_()
    ref = softce.linear_cross_entropy(h64, p["weight"].double(), p["index"], reduction="none")
    (ref * up.double()).sum().backward()
    rtol, gtol = TOL[ctx.dtype]
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=rtol, atol=1e-12)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=0, atol=gtol * float(h64.grad.abs().max()))


@case()
def ce_probabilities_mask_bias(ctx):
    p = problem(ctx.dtype, seed=5)
    def call(h, w, b, a, **kw):
        return softce.linear_cross_entropy(h, w, a["probs"], b, mask=a["mask"],
                                           label_smoothing=0.05,
                                           memory_budget=mb(kw, ctx.dtype), **kw)
    compare(ctx, call, p, {"probs"})


@case(splits=OTHER_SPLITS)
def ce_probabilities_weights_sum(ctx):
    p = problem(ctx.dtype, seed=6)
    def call(h, w, b, a, **kw):
        return softce.linear_cross_entropy(h, w, a["probs"], b, class_weight=a["class_weight"],
                                           reduction="sum", **kw)
    compare(ctx, call, p, {"probs", "class_weight"})


@case()
def ce_topk_tail_mask(ctx):
    p = problem(ctx.dtype, seed=7)
    def call(h, w, b, a, **kw):
        t = a["topk"]
        return softce.linear_cross_entropy(h, w, TopK(t.indices, t.values, tail=True), b,
                                           mask=a["mask"], memory_budget=mb(kw, ctx.dtype),
                                           **kw)
    compare(ctx, call, p, set())


@case(splits=OTHER_SPLITS)
def ce_topk_weights_smoothing(ctx):
    p = problem(ctx.dtype, seed=8)
    def call(h, w, b, a, **kw):
        return softce.linear_cross_entropy(h, w, a["topk"], b, class_weight=a["class_weight"],
                                           label_smoothing=0.2,
                                           memory_budget=mb(kw, ctx.dtype), **kw)
    compare(ctx, call, p, {"class_weight"})


@case()
def distill_logits_kl_mask(ctx):
    p = problem(ctx.dtype, seed=9)
    def call(h, w, b, a, **kw):
        return softce.linear_distillation_loss(h, w, a["teacher"], bias=b, temperature=2.0,
                                               mask=a["mask"],
                                               memory_budget=mb(kw, ctx.dtype), **kw)
    compare(ctx, call, p, {"teacher"})


@case(splits=OTHER_SPLITS)
def distill_logits_jsd_mean(ctx):
    p = problem(ctx.dtype, seed=10)
    def call(h, w, b, a, **kw):
        return softce.linear_distillation_loss(h, w, a["teacher"], divergence="jsd", beta=0.3,
                                               reduction="mean",
                                               memory_budget=mb(kw, ctx.dtype), **kw)
    compare(ctx, call, p, {"teacher"}, bias=False)


@case()
def distill_logits_reverse_kl_none(ctx):
    p = problem(ctx.dtype, seed=11)
    def call(h, w, b, a, **kw):
        return softce.linear_distillation_loss(h, w, a["teacher"], bias=b,
                                               divergence="reverse_kl", reduction="none", **kw)
    compare(ctx, call, p, {"teacher"})


@case()
def distill_topk_sum(ctx):
    p = problem(ctx.dtype, seed=12)
    def call(h, w, b, a, **kw):
        return softce.linear_distillation_loss(h, w, a["topk"], bias=b, reduction="sum",
                                               memory_budget=mb(kw, ctx.dtype), **kw)
    compare(ctx, call, p, set())


@case()
def distill_hidden_teacher_bias(ctx):
    p = problem(ctx.dtype, seed=13)
    def call(h, w, b, a, **kw):
        return softce.linear_distillation_loss(
            h, w, a["teacher_hidden"], teacher_weight=a["teacher_weight"], bias=b,
            teacher_bias=a["teacher_bias"], temperature=1.5,
            memory_budget=mb(kw, ctx.dtype, True), **kw)
    compare(ctx, call, p, {"teacher_weight", "teacher_bias"})


@case(splits=OTHER_SPLITS)
def distill_hidden_jsd_mask(ctx):
    p = problem(ctx.dtype, seed=14)
    def call(h, w, b, a, **kw):
        return softce.linear_distillation_loss(
            h, w, a["teacher_hidden"], teacher_weight=a["teacher_weight"], divergence="jsd",
            mask=a["mask"], memory_budget=mb(kw, ctx.dtype, True), **kw)
    compare(ctx, call, p, {"teacher_weight"}, bias=False)


@case(dtypes=False)
def return_grad_and_module(ctx):
    p = problem(torch.float32, seed=15)
    w, b = ctx.rows(p["weight"]), ctx.rows(p["bias"])
    loss, gh, gw, gb = softce.linear_cross_entropy(p["hidden"], w, p["index"], b,
                                                   return_grad=True, process_group=ctx.group)
    module = softce.nn.LinearCrossEntropyLoss(process_group=ctx.group)
    h = p["hidden"].clone().requires_grad_()
    w2, b2 = w.clone().requires_grad_(), b.clone().requires_grad_()
    loss2 = module(h, w2, p["index"], b2)
    loss2.backward()
    assert torch.equal(loss, loss2.detach())
    torch.testing.assert_close(gh, h.grad, rtol=0, atol=0)
    torch.testing.assert_close(gw, w2.grad, rtol=0, atol=0)
    torch.testing.assert_close(gb, b2.grad, rtol=0, atol=0)
    ref = softce.linear_cross_entropy(p["hidden"].double(), p["weight"].double(), p["index"],
                                      p["bias"].double())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=0)
    dm = softce.nn.LinearDistillationLoss(process_group=ctx.group)
    d = dm(p["hidden"], w, ctx.rows(p["teacher"], -1), b)
    dref = softce.linear_distillation_loss(p["hidden"].double(), p["weight"].double(),
                                           p["teacher"].double(), bias=p["bias"].double())
    torch.testing.assert_close(d.double(), dref, rtol=1e-6, atol=0)


@case(dtypes=False)
def under_torch_compile_runs_eagerly(ctx):
    # as the dense class-parallel losses: under torch.compile the call is a graph break
    # (collectives and C++ callbacks cannot be traced) and runs eagerly, with autograd
    p = problem(torch.float32, seed=16)
    w = ctx.rows(p["weight"])

    def step(h, w):
        return softce.linear_cross_entropy(h * 1.0, w, p["index"], process_group=ctx.group) * 2.0

    compiled = torch.compile(step, backend="eager")
    h1, w1 = p["hidden"].clone().requires_grad_(), w.clone().requires_grad_()
    loss = compiled(h1, w1)
    loss.backward()
    h2, w2 = p["hidden"].clone().requires_grad_(), w.clone().requires_grad_()
    ref = step(h2, w2)
    ref.backward()
    assert torch.equal(loss.detach(), ref.detach())
    assert torch.equal(h1.grad, h2.grad) and torch.equal(w1.grad, w2.grad)


# ---------------------------------------------------------------------------------------
# the commutative reduce mode (softce.distributed.reduce_mode): the same checks


@case()
def commutative_ce_index_weights(ctx):
    with softce.distributed.reduce_mode("commutative"):
        ce_index_weights_smoothing_ignore(ctx)


@case(splits=OTHER_SPLITS)
def commutative_ce_topk_weights(ctx):
    with softce.distributed.reduce_mode("commutative"):
        ce_topk_weights_smoothing(ctx)


@case()
def commutative_distill_hidden(ctx):
    with softce.distributed.reduce_mode("commutative"):
        distill_hidden_teacher_bias(ctx)


@case(splits=OTHER_SPLITS)
def commutative_distill_jsd(ctx):
    with softce.distributed.reduce_mode("commutative"):
        distill_logits_jsd_mean(ctx)


@case(dtypes=False)
def error_reduce_mode_differs(ctx):
    p = problem(torch.float32)
    last = ctx.world - 1
    mode = "commutative" if ctx.rank == last else "ordered"

    def call():
        with softce.distributed.reduce_mode(mode):
            return softce.linear_cross_entropy(p["hidden"], ctx.rows(p["weight"]), p["index"],
                                               process_group=ctx.group)
    expect(ValueError, rf"linear_cross_entropy: reduce mode differs across ranks \(rank 0: "
           rf"'ordered', rank {last}: 'commutative'\)", call)
    expect(ValueError, "softce.distributed.reduce_mode: mode: expected 'ordered' or 'commutative'",
           lambda: softce.distributed.reduce_mode("fast").__enter__())


# ---------------------------------------------------------------------------------------
# errors: every rank raises


def expect(exc, match, fn):
    """fn() raises `exc` whose message matches `match` (an AssertionError otherwise: the
    worker records it and goes on with the next case)."""
    try:
        fn()
    except exc as e:
        assert re.search(match, str(e)), f"{type(e).__name__} {str(e)!r} does not match {match!r}"
        return
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"expected {exc.__name__}, got {type(e).__name__}: {e}") from e
    raise AssertionError(f"expected {exc.__name__} matching {match!r}, nothing was raised")


@case(dtypes=False)
def error_bad_bias_on_one_rank(ctx):
    p = problem(torch.float32)
    last = ctx.world - 1
    n = ctx.hi - ctx.lo
    b = torch.zeros(n + 1 if ctx.rank == last else n)
    own = rf"linear_cross_entropy: bias: expected shape \({SPLITS[ctx.world][last]}\)"
    want = own if ctx.rank == last else f"linear_cross_entropy: failed on rank {last}: " + own
    expect(ValueError, want, lambda: softce.linear_cross_entropy(
        p["hidden"], ctx.rows(p["weight"]), p["index"], b, process_group=ctx.group))


@case(dtypes=False)
def error_hidden_differs(ctx):
    p = problem(torch.float32)
    h = p["hidden"].clone()
    if ctx.rank == ctx.world - 1:
        h[3, 2] += 1.0
    expect(ValueError, rf"linear_cross_entropy: hidden: differs between rank 0 and rank "
           rf"{ctx.world - 1} \(the hidden states are replicated",
           lambda: softce.linear_cross_entropy(h, ctx.rows(p["weight"]), p["index"],
                                               process_group=ctx.group))


@case(dtypes=False)
def error_teacher_form_differs(ctx):
    p = problem(torch.float32)
    last = ctx.world - 1

    def call():
        if ctx.rank == last:
            return softce.linear_distillation_loss(
                p["hidden"], ctx.rows(p["weight"]), p["teacher_hidden"],
                teacher_weight=ctx.rows(p["teacher_weight"]), process_group=ctx.group)
        return softce.linear_distillation_loss(p["hidden"], ctx.rows(p["weight"]),
                                               ctx.rows(p["teacher"], -1), process_group=ctx.group)
    expect(ValueError, rf"linear_distillation_loss: ranks called different functions \(rank 0: "
           rf"linear_distillation_loss with teacher logits, rank {last}: linear_distillation_loss "
           r"with teacher hidden states\)", call)


@case(dtypes=False)
def error_input_grad_on_one_rank(ctx):
    p = problem(torch.float32)
    last = ctx.world - 1
    h = p["hidden"].clone().requires_grad_(ctx.rank != last)
    w = ctx.rows(p["weight"]).clone().requires_grad_()
    expect(ValueError, rf"linear_cross_entropy: grad_hidden differs across ranks \(rank 0: given, "
           rf"rank {last}: not given\)",
           lambda: softce.linear_cross_entropy(h, w, p["index"], process_group=ctx.group))


@case(dtypes=False)
def error_numpy_input(ctx):
    p = problem(torch.float32)
    expect(TypeError, "linear_cross_entropy: input: expected a torch.Tensor with process_group",
           lambda: softce.linear_cross_entropy(p["hidden"].numpy(), ctx.rows(p["weight"]).numpy(),
                                               p["index"].numpy(), process_group=ctx.group))


@case(dtypes=False)
def error_target_requires_grad(ctx):
    p = problem(torch.float32)
    t = ctx.rows(p["probs"], -1).clone().requires_grad_()
    expect(NotImplementedError, "linear_cross_entropy: target: a gradient with respect to it",
           lambda: softce.linear_cross_entropy(p["hidden"], ctx.rows(p["weight"]), t,
                                               process_group=ctx.group))


@case(dtypes=False)
def error_row_upstream_with_weight_grad(ctx):
    p = problem(torch.float32)
    w = ctx.rows(p["weight"]).clone().requires_grad_()
    loss = softce.linear_cross_entropy(p["hidden"], w, p["index"], reduction="none",
                                       process_group=ctx.group)
    up = torch.linspace(0.5, 2.0, 10)
    expect(NotImplementedError, "reduction='none' with process_group",
           lambda: (loss * up).sum().backward())
    # a uniform upstream is fine
    loss = softce.linear_cross_entropy(p["hidden"], w, p["index"], reduction="none",
                                       process_group=ctx.group)
    (loss * 3.0).sum().backward()


@case(dtypes=False)
def error_create_graph(ctx):
    p = problem(torch.float32)
    h = p["hidden"].clone().requires_grad_()
    loss = softce.linear_cross_entropy(h, ctx.rows(p["weight"]), p["index"],
                                       process_group=ctx.group)
    expect(RuntimeError, "double backward",
           lambda: torch.autograd.grad(loss, h, create_graph=True))


@case(dtypes=False)
def good_call_after_errors(ctx):
    p = problem(torch.float32)
    loss = softce.linear_cross_entropy(p["hidden"], torch.zeros(ctx.hi - ctx.lo, D),
                                       p["index"], process_group=ctx.group)
    assert abs(float(loss) - float(torch.log(torch.tensor(float(V))))) < 1e-6


def worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    softce.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))
    path = os.path.join(out_dir, f"rank{rank}.jsonl")
    try:
        with open(path, "w") as out:
            for name, (fn, dtype, splits) in CASES.items():
                start = time.perf_counter()
                try:
                    fn(Context(rank, world, DTYPES.get(dtype), splits))
                    error = None
                except Exception:  # noqa: BLE001
                    error = traceback.format_exc()
                seconds = round(time.perf_counter() - start, 4)
                out.write(json.dumps({"case": name, "error": error, "seconds": seconds}) + "\n")
                out.flush()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
