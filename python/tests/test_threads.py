"""Concurrent calls from several Python threads: the results equal the sequential ones
bitwise, and the kernels release the GIL."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

import softce


def make_jobs(count):
    jobs = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        N, C = int(torch.randint(1, 400, (1,), generator=g)), int(torch.randint(2, 60, (1,),
                                                                                  generator=g))
        x = torch.randn(N, C, generator=g, requires_grad=True)
        t = torch.softmax(torch.randn(N, C, generator=g), 1)
        kind = i % 5
        if kind == 0:
            jobs.append((x, lambda x, t=t: softce.cross_entropy(x, t, label_smoothing=0.1)))
        elif kind == 1:
            idx = torch.randint(0, C, (N,), generator=g)
            jobs.append((x, lambda x, idx=idx: softce.cross_entropy(x, idx, reduction="sum")))
        elif kind == 2:
            jobs.append((x, lambda x, t=t: softce.kl_div(x, t, reduction="batchmean")))
        elif kind == 3:
            jobs.append((x, lambda x, t=t: softce.binary_cross_entropy_with_logits(x, t)))
        else:
            jobs.append((x, lambda x, t=t: softce.distillation_loss(x, t * 5,
                                                                    divergence="jsd")))
    return jobs


def run(job):
    x, fn = job
    x = x.detach().clone().requires_grad_()
    loss = fn(x)
    loss.backward()
    return loss.detach(), x.grad


def test_concurrent_calls_match_sequential_bitwise():
    jobs = make_jobs(60)
    sequential = [run(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(3):
            concurrent = list(pool.map(run, jobs))
            for (a, ga), (b, gb) in zip(sequential, concurrent):
                assert torch.equal(a, b) and torch.equal(ga, gb)


def test_concurrent_numpy_calls_and_thread_setting():
    g = np.random.default_rng(0)
    arrays = [(g.standard_normal((500, 33)), g.integers(0, 33, 500)) for _ in range(16)]
    expected = [softce.cross_entropy(x, t, return_grad=True) for x, t in arrays]

    def work(i):
        if i % 4 == 0:  # changing the thread count while others compute is safe
            softce.set_num_threads(1 + i % 3)
        x, t = arrays[i % len(arrays)]
        return i % len(arrays), softce.cross_entropy(x, t, return_grad=True)

    before = softce.get_num_threads()
    try:
        with ThreadPoolExecutor(max_workers=6) as pool:
            for i, (loss, grad) in pool.map(work, range(64)):
                assert loss == expected[i][0]
                np.testing.assert_array_equal(grad, expected[i][1])
    finally:
        softce.set_num_threads(before)


def test_kernels_release_the_gil():
    """While one thread is inside a long kernel call, another Python thread keeps running."""
    x = torch.randn(8000, 1000)
    t = torch.softmax(torch.randn(8000, 1000), 1)
    softce.cross_entropy(x, t)  # warm up
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.0005)

    before = softce.get_num_threads()
    softce.set_num_threads(1)
    thread = threading.Thread(target=ticker)
    thread.start()
    try:
        time.sleep(0.01)
        longest = (0.0, 0.0)
        for _ in range(3):
            start = time.perf_counter()
            softce.cross_entropy(x, t, return_grad=True)
            end = time.perf_counter()
            longest = max(longest, (end - start, start), key=lambda p: p[0])
        duration, start = longest
    finally:
        stop.set()
        thread.join()
        softce.set_num_threads(before)
    inside = [tick for tick in ticks if start < tick < start + duration]
    assert duration > 0.005, "the call is too short to tell"
    # Holding the GIL would allow no tick at all during the call.
    assert len(inside) >= 2, (duration, len(inside))


def _forked_loss(queue, x, t):
    softce.set_num_threads(2)
    x = x.clone().requires_grad_()
    loss = softce.cross_entropy(x, t)
    loss.backward()
    queue.put((loss.detach().numpy().copy(), x.grad.numpy().copy()))  # plain arrays: no shared-memory handles


def test_a_forked_child_after_parallel_calls_computes_the_same_bits():
    """softce's ranges run on OpenMP, the runtime of torch's own threads; GNU libgomp cannot
    run a parallel region in a child forked after the parent ran one (it would hang), so a
    forked child computes on one thread: the same bits, no hang. Torch itself is kept out of
    parallel regions in the child (its DataLoader workers do the same)."""
    import multiprocessing as mp

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3 * 65536 + 5, generator=g)
    t = torch.softmax(torch.randn(2, 3 * 65536 + 5, generator=g), 1)
    before = softce.get_num_threads()
    softce.set_num_threads(2)
    try:
        expected = run((x.requires_grad_(), lambda x: softce.cross_entropy(x, t)))  # parallel here
        ctx = mp.get_context("fork")
        queue = ctx.Queue()
        old_torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)  # torch's own ops in the child: no parallel region of torch's
        try:
            child = ctx.Process(target=_forked_loss, args=(queue, x.detach(), t))
            child.start()
            loss, grad = queue.get(timeout=60)
            child.join(timeout=60)
        finally:
            torch.set_num_threads(old_torch_threads)
        assert child.exitcode == 0
        assert np.array_equal(loss, expected[0].numpy()) and np.array_equal(grad, expected[1].numpy())
    finally:
        softce.set_num_threads(before)
