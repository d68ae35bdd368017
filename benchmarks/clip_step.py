"""CLIP training step: our fairseq task/model/criterion through ``fairseq.trainer.Trainer.train_step`` vs a plain
open_clip loop (``open_clip.create_model`` + ``open_clip.loss.ClipLoss`` + ``torch.optim.AdamW``).

Same open_clip tower config, same initial weights (the peer loads our towers' state dict), same pre-collated batch
(random pixels, random token ids: the step is timed, not the data pipeline), same optimiser maths: AdamW
(fairseq's ``adam`` has decoupled weight decay), lr 5e-4, betas (0.9, 0.98), eps 1e-6, weight decay 0.2 on every
parameter (with ``--optimizer open_clip_adamw``: ours is torch AdamW with open_clip's weight-decay exclusion, and the
peer excludes the same tensors, as open_clip_train does), no gradient clipping; both clamp the logit scale after the
step. One step = forward, loss, backward, optimiser step (fairseq's also does its logging-output reduction and
gradient-norm computation: part of our cost).

    .venv/bin/python benchmarks/clip_step.py [--model unilm-vl-clip-tiny] [--batch-size 32] [--warmup 3] [--iters 10]

Prints (logs) median seconds per step of each side and ``ratio = open_clip time / our time`` (>= 1.0: at least
parity). ``--device cuda --precision fp16`` runs the GPU variant and also reports the model FLOPs utilisation
(FLOPs counted by torch's ``FlopCounterMode`` on one forward, x3 for forward + backward, over the dense 16-bit peak
of the GPU or ``--peak-tflops``). Mixed precision is fairseq's ``--amp`` (fp16 autocast + dynamic loss scaling)
against ``torch.autocast(float16)`` + ``GradScaler``: fairseq 0.12 has no bf16 autocast (``--bf16`` implies
``--tpu`` and needs torch_xla, and ``--amp`` is fp16). ``--precision fp16`` on CPU runs the same code paths
(``benchmarks/gpu_check.sh --smoke``); its timings say nothing about a GPU.
"""

import argparse
import copy
import math
import os
import sys

import torch

from _timing import interleaved, mfu, peak_tflops, report, setup_logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_ours(args):
    """Task, model, criterion and Trainer exactly as ``fairseq-train --user-dir unilm_vl`` builds them from these
    flags (its trainer is :class:`unilm_vl.trainer.UnilmTrainer`, fairseq's own on a GPU without ``--fsdp2``)."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from unilm_vl.trainer import UnilmTrainer

    flags = [
        REPO,
        "--user-dir",
        os.path.join(REPO, "unilm_vl"),
        "--task",
        "image_text_contrastive",
        "--arch",
        "clip",
        "--open-clip-model",
        args.model,
        "--criterion",
        "clip",
        "--optimizer",
        args.optimizer,
        "--adam-betas",
        "(0.9, 0.98)",
        "--adam-eps",
        "1e-6",
        "--weight-decay",
        "0.2",
        "--lr",
        "5e-4",
        "--clip-norm",
        "0",
        "--batch-size",
        str(args.batch_size),
        "--seed",
        "1",
        "--log-format",
        "none",
    ]
    if args.device == "cpu":
        flags.append("--cpu")
    if args.precision == "fp16":
        flags.append("--amp")  # fairseq's autocast path: fp16 + dynamic loss scaling (its --bf16 needs torch_xla)
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), flags))
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    return UnilmTrainer(cfg, task, model, criterion), model


def batch(model, args):
    g = torch.Generator().manual_seed(0)
    size, length = model.image_size, model.context_length
    return {
        "id": list(range(args.batch_size)),
        "nsentences": args.batch_size,
        "ntokens": args.batch_size * length,
        "net_input": {
            "image": torch.randn(args.batch_size, 3, size, size, generator=g),
            "text": torch.randint(1, 49000, (args.batch_size, length), generator=g),
        },
    }


def build_peer(our_model, args):
    """The open_clip training loop of open_clip_train (forward, ClipLoss, backward, AdamW, clamp), minus data."""
    import open_clip
    from open_clip.loss import ClipLoss

    model = open_clip.create_model(args.model, pretrained=None, output_dict=True).to(args.device)
    model.load_state_dict(copy.deepcopy(our_model.towers.clip.state_dict()))
    model.train()
    loss_fn = ClipLoss()
    # the same decay as our side: every tensor (fairseq adam), or open_clip_train's exclusion (open_clip_adamw)
    params = list(model.parameters())
    if args.optimizer == "open_clip_adamw":
        from unilm_vl.optim.open_clip_adamw import tag_parameter_names, weight_decay_groups

        tag_parameter_names(model)
        params = weight_decay_groups(params)
    optimizer = torch.optim.AdamW(params, lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    max_scale = math.log(100)
    return model, loss_fn, optimizer, max_scale


def tower_flops(model, sample) -> float:
    """Training FLOPs of one step: 3 x (2 x multiply-adds) of the towers' forward, counted with torch's
    FlopCounterMode on a forward pass (attention and matmuls included)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(**sample["net_input"])
    return 3.0 * counter.get_total_flops()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="unilm-vl-clip-tiny", help="open_clip registry name of the towers")
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per step")
    parser.add_argument(
        "--optimizer",
        default="adam",
        choices=["adam", "open_clip_adamw"],
        help="our optimizer: fairseq's adam (decays every tensor) or open_clip_adamw (torch AdamW "
        "with open_clip's weight-decay exclusion); the peer decays the same tensors",
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side")
    parser.add_argument("--iters", type=int, default=10, help="timed steps per side (median reported)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both sides run")
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "fp16"],
        help="fp16: autocast + dynamic loss scaling on both sides (ours: fairseq --amp)",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="dense peak TFLOP/s for the MFU (default: the GPU's 16-bit peak from its name, "
        "989 on H100/H200; no MFU on CPU unless given)",
    )
    args = parser.parse_args(argv)
    setup_logging()
    torch.manual_seed(0)
    trainer, our_model = build_ours(args)
    sample = batch(our_model, args)
    peer_model, loss_fn, optimizer, max_scale = build_peer(our_model, args)
    peer_input = {k: v.to(args.device) for k, v in sample["net_input"].items()}  # for the FLOP count
    mixed = args.precision == "fp16"
    autocast = torch.autocast(args.device, dtype=torch.float16, enabled=mixed)
    scaler = torch.amp.GradScaler(args.device, enabled=mixed)

    def ours():
        trainer.train_step([sample])

    def peer():
        optimizer.zero_grad(set_to_none=True)
        # the batch comes from host memory every step on both sides (fairseq's train_step moves it; so does
        # open_clip_train's loop, non_blocking); a no-op on CPU
        batch_input = {k: v.to(args.device, non_blocking=True) for k, v in sample["net_input"].items()}
        with autocast:
            out = peer_model(**batch_input)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():
            peer_model.logit_scale.clamp_(0, max_scale)

    timing = interleaved(ours, peer, args.warmup, args.iters)
    results = {
        "config": vars(args),
        "train_step": timing,
        "samples_per_s": {"ours": args.batch_size / timing["ours_s"], "peer": args.batch_size / timing["peer_s"]},
    }
    peak = peak_tflops(args.device, args.peak_tflops)
    if args.device == "cuda" or peak:
        flops = tower_flops(peer_model, {"net_input": peer_input})
        results["step_tflops"] = flops / 1e12
        if peak and (mixed or args.peak_tflops is not None):  # the table holds 16-bit peaks
            results["peak_tflops"] = peak
            results["mfu_ours"] = mfu(flops, timing["ours_s"], peak)
            results["mfu_peer"] = mfu(flops, timing["peer_s"], peak)
    report("clip_step", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
