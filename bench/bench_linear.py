#!/usr/bin/env python3
"""The fused output layer + loss (softce.linear_cross_entropy / linear_distillation_loss)
against PyTorch eager F.linear + the loss, torch.compile of the same lines, Cut
Cross-Entropy (impl="torch_compile", index targets) and the three matrix products alone (the
GEMM floor), forward + backward w.r.t. hidden states and weight, on the issue's shapes:

    N = 4096, D = 1024, V = 32000      and      N = 2048, D = 2048, V = 128256

Every (shape, target, implementation) runs in its own subprocess (a fresh heap):
  - inputs are built and touched, then one call is made cold: "cold extra" is the rise of
    ru_maxrss over the inputs during that call (compilation included for compiled peers);
  - then the RSS high-water mark is reset (/proc/self/clear_refs) and one more call made:
    "peak extra" is VmHWM above the RSS just before that call (the warm call's own memory);
  - then `--reps` calls are timed; the median is reported.
Rows: "x floor" is the time over the GEMM floor's time (the three products alone, torch.mm
into preallocated outputs); "loss only" is softce's fused loss over the same N x V logits in
blocks of the default budget (the non-GEMM part of softce's time).

  python bench/bench_linear.py                    # everything (about 15-25 min on 2 cores)
  python bench/bench_linear.py --quick            # small shapes, a smoke run
  python bench/bench_linear.py --shapes small --targets index --impls softce,eager
  python bench/bench_linear.py --markdown         # a markdown table

Threads: torch and softce both on --threads (default 2). PYTHONPATH must reach a softce
package with the linear module (e.g. a build directory's python/).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SHAPES = {
    "small": (4096, 1024, 32000),
    "large": (2048, 2048, 128256),
}
QUICK = {"small": (256, 128, 4000), "large": (128, 256, 16000)}
TARGETS = ["index", "probs", "topk", "distill_hidden", "index_bf16"]
IMPLS = ["softce", "eager", "compile", "cce", "floor", "loss_only"]
# which implementations exist for which targets
SUPPORTED = {
    "index": ["softce", "eager", "compile", "cce", "floor", "loss_only"],
    "probs": ["softce", "eager", "floor"],
    "topk": ["softce", "eager", "floor"],
    "distill_hidden": ["softce", "eager", "floor"],
    "index_bf16": ["softce", "eager", "floor"],
}
K_TOPK = 64
D_TEACHER = 512  # teacher hidden size for distillation from teacher hidden states


def rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------
# one measurement (child process)


def child(shape, target, impl, threads, reps, budget):
    import torch

    import softce

    torch.set_num_threads(threads)
    softce.set_num_threads(threads)
    # the code path warmed up on a tiny problem first (imports, operator registration, a
    # first compilation), so that the cold call below measures the call, not the imports
    make_run(torch, softce, (16, 24, 40), target, impl, budget)()
    run = make_run(torch, softce, shape, target, impl, budget)
    # inputs are built (and touched); the cold call's memory rise, then a warm call's peak
    base_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    base_rss = rss_kib("VmRSS")
    cold_time = cold_extra = float("nan")
    if not os.environ.get("BENCH_LINEAR_NO_COLD"):  # --no-cold: the warm call only
        s = time.perf_counter()
        run()
        cold_time = time.perf_counter() - s
        cold_extra = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - max(base_max, base_rss))
    # softce keeps released gradients and blocks for reuse (softce.set_gradient_cache): let
    # them go, so that the warm call's peak counts every buffer the call uses
    softce.set_gradient_cache(0)
    softce.set_gradient_cache(4)
    have_hwm = reset_hwm()
    before = rss_kib("VmRSS")
    s = time.perf_counter()
    run()
    times = [time.perf_counter() - s]
    peak = rss_kib("VmHWM") - before if have_hwm else None
    for _ in range(reps - 1):
        s = time.perf_counter()
        run()
        times.append(time.perf_counter() - s)
    print(json.dumps(dict(shape=list(shape), target=target, impl=impl, threads=threads,
                          time=statistics.median(times), times=times, cold_time=cold_time,
                          cold_extra_mib=cold_extra / 1024,
                          peak_extra_mib=None if peak is None else peak / 1024,
                          inputs_mib=base_rss / 1024)))


_INPUTS = {}


def child_interleaved(shape, target, impls, threads, rounds, budget):
    """Times every implementation in one process, in a rotating order per round (robust to a
    machine whose load changes): the median time and the median per-round ratio to the GEMM
    floor and to softce."""
    import torch

    import softce

    torch.set_num_threads(threads)
    softce.set_num_threads(threads)
    runs = {impl: make_run(torch, softce, shape, target, impl, budget) for impl in impls}
    for run in runs.values():  # warm-up (compilation)
        run()
    times = {impl: [] for impl in impls}
    for r in range(rounds):
        order = impls[r % len(impls):] + impls[: r % len(impls)]
        for impl in order:
            s = time.perf_counter()
            runs[impl]()
            times[impl].append(time.perf_counter() - s)
    out = {}
    for impl in impls:
        row = dict(time=statistics.median(times[impl]), times=times[impl])
        for ref in ("floor", "softce"):
            if ref in times:
                row["x_" + ref] = statistics.median(a / b for a, b in zip(times[impl], times[ref]))
        out[impl] = row
    print(json.dumps(dict(shape=list(shape), target=target, threads=threads, load=os.getloadavg()[0],
                          results=out)))


def make_inputs(torch, softce, shape, target, dtype):
    N, D, V = shape
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g) / D ** 0.5).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    extra = {}
    if target == "probs":
        p = torch.rand(N, V, generator=g)
        extra["p"] = p.div_(p.sum(1, keepdim=True))
    if target == "topk":
        # in row chunks: no N x V temporary before the measurement
        K = min(K_TOPK, V)
        parts = [torch.rand(min(256, N - r), V, generator=g).topk(K, dim=1) for r in range(0, N, 256)]
        vals = torch.cat([p.values for p in parts]) if parts else torch.empty(0, K)
        idx = torch.cat([p.indices for p in parts]) if parts else torch.empty(0, K, dtype=torch.int64)
        extra["topk"] = softce.TopK(idx, vals / vals.sum(1, keepdim=True))
    if target == "distill_hidden":
        extra["th"] = torch.randn(N, D_TEACHER, generator=g)
        extra["tw"] = torch.randn(V, D_TEACHER, generator=g) / D_TEACHER ** 0.5

    return h, w, t, extra


def make_run(torch, softce, shape, target, impl, budget):
    """The inputs of one case and a closure running one forward + backward."""
    import torch.nn.functional as F

    from softce.linear import linear_cross_entropy, linear_distillation_loss

    N, D, V = shape
    dtype = torch.bfloat16 if target.endswith("bf16") else torch.float32
    if (shape, target) in _INPUTS:  # shared by the implementations of an interleaved run
        h, w, t, extra = _INPUTS[(shape, target)]
    else:
        h, w, t, extra = _INPUTS.setdefault((shape, target), make_inputs(torch, softce, shape, target, dtype))
    def loss_softce():
        if target in ("index", "index_bf16"):
            return linear_cross_entropy(h, w, t, memory_budget=budget)
        if target == "probs":
            return linear_cross_entropy(h, w, extra["p"], memory_budget=budget)
        if target == "topk":
            return linear_cross_entropy(h, w, extra["topk"], memory_budget=budget)
        return linear_distillation_loss(h, w, extra["th"], teacher_weight=extra["tw"],
                                        memory_budget=budget)

    def loss_eager():
        logits = F.linear(h, w)
        if target in ("index", "index_bf16"):
            return F.cross_entropy(logits, t)
        if target == "probs":
            return F.cross_entropy(logits, extra["p"])
        if target == "topk":  # what a user does without softce: scatter into a dense target
            tk = extra["topk"]
            dense = torch.zeros(N, V).scatter_(1, tk.indices, tk.values)
            return F.cross_entropy(logits, dense)
        with torch.no_grad():
            teacher = F.linear(extra["th"], extra["tw"])
        return F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher, -1),
                        reduction="batchmean", log_target=True)

    L = Gh = Gw = None
    if impl == "floor":
        L = torch.empty(N, V, dtype=dtype)
        Gh = torch.empty(N, D, dtype=dtype)
        Gw = torch.empty(V, D, dtype=dtype)
        hd, wd = h.detach(), w.detach()

        def run():
            torch.mm(hd, wd.t(), out=L)
            torch.mm(L, wd, out=Gh)
            torch.mm(L.t(), hd, out=Gw)
    elif impl == "loss_only":
        itemsize = 4
        b = budget if budget is not None else max(64 << 20, min(N, 512) * V * itemsize)
        B = max(1, min(N, b // (V * itemsize)))
        L = torch.randn(B, V)

        def run():
            for r0 in range(0, N, B):
                r1 = min(N, r0 + B)
                softce._core.cross_entropy(L[: r1 - r0], t[r0:r1], None, -100, "sum", 0.0, None,
                                           L[: r1 - r0], None)
    else:
        if impl == "softce":
            f = loss_softce
        elif impl == "eager":
            f = loss_eager
        elif impl == "compile":
            f = torch.compile(loss_eager)
        elif impl == "cce":
            from cut_cross_entropy import linear_cross_entropy as cce

            def f():
                return cce(h, w, t, impl="torch_compile")
        else:
            raise SystemExit(f"unknown impl {impl}")

        def run():
            f().backward()
            # dropped after the call, so that the RSS before the next call holds only the
            # inputs (the gradients are part of each call's own memory)
            h.grad = None
            w.grad = None

    return run



# ---------------------------------------------------------------------------------------
# the driver


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="small,large")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=0, help="timed calls (default 3 small, 1 large)")
    ap.add_argument("--budget", type=int, default=None,
                    help="softce's memory_budget in bytes (default: softce's own default)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--interleaved", type=int, default=0, metavar="ROUNDS",
                    help="time all implementations in one process per case, ROUNDS rounds in a "
                         "rotating order (no memory columns)")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold call (faster; no cold columns)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        c = json.loads(args.child)
        if "impls" in c:
            child_interleaved(tuple(c["shape"]), c["target"], c["impls"], c["threads"], c["rounds"],
                              c["budget"])
        else:
            child(tuple(c["shape"]), c["target"], c["impl"], c["threads"], c["reps"], c["budget"])
        return
    if args.interleaved:
        return interleaved(args)
    if args.no_cold:
        os.environ["BENCH_LINEAR_NO_COLD"] = "1"

    results = []
    print(f"# CPU: {cpu_model()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; "
          f"threads {args.threads}; budget {'default' if args.budget is None else args.budget >> 20} MiB", flush=True)
    for shape_name in args.shapes.split(","):
        shape = (QUICK if args.quick else SHAPES)[shape_name]
        reps = args.reps or (3 if shape_name == "small" or args.quick else 1)
        for target in args.targets.split(","):
            for impl in args.impls.split(","):
                if impl not in SUPPORTED[target]:
                    continue
                spec = json.dumps(dict(shape=shape, target=target, impl=impl, threads=args.threads,
                                       reps=reps, budget=args.budget))
                proc = subprocess.run([sys.executable, __file__, "--child", spec],
                                      capture_output=True, text=True)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
                if proc.returncode != 0 or not lines:
                    err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    print(f"{shape} {target:15s} {impl:10s} FAILED: {err}", flush=True)
                    continue
                r = json.loads(lines[-1])
                results.append(r)
                peak = r["peak_extra_mib"]
                print(f"{str(shape):22s} {target:15s} {impl:10s} time {r['time']:8.3f} s   "
                      f"peak extra {peak if peak is None else round(peak):>7} MiB   "
                      f"cold extra {r['cold_extra_mib']:8.0f} MiB   cold time {r['cold_time']:.2f} s",
                      flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.markdown:
        print_markdown(results)


def interleaved(args):
    print(f"# CPU: {cpu_model()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; "
          f"threads {args.threads}; budget {'default' if args.budget is None else args.budget >> 20} MiB; interleaved, "
          f"{args.interleaved} rounds", flush=True)
    results = []
    for shape_name in args.shapes.split(","):
        shape = (QUICK if args.quick else SHAPES)[shape_name]
        for target in args.targets.split(","):
            impls = [i for i in args.impls.split(",") if i in SUPPORTED[target]]
            spec = json.dumps(dict(shape=shape, target=target, impls=impls, threads=args.threads,
                                   rounds=args.interleaved, budget=args.budget))
            proc = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{shape} {target} FAILED: {err}", flush=True)
                continue
            r = json.loads(lines[-1])
            results.append(r)
            for impl, row in r["results"].items():
                print(f"{str(shape):22s} {target:15s} {impl:10s} time {row['time']:8.3f} s   "
                      f"x floor {row.get('x_floor', float('nan')):5.2f}   "
                      f"x softce {row.get('x_softce', float('nan')):5.2f}   (load {r['load']:.1f})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.markdown:
        print("\n| N, D, V | target | implementation | time (s) | x floor | x softce |")
        print("| --- | --- | --- | ---: | ---: | ---: |")
        for r in results:
            for impl, row in r["results"].items():
                print(f"| {', '.join(map(str, r['shape']))} | {r['target']} | {impl} | {row['time']:.3f} | "
                      f"{row.get('x_floor', float('nan')):.2f} | {row.get('x_softce', float('nan')):.2f} |")


def print_markdown(results):
    by = {(tuple(r["shape"]), r["target"], r["impl"]): r for r in results}
    print("\n| N, D, V | target | implementation | time (s) | x floor | x softce | peak extra (MiB) | cold extra (MiB) |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for (shape, target, impl), r in by.items():
        floor = by.get((shape, target, "floor"))
        soft = by.get((shape, target, "softce"))
        xf = f"{r['time'] / floor['time']:.2f}" if floor else ""
        xs = f"{r['time'] / soft['time']:.2f}" if soft else ""
        peak = "" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.0f}"
        print(f"| {', '.join(map(str, shape))} | {target} | {impl} | {r['time']:.3f} | {xf} | {xs} | "
              f"{peak} | {r['cold_extra_mib']:.0f} |")


if __name__ == "__main__":
    main()
