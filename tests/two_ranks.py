"""The one multi-rank test harness: run a function on 2 (or N) local gloo ranks.

Processes fork from a fork server that has imported the harness modules (fairseq, torch, unilm_vl) once per test
session: an interpreter per rank spends most of a two-rank test importing, and forking the test process itself would
copy the thread pools and process-group state earlier tests left in it (a forked child can then block forever)."""

import io
import multiprocessing
import os
import socket
import tempfile
import traceback
from typing import Callable

import torch


def end_process_group() -> None:
    """Destroy this process's default group and fairseq's cached handle on it (``get_global_group`` keeps the first
    group it sees), so the next group starts clean."""
    import torch.distributed as dist
    from fairseq.distributed import utils as distributed_utils

    if dist.is_initialized():
        dist.destroy_process_group()
    if hasattr(distributed_utils.get_global_group, "_global_group"):
        del distributed_utils.get_global_group._global_group


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, fn: Callable, args: tuple, errors, log: str) -> None:
    import torch.distributed as dist

    # the rank's output (fairseq's and open_clip's logging, C-level writes) goes to its log file: the fork server's
    # descriptors are those of the pytest worker, outside the capture of the test that runs this rank
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        fn(rank, *args)
        dist.barrier()
    except BaseException:  # noqa: B902 - reported to the parent, which fails the test with it
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        end_process_group()


HARNESS_MODULES = ["trainer_harness", "unilm_vl.data.synthetic.world"]


def start_forkserver() -> None:
    """Start this process's multiprocessing fork server (if it is not running) with :data:`HARNESS_MODULES` imported.

    Python 3.11's fork server receives the parent's ``sys.path`` but does not use it, and it skips a preload module
    it cannot import without a word: this tests directory is not on a fresh interpreter's path, so every rank used
    to import fairseq, torch and unilm_vl itself (measured: an empty two-rank run took 6.7 s instead of 0.16 s). The
    server inherits the environment, so it starts with the directory in ``PYTHONPATH``. tests/conftest.py calls this
    at session start, before ``generate_world``'s pools would start the one server of the process with their own
    preload list (the world module, included here)."""
    from multiprocessing import forkserver

    here = os.path.dirname(os.path.abspath(__file__))
    multiprocessing.get_context("forkserver").set_forkserver_preload(HARNESS_MODULES)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([here, old] if old else [here])
    try:
        forkserver.ensure_running()
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old


def run_ranks(fn: Callable, args: tuple = (), world_size: int = 2, timeout: float = 300) -> None:
    """Run ``fn(rank, *args)`` in ``world_size`` processes with a gloo group initialised; raises with the ranks'
    tracebacks and the end of their output if one fails, and prints that output (for pytest to capture)
    otherwise. ``fn`` (a module-level function) writes what the test compares to files.

    The processes fork from a fork server that has imported this module (and with it fairseq and unilm_vl) once
    per test session (:func:`start_forkserver`): a torchrun launch spends most of its time importing, and forking
    the test process itself would copy the thread pools and process-group state earlier tests left in it."""
    start_forkserver()
    ctx = multiprocessing.get_context("forkserver")
    errors = ctx.Queue()
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="ranks-") as tmp:
        logs = [os.path.join(tmp, f"rank{r}.log") for r in range(world_size)]
        procs = [
            ctx.Process(target=_rank_main, args=(r, world_size, port, fn, args, errors, logs[r]))
            for r in range(world_size)
        ]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout)
        alive = [p for p in procs if p.is_alive()]
        for proc in alive:
            proc.kill()
        output = []
        for r, log in enumerate(logs):
            with open(log, errors="replace") if os.path.exists(log) else io.StringIO() as f:
                output.append(f"---- rank {r} output ----\n{f.read()}")
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    if alive or any(p.exitcode != 0 for p in procs) or messages:
        raise AssertionError(
            f"ranks failed (exit codes {[p.exitcode for p in procs]}, {len(alive)} hung):\n"
            + "\n".join(messages)
            + "\n"
            + "\n".join(text[-4000:] for text in output)
        )
    print("\n".join(output))
