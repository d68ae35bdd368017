"""Sharded data parallelism with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``) for every model family.

What FSDP2 does (PyTorch docs, "FSDP2: fully_shard"): every parameter becomes a ``DTensor`` sharded on dim 0 over
the data-parallel ranks; before a wrapped module's forward its parameters are all-gathered, after its backward their
gradients are reduce-scattered (averaged over ranks, like DDP) into sharded gradients, and the optimizer steps on
the shards. With ``MixedPrecisionPolicy(param_dtype=bf16|fp16, reduce_dtype=fp32)`` the gathered compute copies are
half precision while the sharded master weights, the optimizer state and the gradient reduction stay fp32.

Why FSDP2 and not fairseq's ``--ddp-backend fully_sharded``: that one is fairscale's FSDP, which computes on CUDA
only and flattens parameters (no frozen towers or LoRA in a flat group without ``--fp16-no-flatten-grads`` care);
FSDP2 keeps one tensor per parameter (mixed ``requires_grad`` is fine: frozen towers, LoRA, EMA teachers), runs on
CPU with gloo (so the tests run it) and on GPUs with NCCL, and saves with ``torch.distributed.checkpoint``.

This module holds the pieces; :class:`unilm_vl.trainer.UnilmTrainer` wires them into fairseq's trainer:

- :func:`shard_module`: ``fully_shard`` on every transformer block (open_clip ``ResidualAttentionBlock``, timm ViT /
  Swin blocks, torchscale ``DecoderLayer``, HF ``BertLayer``), then on the root; frozen and EMA copies included.
- :func:`clip_grad_norm_`: the global gradient norm from the local shards in one all-reduce (fairseq's version
  would run one collective per parameter through DTensor dispatch), then the clip on the shards.
- :func:`save_sharded` / :func:`load_sharded`: model and optimizer state through ``torch.distributed.checkpoint``
  (each rank writes its shards; reshards on load, so a checkpoint resumes on another number of ranks).
- :func:`consolidate`: a sharded checkpoint to one regular fairseq checkpoint file (``python -m
  unilm_vl.consolidate``), which every eval / convert / export tool reads.

A sharded checkpoint is a small regular file (``checkpoint_last.pt``: config, optimizer history, iterator state,
``"sharded": {"dir": ...}``) beside a directory of shards (``shards-u<updates>-<token>/``). The directory is written
completely (``dcp.save`` ends with its metadata file) before rank 0 writes the small file atomically, so a killed
save leaves the previous checkpoint intact; fairseq's copies (``checkpoint_last.pt`` from ``checkpoint_3_60.pt``)
copy only the small file, which names the same directory; directories no file names any more are removed.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .safe_load import SAFE_GLOBALS

logger = logging.getLogger(__name__)

SHARDED_KEY = "sharded"
SHARD_DIR_PREFIX = "shards-"
PRECISIONS = ("fp32", "bf16", "fp16")


class ShardingError(ValueError):
    """A sharding option that cannot work; the message is the one line shown to the user."""


# ------------------------------------------------------------------------------------------------ wrapping
def block_types() -> Tuple[type, ...]:
    """The transformer block classes that become their own FSDP2 unit (one all-gather each). Imported lazily
    because each belongs to an optional tower library; missing libraries contribute nothing."""
    found: List[type] = []

    def add(module: str, name: str) -> None:
        try:
            found.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass

    add("open_clip.transformer", "ResidualAttentionBlock")
    add("open_clip.transformer", "CustomResidualAttentionBlock")
    add("timm.models.vision_transformer", "Block")
    add("timm.models.swin_transformer", "SwinTransformerBlock")
    add("torchscale.architecture.decoder", "DecoderLayer")
    add("torchscale.architecture.encoder", "EncoderLayer")
    add("transformers.models.bert.modeling_bert", "BertLayer")
    return tuple(found)


def sharding_units(root: nn.Module, types: Optional[Tuple[type, ...]] = None) -> List[nn.Module]:
    """Modules of ``root`` that are instances of :func:`block_types` (outermost first, no nesting: a block inside a
    block stays with its parent)."""
    types = block_types() if types is None else types
    units: List[nn.Module] = []
    inside: set = set()
    for module in root.modules():
        if id(module) in inside:
            continue
        if module is not root and isinstance(module, types):
            units.append(module)
            inside.update(id(m) for m in module.modules())
    return units


def mixed_precision_policy(precision: str):
    """FSDP2 policy: compute in ``precision``, keep fp32 sharded weights, reduce gradients in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision not in PRECISIONS:
        raise ShardingError(f"--fsdp2-precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return MixedPrecisionPolicy()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return MixedPrecisionPolicy(
        param_dtype=dtype, reduce_dtype=torch.float32, output_dtype=None, cast_forward_inputs=True
    )


def shard_module(
    module: nn.Module, mesh, precision: str = "fp32", reshard_after_forward: bool = True
) -> Tuple[int, List[nn.Parameter]]:
    """``fully_shard`` every block of ``module`` (:func:`sharding_units`), then ``module`` itself. Returns the number
    of units and the parameters left replicated: FSDP2 cannot shard 0-dim parameters (CLIP's ``logit_scale``), so
    they stay plain tensors whose gradients :func:`all_reduce_replicated_grads` averages. Sharded parameters keep
    their names; their objects change (re-tag anything stored on them afterwards)."""
    from torch.distributed.fsdp import fully_shard

    policy = mixed_precision_policy(precision)
    replicated = [p for p in module.parameters() if p.ndim == 0]
    ignored = set(replicated)
    if precision != "fp32":
        # BatchNorm keeps fp32 running statistics, which a half-precision weight cannot be combined with: each
        # BatchNorm is its own unit computing in fp32 and handing its output back in the compute precision
        from torch.distributed.fsdp import MixedPrecisionPolicy

        low = policy.param_dtype
        norm_policy = MixedPrecisionPolicy(
            param_dtype=torch.float32, reduce_dtype=torch.float32, output_dtype=low, cast_forward_inputs=True
        )
        for norm in [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]:
            if any(True for _ in norm.parameters(recurse=False)):
                fully_shard(
                    norm,
                    mesh=mesh,
                    mp_policy=norm_policy,
                    reshard_after_forward=reshard_after_forward,
                    ignored_params=ignored,
                )
    units = sharding_units(module)
    for unit in units:
        fully_shard(
            unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward, ignored_params=ignored
        )
    fully_shard(
        module, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward, ignored_params=ignored
    )
    return len(units) + 1, replicated


def all_reduce_replicated_grads(params: Sequence[torch.Tensor], group=None) -> None:
    """Average the gradients of the parameters FSDP2 left replicated over the ranks (what its reduce-scatter does
    for the sharded ones); one all-reduce of their concatenation."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def ensure_process_group(device: torch.device) -> None:
    """FSDP2 needs a process group even on one rank; fairseq creates none for single-process training, so make a
    1-rank one (gloo on CPU, NCCL on GPU) with an in-memory store."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    logger.info("FSDP2: single-process %s group", backend)


def device_mesh(device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("dp",))


# ------------------------------------------------------------------------------------------------ gradients
def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if hasattr(t, "to_local") else t


def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float, group=None) -> torch.Tensor:
    """fairseq's ``utils.clip_grad_norm_`` for FSDP2's sharded gradients: ``||g||_2`` over all parameters from the
    local shards' squared norms summed in ONE all-reduce (Shard(0) shards partition each parameter, so the sum over
    ranks of the local squares is the full square; replicated gradients, equal on every rank, are added once);
    clip in place by ``min(1, max_norm / (norm + 1e-6))`` when ``max_norm > 0``. Returns the float32 norm (a plain
    tensor, equal on every rank)."""
    with_grad = [p.grad.detach() for p in params if getattr(p, "grad", None) is not None]
    grads = [_local(g) for g in with_grad]
    device = grads[0].device if grads else torch.device("cpu")
    sharded = torch.zeros((), dtype=torch.float32, device=device)
    replicated = torch.zeros((), dtype=torch.float32, device=device)
    for full, g in zip(with_grad, grads):
        if full is g:
            replicated += g.float().pow(2).sum()
        else:
            sharded += g.float().pow(2).sum()
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(sharded, group=group)
    total = (sharded + replicated).sqrt()
    if max_norm > 0 and grads:
        coef = (float(max_norm) / (total + 1e-6)).clamp_(max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return total


# ------------------------------------------------------------------------------------------------ checkpoints
def _state_module(model: nn.Module, criterion: Optional[nn.Module]) -> nn.Module:
    """One module whose parameter names are ``model.*`` and ``criterion.*``: the optimizer holds both, and the
    checkpoint helpers map optimizer state to parameter names through a single module."""
    container = nn.Module()
    container.model = model
    if criterion is not None and any(True for _ in criterion.parameters()):
        container.criterion = criterion
    return container


def sharded_state(
    model: nn.Module, criterion: Optional[nn.Module], optimizer, with_optimizer: bool = True
) -> Dict[str, Any]:
    """``{"model": {name: DTensor}, "optim": {...}}`` keyed by parameter names (resharding-safe)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    container = _state_module(model, criterion)
    state = {"model": get_model_state_dict(container)}
    if with_optimizer and optimizer is not None:
        state["optim"] = get_optimizer_state_dict(container, optimizer)
    return state


def new_shard_dir_name(num_updates: int) -> str:
    """A fresh directory name, the same on every rank (rank 0 draws the token and broadcasts it)."""
    token = [uuid.uuid4().hex[:10] if not dist.is_initialized() or dist.get_rank() == 0 else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(token, src=0)
    return f"{SHARD_DIR_PREFIX}u{num_updates}-{token[0]}"


def save_sharded(
    save_dir: str,
    num_updates: int,
    model: nn.Module,
    criterion: Optional[nn.Module],
    optimizer,
    with_optimizer: bool = True,
) -> Dict[str, Any]:
    """Collective: every rank writes its shards into a new directory of ``save_dir``; returns the ``"sharded"``
    entry of the small checkpoint file."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultSavePlanner

    name = new_shard_dir_name(num_updates)
    path = os.path.join(save_dir, name)
    state = sharded_state(model, criterion, optimizer, with_optimizer)
    # replicated tensors (buffers such as BatchNorm statistics, which no backend synchronises, and the 0-dim
    # parameters) are saved from rank 0, as fairseq saves rank 0's state under DDP
    dcp.save(state, checkpoint_id=path, planner=DefaultSavePlanner(dedup_save_to_lowest_rank=True))
    return {
        "format": "torch.distributed.checkpoint",
        "dir": name,
        "world_size": dist.get_world_size(),
        "optimizer": with_optimizer and optimizer is not None,
    }


def shard_dir_of(checkpoint_path: str, entry: Dict[str, Any]) -> str:
    """The shards directory a small checkpoint file names (relative to the file's directory)."""
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), entry["dir"])
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise FileNotFoundError(
            f"{checkpoint_path} is a sharded checkpoint whose shards directory {path} is missing "
            f"or incomplete (no .metadata); copy the directory along with the file"
        )
    return path


def load_sharded(
    checkpoint_path: str,
    entry: Dict[str, Any],
    model: nn.Module,
    criterion: Optional[nn.Module],
    optimizer,
    load_optimizer: bool = True,
) -> None:
    """Collective: load (and reshard to this run's ranks) the model, criterion and optionally optimizer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = shard_dir_of(checkpoint_path, entry)
    load_optimizer = load_optimizer and optimizer is not None and entry.get("optimizer", True)
    state = sharded_state(model, criterion, optimizer, with_optimizer=load_optimizer)
    dcp.load(state, checkpoint_id=path)
    container = _state_module(model, criterion)
    set_model_state_dict(container, state["model"])
    if load_optimizer:
        set_optimizer_state_dict(container, optimizer, state["optim"])


def referenced_shard_dirs(save_dir: str) -> set:
    """Names of the shard directories that some ``*.pt`` file of ``save_dir`` names (memory-mapped reads)."""
    names = set()
    for fn in os.listdir(save_dir):
        if not fn.endswith(".pt"):
            continue
        try:
            with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
                state = torch.load(os.path.join(save_dir, fn), map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # a foreign or truncated file: keep every directory rather than guess
            logger.warning("cannot read %s to find its shards (%s); keeping all shard directories", fn, exc)
            return {d for d in os.listdir(save_dir) if d.startswith(SHARD_DIR_PREFIX)}
        entry = state.get(SHARDED_KEY) if isinstance(state, dict) else None
        if entry:
            names.add(entry["dir"])
    return names


def remove_orphan_shard_dirs(save_dir: str, keep: Sequence[str] = ()) -> List[str]:
    """Delete the shard directories of ``save_dir`` that no checkpoint file names (rank 0 only); returns them."""
    if not os.path.isdir(save_dir):
        return []
    used = referenced_shard_dirs(save_dir) | set(keep)
    removed = []
    for name in sorted(os.listdir(save_dir)):
        if name.startswith(SHARD_DIR_PREFIX) and name not in used and os.path.isdir(os.path.join(save_dir, name)):
            shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
            removed.append(name)
    if removed:
        logger.info("removed shard directories no checkpoint names: %s", ", ".join(removed))
    return removed


# ------------------------------------------------------------------------------------------------ consolidation
def _fairseq_optimizer_state(optim_state: Dict[str, Any]) -> Dict[str, Any]:
    """Name-keyed optimizer state (``torch.distributed.checkpoint``) -> torch's index-keyed form, which fairseq's
    optimizers load: indices follow the parameter order of the param groups, the order the optimizer was built in."""
    groups, state, index = [], {}, {}
    for group in optim_state["param_groups"]:
        ids = []
        for name in group["params"]:
            index.setdefault(name, len(index))
            ids.append(index[name])
        groups.append({**group, "params": ids})
    for name, value in optim_state.get("state", {}).items():  # SGD without momentum keeps none
        state[index[name]] = value
    return {"state": state, "param_groups": groups}


def _split_names(flat: Dict[str, Any], prefix: str) -> Dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}


def consolidated_state(checkpoint_path: str, with_optimizer: bool = True) -> Dict[str, Any]:
    """A regular fairseq checkpoint dict (full fp32 ``model``/``criterion`` state, fairseq-form optimizer state)
    from a sharded one, in this process alone (no process group). The small file is read without running code
    from it; the shards' ``.metadata`` is a pickle that ``torch.distributed.checkpoint`` loads as such, so consolidate
    only checkpoints you trust."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from .safe_load import load_checkpoint_file

    state = load_checkpoint_file(checkpoint_path)
    entry = state.get(SHARDED_KEY) if isinstance(state, dict) else None
    if not entry:
        raise ValueError(f"{checkpoint_path} is not a sharded checkpoint (no {SHARDED_KEY!r} entry)")
    shard_dir = shard_dir_of(checkpoint_path, entry)
    with tempfile.TemporaryDirectory() as tmp:
        full_path = os.path.join(tmp, "full.pt")
        dcp_to_torch_save(shard_dir, full_path)
        full = torch.load(full_path, map_location="cpu", weights_only=False)
    tensors = full["model"]
    state["model"] = _split_names(tensors, "model.")
    criterion = _split_names(tensors, "criterion.")
    state["criterion"] = criterion or None
    if with_optimizer and "optim" in full:
        optim = _fairseq_optimizer_state(full["optim"])
        if "loss_scale" in entry:
            optim["loss_scale"] = entry["loss_scale"]
        state["last_optimizer_state"] = optim
    else:
        state.pop("last_optimizer_state", None)
    del state[SHARDED_KEY]
    return state


def is_sharded_checkpoint(state: Any) -> bool:
    return isinstance(state, dict) and bool(state.get(SHARDED_KEY))


@dataclass
class ShardingPlan:
    """What the trainer does under ``--fsdp2`` (from the task config)."""

    precision: str = "fp32"
    reshard_after_forward: bool = True
    full_checkpoint: bool = False


def check_options(cfg, plan: ShardingPlan) -> None:
    """Options that cannot work with FSDP2: one line each (raised as :class:`ShardingError`)."""
    common, dt, opt, ck = cfg.common, cfg.distributed_training, cfg.optimization, cfg.checkpoint
    half = [
        flag
        for flag, on in (
            ("--fp16", common.fp16),
            ("--memory-efficient-fp16", common.memory_efficient_fp16),
            ("--amp", common.amp),
            ("--bf16", common.bf16),
        )
        if on
    ]
    if half:
        raise ShardingError(
            f"{half[0]} casts the whole model; with --fsdp2 keep fp32 master weights and choose the "
            f"compute precision with --fsdp2-precision bf16|fp16 (fp16 adds dynamic loss scaling)"
        )
    if dt.ddp_backend == "fully_sharded":
        raise ShardingError("--fsdp2 and --ddp-backend fully_sharded are two sharding backends; use one of them")
    if dt.zero_sharding != "none":
        raise ShardingError("--zero-sharding shards the optimizer state again; FSDP2 already shards it, drop it")
    if opt.use_bmuf:
        raise ShardingError("--use-bmuf averages full model copies; it cannot run on FSDP2's sharded weights")
    if dt.cpu_offload:
        raise ShardingError("--cpu-offload belongs to fairscale's FSDP; FSDP2 here keeps shards on the device")
    if getattr(cfg, "ema", None) is not None and cfg.ema.store_ema:
        raise ShardingError(
            "--store-ema keeps a full unsharded model copy; use the model's own EMA (COSMOS "
            "teacher, BYOLIP momentum), which FSDP2 shards"
        )
    if not plan.full_checkpoint and ck.no_last_checkpoints:
        raise ShardingError(
            "sharded checkpoints are written collectively with checkpoint_last.pt; drop "
            "--no-last-checkpoints or pass --fsdp2-full-checkpoint"
        )
    if plan.precision not in PRECISIONS:
        raise ShardingError(f"--fsdp2-precision must be one of {', '.join(PRECISIONS)}, got {plan.precision!r}")
