#!/usr/bin/env python3
"""softce against PyTorch (eager and torch.compile), the hand-written formula, Snorkel and
JAX/optax under jax.jit, and against the memory-bandwidth limit of the machine.

One invocation is one run. Every measurement happens in a fresh process forked from a
server that has imported torch, numpy and softce once (multiprocessing "forkserver"):

- timing: one process per (case, thread count). Each round times every implementation once
  (forward + backward, or the equivalent gradient computation) in a rotating order, plus a
  triad a = b + s*c over arrays far bigger than the last-level cache (torch.add(b, c,
  alpha=s, out=a): one pass, 2 reads + 1 write). Reported: the median time over rounds, the
  median over rounds of each implementation's time divided by softce's time in the same
  round ("x softce"; also against softce in place), and softce's fraction of the bound: the
  unavoidable bytes of the call (read the logits and the targets once, write the gradient
  once) / time / triad bandwidth. After a JAX peer's sample the round pauses JAX_SETTLE_S:
  XLA's pool threads spin on after a call and would take the cores from whatever is timed
  next. Each round also times the memory floor (floor_impls): one PyTorch streaming pass over
  the bytes softce's call moves, in place and into a kept buffer; softce's time against it
  tells a kernel that is short of the machine from a goal that is out of its reach. The
  small cases also time an empty torch.autograd.Function (autograd_floor): the per-call
  cost of autograd itself. Then the default call's tail latency: 20 consecutive
  calls timed one by one, alone and between steps of a workload that fragments memory
  (tensors of random sizes allocated, kept and freed, and the JAX peer run, then the same
  settle pause), reporting the
  90th percentile over the median (the stalls a median hides); the memory floor is timed
  in the same fragmented protocol, so that the machine's own stalls show beside softce's.
- memory: one process per (case, implementation): build the inputs, warm the code path up
  on a small problem (a gradient of >= 1 MiB, as the measured call's), start the OpenMP team, reset the RSS high-water mark, run one call, report the high-water mark
  above the baseline (VmHWM after /proc/self/clear_refs; ru_maxrss where that is missing).

  python bench/bench.py                 # full run, 1 and 2 threads, text tables
  python bench/bench.py --markdown      # the README table (and the memory and target tables)
  python bench/bench.py --quick         # smoke run on small shapes (well under a minute)
  python bench/bench.py --cases dense_ce_1024x32000,index_ce --threads 2 --json out.json

JAX/optax peers run when `jax` and `optax` are importable (bench/requirements.txt, installed
by scripts/setup.sh). torch.compile compiles on the warm-up call (10-20 s per case and thread
count on 2 cores); --quick compiles one case only.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
import traceback

# ---------------------------------------------------------------------------------------
# cases

# kind, shape (N, C), dtype, bytes per element at the bound, and a small shape for --quick
CASES = [
    dict(name="dense_ce_4096x1000", kind="dense", N=4096, C=1000, bpe=12, quick=(512, 1000)),
    dict(name="dense_ce_1024x32000", kind="dense", N=1024, C=32000, bpe=12, quick=(64, 8000)),
    dict(name="dense_ce_128x128256", kind="dense", N=128, C=128256, bpe=12, quick=(8, 128256)),
    dict(name="index_ce_1024x32000", kind="index", N=1024, C=32000, bpe=8, quick=(64, 8000)),
    dict(name="topk64_256x128256", kind="topk", N=256, C=128256, bpe=8, tail=False, quick=(16, 32000)),
    dict(name="topk64_tail_256x128256", kind="topk", N=256, C=128256, bpe=8, tail=True, quick=(16, 32000)),
    dict(name="distill_kl_T2_1024x32000", kind="distill", N=1024, C=32000, bpe=12, quick=(64, 8000)),
    dict(name="reverse_kl_T2_1024x32000", kind="rkl", N=1024, C=32000, bpe=12, quick=(64, 8000)),
    dict(name="jsd_beta0.5_1024x32000", kind="jsd", N=1024, C=32000, bpe=12, quick=(64, 8000)),
    dict(name="bce_4096x1000", kind="bce", N=4096, C=1000, bpe=12, quick=(512, 1000)),
    dict(name="dense_ce_bf16_1024x32000", kind="dense", N=1024, C=32000, bpe=6, dtype="bfloat16",
         quick=(64, 8000)),
    # one very long row, and a few: a retrieval head or a big vocabulary at batch 1
    dict(name="dense_ce_1x4194304", kind="dense", N=1, C=4 << 20, bpe=12, quick=(1, 1 << 20)),
    dict(name="dense_ce_8x1048576", kind="dense", N=8, C=1 << 20, bpe=12, quick=(2, 1 << 20)),
    dict(name="small_64x10", kind="dense", N=64, C=10, bpe=12, small=True, quick=(64, 10)),
    dict(name="small_256x1000", kind="dense", N=256, C=1000, bpe=12, small=True, quick=(256, 1000)),
]
TOPK = 64
TEMPERATURE = 2.0  # distillation KL
BETA = 0.5  # generalised JSD (temperature 1)
SNORKEL_MAX_CLASSES = 100  # Snorkel loops over the classes: one index-target CE per class
TRIAD_ELEMENTS = 32 << 20  # 128 MiB per float32 array, 3 arrays: far beyond a 32 MiB L3

SOFTCE = "softce"
SOFTCE_INPLACE = "softce in place"
TORCH = "PyTorch"
TORCH_COMPILE = "torch.compile"
OPTAX_JSD = "jax.jit TRL JSD"
# the pause after a JAX peer's sample (its pool threads stop spinning well within it)
JAX_SETTLE_S = 0.1
OPTAX_TOPK = "optax softmax_cross_entropy (scattered top-k)"
# the memory floor: one streaming pass of PyTorch over the bytes softce's call must move
FLOOR_INPLACE = "floor in place"
FLOOR = "floor"
FLOOR_AUTOGRAD = "autograd floor"
# rows too long for a core's cache: a pass that reads each row, then one that reads and
# writes it (the structure of any softmax gradient with unnormalised targets)
FLOOR_TWO_PASS = "two-pass floor in place"
LONG_ROW = 256 * 1024  # classes: softce's kSplitRowMin (src/row_driver.hpp); keep the two equal


def jax_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("jax") is not None and importlib.util.find_spec("optax") is not None


# ---------------------------------------------------------------------------------------
# inputs (built without N x C temporaries beyond the final arrays where it matters)


def make_inputs(case, N, C, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case.get("dtype", "float32"))
    kind = case["kind"]
    inp = {}

    def logits():
        x = torch.randn(N, C, generator=g).mul_(2.0)
        return x.to(dtype) if dtype != torch.float32 else x

    def probabilities(rows, cols):
        p = torch.randn(rows, cols, generator=g).mul_(2.0).exp_()
        p.div_(p.sum(1, keepdim=True))
        return p.to(dtype) if dtype != torch.float32 else p

    inp["x"] = logits()
    if kind == "dense":
        inp["t"] = probabilities(N, C)
    elif kind == "index":
        inp["y"] = torch.randint(C, (N,), generator=g)
    elif kind == "topk":
        k = min(TOPK, C)
        idx = torch.empty(N, k, dtype=torch.int64)
        for n in range(N):
            idx[n] = torch.randperm(C, generator=g)[:k]
        inp["idx"] = idx
        inp["val"] = probabilities(N, k).mul_(0.95)  # 95 % of the mass in the top k
        inp["y"] = idx[:, 0].clone()  # the index-CE reference at the same shape
    elif kind in ("distill", "rkl", "jsd"):
        inp["teacher"] = logits()
    elif kind == "bce":
        inp["t"] = torch.rand(N, C, generator=g)
    return inp


# ---------------------------------------------------------------------------------------
# implementations: each factory returns a callable running forward + backward once


def leaf(x):
    return x.detach().requires_grad_()


def softce_impls(case, inp, inplace):
    """softce through autograd: default (fresh gradient buffer) or in place (the gradient is
    written over the logits; the logits are a non-leaf view, as a model's output would be)."""
    import softce

    kind = case["kind"]
    if inplace:
        base = leaf(inp["x"].clone())
    else:
        x = leaf(inp["x"])

    def loss_of(xx):
        if kind == "dense":
            return softce.cross_entropy(xx, inp["t"], inplace_backward=inplace)
        if kind == "index":
            return softce.cross_entropy(xx, inp["y"], inplace_backward=inplace)
        if kind == "topk":
            return softce.cross_entropy(xx, softce.TopK(inp["idx"], inp["val"], tail=case["tail"]),
                                        inplace_backward=inplace)
        if kind == "distill":
            return softce.distillation_loss(xx, inp["teacher"], temperature=TEMPERATURE, divergence="kl",
                                            inplace_backward=inplace)
        if kind == "rkl":
            return softce.distillation_loss(xx, inp["teacher"], temperature=TEMPERATURE,
                                            divergence="reverse_kl", inplace_backward=inplace)
        if kind == "jsd":
            return softce.distillation_loss(xx, inp["teacher"], divergence="jsd", beta=BETA,
                                            inplace_backward=inplace)
        if kind == "bce":
            return softce.binary_cross_entropy_with_logits(xx, inp["t"], inplace_backward=inplace)
        raise ValueError(kind)

    if inplace:
        return inplace_run(base, lambda logits: loss_of(logits).backward())
    else:
        def run():
            x.grad = None
            loss_of(x).backward()
    return run


def inplace_run(base, step):
    """A run for an in-place gradient: the logits must be a model's output, not a leaf (softce
    refuses to overwrite a leaf that requires grad), so `prepare` makes them with
    base.clone() before each call, outside the timing (a model's output layer would have
    made them); clone's backward hands the gradient on without a copy."""
    holder = {}

    def prepare():
        base.grad = None
        holder["logits"] = base.clone()

    def run():
        step(holder.pop("logits"))
    run.prepare = prepare
    return run


def call(fn):
    """One untimed call of a run (with its preparation, if it has one)."""
    prepare = getattr(fn, "prepare", None)
    if prepare is not None:
        prepare()
    fn()


def softce_index_same_shape(case, inp):
    """Index-target CE at the top-k case's shape (the top-k target: within 1.5x of it)."""
    import softce

    base = leaf(inp["x"].clone())
    return inplace_run(base, lambda logits: softce.cross_entropy(logits, inp["y"], inplace_backward=True).backward())


def floor_impls(case, inp):
    """The memory floor of the case: one PyTorch streaming pass (2 threads: its own OpenMP
    loop) over the bytes softce's call must move, timed in the same rounds. In place: read
    the logits (and the targets or teacher, where softce reads them) and write over the
    logits, on a fresh clone as softce in place gets; separate: the same reads, written to a
    buffer kept between calls (softce's default call takes a released buffer from its
    cache). A reference, not a proof of a bound: a kernel that makes two passes over a row,
    computes exps or rounds rarely beats it, but may (index CE in place ran at 116 % of it).
    Small cases add the autograd floor; rows of more than LONG_ROW classes a two-pass floor
    (each row read, then read and written in place: a softmax gradient's structure)."""
    import torch

    kind = case["kind"]
    x = inp["x"]
    other = {"dense": "t", "bce": "t", "distill": "teacher", "rkl": "teacher", "jsd": "teacher"}.get(kind)
    other = inp[other] if other else None
    if x.dtype in (torch.bfloat16, torch.float16):  # the same bytes as integers (no conversion)
        as_bits = lambda a: a.view(torch.int16)  # noqa: E731
    else:
        as_bits = lambda a: a  # noqa: E731
    src, oth = as_bits(x), (as_bits(other) if other is not None else None)
    kept = torch.zeros_like(src)  # touched once: the pages exist, as a reused buffer's do

    def one_pass(a, out):
        if oth is None:
            torch.mul(a, 2, out=out)
        else:
            torch.add(a, oth, out=out)

    holder = {}

    def prepare():
        holder["x"] = src.clone()

    def in_place():
        a = holder.pop("x")
        one_pass(a, a)
    in_place.prepare = prepare
    floors = {FLOOR_INPLACE: in_place, FLOOR: lambda: one_pass(src, kept)}
    if case.get("small"):
        floors[FLOOR_AUTOGRAD] = autograd_floor(inp)
    if case["C"] > LONG_ROW and oth is not None and src.dim() == 2:
        def two_pass():
            a = holder.pop("x")
            for r in range(a.shape[0]):  # row by row, each op on PyTorch's threads (dot: its
                torch.dot(a[r], oth[r])  # BLAS's; measured 1.7-1.8x from 1 to 2 threads)
                torch.add(a[r], oth[r], out=a[r])  # reads it again, writes over it
        two_pass.prepare = prepare
        floors[FLOOR_TWO_PASS] = two_pass
    return floors


def autograd_floor(inp):
    """What any loss behind torch.autograd pays on a small call, whatever its kernel: a
    torch.autograd.Function that computes nothing (forward: a 0-d tensor; backward: the
    upstream gradient broadcast to the logits' shape), called and backpropagated as the
    softce and PyTorch runs are. A reference for the small cases, where the call's fixed
    cost (Python, autograd's graph and engine) is most of the time."""
    import torch

    x = leaf(inp["x"])

    class Empty(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits):
            ctx.shape = logits.shape
            return logits.new_zeros(())

        @staticmethod
        def backward(ctx, g):
            return g.expand(ctx.shape)

    def run():
        x.grad = None
        Empty.apply(x).backward()
    return run


def torch_loss(case, inp):
    """PyTorch's loss for the case as (function of the logits and the other tensors, those
    tensors): eager PyTorch calls it as is, torch.compile compiles it (no closures over
    tensors, so that Inductor sees them as graph inputs)."""
    import torch
    import torch.nn.functional as F

    kind = case["kind"]
    if kind == "dense":
        return (lambda x, t: F.cross_entropy(x, t)), (inp["t"],)
    if kind == "index":
        return (lambda x, y: F.cross_entropy(x, y)), (inp["y"],)
    if kind == "topk":
        tail = case["tail"]

        def topk_loss(x, idx, val):
            # the dense equivalent: scatter the top-k into zeros, then probability-target CE
            dense = torch.zeros_like(x, requires_grad=False).scatter_(1, idx, val)
            value = F.cross_entropy(x, dense)
            if tail:  # the bucket term -(1 - sum v) log(1 - sum_k q_k)
                q_top = torch.softmax(x, 1).gather(1, idx).sum(1)
                value = value - ((1 - val.sum(1)) * torch.log1p(-q_top)).mean()
            return value
        return topk_loss, (inp["idx"], inp["val"])
    if kind == "distill":
        T = TEMPERATURE
        return (lambda x, z: F.kl_div(F.log_softmax(x / T, -1), F.softmax(z / T, -1),
                                      reduction="batchmean") * (T * T)), (inp["teacher"],)
    if kind == "rkl":
        T = TEMPERATURE
        return (lambda x, z: F.kl_div(F.log_softmax(z / T, -1), F.log_softmax(x / T, -1), reduction="batchmean",
                                      log_target=True) * (T * T)), (inp["teacher"],)
    if kind == "jsd":
        def jsd_loss(x, z):  # TRL's GKDTrainer.generalized_jsd_loss (temperature 1, batchmean)
            beta = torch.tensor(BETA)
            s = F.log_softmax(x, -1)
            t = F.log_softmax(z, -1)
            m = torch.logsumexp(torch.stack([s + torch.log(1 - beta), t + torch.log(beta)]), dim=0)
            jsd = beta * F.kl_div(m, t, reduction="none", log_target=True) + \
                (1 - beta) * F.kl_div(m, s, reduction="none", log_target=True)
            return jsd.sum() / jsd.size(0)
        return jsd_loss, (inp["teacher"],)
    if kind == "bce":
        return (lambda x, t: F.binary_cross_entropy_with_logits(x, t)), (inp["t"],)
    raise ValueError(kind)


def torch_impl(case, inp, compiled=False):
    """Eager PyTorch, or the same loss under torch.compile (Inductor's fused C++/OpenMP loop;
    compiled on the warm-up call)."""
    import torch

    loss, args = torch_loss(case, inp)
    if compiled:
        loss = torch.compile(loss, fullgraph=True)
    x = leaf(inp["x"])

    def run():
        x.grad = None
        loss(x, *args).backward()
    return run


def seed_impl(case, inp):
    """The seed's hand-written soft-target CE: -(t * log_softmax(x)).sum() / N."""
    import torch.nn.functional as F

    x = leaf(inp["x"])
    t = inp["t"]

    def run():
        x.grad = None
        (-(t * F.log_softmax(x, dim=1)).sum() / x.shape[0]).backward()
    return run


def snorkel_impl(case, inp):
    """Snorkel's cross_entropy_with_probs: one index-target CE per class (small C only)."""
    import torch
    import torch.nn.functional as F

    x = leaf(inp["x"])
    t = inp["t"]

    def loss():
        num_points, num_classes = x.shape
        cum_losses = x.new_zeros(num_points)
        for y in range(num_classes):
            target_temp = x.new_full((num_points,), y, dtype=torch.long)
            y_loss = F.cross_entropy(x, target_temp, reduction="none")
            cum_losses += t[:, y].float() * y_loss
        return cum_losses.mean()

    def run():
        x.grad = None
        loss().backward()
    return run


def jax_impls(case, inp):
    """optax under jax.jit(value_and_grad); returns {name: run}."""
    import jax
    import jax.numpy as jnp
    import optax

    kind = case["kind"]
    x = jnp.asarray(inp["x"].float().numpy() if case.get("dtype") == "bfloat16" else inp["x"].numpy())
    if case.get("dtype") == "bfloat16":
        x = x.astype(jnp.bfloat16)
    out = {}

    def add(name, loss, *args):
        f = jax.jit(jax.value_and_grad(loss))
        out[name] = lambda: jax.block_until_ready(f(x, *args))

    if kind == "dense":
        t = jnp.asarray(inp["t"].float().numpy()).astype(x.dtype)
        add("optax softmax_cross_entropy", lambda x, t: optax.softmax_cross_entropy(x, t).mean(), t)
        add("optax safe_softmax_cross_entropy", lambda x, t: optax.safe_softmax_cross_entropy(x, t).mean(), t)
    elif kind == "index":
        y = jnp.asarray(inp["y"].numpy())
        add("optax softmax_cross_entropy_with_integer_labels",
            lambda x, y: optax.softmax_cross_entropy_with_integer_labels(x, y).mean(), y)
    elif kind == "distill":
        z = jnp.asarray(inp["teacher"].numpy())
        T = TEMPERATURE
        add("optax kl_divergence",
            lambda x, z: optax.kl_divergence(jax.nn.log_softmax(x / T), jax.nn.softmax(z / T)).mean() * T * T, z)
    elif kind == "rkl":
        z = jnp.asarray(inp["teacher"].numpy())
        T = TEMPERATURE
        add("optax kl_divergence_with_log_targets",
            lambda x, z: optax.losses.kl_divergence_with_log_targets(jax.nn.log_softmax(z / T),
                                                                     jax.nn.log_softmax(x / T)).mean() * T * T, z)
    elif kind == "jsd":
        z = jnp.asarray(inp["teacher"].numpy())

        def jsd(x, z):  # TRL's generalised JSD (as torch_loss), in JAX
            s, t = jax.nn.log_softmax(x), jax.nn.log_softmax(z)
            m = jnp.logaddexp(s + jnp.log(1 - BETA), t + jnp.log(BETA))
            kl_tm = jnp.sum(jnp.exp(t) * (t - m), axis=-1)
            kl_sm = jnp.sum(jnp.exp(s) * (s - m), axis=-1)
            return jnp.mean(BETA * kl_tm + (1 - BETA) * kl_sm)
        add(OPTAX_JSD, jsd, z)
    elif kind == "topk":
        idx = jnp.asarray(inp["idx"].numpy())
        val = jnp.asarray(inp["val"].numpy())
        rows = jnp.arange(idx.shape[0])[:, None]
        tail = case["tail"]

        def topk(x, idx, val):  # the dense scatter, then optax's soft-target CE
            dense = jnp.zeros_like(x).at[rows, idx].set(val)
            value = optax.softmax_cross_entropy(x, dense).mean()
            if tail:
                q_top = jnp.take_along_axis(jax.nn.softmax(x), idx, axis=1).sum(1)
                value = value - jnp.mean((1 - val.sum(1)) * jnp.log1p(-q_top))
            return value
        add(OPTAX_TOPK, topk, idx, val)
    elif kind == "bce":
        t = jnp.asarray(inp["t"].numpy())
        add("optax sigmoid_binary_cross_entropy",
            lambda x, t: optax.sigmoid_binary_cross_entropy(x, t).mean(), t)
    return out


def with_compile(case):
    """torch.compile runs on every case (compiling takes ~10-20 s per case and thread count on
    2 cores); a --quick smoke run compiles one case only, to keep the path exercised."""
    return not case.get("no_compile")


def implementations(case, inp, with_jax, only=None):
    """{name: run} for the case; `only` builds just that one (memory measurements)."""
    kind = case["kind"]
    factories = {
        SOFTCE_INPLACE: lambda: softce_impls(case, inp, True),
        SOFTCE: lambda: softce_impls(case, inp, False),
        TORCH: lambda: torch_impl(case, inp),
    }
    if with_compile(case):
        factories[TORCH_COMPILE] = lambda: torch_impl(case, inp, compiled=True)
    if kind == "dense":
        factories["seed -(t*log_softmax(x)).sum()/N"] = lambda: seed_impl(case, inp)
        if case["C"] <= SNORKEL_MAX_CLASSES:
            factories["Snorkel cross_entropy_with_probs"] = lambda: snorkel_impl(case, inp)
    if kind == "topk":
        factories["softce index CE, same shape"] = lambda: softce_index_same_shape(case, inp)
    if only is not None:
        if is_jax(only):
            return {only: jax_impls(case, inp)[only]}
        return {only: factories[only]()}
    impls = {name: factories[name]() for name in factories}
    if with_jax:
        impls.update(jax_impls(case, inp))
    return impls


def implementation_names(case, with_jax):
    """The names implementations() will produce (without building anything)."""
    names = [SOFTCE_INPLACE, SOFTCE, TORCH]
    kind = case["kind"]
    if with_compile(case):
        names.append(TORCH_COMPILE)
    if kind == "dense":
        names.append("seed -(t*log_softmax(x)).sum()/N")
        if case["C"] <= SNORKEL_MAX_CLASSES:
            names.append("Snorkel cross_entropy_with_probs")
    if kind == "topk":
        names.append("softce index CE, same shape")
    if with_jax:
        names += {
            "dense": ["optax softmax_cross_entropy", "optax safe_softmax_cross_entropy"],
            "index": ["optax softmax_cross_entropy_with_integer_labels"],
            "distill": ["optax kl_divergence"],
            "rkl": ["optax kl_divergence_with_log_targets"],
            "jsd": [OPTAX_JSD],
            "topk": [OPTAX_TOPK],
            "bce": ["optax sigmoid_binary_cross_entropy"],
        }.get(kind, [])
    return names


# ---------------------------------------------------------------------------------------
# workers (run in forked children)


def set_threads(threads):
    import torch
    import softce

    torch.set_num_threads(threads)
    softce.set_num_threads(threads)
    if threads == 1:  # read by XLA when its CPU client starts (on the first JAX call)
        os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def timed(fn, inner):
    """Seconds per call: one call, or the median of `inner` calls (short calls: a stray
    stall, e.g. an OpenMP barrier waiting for a core another process holds, must not
    stand for the typical per-call cost)."""
    prepare = getattr(fn, "prepare", None)
    times = []
    for _ in range(inner):
        if prepare is not None:
            prepare()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times[0] if inner == 1 else statistics.median(times)


def timing_worker(case, threads, quick, with_jax, rounds, min_sample):
    import torch

    set_threads(threads)
    N, C = case["N"], case["C"]
    inp = make_inputs(case, N, C)
    impls = implementations(case, inp, with_jax)
    impls.update(floor_impls(case, inp))

    n_triad = TRIAD_ELEMENTS // (4 if quick else 1)
    # random contents: pages of equal content could be merged or compressed behind our back
    a, b, c = torch.rand(n_triad), torch.rand(n_triad), torch.rand(n_triad)

    def triad():
        torch.add(b, c, alpha=3.0, out=a)

    # warm-up (JIT compilation, thread pools, first-touch of buffers), then the batch size
    # of each implementation: enough calls per sample to last min_sample seconds, from its
    # typical call (the fastest of three when one is short: a single slow call made a 3 ms
    # call a batch of one, whose sample is then any one call's stall)
    inner = {}
    for name, fn in impls.items():
        call(fn)
        first = timed(fn, 1)
        if first < min_sample:
            first = min(first, timed(fn, 1), timed(fn, 1))
        inner[name] = max(1, min(100000, math.ceil(min_sample / max(first, 1e-9))))
    triad()
    names = list(impls)
    times = {name: [] for name in names}
    triad_times = []
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(timed(impls[name], inner[name]))
            if is_jax(name):
                # XLA's pool threads spin on after a jax.jit call (bench/jax_after_step.py:
                # a softce call right after one took 1.7x as long on 2 cores); let them
                # sleep so the next implementation in the round gets the cores
                time.sleep(JAX_SETTLE_S)
        triad_times.append(timed(triad, 1))
    triad_bw = 12.0 * n_triad / statistics.median(triad_times)
    tails = {"alone": tail_latency(impls[SOFTCE], None),
             "fragmented": tail_latency(impls[SOFTCE], fragmenting_workload(impls, quick))}
    # the same protocol for the memory floor (a PyTorch pass that allocates nothing): stalls
    # it shows too come from the machine (other vCPUs, the host), not from softce's call
    floor_tail = {"fragmented": tail_latency(impls[FLOOR], fragmenting_workload(impls, quick))}
    bytes_at_bound = case["bpe"] * N * C
    ref = times[SOFTCE]
    ref_inplace = times[SOFTCE_INPLACE]
    result = {"triad_GBps": triad_bw / 1e9, "rounds": rounds, "impls": {}, "default_tail": tails,
              "floor_tail": floor_tail}
    for name in names:
        med = statistics.median(times[name])
        result["impls"][name] = {
            "median_s": med,
            "x_softce": statistics.median(t / s for t, s in zip(times[name], ref)),
            "x_softce_inplace": statistics.median(t / s for t, s in zip(times[name], ref_inplace)),
            "fraction_of_bound": bytes_at_bound / med / triad_bw,
            "calls_per_sample": inner[name],
        }
    return result


TAIL_CALLS = 20


def is_jax(name):
    return name.startswith(("optax", "jax"))


def is_floor(name):
    return name in (FLOOR, FLOOR_INPLACE, FLOOR_AUTOGRAD, FLOOR_TWO_PASS)


def tail_latency(fn, between):
    """The default call's time over TAIL_CALLS consecutive calls (each timed alone, `between`
    run before each call outside the timing): median, 90th percentile and their ratio. A
    fresh gradient buffer per call is what autograd uses; stalls show here, not in medians."""
    times = []
    for _ in range(TAIL_CALLS):
        if between is not None:
            between()
        times.append(timed(fn, 1))
    in_order = list(times)
    times.sort()
    median = statistics.median(times)
    p90 = times[math.ceil(0.9 * len(times)) - 1]
    return {"median_s": median, "p90_s": p90, "p90_over_median": p90 / median, "max_s": times[-1],
            "times_s": in_order}


def fragmenting_workload(impls, quick):
    """Between two calls: allocate and free tensors of random sizes (1-96 MiB, touched, some
    kept across calls) and run the JAX peer once where JAX is installed, as a training step
    with other frameworks in the process would. Reproducible (fixed seed)."""
    import random

    import torch

    rng = random.Random(0)
    kept = []
    jax_peer = next((fn for name, fn in impls.items() if is_jax(name)), None)

    def between():
        for _ in range(4):
            mib_count = rng.randint(1, 24 if quick else 96)
            kept.append(torch.ones(mib_count << 18))  # float32: 4 bytes each, touched
        while len(kept) > 6:
            kept.pop(rng.randrange(len(kept)))
        if jax_peer is not None:
            call(jax_peer)
            # the settle pause of the timing rounds: XLA's pool threads spin on after the
            # step (bench/jax_after_step.py) and would stand in the tail for memory stalls
            time.sleep(JAX_SETTLE_S)
    return between


def vm_kb(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak():
    """Resets the RSS high-water mark (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return vm_kb("VmHWM") is not None
    except OSError:
        return False


def memory_worker(case, name, threads):
    set_threads(threads)
    # warm the code path up on a small problem of the same kind (lazy initialisation). Its
    # gradient is >= 1 MiB, so that softce takes the path of its cache of released buffers
    # (softce._gradient_cache) as the measured call does: torch's slicing and storage code
    # that path runs is ~0.75 MiB of libtorch code pages (RssFile, measured in a forkserver
    # child), touched for the first time by the measured call otherwise -- the process's,
    # not memory the call allocates.
    warm_c = min(case["C"], 1024)
    warm = dict(case, N=max(4, (1 << 20) // (2 * warm_c)), C=warm_c)
    warm_inp = make_inputs(warm, warm["N"], warm["C"])
    call(implementations(warm, warm_inp, True, only=name)[name])
    del warm_inp
    # start the OpenMP team (torch and softce share libgomp) outside the measurement: a
    # warm-up call of few rows runs on one thread, and the first parallel region's thread
    # stacks and arenas (~0.4-0.6 MiB here) are the process's, not the call's
    import torch

    torch.ones(1 << 22).add_(1.0)
    inp = make_inputs(case, case["N"], case["C"])
    fn = implementations(case, inp, True, only=name)[name]
    gc.collect()
    try:  # hand freed heap memory back, so that the call cannot reuse it unseen
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
    if reset_peak():
        prepare = getattr(fn, "prepare", None)
        if prepare is not None:  # before the baseline: the logits are the model's, not the call's
            prepare()
        base = vm_kb("VmRSS")
        fn()
        peak = vm_kb("VmHWM")
        method = "VmHWM"
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        call(fn)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        method = "ru_maxrss"
    return {"extra_bytes": max(0, peak - base) * 1024, "method": method}


def child_main(conn, task):
    try:
        if task["what"] == "time":
            out = timing_worker(task["case"], task["threads"], task["quick"], task["jax"], task["rounds"],
                                task["min_sample"])
        else:
            out = memory_worker(task["case"], task["impl"], task["threads"])
        conn.send({"ok": out})
    except BaseException:  # report, never hang the parent
        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()
    os._exit(0)  # skip the interpreter's teardown (torch's takes a good part of a second)


def run_in_child(ctx, task, timeout):
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=child_main, args=(child, task))
    p.start()
    child.close()
    result = {"error": f"no result within {timeout} s"}
    if parent.poll(timeout):
        try:
            result = parent.recv()
        except EOFError:
            result = {"error": "the worker died (exit code %s)" % p.exitcode}
    p.join(5)
    if p.is_alive():
        p.kill()
        p.join()
    elif "error" in result and p.exitcode:
        result["error"] += f" (exit code {p.exitcode})"
    return result


# ---------------------------------------------------------------------------------------
# targets (issue: at 2 threads, or the largest thread count run)


def evaluate_targets(results, threads):
    """[(target, measured, met, note)] for the cases that were run."""
    out = []

    def get(case, impl, key):
        r = results.get(case, {}).get("time", {}).get(str(threads), {})
        return r.get("impls", {}).get(impl, {}).get(key) if "impls" in r else None

    def floor_of(case, impl):
        """The memory floor's median for softce's call `impl` (in place or default)."""
        return get(case, FLOOR_INPLACE if impl == SOFTCE_INPLACE else FLOOR, "median_s")

    def bound(case, label, goal=0.75, impl=SOFTCE_INPLACE):
        f = get(case, impl, "fraction_of_bound")
        if f is not None:
            note = "" if f >= goal else f"missed by {goal - f:.0%} of the bound ({goal / f:.2f}x too slow)"
            ff = get(case, FLOOR_INPLACE if impl == SOFTCE_INPLACE else FLOOR, "fraction_of_bound")
            if ff is not None:
                note += ("; " if note else "") + f"one streaming pass over the same bytes: {ff:.0%}"
            f2 = get(case, FLOOR_TWO_PASS, "fraction_of_bound") if impl == SOFTCE_INPLACE else None
            if f2 is not None:
                note += ("; " if note else "") + f"two passes over each row ({FLOOR_TWO_PASS}): {f2:.0%}"
            out.append((f"{label}: {impl} >= {goal:.0%} of the bound", f"{f:.0%}", f >= goal, note))

    def speedup(case, label, goal, peer=TORCH, impl=SOFTCE):
        x = get(case, peer, "x_softce" if impl == SOFTCE else "x_softce_inplace")
        if x is not None:
            out.append((f"{label}: {impl} >= {goal}x {peer}", f"{x:.1f}x", x >= goal,
                        "" if x >= goal else f"missed: {goal / x:.2f}x short" + reach(case, peer, impl, goal)))

    def reach(case, peer, impl, goal):
        """Whether a missed speed-up goal is reachable at all: the peer's time over the
        memory floor's (one streaming pass over the bytes the call must move)."""
        floor, p = floor_of(case, impl), get(case, peer, "median_s")
        if not floor or not p:
            return ""
        fx = p / floor
        # a reference, not a proof: a kernel may beat PyTorch's pass (index CE in place did)
        return (f"; the memory floor itself is {fx:.1f}x {peer}" +
                (" (the floor misses it too)" if fx < goal else ""))

    bound("dense_ce_1024x32000", "dense soft CE 1024x32000")
    speedup("dense_ce_1024x32000", "dense soft CE 1024x32000", 5)
    bound("index_ce_1024x32000", "index CE 1024x32000 (8 B/element)")
    speedup("index_ce_1024x32000", "index CE 1024x32000", 2)
    bound("distill_kl_T2_1024x32000", "distillation KL 1024x32000")
    speedup("distill_kl_T2_1024x32000", "distillation KL 1024x32000", 5)
    for case in ("topk64_256x128256", "topk64_tail_256x128256"):
        speedup(case, case, 20, impl=SOFTCE_INPLACE)
        speedup(case, case, 20)
        x = get(case, "softce index CE, same shape", "x_softce_inplace")
        if x is not None:  # top-k time / index-CE time, both in place
            ratio = 1.0 / x
            out.append((f"{case}: softce in place within 1.5x of index CE in place", f"{ratio:.2f}x",
                        ratio <= 1.5, "" if ratio <= 1.5 else f"missed: {ratio / 1.5:.2f}x over"))
    bound("dense_ce_bf16_1024x32000", "bfloat16 dense soft CE 1024x32000 (6 B/element)")
    bound("reverse_kl_T2_1024x32000", "reverse KL 1024x32000")
    bound("jsd_beta0.5_1024x32000", "JSD 1024x32000", goal=0.5)
    # against the strongest peers a user would pick instead (issue 13)
    for case, label in (("dense_ce_1024x32000", "soft CE"), ("index_ce_1024x32000", "index CE"),
                        ("distill_kl_T2_1024x32000", "distillation KL"), ("jsd_beta0.5_1024x32000", "JSD")):
        r = results.get(case, {}).get("time", {}).get(str(threads), {})
        fused = {n: v for n, v in r.get("impls", {}).items() if n == TORCH_COMPILE or n.startswith(("optax", "jax"))}
        if not fused:
            continue
        best = min(fused, key=lambda n: fused[n]["median_s"])
        for impl, key, goal in ((SOFTCE, "x_softce", 3), (SOFTCE_INPLACE, "x_softce_inplace", 6)):
            x = fused[best][key]
            out.append((f"{label} {case}: {impl} >= {goal}x the faster of torch.compile and JAX ({best})",
                        f"{x:.1f}x", x >= goal,
                        "" if x >= goal else f"missed: {goal / x:.2f}x short" + reach(case, best, impl, goal)))
    # the default call (a fresh gradient, as autograd uses it): near in place, no stalls
    for case in ("dense_ce_1024x32000", "index_ce_1024x32000", "distill_kl_T2_1024x32000"):
        r = results.get(case, {}).get("time", {}).get(str(threads), {})
        if "impls" not in r:
            continue
        ratio = r["impls"][SOFTCE_INPLACE]["x_softce"]
        ratio = 1.0 / ratio if ratio else float("inf")  # default time / in-place time
        out.append((f"{case}: softce within 1.5x of softce in place", f"{ratio:.2f}x", ratio <= 1.5,
                    "" if ratio <= 1.5 else f"missed: {ratio / 1.5:.2f}x over"))
        for how, tail in r.get("default_tail", {}).items():
            q = tail["p90_over_median"]
            fq = r.get("floor_tail", {}).get(how, {}).get("p90_over_median")
            floor_note = (f"; the memory floor (allocates nothing) in the same protocol: {fq:.2f}x"
                          if fq is not None else "")
            out.append((f"{case}: softce p90 <= 1.3x median over {TAIL_CALLS} calls ({how})", f"{q:.2f}x",
                        q <= 1.3, "" if q <= 1.3 else f"missed: {q / 1.3:.2f}x over" + floor_note))
    # one long row split across threads
    for case in ("dense_ce_1x4194304", "dense_ce_8x1048576"):
        bound(case, case)
        one = results.get(case, {}).get("time", {}).get("1", {}).get("impls", {}).get(SOFTCE_INPLACE)
        two = results.get(case, {}).get("time", {}).get("2", {}).get("impls", {}).get(SOFTCE_INPLACE)
        if one and two and threads == 2:
            sp = one["median_s"] / two["median_s"]
            # a memory-bound kernel cannot scale past the memory system: the triad's own
            # 2-thread / 1-thread ratio in the same run bounds the speedup
            bw = {k: results[case]["time"][k].get("triad_GBps") for k in ("1", "2")}
            mem = bw["2"] / bw["1"] if bw["1"] and bw["2"] else None
            note = f" (triad {mem:.2f}x)" if mem else ""
            # the floors moving the case's own bytes (one pass, and two passes over each
            # row) in the same protocol: where the data partly fits a cache at 1 thread,
            # they scale less than the triad
            floors = []
            for name in (FLOOR_INPLACE, FLOOR_TWO_PASS):
                f1 = results[case]["time"]["1"].get("impls", {}).get(name)
                f2 = results[case]["time"]["2"].get("impls", {}).get(name)
                if f1 and f2:
                    floors.append(f"the {name} {f1['median_s'] / f2['median_s']:.2f}x")
            out.append((f"{case}: softce in place 2 threads >= 1.7x 1 thread", f"{sp:.2f}x{note}", sp >= 1.7,
                        "" if sp >= 1.7 else f"missed: {1.7 / sp:.2f}x short" +
                        (f"; the triad itself scaled {mem:.2f}x" if mem else "") +
                        (f"; in the same rounds {', '.join(floors)}" if floors else "")))

    def autograd_share(case, peer):
        """For a missed small-case goal: the empty autograd.Function's time as a share of
        the peer's (how much of the peer's time any autograd loss spends before computing)."""
        fa, p = get(case, FLOOR_AUTOGRAD, "median_s"), get(case, peer, "median_s")
        return f"; an empty autograd.Function alone takes {fa / p:.0%} of its time" if fa and p else ""

    for case in ("small_64x10", "small_256x1000"):
        x = get(case, TORCH, "x_softce")
        if x is not None:
            out.append((f"{case}: softce per call <= PyTorch", f"{x:.2f}x faster", x >= 1.0,
                        "" if x >= 1.0 else f"missed: {1 / x:.2f}x slower" + autograd_share(case, TORCH)))
    # memory: default = gradient buffer + O(N); in place = O(N)
    for case_name, r in results.items():
        mem = r.get("memory", {})
        case = next(c for c in CASES if c["name"] == case_name)
        grad = r.get("grad_bytes", 0)
        slack = 1 << 20  # O(N) and allocator rounding
        for impl, allowed in ((SOFTCE, grad + slack), (SOFTCE_INPLACE, slack)):
            m = mem.get(impl, {}).get("extra_bytes")
            if m is not None and not case.get("small"):
                out.append((f"{case_name}: {impl} extra memory <= {'gradient + ' if impl == SOFTCE else ''}O(N)",
                            mib(m), m <= allowed, "" if m <= allowed else f"missed by {mib(m - allowed)}"))
    # ahead of every peer on every case (softce's best mode against each peer)
    for case_name, r in results.items():
        t = r.get("time", {}).get(str(threads), {})
        if "impls" not in t:
            continue
        for peer, v in t["impls"].items():
            if peer.startswith("softce") or is_floor(peer):
                continue
            best = max(v["x_softce"], v["x_softce_inplace"])
            if best < 1.0:
                out.append((f"{case_name}: ahead of {peer}", f"{best:.2f}x", False,
                            f"missed: {1 / best:.2f}x slower than {peer}" + autograd_share(case_name, peer)))
    return out


# ---------------------------------------------------------------------------------------
# reporting


def mib(b):
    return f"{b / 2**20:.1f} MiB" if b >= 2**20 / 10 else f"{b / 1024:.0f} KiB"


def fmt_time(s):
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} us"


def report(results, threads_list, markdown, meta):
    lines = []
    sep = " | "

    def row(cells):
        lines.append(("| " + sep.join(cells) + " |") if markdown else "  ".join(cells))

    def header(cells):
        row(cells)
        if markdown:
            lines.append("|" + "|".join(" --- " for _ in cells) + "|")

    lines.append(f"softce {meta['softce']} ({meta['simd']}), PyTorch {meta['torch']}, "
                 f"{meta['cpu']}, {meta['cores']} cores; medians of {meta['rounds']} rounds; "
                 f"bound = unavoidable bytes / triad bandwidth"
                 + ("" if meta["jax"] else "; JAX/optax not installed")
                 + (f"; load average {meta['load'][0]:.1f} -> {meta['load'][1]:.1f}" if "load" in meta else ""))
    lines.append("")
    header(["case", "threads", "triad GB/s", "softce in place (% of bound)", "softce (% of bound)",
            "floor in place / floor (softce's % of it)", "PyTorch (x softce)", "other peers (x softce)"])
    for case in CASES:
        r = results.get(case["name"])
        if not r:
            continue
        for threads in threads_list:
            t = r.get("time", {}).get(str(threads))
            if t is None:
                continue
            if "error" in t:
                row([case["name"], str(threads), "error", "", "", "", "", ""])
                continue
            im = t["impls"]

            def cell(name, bound=False):
                v = im.get(name)
                if v is None:
                    return "-"
                if bound:
                    return f"{fmt_time(v['median_s'])} ({v['fraction_of_bound']:.0%})"
                return f"{fmt_time(v['median_s'])} ({v['x_softce']:.1f}x)"
            others = [f"{n}: {fmt_time(v['median_s'])} ({v['x_softce']:.1f}x)" for n, v in im.items()
                      if n not in (SOFTCE, SOFTCE_INPLACE, TORCH) and not is_floor(n)]
            floor = "-"
            if FLOOR_INPLACE in im and FLOOR in im:
                fi, fs = im[FLOOR_INPLACE], im[FLOOR]
                floor = (f"{fmt_time(fi['median_s'])} / {fmt_time(fs['median_s'])} "
                         f"({fi['x_softce_inplace']:.0%} / {fs['x_softce']:.0%})")
            if FLOOR_AUTOGRAD in im:
                fa = im[FLOOR_AUTOGRAD]
                floor += f"; {FLOOR_AUTOGRAD}: {fmt_time(fa['median_s'])} ({fa['x_softce']:.0%})"
            if FLOOR_TWO_PASS in im:
                f2 = im[FLOOR_TWO_PASS]
                floor += f"; {FLOOR_TWO_PASS}: {fmt_time(f2['median_s'])} ({f2['x_softce_inplace']:.0%})"
            row([case["name"], str(threads), f"{t['triad_GBps']:.1f}", cell(SOFTCE_INPLACE, True),
                 cell(SOFTCE, True), floor, cell(TORCH), ("; " if markdown else "; ").join(others) or "-"])
    lines.append("")
    lines.append(f"The default call (fresh gradient buffer, as autograd uses it) over {TAIL_CALLS} consecutive calls, "
                 "alone and between steps of a workload that allocates and frees tensors of random sizes and "
                 "runs the JAX peer (bench.py's fragmenting_workload); the last column times the memory floor "
                 "(a PyTorch pass that allocates nothing) in the same protocol:")
    lines.append("")
    header(["case", "threads", "in place median", "default median", "default p90 / median (alone)",
            "default p90 / median (fragmented)", "max (fragmented)", "floor p90 / median (fragmented)"])
    for case in CASES:
        r = results.get(case["name"])
        if not r:
            continue
        for threads in threads_list:
            t = r.get("time", {}).get(str(threads))
            if not t or "impls" not in t or "default_tail" not in t:
                continue
            a, f = t["default_tail"]["alone"], t["default_tail"]["fragmented"]
            ff = t.get("floor_tail", {}).get("fragmented")
            row([case["name"], str(threads), fmt_time(t["impls"][SOFTCE_INPLACE]["median_s"]),
                 fmt_time(a["median_s"]), f"{a['p90_over_median']:.2f}", f"{f['p90_over_median']:.2f}",
                 fmt_time(f["max_s"]), f"{ff['p90_over_median']:.2f}" if ff else "-"])
    lines.append("")
    lines.append("Peak extra memory of one call (RSS high-water above baseline, fresh process):")
    lines.append("")
    header(["case", "gradient buffer", "softce in place", "softce", "PyTorch", "other peers"])
    for case in CASES:
        r = results.get(case["name"])
        if not r or "memory" not in r:
            continue
        m = r["memory"]

        def mcell(name):
            v = m.get(name)
            return "-" if v is None else ("error" if "error" in v else mib(v["extra_bytes"]))
        others = [f"{n}: {mcell(n)}" for n in m if n not in (SOFTCE, SOFTCE_INPLACE, TORCH)]
        row([case["name"], mib(r["grad_bytes"]), mcell(SOFTCE_INPLACE), mcell(SOFTCE), mcell(TORCH),
             "; ".join(others) or "-"])
    targets = evaluate_targets(results, max(threads_list))
    if targets:
        lines.append("")
        lines.append(f"Targets ({max(threads_list)} threads):")
        lines.append("")
        header(["target", "measured", "met", "note"])
        for name, measured, met, note in targets:
            row([name, measured, "yes" if met else "**no**" if markdown else "NO", note])
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, few rounds (smoke test)")
    ap.add_argument("--markdown", action="store_true", help="print the README tables")
    ap.add_argument("--threads", default=None, help="thread counts (default 1,2; --quick: 2)")
    ap.add_argument("--cases", default="", help="comma-separated case names or prefixes")
    ap.add_argument("--rounds", type=int, default=None, help="timing rounds (default 7, quick 3)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    ap.add_argument("--no-jax", action="store_true", help="skip the JAX/optax peers")
    ap.add_argument("--json", default="", help="write the raw results here")
    ap.add_argument("--from-json", default="", help="print the report of a saved --json file (times nothing)")
    args = ap.parse_args(argv)
    if args.from_json:
        try:
            with open(args.from_json) as f:
                saved = json.load(f)
            results = saved["results"]
            threads_list = sorted({int(t) for r in results.values() for t in r["time"]})
            unknown = [name for name in results if not any(c["name"] == name for c in CASES)]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            sys.exit(f"--from-json {args.from_json}: not a saved bench.py --json run ({type(e).__name__}: {e})")
        if not results or unknown:
            sys.exit(f"--from-json {args.from_json}: " + (f"cases this bench.py does not know: {', '.join(unknown)}"
                                                          if unknown else "no results in the file"))
        print(report(results, threads_list, args.markdown, saved["meta"]))
        return 1 if any("error" in t for r in results.values() for t in r["time"].values()) else 0

    threads_list = [int(t) for t in (args.threads or ("2" if args.quick else "1,2")).split(",") if t]
    rounds = args.rounds or (3 if args.quick else 7)
    min_sample = 0.002 if args.quick else 0.02
    with_jax = jax_available() and not args.no_jax
    wanted = [w for w in args.cases.split(",") if w]
    cases = []
    for case in CASES:
        if wanted and not any(case["name"].startswith(w) for w in wanted):
            continue
        case = dict(case)
        if args.quick:
            case["N"], case["C"] = case["quick"]
            case["no_compile"] = case["name"] != "dense_ce_4096x1000"
        cases.append(case)

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "numpy", "softce", "softce._torch"]
                               + (["jax", "optax"] if with_jax else []))
    import softce
    import torch

    meta = {
        "softce": softce.__version__, "simd": softce.simd_target(), "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "rounds": rounds,
        "jax": with_jax, "quick": args.quick,
    }
    try:
        with open("/proc/cpuinfo") as f:
            meta["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass

    results = {}
    timeout = 120 if args.quick else 1800
    started = time.perf_counter()
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    for case in cases:
        itemsize = 2 if case.get("dtype") == "bfloat16" else 4
        r = results[case["name"]] = {"N": case["N"], "C": case["C"], "grad_bytes": case["N"] * case["C"] * itemsize,
                                     "time": {}}
        for threads in threads_list:
            task = dict(what="time", case=case, threads=threads, quick=args.quick, jax=with_jax, rounds=rounds,
                        min_sample=min_sample)
            out = run_in_child(ctx, task, timeout)
            r["time"][str(threads)] = out.get("ok", {"error": out.get("error")})
            if "error" in out:
                print(f"{case['name']} ({threads} threads): {out['error']}", file=sys.stderr)
        if not args.no_memory:
            r["memory"] = {}
            for name in implementation_names(case, with_jax):
                if name == "softce index CE, same shape" or (args.quick and name not in (SOFTCE, SOFTCE_INPLACE, TORCH)):
                    continue
                out = run_in_child(ctx, dict(what="memory", case=case, impl=name, threads=max(threads_list)),
                                   timeout)
                r["memory"][name] = out.get("ok", {"error": out.get("error")})
                if "error" in out:
                    print(f"{case['name']} memory of {name}: {out['error']}", file=sys.stderr)
        print(f"done: {case['name']} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)

    if hasattr(os, "getloadavg"):  # a busy machine explains noisy rows
        meta["load"] = (load_at_start, os.getloadavg()[0])
    print(report(results, threads_list, args.markdown, meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    failed = any("error" in t for r in results.values() for t in r["time"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
