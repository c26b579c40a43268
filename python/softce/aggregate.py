"""Soft labels from several noisy votes per item (crowd annotators, labelling functions).

NumPy in, NumPy out; the work is done by softce's C++ core (``softce/aggregate.hpp``), with
results identical for any ``softce.set_num_threads``. Votes come in one of two layouts:

* ``layout="wide"`` (default): an ``(items, annotators)`` integer array, the class id each
  annotator gave each item, or ``-1`` for no vote;
* ``layout="long"``: a ``(votes, 3)`` integer array of ``(item, annotator, label)`` rows
  (ids from 0; a repeated pair counts as two votes, as in crowd-kit).

Every item needs at least one vote (an item without any is a ``ValueError``). ``num_classes``
defaults to the largest class id + 1.

>>> import numpy as np, softce.aggregate as agg
>>> votes = np.array([[0, 0, 1], [2, -1, 2], [1, 0, -1]])
>>> agg.majority(votes)               # ties go to the lowest class id
array([0, 2, 0])
>>> agg.vote_fractions(votes)[0]
array([0.66666667, 0.33333333, 0.        ])
>>> result = agg.dawid_skene(votes, max_iterations=50)
>>> result.probabilities.shape, result.confusion.shape
((3, 3), (3, 3, 3))
"""

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from . import _core

__all__ = ["DawidSkeneResult", "dawid_skene", "majority", "vote_fractions"]


@dataclass
class DawidSkeneResult:
    """What :func:`dawid_skene` estimated.

    probabilities: (items, classes) posterior of each item's true class.
    priors: (classes,) class priors (mean posterior, from the last M-step).
    confusion: (annotators, classes, classes); ``confusion[j, k, l]`` = P(annotator j votes l |
        true class k), rows summing to 1 (an annotator without votes: uniform rows).
    accuracy: (annotators,) estimated accuracy, ``sum_k priors[k] * confusion[j, k, k]``.
    votes_per_annotator: (annotators,) how many votes each annotator cast.
    iterations: EM iterations run; converged: stopped by ``tolerance`` before the cap.
    log_likelihood: log p(votes) under the parameters that produced ``probabilities``
        (total and per item).
    """

    probabilities: np.ndarray
    priors: np.ndarray
    confusion: np.ndarray
    accuracy: np.ndarray
    votes_per_annotator: np.ndarray
    iterations: int
    converged: bool
    log_likelihood: float
    log_likelihood_per_item: float


def _votes(votes, layout):
    if layout not in ("wide", "long"):
        raise ValueError(f"layout: expected 'wide' or 'long', got {layout!r}")
    array = np.asarray(votes)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"votes: expected an integer array (class ids, -1 = no vote), got dtype "
                        f"{array.dtype}")
    if array.ndim != 2:
        shape = "(items, annotators)" if layout == "wide" else "(votes, 3)"
        raise ValueError(f"votes: expected a 2-D array {shape}, got shape {array.shape}")
    if array.dtype == np.uint64 and array.size and array.max() > np.iinfo(np.int64).max:
        raise ValueError(f"votes: expected ids below 2**63, got {array.max()}")
    return np.ascontiguousarray(array, dtype=np.int64)


def _num_classes(votes, layout, num_classes):
    if num_classes is not None:
        return int(num_classes)
    labels = votes if layout == "wide" else votes[:, 2]
    return int(labels.max()) + 1 if labels.size else 1


def majority(votes, num_classes: Optional[int] = None, *, layout: str = "wide",
             num_items: int = 0, num_annotators: int = 0) -> np.ndarray:
    """Majority vote per item, int64 ``(items,)``; a tie goes to the lowest class id (as
    crowd-kit's ``MajorityVote``). ``num_items`` / ``num_annotators`` (long layout): 0 infers
    them as the largest id + 1."""
    v = _votes(votes, layout)
    labels = _core.aggregate_majority(v, layout, int(num_items), int(num_annotators),
                                      _num_classes(v, layout, num_classes))
    return labels.view(np.int64)  # NumPy's own int64 (the binding's is C's long long)


def vote_fractions(votes, num_classes: Optional[int] = None, *, layout: str = "wide",
                   num_items: int = 0, num_annotators: int = 0) -> np.ndarray:
    """Per item, the fraction of its votes for each class: float64 ``(items, classes)``."""
    v = _votes(votes, layout)
    return _core.aggregate_vote_fractions(v, layout, int(num_items), int(num_annotators),
                                          _num_classes(v, layout, num_classes))


def dawid_skene(votes, num_classes: Optional[int] = None, *, layout: str = "wide",
                max_iterations: int = 100, tolerance: float = 1e-5, smoothing: float = 0.0,
                floor: float = 1e-10, num_items: int = 0, num_annotators: int = 0,
                callback: Optional[Callable[[int, float], None]] = None) -> DawidSkeneResult:
    """Dawid & Skene's EM (1979), as crowd-kit's ``DawidSkene``: per-annotator confusion
    matrices and class priors, started from the vote fractions.

    Stops after ``max_iterations`` or when the log-likelihood per item improves by less than
    ``tolerance`` (0: run every iteration). ``smoothing`` is added to every confusion count
    (0: maximum likelihood); ``floor`` (crowd-kit's 1e-10) bounds the class priors and the
    confusion counts of the labels an annotator used from below, so every log stays finite.
    ``callback(iteration, log_likelihood_per_item)`` is called after every iteration.
    """
    v = _votes(votes, layout)
    d = _core.aggregate_dawid_skene(v, layout, int(num_items), int(num_annotators),
                                    _num_classes(v, layout, num_classes), int(max_iterations),
                                    float(tolerance), float(smoothing), float(floor), callback)
    d["votes_per_annotator"] = d["votes_per_annotator"].view(np.int64)
    return DawidSkeneResult(**d)
