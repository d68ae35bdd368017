"""SHIM: CPU buffers for fairseq 0.12's ``all_gather_list`` so that multi-process CPU (gloo) training works with
criteria whose logging outputs cannot be summed (``kosmos2_lm``: its per-source keys differ between batches).

Why: fairseq's trainer syncs such logging outputs with ``fairseq.distributed.utils.all_gather_list``, which
allocates its staging buffers lazily with ``torch.cuda.ByteTensor`` and ``pin_memory()`` and therefore fails on a
machine without CUDA ("Found no NVIDIA driver"). The function keeps its buffers as attributes and only allocates
when they are missing or too small, so handing it CPU buffers once is enough: fairseq's own code then pickles,
all-reduces (gloo supports uint8 sums) and unpickles unchanged. Nothing is replaced and nothing happens on CUDA
machines or in single-process runs.

Limit: the buffers hold ``CPU_ALL_GATHER_MAX_SIZE`` bytes per rank, 4x fairseq's default
``--all-gather-list-size`` 16384; a larger ``--all-gather-list-size`` on CPU would make fairseq reallocate on CUDA
and fail as before.
"""

import logging

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

CPU_ALL_GATHER_MAX_SIZE = 4 * 16384


def prepare_cpu_all_gather_list(max_size: int = CPU_ALL_GATHER_MAX_SIZE) -> bool:
    """Give fairseq's ``all_gather_list`` CPU buffers when training is distributed over gloo without CUDA.
    Returns whether buffers were installed (idempotent: an existing large enough buffer is kept)."""
    if torch.cuda.is_available() or not (dist.is_available() and dist.is_initialized()):
        return False
    if dist.get_backend() != "gloo":
        return False
    from fairseq.distributed import utils as dist_utils

    target = dist_utils.all_gather_list
    needed = max_size * dist.get_world_size()
    if getattr(target, "_buffer", None) is not None and target._buffer.numel() >= needed:
        return False
    target._buffer = torch.zeros(needed, dtype=torch.uint8)  # all ranks' slots, all-reduced
    target._cpu_buffer = torch.zeros(max_size, dtype=torch.uint8)  # this rank's pickled payload
    logger.info("fairseq all_gather_list: %d-byte CPU buffers per rank for gloo training without CUDA", max_size)
    return True
