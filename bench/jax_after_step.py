"""softce's default call right after a `jax.jit` step, after the same step and a pause, and
with no JAX in between (the reproduction of docs/benchmarks.md "The default call between
JAX steps"): XLA's CPU threads keep spinning for a while after a step and share the cores
with the next multi-threaded call.

    python bench/jax_after_step.py [--threads 2] [--calls 10] [--pause-ms 50]
"""

import argparse
import statistics
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--pause-ms", type=float, default=50.0)
    ap.add_argument("--shape", default="1024x32000", help="N x C of the soft-label CE")
    a = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import optax
    import torch

    import softce

    torch.set_num_threads(a.threads)
    softce.set_num_threads(a.threads)
    N, C = (int(v) for v in a.shape.split("x"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, generator=g).requires_grad_()
    t = torch.softmax(torch.randn(N, C, generator=g), 1)
    xj, tj = jnp.asarray(x.detach().numpy()), jnp.asarray(t.numpy())
    step = jax.jit(jax.value_and_grad(lambda a, b: optax.softmax_cross_entropy(a, b).mean()))

    def softce_call():
        x.grad = None
        softce.cross_entropy(x, t).backward()

    def jax_step():
        step(xj, tj)[1].block_until_ready()

    for _ in range(3):
        softce_call()
        jax_step()
    print(f"softce.cross_entropy fwd+bwd {N}x{C}, default call, {a.threads} threads, "
          f"{a.calls} calls each (ms)")
    for label, pause in (("right after a jax.jit step", 0.0),
                         (f"after a jax.jit step and {a.pause_ms:g} ms", a.pause_ms / 1e3),
                         ("no JAX in between", None)):
        times = []
        for _ in range(a.calls):
            if pause is not None:
                jax_step()
                if pause:
                    time.sleep(pause)
            s = time.perf_counter()
            softce_call()
            times.append((time.perf_counter() - s) * 1e3)
        print(f"  {label:34s} median {statistics.median(times):6.1f}   "
              + " ".join(f"{v:.1f}" for v in times))


if __name__ == "__main__":
    main()
