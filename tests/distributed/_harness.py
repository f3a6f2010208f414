"""Launch real multi-process gloo jobs for the distributed tests.

Each ``test_dist_*.py`` module doubles as its own worker script: the test
process (pytest) starts ``world_size`` copies of the module with
``python <module> <out_dir>`` and the environment variables that torchrun
would set (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``). The workers initialise one gloo process group, run every
scenario of the module in order, record per-rank results (or the exception
each rank raised) and write them to ``<out_dir>/rank<r>.pt``. One process
group per module keeps the suite's start-up cost to one launch per module.

Hangs fail instead of blocking CI: the process group has a short collective
timeout, and the launcher kills the whole job after a wall-clock deadline and
reports every rank's stderr.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

#: Collective timeout inside the workers: a scenario that hangs fails after this.
COLLECTIVE_TIMEOUT_S = 30.0


def free_port() -> int:
    """A TCP port that is free now (bound to port 0 and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WorkerFailure(RuntimeError):
    """A worker process exited non-zero or the job ran past its deadline."""


def launch(script: str | Path, world_size: int, *, timeout: float = 150.0) -> list[dict[str, Any]]:
    """Run ``script`` as a ``world_size``-process gloo job; return each rank's results.

    The returned list holds, for rank ``r``, the dict written by
    :func:`worker_main`: scenario name -> ``{"ok": True, "value": ...}`` or
    ``{"ok": False, "type": ..., "message": ...}``.
    """
    import torch

    out_dir = Path(tempfile.mkdtemp(prefix="vcpo_dist_"))
    last_error: str | None = None
    for _attempt in range(2):  # retry once if the port was taken in between
        port = free_port()
        procs = []
        logs = []
        for rank in range(world_size):
            env = dict(os.environ)
            env.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(world_size),
                LOCAL_WORLD_SIZE=str(world_size),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join(
                    [str(REPO), str(Path(script).parent), env.get("PYTHONPATH", "")]
                ),
            )
            log = open(out_dir / f"rank{rank}.log", "w+")  # noqa: SIM115
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(script), str(out_dir)],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=str(REPO),
                )
            )
        deadline = time.monotonic() + timeout
        timed_out = False
        for p in procs:
            remaining = deadline - time.monotonic()
            try:
                p.wait(timeout=max(remaining, 0.1))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
        if timed_out:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
        texts = []
        for log in logs:
            log.seek(0)
            texts.append(log.read())
            log.close()
        codes = [p.returncode for p in procs]
        if not timed_out and all(
            c == 0 or teardown_abort(c, texts[r], out_dir / f"rank{r}.pt")
            for r, c in enumerate(codes)
        ):
            return [
                torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world_size)
            ]
        report = "\n".join(
            f"--- rank {r} (exit {codes[r]}) ---\n{texts[r][-4000:]}" for r in range(world_size)
        )
        last_error = (
            f"distributed job {Path(script).name} "
            + (f"ran past {timeout:.0f}s and was killed" if timed_out else "failed")
            + f":\n{report}"
        )
        if "address already in use" not in report.lower() and "EADDRINUSE" not in report:
            break
    raise WorkerFailure(last_error)


#: What a rare gloo shutdown race prints (std::terminate at interpreter exit,
#: after every collective finished and destroy_process_group() returned).
TEARDOWN_ABORT = "terminate called without an active exception"


def teardown_abort(code: int | None, log: str, results: Path) -> bool:
    """A worker that wrote all its results and then aborted while shutting down.

    Seen about once in 10-20 two-rank runs on a loaded 2-core machine (torch
    2.13 CPU, gloo), with and without this library's collectives in flight;
    it happens after the results file was written, so nothing checked is lost.
    """
    return code == -6 and TEARDOWN_ABORT in log and results.exists()


# ----------------------------------------------------------------- worker side


def worker_main(scenarios: dict[str, Callable[[], Any]]) -> None:
    """Body of a worker process: run every scenario, record results, exit 0.

    A scenario returns any picklable value (tensors included). An exception is
    recorded with its type and message, so tests can assert that every rank
    raised the same error. After each scenario the ranks meet at a barrier,
    so a scenario that leaves ranks out of step fails there (within the
    collective timeout) instead of corrupting the next one.
    """
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    out_dir = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    results: dict[str, Any] = {}
    try:
        for name, fn in scenarios.items():
            t0 = time.perf_counter()
            try:
                results[name] = {"ok": True, "value": fn()}
            except Exception as exc:
                results[name] = {
                    "ok": False,
                    "type": type(exc).__name__,
                    "message": str(exc),
                    "traceback": traceback.format_exc(),
                }
            results[name]["seconds"] = time.perf_counter() - t0
            try:
                dist.barrier()
            except Exception as exc:  # a desynchronised scenario: stop here
                results[name]["barrier_error"] = repr(exc)
                break
    finally:
        torch.save(results, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


def value(results: list[dict[str, Any]], name: str, rank: int) -> Any:
    """The value of scenario ``name`` on ``rank``; fail with its traceback if it raised."""
    r = results[rank].get(name)
    if r is None:
        raise AssertionError(f"scenario {name!r} did not run on rank {rank}")
    if not r["ok"]:
        raise AssertionError(f"scenario {name!r} raised on rank {rank}:\n{r['traceback']}")
    return r["value"]


def values(results: list[dict[str, Any]], name: str) -> list[Any]:
    """``value(results, name, r)`` for every rank."""
    return [value(results, name, r) for r in range(len(results))]


def errors(results: list[dict[str, Any]], name: str) -> list[tuple[str, str]]:
    """``(type, message)`` of the exception scenario ``name`` raised on each rank."""
    out = []
    for rank, res in enumerate(results):
        r = res.get(name)
        if r is None:
            raise AssertionError(f"scenario {name!r} did not run on rank {rank}")
        if r["ok"]:
            raise AssertionError(f"scenario {name!r} did not raise on rank {rank}: {r['value']!r}")
        if "barrier_error" in r:
            raise AssertionError(f"ranks left out of step after {name!r}: {r['barrier_error']}")
        out.append((r["type"], r["message"]))
    return out
