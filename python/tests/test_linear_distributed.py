"""The fused output layer class-parallel on torch.distributed (softce.linear_* with
process_group=): 2 and 3 processes with gloo on loopback, spawned here, against the
single-process result (_linear_distributed_cases.py has the cases and what they check). All
cases of one world size run in one spawned job; a job past its deadline is killed, so a hang
fails the cases it did not finish instead of blocking the suite.
"""

import pytest
import torch
import torch.distributed as dist

import _linear_distributed_cases as cases
from _distributed_harness import check_case, free_ports, job_fixture
from _distributed_harness import run_job as run_job_of

assert dist.is_available() and dist.is_gloo_available(), "torch.distributed with gloo is not available"

WORLDS = (2, 3)
DEADLINE_S = 150


def run_job(world, out_dir):
    (port,) = free_ports(1)
    return run_job_of(cases.worker, (world, port, str(out_dir)), world, out_dir, DEADLINE_S)


job = job_fixture(run_job, "linear_world")


@pytest.mark.parametrize("name", list(cases.CASES))
@pytest.mark.parametrize("world", WORLDS)
def test_case(job, world, name):
    check_case(*job(world), world, name)


def test_process_group_without_torch_distributed_initialised():
    import softce

    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="linear_cross_entropy: process_group: torch.distributed is not initialised"):
        softce.linear_cross_entropy(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, dtype=torch.int64),
                                    process_group=object())
