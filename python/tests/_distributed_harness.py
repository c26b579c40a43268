"""What the torch.distributed tests share (test_distributed.py, test_linear_distributed.py and
their case modules, _distributed_cases.py and _linear_distributed_cases.py): spawning one job of
`world` ranks on loopback ports, cutting it off at a deadline, reading the one JSON line per case
and rank that it writes, and the rank's context: its process group and its share of the classes.
Not collected by pytest itself (the name has no test_ prefix).
"""

import json
import socket
import time

import torch.distributed as dist
import torch.multiprocessing as mp


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


def run_job(worker, args, world, out_dir, deadline_s):
    """Spawns `world` ranks of worker(rank, *args), killed past deadline_s; returns
    ({rank: {case: error}}, problem) from the <out_dir>/rank<r>.jsonl files they wrote."""
    context = mp.start_processes(worker, args=args, nprocs=world, join=False, start_method="spawn")
    problem = None
    deadline = time.monotonic() + deadline_s
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                problem = f"the job ran past {deadline_s} s and was killed"
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


def job_fixture(run_job, prefix):
    """A module-scoped fixture: get(world) runs run_job(world, a fresh <prefix><world> folder)
    once per world size and hands back its (results, problem) after that."""
    import pytest  # here, not at the top: the spawned ranks import this module too

    @pytest.fixture(scope="module")
    def job(tmp_path_factory):
        done = {}

        def get(world):
            if world not in done:
                done[world] = run_job(world, tmp_path_factory.mktemp(f"{prefix}{world}"))
            return done[world]

        return get

    return job


def check_case(results, problem, world, name):
    """Every rank finished case `name` without an error."""
    for rank in range(world):
        assert name in results[rank], f"rank {rank} did not finish this case ({problem})"
        error = results[rank][name]
        assert error is None, f"rank {rank} of {world}:\n{error}"


class RankContext:
    """A rank's place in the job: the WORLD group and its classes [lo, hi) of sizes[world]."""

    def __init__(self, rank, world, dtype, sizes):
        self.rank, self.world, self.dtype = rank, world, dtype
        self.group = dist.group.WORLD
        sizes = sizes[world]
        self.lo = sum(sizes[:rank])
        self.hi = self.lo + sizes[rank]
