"""Class-parallel losses on torch.distributed (process_group=): 2 and 3 processes with gloo
on loopback, spawned here, against the single-process softce result and torch's; and the
error cases, where every rank must raise instead of hanging.

All cases of one world size run in one spawned job (_distributed_cases.py; starting the
processes costs more than the cases), which writes one JSON line per case and rank; the
tests below only read them. The job ends with the example of docs/distributed.md, run
as torchrun would run it. A job that runs past its deadline is killed, so a hang fails
the tests of the cases it did not finish instead of blocking the suite.
"""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import _distributed_cases as cases
from _distributed_harness import check_case, free_ports, job_fixture
from _distributed_harness import run_job as run_job_of

# the pinned CPU torch has gloo; without it these tests must fail, not be skipped
assert dist.is_available() and dist.is_gloo_available(), "torch.distributed with gloo is not available"

WORLDS = (2, 3)
DOC = Path(__file__).resolve().parents[2] / "docs" / "distributed.md"
DEADLINE_S = 150  # per job; a case that hangs is cut off by gloo's timeout well before


def run_job(world, out_dir):
    """Spawns `world` ranks running every case; returns ({rank: {case: error}}, problem)."""
    port, doc_port = free_ports(2)
    args = (world, port, str(out_dir), doc_port, str(DOC))
    return run_job_of(cases.worker, args, world, out_dir, DEADLINE_S)


job = job_fixture(run_job, "world")


@pytest.mark.parametrize("name", list(cases.CASES))
@pytest.mark.parametrize("world", WORLDS)
def test_case(job, world, name):
    check_case(*job(world), world, name)


def test_process_group_without_torch_distributed_initialised():
    # raised before any collective, so no process group is needed to see it
    import numpy as np

    import softce

    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        softce.cross_entropy(np.zeros((2, 3)), np.zeros(2, dtype=np.int64),
                             process_group=object())
