"""fairseq's real training loop in the test process: parse ``fairseq-train`` arguments, set the task, model,
criterion and :class:`unilm_vl.trainer.UnilmTrainer` up as ``fairseq_cli.train.main`` does, and run updates.

In-process runs cost the model build and the steps only (no interpreter start and fairseq import per run), so the
precision tests can cover every family; the subprocess tests (``fairseq-train``, ``torchrun``) cover the CLI."""

import os
from typing import List, Sequence, Tuple

import numpy as np
import torch
from fairseq import checkpoint_utils, options, tasks, utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.logging import metrics

from unilm_vl.trainer import UnilmTrainer

from conftest import REPO
from two_ranks import end_process_group, run_ranks  # noqa: F401  (re-exported for the tests)


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
    _, epoch_itr = checkpoint_utils.load_checkpoint(
        cfg.checkpoint, trainer, disable_iterator_cache=task.has_sharded_data("train")
    )
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


def parameters(trainer: UnilmTrainer) -> dict:
    """The model's state (parameters, tied ones under each name, and buffers) as full CPU tensors by name; FSDP2's
    sharded ``DTensor``s are gathered."""
    out = {}
    for name, t in trainer.get_model().state_dict().items():
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        out[name] = t.detach().clone()
    return out


def train_on_ranks(rank: int, argv: Sequence[str], num_updates: int, out: str) -> None:
    """A rank of :func:`run_ranks`: build the trainer for ``argv`` (data split by rank), run ``num_updates`` and
    let rank 0 save ``{"losses", "state"}`` (full tensors) to ``out``."""
    import torch.distributed as dist

    world = [
        "--distributed-world-size",
        str(dist.get_world_size()),
        "--distributed-rank",
        str(rank),
        "--distributed-no-spawn",
    ]  # fairseq's trainer reads its world size from the config
    trainer, epoch_itr = build_trainer([*argv, *world])
    losses = [o["loss"] for o in train_updates(trainer, epoch_itr, num_updates)]
    state = parameters(trainer)  # collective under FSDP2 (full_tensor)
    if rank == 0:
        torch.save({"losses": losses, "state": state}, out)
