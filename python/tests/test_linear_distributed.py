"""The fused output layer class-parallel on torch.distributed (softce.linear_* with
process_group=): 2 and 3 processes with gloo on loopback, spawned here, against the
single-process result (_linear_distributed_cases.py has the cases and what they check). All
cases of one world size run in one spawned job; a job past its deadline is killed, so a hang
fails the cases it did not finish instead of blocking the suite.
"""

import json
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _linear_distributed_cases as cases
from test_distributed import free_ports

assert dist.is_available() and dist.is_gloo_available(), "torch.distributed with gloo is not available"

WORLDS = (2, 3)
DEADLINE_S = 150


def run_job(world, out_dir):
    (port,) = free_ports(1)
    context = mp.start_processes(cases.worker, args=(world, port, str(out_dir)), nprocs=world,
                                 join=False, start_method="spawn")
    problem = None
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                problem = f"the job ran past {DEADLINE_S} s and was killed"
                break
    except Exception as e:  # noqa: BLE001
        problem = f"a rank failed: {e}"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()
    results = {}
    for rank in range(world):
        path = out_dir / f"rank{rank}.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        results[rank] = {r["case"]: r["error"] for r in map(json.loads, lines)}
    return results, problem


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    done = {}

    def get(world):
        if world not in done:
            done[world] = run_job(world, tmp_path_factory.mktemp(f"linear_world{world}"))
        return done[world]

    return get


@pytest.mark.parametrize("name", list(cases.CASES))
@pytest.mark.parametrize("world", WORLDS)
def test_case(job, world, name):
    results, problem = job(world)
    for rank in range(world):
        assert name in results[rank], f"rank {rank} did not finish this case ({problem})"
        error = results[rank][name]
        assert error is None, f"rank {rank} of {world}:\n{error}"


def test_process_group_without_torch_distributed_initialised():
    import softce

    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="linear_cross_entropy: process_group: torch.distributed is not initialised"):
        softce.linear_cross_entropy(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, dtype=torch.int64),
                                    process_group=object())
