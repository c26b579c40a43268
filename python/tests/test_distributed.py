"""Class-parallel losses on torch.distributed (process_group=): 2 and 3 processes with gloo
on loopback, spawned here, against the single-process softce result and torch's; and the
error cases, where every rank must raise instead of hanging.

All cases of one world size run in one spawned job (_distributed_cases.py; starting the
processes costs more than the cases), which writes one JSON line per case and rank; the
tests below only read them. The job ends with the example of docs/distributed.md, run
as torchrun would run it. A job that runs past its deadline is killed, so a hang fails
the tests of the cases it did not finish instead of blocking the suite.
"""

import json
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _distributed_cases as cases

# the pinned CPU torch has gloo; without it these tests must fail, not be skipped
assert dist.is_available() and dist.is_gloo_available(), "torch.distributed with gloo is not available"

WORLDS = (2, 3)
DOC = Path(__file__).resolve().parents[2] / "docs" / "distributed.md"
DEADLINE_S = 150  # per job; a case that hangs is cut off by gloo's timeout well before


def free_ports(n):
    """n distinct free ports on loopback (held open together while they are chosen)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run_job(world, out_dir):
    """Spawns `world` ranks running every case; returns ({rank: {case: error}}, problem)."""
    port, doc_port = free_ports(2)
    args = (world, port, str(out_dir), doc_port, str(DOC))
    context = mp.start_processes(cases.worker, args=args, nprocs=world, join=False,
                                 start_method="spawn")
    problem = None
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                problem = f"the job ran past {DEADLINE_S} s and was killed"
                break
    except Exception as e:  # noqa: BLE001  (a rank crashed)
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
            done[world] = run_job(world, tmp_path_factory.mktemp(f"world{world}"))
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
    # raised before any collective, so no process group is needed to see it
    import numpy as np

    import softce

    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        softce.cross_entropy(np.zeros((2, 3)), np.zeros(2, dtype=np.int64),
                             process_group=object())
