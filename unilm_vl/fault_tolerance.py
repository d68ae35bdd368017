"""Surviving the faults of long runs: atomic checkpoint copies, collective timeouts, and NaN/Inf loss skipping.

:class:`~unilm_vl.tasks._base.StreamTaskBase` wires these in; nothing here forks fairseq's trainer.

Atomic checkpoints
    fairseq writes the first checkpoint of a save (e.g. ``checkpoint_1_4.pt``) atomically (``.tmp`` then rename),
    but makes the others (``checkpoint_last.pt``, ``checkpoint_best.pt``) with ``PathManager.copy``, a plain
    ``shutil.copyfile`` onto the final name. A process killed during that copy leaves a truncated
    ``checkpoint_last.pt``, the very file a restart loads. :func:`install_atomic_checkpoint_copy` makes local copies
    go to a temporary file in the same directory, fsync it, then ``os.replace`` it over the target.

Collective timeouts
    A rank that *dies* closes its gloo sockets and the others fail at once ("Connection reset by peer"); under
    ``torchrun`` the agent also tears the job down. A rank that *hangs* (stuck I/O, a stopped process) leaves the
    others blocked in the next all-reduce for torch's default timeout (30 min for gloo). ``--collective-timeout N``
    sets the default process group's timeout to N seconds (:func:`set_collective_timeout`), so a hung peer makes
    every other rank fail with gloo's "Timed out waiting ... ms" error after N seconds. fairseq's
    ``--heartbeat-timeout`` sends SIGINT, which Python only sees once the main thread returns from the blocking
    C++ collective, so it does not end a hang inside gloo.

NaN/Inf losses
    :class:`NonFiniteLossGuard` runs after fairseq's forward/backward of each micro-batch. If any rank's loss is
    NaN/Inf, every rank zeroes its gradients (so fairseq's gradient-norm check does not raise), the optimizer step
    of that update is skipped (weights and optimizer state unchanged; the update counter and learning-rate schedule
    still advance), the skipped micro-batch logs nothing but ``nan_skipped`` (summed per log interval), and more than
    ``--max-consecutive-nan-steps`` skipped updates in a row stop the run with :class:`TooManyNonFiniteLosses`.
    Non-finite *gradients* of a finite loss keep fairseq's handling (FloatingPointError in fp32, a smaller loss
    scale in fp16/AMP).
"""

from __future__ import annotations

import logging
import os
import shutil
from datetime import timedelta
from typing import Any, Dict, Optional

import torch

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- atomic checkpoints
def atomic_copy(src: str, dst: str) -> str:
    """Copy ``src`` to ``dst`` so that ``dst`` is always either its old content or a complete copy of ``src``:
    copy to ``<dst>.tmp`` in the same directory, fsync, then ``os.replace`` (atomic on POSIX). Returns ``dst``."""
    tmp = dst + ".tmp"
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout, length=16 << 20)
        fout.flush()
        os.fsync(fout.fileno())
    os.replace(tmp, dst)
    return dst


def install_atomic_checkpoint_copy() -> None:
    """Shim (see the module docstring): route fairseq's ``PathManager.copy`` of local files through
    :func:`atomic_copy`. Remote paths (an ioPath handler) keep fairseq's copy. Idempotent."""
    from fairseq.file_io import PathManager

    original = PathManager.copy
    if getattr(original, "_unilm_vl_atomic", False):
        return

    def copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
        if PathManager.path_requires_pathmanager(src_path) or PathManager.path_requires_pathmanager(dst_path):
            return original(src_path, dst_path, overwrite=overwrite)
        if not overwrite and os.path.exists(dst_path):
            raise FileExistsError(f"{dst_path} exists and overwrite is False")
        return bool(atomic_copy(src_path, dst_path))

    copy._unilm_vl_atomic = True
    PathManager.copy = staticmethod(copy)


# ------------------------------------------------------------------------------------------- collective timeouts
def set_collective_timeout(seconds: int) -> bool:
    """Set the default process group's timeout to ``seconds`` (> 0) when one is initialised; returns whether it
    was set."""
    import torch.distributed as dist

    if seconds <= 0 or not dist.is_available() or not dist.is_initialized():
        return False
    dist.set_timeout(timedelta(seconds=seconds))
    logger.info("collective timeout: %d s (a rank that stops responding fails the others after this)", seconds)
    return True


# ------------------------------------------------------------------------------------------- NaN / Inf losses
class TooManyNonFiniteLosses(RuntimeError):
    """Raised when more consecutive updates had a NaN/Inf loss than ``--max-consecutive-nan-steps`` allows."""


def zeroed_logging_output(logging_output: Dict[str, Any]) -> Dict[str, Any]:
    """The same keys with every number set to 0, so a skipped micro-batch adds nothing to the logged averages
    while the keys still match the other ranks' (fairseq sums logging outputs across ranks key by key)."""
    out = {}
    for key, value in logging_output.items():
        if torch.is_tensor(value):
            out[key] = torch.zeros_like(value)
        elif isinstance(value, (bool, str)) or not isinstance(value, (int, float)):
            out[key] = value
        else:
            out[key] = type(value)(0)
    return out


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is set on any data-parallel rank (one tiny all-reduce when distributed)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


class NonFiniteLossGuard:
    """Skip updates whose loss is NaN/Inf on any rank; stop after ``max_consecutive`` skipped updates in a row.

    ``after_backward`` runs after each micro-batch's forward/backward, ``should_step`` in place of the optimizer
    step. ``max_consecutive = 0`` stops at the first non-finite loss.
    """

    def __init__(self, max_consecutive: int):
        if max_consecutive < 0:
            raise ValueError(f"--max-consecutive-nan-steps must be >= 0, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.skipped_total = 0
        self._skip_update: Optional[int] = None

    def after_backward(self, loss, sample_size, logging_output, optimizer, update_num: int, ignore_grad: bool):
        """Check one micro-batch; returns ``(sample_size, logging_output)`` to hand to the trainer."""
        local_bad = (not ignore_grad) and torch.is_tensor(loss) and not bool(torch.isfinite(loss.detach()).all())
        device = loss.device if torch.is_tensor(loss) else torch.device("cpu")
        if not any_rank(local_bad, device) and self._skip_update != update_num:
            return sample_size, logging_output
        if self._skip_update != update_num:
            where = "this rank's" if local_bad else "another rank's"
            logger.warning(
                "update %d: %s loss is %s; skipping the update",
                update_num + 1,
                where,
                loss.detach().float().item() if local_bad else "NaN/Inf",
            )
        self._skip_update = update_num
        optimizer.zero_grad()  # also drops earlier micro-batches of this update: the whole update is skipped
        return sample_size * 0, zeroed_logging_output(logging_output)

    def should_step(self, optimizer, update_num: int) -> bool:
        """False when this update is skipped (then also counts it, logs ``nan_skipped`` and may stop the run)."""
        if self._skip_update != update_num:
            self.consecutive = 0
            return True
        from fairseq import metrics
        from fairseq.optim.amp_optimizer import AMPOptimizer

        self._skip_update = None
        self.consecutive += 1
        self.skipped_total += 1
        metrics.log_scalar_sum("nan_skipped", 1, priority=700, round=0)
        if isinstance(optimizer, AMPOptimizer):
            optimizer.scaler.update()  # close the scaler's iteration that clip_grad_norm's unscale_ opened
        if self.consecutive > self.max_consecutive:
            raise TooManyNonFiniteLosses(
                f"{self.consecutive} consecutive updates (the last is update {update_num + 1}) had a NaN/Inf loss, "
                f"more than --max-consecutive-nan-steps {self.max_consecutive}; stopping. The weights are those of "
                f"the last finite update; lower the learning rate or check the data, then resume from the last "
                f"checkpoint"
            )
        return False
