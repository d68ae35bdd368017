"""fairseq's real training loop in the test process: parse ``fairseq-train`` arguments, set the task, model,
criterion and :class:`unilm_vl.trainer.UnilmTrainer` up as ``fairseq_cli.train.main`` does, and run updates.

In-process runs cost the model build and the steps only (no interpreter start and fairseq import per run), so the
precision tests can cover every family; the subprocess tests (``fairseq-train``, ``torchrun``) cover the CLI."""
import multiprocessing
import os
import socket
import traceback
from typing import Callable, List, Sequence, Tuple

import numpy as np
import torch
from fairseq import checkpoint_utils, options, tasks, utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.logging import metrics

from conftest import REPO
from unilm_vl.trainer import UnilmTrainer


def build_trainer(argv: Sequence[str]) -> Tuple[UnilmTrainer, object]:
    """``(trainer, epoch_itr)`` for ``fairseq-train ARGV`` (``--user-dir`` added), resumed from the save dir's
    ``checkpoint_last.pt`` if there is one, as ``fairseq_cli.train.main`` would."""
    argv = ["--user-dir", os.path.join(REPO, "unilm_vl"), *argv]
    args = options.parse_args_and_arch(options.get_training_parser(), input_args=list(argv))
    cfg = convert_namespace_to_omegaconf(args)
    np.random.seed(cfg.common.seed)
    utils.set_torch_seed(cfg.common.seed)
    metrics.reset()
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    trainer = UnilmTrainer(cfg, task, model, criterion)
    _, epoch_itr = checkpoint_utils.load_checkpoint(cfg.checkpoint, trainer,
                                                    disable_iterator_cache=task.has_sharded_data("train"))
    return trainer, epoch_itr


def train_updates(trainer: UnilmTrainer, epoch_itr, num_updates: int) -> List[dict]:
    """Run ``num_updates`` calls of ``trainer.train_step`` (one batch each, ``--update-freq 1``) within an epoch;
    returns each call's logging output (``None`` for a skipped fp16-overflow step)."""
    itr = epoch_itr.next_epoch_itr(shuffle=True)
    outputs = []
    with metrics.aggregate(new_root=True):
        for _ in range(num_updates):
            outputs.append(trainer.train_step([next(itr)]))
    return outputs


def end_process_group() -> None:
    """Destroy the 1-rank process group an in-process ``--fsdp2`` run made, and fairseq's cached handle on it
    (``distributed.utils.get_global_group`` keeps the first group it sees), so the next run starts clean."""
    import torch.distributed as dist
    from fairseq.distributed import utils as distributed_utils

    if dist.is_initialized():
        dist.destroy_process_group()
    if hasattr(distributed_utils.get_global_group, "_global_group"):
        del distributed_utils.get_global_group._global_group


def parameters(trainer: UnilmTrainer) -> dict:
    """The model's state (parameters, tied ones under each name, and buffers) as full CPU tensors by name; FSDP2's
    sharded ``DTensor``s are gathered."""
    out = {}
    for name, t in trainer.get_model().state_dict().items():
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        out[name] = t.detach().clone()
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, fn: Callable, args: tuple, errors) -> None:
    import torch.distributed as dist

    try:
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world_size))
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        fn(rank, *args)
        dist.barrier()
    except BaseException:  # noqa: B902 - reported to the parent, which fails the test with it
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        end_process_group()


def run_ranks(fn: Callable, args: tuple = (), world_size: int = 2, timeout: float = 300) -> None:
    """Run ``fn(rank, *args)`` in ``world_size`` processes with a gloo group initialised; raises with the ranks'
    tracebacks if one fails. ``fn`` (a module-level function) writes what the test compares to files.

    The processes fork from a fork server that has imported this module (and with it fairseq and unilm_vl) once
    per test session: a torchrun launch spends most of its time importing, and forking the test process itself
    would copy the thread pools and process-group state earlier tests left in it."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    errors = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, fn, args, errors)) for r in range(world_size)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout)
    alive = [p for p in procs if p.is_alive()]
    for proc in alive:
        proc.kill()
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    if alive or any(p.exitcode != 0 for p in procs) or messages:
        raise AssertionError(f"ranks failed (exit codes {[p.exitcode for p in procs]}, {len(alive)} hung):\n"
                             + "\n".join(messages))


def train_on_ranks(rank: int, argv: Sequence[str], num_updates: int, out: str) -> None:
    """A rank of :func:`run_ranks`: build the trainer for ``argv`` (data split by rank), run ``num_updates`` and
    let rank 0 save ``{"losses", "state"}`` (full tensors) to ``out``."""
    import torch.distributed as dist

    world = ["--distributed-world-size", str(dist.get_world_size()), "--distributed-rank", str(rank),
             "--distributed-no-spawn"]  # fairseq's trainer reads its world size from the config
    trainer, epoch_itr = build_trainer([*argv, *world])
    losses = [o["loss"] for o in train_updates(trainer, epoch_itr, num_updates)]
    state = parameters(trainer)  # collective under FSDP2 (full_tensor)
    if rank == 0:
        torch.save({"losses": losses, "state": state}, out)
