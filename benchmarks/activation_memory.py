"""Memory of one training step for the Kosmos-2 and COSA shapes: the activations kept for the backward with and
without ``--checkpoint-activations``, and the per-rank model states (weights, gradients, AdamW state) of the
unsharded model and under FSDP2 (``--fsdp2``, PyTorch ``fully_shard``) on N ranks.

Each configuration runs in processes of its own (spawned, so no run inherits another's allocations): every rank
builds the model with seed 0, the sharded runs then shard it over N gloo ranks on this CPU as ``--fsdp2`` does
(:func:`unilm_vl.fsdp2.shard_module`: ``fully_shard`` on every transformer block, then on the root, in
``--precision``), build ``torch.optim.AdamW`` over the trainable parameters and run two training steps of
``--batch-size`` samples per rank (forward, backward, AdamW step; the gradients are set to None between them, as
fairseq's ``zero_grad`` does). MEASURED on every rank:

* model states after the first step, each counted once per storage: the parameters' (local shards') bytes, the
  gradients' and the AdamW state's (``exp_avg``, ``exp_avg_sq``, ``step``). FSDP2 keeps each local shard padded to
  ceil(dim 0 / N) rows and views each unit's gradients into one padded buffer, so that padding is counted; AdamW's
  state is allocated like the unpadded local shard.
* saved activations of the second forward: the bytes of the tensors autograd keeps for the backward
  (``torch.autograd.graph.saved_tensors_hooks``, once per storage) that are not parameters. Weights that autograd
  keeps (a linear layer keeps its weight for the input's gradient; under FSDP2 the unit's all-gathered copy) are
  model states or the unsharded unit, so they are excluded and reported apart (``saved_param_bytes``).
* peak increase of the second step: the highest point of the CPU allocator's live bytes during the step (forward,
  backward, AdamW step), minus the level at its start, from the profiler's memory events
  (``torch.profiler.profile(profile_memory=True)``). At the start the weights, the AdamW state and the batch are
  live; the increase holds the activations, the gradients, FSDP2's unsharded units and collective buffers, and the
  temporaries of single ops (AdamW's per-parameter temporaries included: ``fwd_bwd_peak_increase_bytes`` is the
  same peak before the AdamW step starts). Peak per rank = weights + AdamW state + increase.

COMPUTED from the parameter shapes and checked against the measurement (``formula_matches``):
:func:`fsdp2_state_bytes` gives the states per rank on any number of ranks (``--gpus``, default 8); ranks = 1 is the
unsharded model. :func:`unit_gather_bytes` gives the bytes of a unit's all-gathered weights: the root unit (weights
outside the blocks: embeddings, output projection, connector) stays unsharded from the forward to the end of the
backward, each block unit from its forward until after its backward. ``--shapes-only`` builds the model on the meta
device (no memory, no step) and reports only these computed numbers: for shapes that do not fit this machine.

Not included: the CUDA context, allocator caches and NCCL buffers of a GPU. fp32 unless ``--precision``; with
``bf16`` / ``fp16`` FSDP2 computes with half-precision copies of the weights and keeps fp32 shards and AdamW state.

    .venv/bin/python benchmarks/activation_memory.py --model kosmos2 --arch base --batch-size 2 --fsdp2-ranks 2
    .venv/bin/python benchmarks/activation_memory.py --model cosa --arch cosa_base_clip --batch-size 2 --fsdp2-ranks 2
    .venv/bin/python benchmarks/activation_memory.py --model kosmos2 --arch xl --shapes-only --gpus 8
"""

import argparse
import contextlib
import functools
import json
import logging
import os
import resource
import sys
import tempfile
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

import torch
from torch import nn

from _timing import machine, report, setup_logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
logger = logging.getLogger("benchmarks")
MiB = 2**20
STATE_KEYS = ("param_bytes", "grad_bytes", "optim_bytes")
OPTIMIZER_MARK = "activation_memory::optimizer_step"  # profiler range of the AdamW step
Shape = Tuple[Tuple[int, ...], bool]  # (parameter shape, trainable)


# ------------------------------------------------------------------------------------------------ pure maths
def chunk_rows(dim0: int, ranks: int, rank: int) -> int:
    """Rows of dim 0 that ``rank`` holds when ``torch.chunk`` cuts ``dim0`` rows into ``ranks`` pieces, FSDP2's
    ``Shard(0)``: pieces of ceil(dim0 / ranks) rows, the last ones shorter or empty."""
    size = -(-dim0 // ranks)
    return max(0, min(size, dim0 - rank * size))


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def fsdp2_state_bytes(params: Iterable[Shape], ranks: int, rank: int = 0, dtype_bytes: int = 4) -> Dict[str, int]:
    """Bytes of weights, gradients and ``torch.optim.AdamW`` state that ``rank`` holds when FSDP2 shards parameters
    of these shapes over ``ranks`` ranks (``ranks = 1``: the unsharded model). A parameter with dims keeps a local
    shard padded to ceil(dim 0 / ranks) rows (FSDP2 allocates every rank's shard at rank 0's size); a trainable
    one also gets a gradient of that padded size (a view into its unit's padded reduce-scatter buffer) and AdamW's
    ``exp_avg`` + ``exp_avg_sq`` at the unpadded size of its rows on this rank (``torch.zeros_like`` of the local
    shard), plus a 4-byte fp32 ``step``. 0-dim parameters stay whole on every rank (``shard_module`` leaves them
    replicated)."""
    out = dict.fromkeys(STATE_KEYS, 0)
    for shape, trainable in params:
        if len(shape) == 0:
            padded = local = 1
        else:
            row = _numel(shape[1:])
            padded = chunk_rows(shape[0], ranks, 0) * row
            local = chunk_rows(shape[0], ranks, rank) * row
        out["param_bytes"] += padded * dtype_bytes
        if trainable:
            out["grad_bytes"] += padded * dtype_bytes
            out["optim_bytes"] += 2 * local * dtype_bytes + 4
    return out


def unit_gather_bytes(shapes: Iterable[Sequence[int]], ranks: int, compute_bytes: int) -> int:
    """Bytes of one FSDP2 unit's all-gathered (unsharded) weights: every parameter with dims at ranks x its padded
    shard, in the compute precision; 0-dim parameters are not gathered."""
    return sum(chunk_rows(s[0], ranks, 0) * ranks * _numel(s[1:]) * compute_bytes for s in shapes if len(s) > 0)


def peak_increase(events: Iterable[Tuple[int, int]]) -> int:
    """Highest level of the running sum of allocator events ``(time, +bytes allocated | -bytes freed)`` in time
    order, above its start (0 when nothing was allocated beyond the start)."""
    live = peak = 0
    for _, nbytes in sorted(events, key=lambda e: e[0]):
        live += nbytes
        peak = max(peak, live)
    return peak


# ------------------------------------------------------------------------------------------------ models
def kosmos2_model(arch: str, checkpointing: bool) -> Tuple[nn.Module, object]:
    """Kosmos2Module of a ``benchmarks/kosmos2_step.py`` shape (image tower frozen, no dropout) and its config."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from kosmos2_step import our_config

    from unilm_vl.modules.kosmos2 import Kosmos2Module

    cfg = our_config(arch, 8000)
    cfg.decoder.checkpoint_activations = checkpointing
    return Kosmos2Module(cfg).train(), cfg


def kosmos2_forward(model: nn.Module, cfg, batch_size: int, text_len: int) -> Callable[[], torch.Tensor]:
    """Loss of one Kosmos-2 step: token-mean NLL over the text positions."""
    import torch.nn.functional as F
    from kosmos2_step import prompts

    tokens, mask, image = prompts(cfg, batch_size, text_len, "cpu")
    start = cfg.connector.latent_query_num + 2

    def forward():
        logits = model(tokens[:, :-1], image, mask[:, :-1])["lm_logits"]  # B x T-1 x V
        return F.cross_entropy(logits[:, start:].flatten(0, 1), tokens[:, start + 1 :].flatten())

    return forward


def cosa_model(arch: str, checkpointing: bool, text_len: int) -> Tuple[nn.Module, object]:
    """CosaModel of a registered COSA arch and its special token ids."""
    from argparse import Namespace

    from fairseq.models import ARCH_CONFIG_REGISTRY

    from unilm_vl.models.cosa import CosaModel, CosaModelConfig, CosaSpecialIds

    args = Namespace(checkpoint_activations=checkpointing)
    ARCH_CONFIG_REGISTRY[arch](args)
    special = CosaSpecialIds(vocab_size=30522, pad_id=0, cls_id=101, sep_id=102, mask_id=103, unk_id=100)
    return CosaModel(CosaModelConfig(**vars(args)), special, text_len).train(), special


def cosa_forward(model: nn.Module, special, batch_size: int, text_len: int) -> Callable[[], torch.Tensor]:
    """Loss of one COSA pretraining step (ret, cret, ccap, cmlm; K = 4 concatenation partners)."""
    from unilm_vl.criterions.cosa import CosaCriterion, CosaCriterionConfig

    criterion = CosaCriterion(CosaCriterionConfig(cosa_tasks="ret_cret_ccap_cmlm"), None)
    g = torch.Generator().manual_seed(0)
    size = model.net.vision.image_size
    ids = torch.randint(1000, 30000, (batch_size, text_len), generator=g)
    ids[:, 0], ids[:, -1] = special.cls_id, special.sep_id
    sample = {
        "id": list(range(batch_size)),
        "nsentences": batch_size,
        "ntokens": int(ids.numel()),
        "net_input": {
            "frames": torch.randn(batch_size, 1, 3, size, size, generator=g),
            "text_ids": ids,
            "text_mask": torch.ones_like(ids),
        },
    }

    def forward():
        return criterion(model, sample)[0]

    return forward


def build_model(kind: str, arch: str, checkpointing: bool, text_len: int) -> Tuple[nn.Module, object]:
    return kosmos2_model(arch, checkpointing) if kind == "kosmos2" else cosa_model(arch, checkpointing, text_len)


def build_forward(kind: str, model: nn.Module, extra, batch_size: int, text_len: int) -> Callable[[], torch.Tensor]:
    build = kosmos2_forward if kind == "kosmos2" else cosa_forward
    return build(model, extra, batch_size, text_len)


@contextlib.contextmanager
def meta_device():
    """Build on the meta device (shapes only, no memory). open_clip's ``create_model`` moves its model to
    ``device='cpu'`` by default, which a meta tensor cannot do; it is asked for ``device='meta'`` inside."""
    import open_clip

    original = open_clip.create_model
    open_clip.create_model = functools.partial(original, device="meta")
    try:
        with torch.device("meta"):
            yield
    finally:
        open_clip.create_model = original


# ------------------------------------------------------------------------------------------------ measuring
def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the storages under ``tensors`` (local shards of DTensors), each storage counted once."""
    seen = {}
    for t in tensors:
        storage = _local(t).untyped_storage()
        seen[storage._cdata] = storage.nbytes()
    return sum(seen.values())


def measure_states(model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, int]:
    """MEASURED per-rank model states: the bytes of the parameters' (local shards') storages, of the gradients' and
    of the optimizer state's tensors, each storage counted once."""
    params = list(model.parameters())
    return {
        "param_bytes": storage_bytes(params),
        "grad_bytes": storage_bytes(p.grad for p in params if p.grad is not None),
        "optim_bytes": storage_bytes(t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)),
    }


def formula_matches(measured: Dict[str, int], computed: Dict[str, int]) -> bool:
    """Whether the measured weights, gradients and optimizer state equal :func:`fsdp2_state_bytes` to the byte."""
    return all(measured[k] == computed[k] for k in STATE_KEYS)


def parameter_layout(model: nn.Module, ranks: int, compute_bytes: int) -> Dict[str, object]:
    """Shapes for :func:`fsdp2_state_bytes` and the all-gather bytes of the root unit and of the largest block
    unit (:func:`unilm_vl.fsdp2.sharding_units`), computed before sharding."""
    from unilm_vl.fsdp2 import sharding_units

    units = sharding_units(model)
    in_units = {id(p) for u in units for p in u.parameters()}
    root = [tuple(p.shape) for p in model.parameters() if id(p) not in in_units]
    blocks = [unit_gather_bytes([tuple(p.shape) for p in u.parameters()], ranks, compute_bytes) for u in units]
    return {
        "shapes": [(tuple(p.shape), p.requires_grad) for p in model.parameters()],
        "block_units": len(units),
        "root_gather_bytes": unit_gather_bytes(root, ranks, compute_bytes),
        "max_block_gather_bytes": max(blocks, default=0),
    }


def unsharded_parameter_keys(model: nn.Module) -> set:
    """Storage keys of every parameter as the forward sees it: the parameters themselves, and under FSDP2 each
    unit's all-gathered copies (their storages persist between steps, resized to 0 while sharded)."""
    from torch.distributed.fsdp import FSDPModule

    keys = {_local(p).untyped_storage()._cdata for p in model.parameters()}
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.unshard()
            keys |= {p.untyped_storage()._cdata for p in module.parameters() if not hasattr(p, "to_local")}
            module.reshard()
    return keys


def run_rank(rank: int, world: int, job: Dict[str, object], init_file: str, out_dir: str) -> None:
    """One rank of one configuration: build (and shard), two training steps, the measurements as json."""
    from torch.profiler import ProfilerActivity, profile

    from unilm_vl import fsdp2

    setup_logging()
    torch.set_num_threads(max(1, int(job["threads"]) // world))
    sharded = bool(job["sharded"])
    if sharded:
        torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    kind, precision = job["model"], job["precision"]
    model, extra = build_model(kind, job["arch"], bool(job["checkpointing"]), int(job["text_len"]))
    compute_bytes = 4 if precision == "fp32" or not sharded else 2
    layout = parameter_layout(model, world, compute_bytes)
    replicated: List[nn.Parameter] = []
    if sharded:
        _, replicated = fsdp2.shard_module(model, fsdp2.device_mesh(torch.device("cpu")), precision)
    forward = build_forward(kind, model, extra, int(job["batch_size"]), int(job["text_len"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def step(pack=None):
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if pack else contextlib.nullcontext()
        with hooks:
            loss = forward()
        loss.backward()
        fsdp2.all_reduce_replicated_grads(replicated)
        with torch.profiler.record_function(OPTIMIZER_MARK):
            optimizer.step()
        return float(loss.detach())

    loss1 = step()
    params = list(model.parameters())
    states = measure_states(model, optimizer)
    param_keys = unsharded_parameter_keys(model) if sharded else {p.untyped_storage()._cdata for p in params}
    optimizer.zero_grad(set_to_none=True)
    saved, saved_params = {}, {}

    def pack(t):
        storage = t.untyped_storage()
        (saved_params if storage._cdata in param_keys else saved)[storage._cdata] = storage.nbytes()
        return t

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss2 = step(pack)
    kineto = prof.profiler.kineto_results.events()
    events = [(e.start_ns(), e.nbytes()) for e in kineto if e.name() == "[memory]"]
    optimizer_start = min(e.start_ns() for e in kineto if e.name() == OPTIMIZER_MARK)
    result = {
        "rank": rank,
        "world": world,
        "loss": [loss1, loss2],
        **states,
        "computed": fsdp2_state_bytes(layout["shapes"], world, rank),
        f"computed_{job['gpus']}_ranks": fsdp2_state_bytes(layout["shapes"], int(job["gpus"]), 0),
        "saved_bytes": sum(saved.values()),
        "saved_param_bytes": sum(saved_params.values()),
        "peak_increase_bytes": peak_increase(events),
        "fwd_bwd_peak_increase_bytes": peak_increase(e for e in events if e[0] < optimizer_start),
        "params": sum(_numel(s) for s, _ in layout["shapes"]),
        "trainable": sum(_numel(s) for s, t in layout["shapes"] if t),
        **{k: v for k, v in layout.items() if k != "shapes"},
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    result["formula_matches"] = formula_matches(states, result["computed"])
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if sharded:
        torch.distributed.destroy_process_group()


def run_job(job: Dict[str, object], world: int) -> List[Dict[str, object]]:
    """Run one configuration on ``world`` spawned processes; their results, rank order."""
    import torch.multiprocessing as mp

    # glibc serves allocations above its mmap threshold with their own mappings, returned on free; the default
    # threshold grows up to 32 MiB, after which freed tensors stay in the heap and every rank's RSS keeps the
    # full model it built before sharding. A fixed 1 MiB threshold keeps the ranks' resident memory near their live
    # bytes (it changes no measured number: those come from storages and the profiler)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(MiB))
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            run_rank, args=(world, job, os.path.join(tmp, "init"), tmp), nprocs=world, join=True, start_method="spawn"
        )
        results = []
        for rank in range(world):
            with open(os.path.join(tmp, f"rank{rank}.json")) as f:
                results.append(json.load(f))
    return results


def summarise(ranks: List[Dict[str, object]], batch_size: int) -> Dict[str, object]:
    """The largest per-rank numbers of a configuration (ranks differ only in AdamW's unpadded last shard)."""
    top = {
        k: max(r[k] for r in ranks)
        for k in (
            *STATE_KEYS,
            "saved_bytes",
            "saved_param_bytes",
            "peak_increase_bytes",
            "fwd_bwd_peak_increase_bytes",
            "max_rss_bytes",
        )
    }
    top["model_state_bytes"] = sum(top[k] for k in STATE_KEYS)
    top["peak_bytes"] = max(r["param_bytes"] + r["optim_bytes"] + r["peak_increase_bytes"] for r in ranks)
    top["activations_bf16_per_sample_bytes"] = top["saved_bytes"] / batch_size / 2
    top["formula_matches"] = all(r["formula_matches"] for r in ranks)
    top["ranks"] = ranks
    return top


def log_row(name: str, row: Dict[str, object]) -> None:
    logger.info(
        "%-24s weights %8.1f  grads %8.1f  AdamW %8.1f  = states %8.1f MiB | saved activations %7.1f MiB "
        "(+ %.1f MiB weights kept) | peak increase %8.1f (forward + backward %8.1f), peak %8.1f MiB | "
        "formula %s | max RSS %.0f MiB",
        name,
        row["param_bytes"] / MiB,
        row["grad_bytes"] / MiB,
        row["optim_bytes"] / MiB,
        row["model_state_bytes"] / MiB,
        row["saved_bytes"] / MiB,
        row["saved_param_bytes"] / MiB,
        row["peak_increase_bytes"] / MiB,
        row["fwd_bwd_peak_increase_bytes"] / MiB,
        row["peak_bytes"] / MiB,
        "exact" if row["formula_matches"] else "DIFFERS",
        row["max_rss_bytes"] / MiB,
    )


def shapes_only(args) -> Dict[str, object]:
    """Computed states (1 rank, ``--fsdp2-ranks``, ``--gpus``) of a model built on the meta device."""
    with meta_device():
        model, _ = build_model(args.model, args.arch, False, args.text_len)
    compute_bytes = 4 if args.precision == "fp32" else 2
    out = {}
    for ranks in sorted({1, args.gpus, max(args.fsdp2_ranks, 1)}):
        layout = parameter_layout(model, ranks, compute_bytes)
        states = fsdp2_state_bytes(layout["shapes"], ranks, 0)
        out[f"computed_{ranks}_ranks"] = {
            **states,
            "model_state_bytes": sum(states.values()),
            **{k: v for k, v in layout.items() if k != "shapes"},
        }
        logger.info(
            "%s %s on %d rank(s), computed: weights %.1f  grads %.1f  AdamW %.1f = %.1f MiB per rank; root "
            "unit gathered %.1f MiB, largest block unit %.1f MiB",
            args.model,
            args.arch,
            ranks,
            states["param_bytes"] / MiB,
            states["grad_bytes"] / MiB,
            states["optim_bytes"] / MiB,
            sum(states.values()) / MiB,
            layout["root_gather_bytes"] / MiB,
            layout["max_block_gather_bytes"] / MiB,
        )
    shapes = parameter_layout(model, 1, 4)["shapes"]
    out["params"] = sum(_numel(s) for s, _ in shapes)
    out["trainable"] = sum(_numel(s) for s, t in shapes if t)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="kosmos2", choices=["kosmos2", "cosa"], help="model family")
    parser.add_argument(
        "--arch",
        default="base",
        help="kosmos2: bench | base | xl (benchmarks/kosmos2_step.py shapes); cosa: a cosa arch "
        "(cosa_tiny, cosa_base, cosa_base_clip, cosa_large)",
    )
    parser.add_argument("--batch-size", type=int, default=2, help="samples per step and rank")
    parser.add_argument("--text-len", type=int, default=32, help="caption tokens per sample")
    parser.add_argument(
        "--checkpointing",
        default="both",
        choices=["both", "off", "on"],
        help="runs without and/or with --checkpoint-activations",
    )
    parser.add_argument(
        "--fsdp2-ranks",
        type=int,
        default=0,
        help="also run FSDP2 on this many gloo ranks on this CPU and measure each rank (0: only the unsharded model)",
    )
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="FSDP2 compute precision of the sharded runs (--fsdp2-precision); shards and AdamW state stay fp32",
    )
    parser.add_argument("--gpus", type=int, default=8, help="rank count of the computed per-rank model states")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of a configuration, split over its ranks")
    parser.add_argument(
        "--skip-unsharded",
        action="store_true",
        help="run only the FSDP2 configurations of --fsdp2-ranks (the unsharded ones of the same "
        "shape take as long again on a busy CPU)",
    )
    parser.add_argument(
        "--shapes-only",
        action="store_true",
        help="build on the meta device and report the computed model states only (no step)",
    )
    args = parser.parse_args(argv)
    setup_logging()
    if args.fsdp2_ranks < 0 or args.gpus < 1 or args.batch_size < 1:
        parser.error("--fsdp2-ranks must be >= 0, --gpus and --batch-size >= 1")
    if args.skip_unsharded and not args.fsdp2_ranks and not args.shapes_only:
        parser.error("--skip-unsharded needs --fsdp2-ranks N (else nothing runs)")
    results = {"config": vars(args)}
    if args.shapes_only:
        results.update(shapes_only(args))
        report("activation_memory", results)
        return 0
    modes = {"both": (False, True), "off": (False,), "on": (True,)}[args.checkpointing]
    runs = [] if args.skip_unsharded else [("unsharded", 1, ck) for ck in modes]
    if args.fsdp2_ranks:
        runs += [(f"fsdp2_{args.fsdp2_ranks}_ranks", args.fsdp2_ranks, ck) for ck in modes]
    for name, world, ck in runs:
        job = {
            "model": args.model,
            "arch": args.arch,
            "batch_size": args.batch_size,
            "text_len": args.text_len,
            "checkpointing": ck,
            "sharded": name != "unsharded",
            "precision": args.precision,
            "gpus": args.gpus,
            "threads": args.threads,
        }
        key = f"{name}_checkpointing_{'on' if ck else 'off'}"
        results[key] = summarise(run_job(job, world), args.batch_size)
        log_row(key, results[key])
    first = results[next(k for k in results if k.startswith(("unsharded", "fsdp2")))]["ranks"][0]
    logger.info(
        "%s %s: %.1fM params (%.1fM trainable), batch %d x %d text tokens per rank; computed states on %d "
        "ranks: %.1f MiB per rank",
        args.model,
        args.arch,
        first["params"] / 1e6,
        first["trainable"] / 1e6,
        args.batch_size,
        args.text_len,
        args.gpus,
        sum(first[f"computed_{args.gpus}_ranks"].values()) / MiB,
    )
    if len(modes) == 2:
        name = runs[0][0]
        off, on = results[f"{name}_checkpointing_off"], results[f"{name}_checkpointing_on"]
        results["saved_ratio_on_over_off"] = on["saved_bytes"] / max(off["saved_bytes"], 1)
        logger.info(
            "activations saved for the backward: %.1f MiB without / %.1f MiB with --checkpoint-activations "
            "(ratio %.3f, fp32)",
            off["saved_bytes"] / MiB,
            on["saved_bytes"] / MiB,
            results["saved_ratio_on_over_off"],
        )
    report("activation_memory", results)
    logger.info("machine %s", machine())
    return 0


if __name__ == "__main__":
    sys.exit(main())
