"""softce.aggregate against crowd-kit (pinned in requirements-dev.txt): the same Dawid-Skene
posteriors, priors and confusion matrices as crowd-kit's ``DawidSkene`` with the same
initialisation (vote fractions) and iteration count, to 1e-6; the same majority vote and vote
fractions as its ``MajorityVote``; the long layout; thread-count invariance; the errors; and
the speed ratio against crowd-kit measured in one run.

    python3 python/tests/test_aggregate.py --bench   # 60000 x 5 x 10, 50 iterations
"""

import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from crowdkit.aggregation import DawidSkene, MajorityVote

import softce
import softce.aggregate as agg


def simulate(items, annotators, classes, seed, abstain=0.2):
    """Wide votes (-1 = no vote) from annotators with class-dependent confusion (errors go to
    a neighbouring class more often than to others); every item keeps at least one vote."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, classes, items)
    accuracy = rng.uniform(0.45, 0.95, annotators)
    votes = np.empty((items, annotators), np.int64)
    for j in range(annotators):
        right = rng.random(items) < accuracy[j]
        neighbour = (truth + rng.choice([1, classes - 1], items)) % classes
        anything = rng.integers(0, classes, items)
        wrong = np.where(rng.random(items) < 0.7, neighbour, anything)
        votes[:, j] = np.where(right, truth, wrong)
    votes[rng.random((items, annotators)) < abstain] = -1
    empty = (votes < 0).all(1)
    votes[empty, 0] = truth[empty]
    return votes, truth


def to_frame(votes):
    task, worker = np.nonzero(votes >= 0)
    return pd.DataFrame({"task": task, "worker": worker, "label": votes[task, worker]})


@pytest.mark.parametrize("shape,iterations", [((500, 5, 4), 10), ((2000, 7, 10), 30),
                                              ((300, 3, 2), 50)])
def test_dawid_skene_equals_crowdkit(shape, iterations):
    votes, _ = simulate(*shape, seed=sum(shape))
    classes = shape[2]
    ck = DawidSkene(n_iter=iterations, tol=-np.inf).fit(to_frame(votes))  # never stops early
    ours = agg.dawid_skene(votes, classes, max_iterations=iterations, tolerance=0)
    assert ours.iterations == len(ck.loss_history_) == iterations
    probas = ck.probas_.reindex(index=range(shape[0]), columns=range(classes)).to_numpy()
    np.testing.assert_allclose(ours.probabilities, probas, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours.priors, ck.priors_.reindex(range(classes)).to_numpy(),
                               rtol=0, atol=1e-6)
    # crowd-kit's errors_[(worker, observed), true] = our confusion[worker, true, observed]
    for (worker, observed), row in ck.errors_.iterrows():
        np.testing.assert_allclose(ours.confusion[worker, :, observed],
                                   row.reindex(range(classes)).to_numpy(), rtol=0, atol=1e-6)
    assert (ours.probabilities.argmax(1) == probas.argmax(1)).mean() > 0.999


def test_majority_and_fractions_equal_crowdkit():
    votes, _ = simulate(3000, 4, 5, seed=1, abstain=0.4)  # many ties
    mv = MajorityVote()
    labels = mv.fit_predict(to_frame(votes)).sort_index().to_numpy()
    ties = 0
    for row in votes:
        counts = np.bincount(row[row >= 0], minlength=5)
        ties += (counts == counts.max()).sum() > 1
    assert ties > 300
    np.testing.assert_array_equal(agg.majority(votes, 5), labels)
    fractions = mv.probas_.reindex(index=range(3000), columns=range(5), fill_value=0).to_numpy()
    np.testing.assert_allclose(agg.vote_fractions(votes, 5), fractions, rtol=0, atol=1e-15)


def test_long_layout_and_callback():
    votes, _ = simulate(800, 6, 3, seed=2)
    item, annotator = np.nonzero(votes >= 0)
    rows = np.stack([item, annotator, votes[item, annotator]], 1)[np.random.default_rng(0).permutation(len(item))]
    wide = agg.dawid_skene(votes, max_iterations=20, tolerance=0)
    history = []
    long = agg.dawid_skene(rows.astype(np.int32), layout="long", max_iterations=20, tolerance=0,
                           callback=lambda it, ll: history.append((it, ll)))
    np.testing.assert_allclose(long.probabilities, wide.probabilities, rtol=0, atol=1e-12)
    assert [it for it, _ in history] == list(range(1, 21))
    assert history[-1][1] == pytest.approx(long.log_likelihood_per_item)
    assert all(b >= a - 1e-12 for (_, a), (_, b) in zip(history, history[1:]))
    np.testing.assert_array_equal(agg.majority(rows, layout="long"), agg.majority(votes))
    np.testing.assert_array_equal(agg.vote_fractions(rows, 3, layout="long"),
                                  agg.vote_fractions(votes, 3))
    assert wide.votes_per_annotator.tolist() == (votes >= 0).sum(0).tolist()


def test_thread_count_invariance():
    votes, _ = simulate(50000, 5, 10, seed=3)
    saved = softce.get_num_threads()
    try:
        softce.set_num_threads(1)
        one = agg.dawid_skene(votes, max_iterations=5, tolerance=0)
        softce.set_num_threads(3)
        three = agg.dawid_skene(votes, max_iterations=5, tolerance=0)
    finally:
        softce.set_num_threads(saved)
    assert one.probabilities.tobytes() == three.probabilities.tobytes()
    assert one.confusion.tobytes() == three.confusion.tobytes()
    assert one.log_likelihood == three.log_likelihood


def test_errors():
    with pytest.raises(ValueError, match=r"^dawid_skene: votes: expected class ids in \[-1, 3\), "
                                         r"got 5 at \[1, 0\]$"):
        agg.dawid_skene(np.array([[0, 1], [5, 1]]), 3)
    with pytest.raises(ValueError, match=r"^majority: votes: expected at least one vote per item, "
                                         r"got none for item 1"):
        agg.majority(np.array([[0, 1], [-1, -1]]))
    with pytest.raises(TypeError, match="votes: expected an integer array"):
        agg.vote_fractions(np.array([[0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"votes: expected a 2-D array \(items, annotators\)"):
        agg.majority(np.array([0, 1]))
    with pytest.raises(ValueError, match=r"^dawid_skene: annotator: expected ids in \[0, 2\), "
                                         r"got 2 at \[1\]$"):
        agg.dawid_skene(np.array([[0, 0, 1], [0, 2, 1]]), layout="long", num_annotators=2)
    with pytest.raises(ValueError, match="expected shape \\(votes, 3\\)"):
        agg.dawid_skene(np.array([[0, 0], [0, 1]]), 2, layout="long")
    with pytest.raises(ValueError, match=r"^dawid_skene: max_iterations: expected a value >= 1"):
        agg.dawid_skene(np.array([[0, 1]]), max_iterations=0)
    with pytest.raises(ZeroDivisionError):
        agg.dawid_skene(np.array([[0, 1], [1, 1]]), callback=lambda it, ll: 1 / 0)


def test_docs_aggregate_md_python_blocks_run():
    text = (Path(__file__).resolve().parents[2] / "docs" / "aggregate.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert blocks
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/aggregate.md:{i}", "exec"), {"__name__": "__docs__"})


def measure(items=60000, annotators=5, classes=10, iterations=50, seed=0):
    """crowd-kit's DawidSkene and softce's on the same votes, in this one run: wall and CPU
    seconds of each (softce on its default thread count, and on one thread)."""
    votes, _ = simulate(items, annotators, classes, seed)
    frame = to_frame(votes)
    t, c = time.perf_counter(), time.process_time()
    ck = DawidSkene(n_iter=iterations, tol=-np.inf).fit(frame)
    ck_wall, ck_cpu = time.perf_counter() - t, time.process_time() - c
    saved = softce.get_num_threads()
    ours = {}
    try:
        for threads in (saved, 1):
            softce.set_num_threads(threads)
            best = (np.inf, np.inf)
            for _ in range(3):
                t, c = time.perf_counter(), time.process_time()
                r = agg.dawid_skene(votes, classes, max_iterations=iterations, tolerance=0)
                best = min(best, (time.perf_counter() - t, time.process_time() - c))
            ours[threads] = best
    finally:
        softce.set_num_threads(saved)
    probas = ck.probas_.reindex(index=range(items), columns=range(classes)).to_numpy()
    return ck_wall, ck_cpu, ours, saved, float(np.abs(r.probabilities - probas).max())


def test_faster_than_crowdkit():
    # A reduced size (the full one: --bench); CPU time on one thread, so the ratio holds on a
    # loaded machine too. The requirement at full size is >= 10x.
    ck_wall, ck_cpu, ours, _, difference = measure(items=20000, iterations=10)
    assert difference < 1e-6
    assert ck_cpu / ours[1][1] >= 10, (ck_cpu, ours)


if __name__ == "__main__" and "--bench" in sys.argv:
    ck_wall, ck_cpu, ours, threads, difference = measure()
    print("Dawid-Skene, 60000 items x 5 annotators x 10 classes, 50 EM iterations")
    print(f"crowd-kit DawidSkene:        {ck_wall:8.3f} s wall {ck_cpu:8.3f} s CPU")
    for n, (wall, cpu) in ours.items():
        print(f"softce.aggregate ({n} thread{'s' if n > 1 else ''}): {wall:8.3f} s wall {cpu:8.3f} "
              f"s CPU  -> {ck_wall / wall:6.1f}x (wall), {ck_cpu / cpu:6.1f}x (CPU)")
    print(f"max |posterior difference| = {difference:.2e}")
