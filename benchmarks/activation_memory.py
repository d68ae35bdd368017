"""Activation memory of one training step with and without ``--checkpoint-activations`` (Kosmos-2 and COSA
shapes), and the per-GPU memory that follows for DDP and FSDP.

Measured quantity: the bytes of the tensors the forward pass keeps for the backward (``torch.autograd.graph.
saved_tensors_hooks`` during the forward of the loss, counted once per storage). That is the activation memory a GPU
holds at the end of the forward, the part that checkpointing removes (a checkpointed block keeps only its input and
recomputes the rest during the backward) and that scales with batch and sequence length; it is exact and
device-independent (fp32 here; bf16 / fp16 autocast keeps most of them in 2 bytes). Not counted: weights, gradients,
optimizer state (in the per-GPU table below) and the transient buffers of single ops.

The per-GPU table adds the model states that do not depend on the batch, per trainable parameter: mixed-precision
Adam keeps fp16/bf16 weights (2 B) + fp32 master weights (4 B) + gradients (2 B) + two fp32 Adam moments (8 B) =
16 B (frozen parameters: 2 B); DDP replicates them on every GPU, FSDP (ZeRO-3 sharding) divides them by the number of
GPUs (plus one unsharded layer at a time, not counted).

    .venv/bin/python benchmarks/activation_memory.py --model kosmos2 --arch base --batch-size 2
    .venv/bin/python benchmarks/activation_memory.py --model cosa --arch cosa_base_clip --batch-size 2
"""
import argparse
import logging
import os
import sys

import torch

from _timing import machine, report, setup_logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
logger = logging.getLogger("benchmarks")
MiB = 2 ** 20


def build_kosmos2(arch: str, batch_size: int, text_len: int, checkpointing: bool):
    """(model, forward returning the loss) for a Kosmos-2 shape: frozen tower, token-mean NLL over the text positions."""
    import torch.nn.functional as F

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from kosmos2_step import our_config, prompts

    from unilm_vl.modules.kosmos2 import Kosmos2Module

    cfg = our_config(arch, 8000)
    cfg.decoder.checkpoint_activations = checkpointing
    model = Kosmos2Module(cfg).train()
    tokens, mask, image = prompts(cfg, batch_size, text_len, "cpu")

    def forward():
        logits = model(tokens[:, :-1], image, mask[:, :-1])["lm_logits"]  # B x T-1 x V
        start = cfg.connector.latent_query_num + 2
        return F.cross_entropy(logits[:, start:].flatten(0, 1), tokens[:, start + 1:].flatten())
    return model, forward


def build_cosa(arch: str, batch_size: int, text_len: int, checkpointing: bool):
    """(model, forward returning the loss) for a COSA shape: one pretraining step (ret_cret_ccap_cmlm, K = 4 partners)."""
    from argparse import Namespace

    from fairseq.models import ARCH_CONFIG_REGISTRY

    from unilm_vl.criterions.cosa import CosaCriterion, CosaCriterionConfig
    from unilm_vl.models.cosa import CosaModel, CosaModelConfig, CosaSpecialIds

    args = Namespace(checkpoint_activations=checkpointing)
    ARCH_CONFIG_REGISTRY[arch](args)
    special = CosaSpecialIds(vocab_size=30522, pad_id=0, cls_id=101, sep_id=102, mask_id=103, unk_id=100)
    model = CosaModel(CosaModelConfig(**vars(args)), special, text_len).train()
    criterion = CosaCriterion(CosaCriterionConfig(cosa_tasks="ret_cret_ccap_cmlm"), None)
    g = torch.Generator().manual_seed(0)
    size = model.net.vision.image_size
    ids = torch.randint(1000, 30000, (batch_size, text_len), generator=g)
    ids[:, 0], ids[:, -1] = special.cls_id, special.sep_id
    sample = {"id": list(range(batch_size)), "nsentences": batch_size, "ntokens": int(ids.numel()),
              "net_input": {"frames": torch.randn(batch_size, 1, 3, size, size, generator=g), "text_ids": ids,
                            "text_mask": torch.ones_like(ids)}}

    def forward():
        return criterion(model, sample)[0]
    return model, forward


def measure(model_kind: str, arch: str, batch_size: int, text_len: int, checkpointing: bool) -> dict:
    """Parameters and the bytes saved for the backward by one forward (one backward checks the step runs)."""
    torch.manual_seed(0)
    build = build_kosmos2 if model_kind == "kosmos2" else build_cosa
    model, forward = build(arch, batch_size, text_len, checkpointing)
    storages = {}

    def pack(t):
        storages[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    loss.backward()
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params": params, "trainable": trainable, "saved_bytes": sum(storages.values()),
            "loss": float(loss)}


def per_gpu_table(params: int, trainable: int, saved_bytes: float, batch_size: int, gpus: int):
    """Rows of GiB per GPU: model states under DDP / FSDP and activations per sample (bf16: half the fp32 bytes)."""
    states = 16 * trainable + 2 * (params - trainable)  # bytes: mixed-precision Adam, frozen weights in half
    per_sample = saved_bytes / batch_size / 2  # bf16 activations, per sample
    gib = 2 ** 30
    return {"model_states_ddp_gib": states / gib, f"model_states_fsdp{gpus}_gib": states / gpus / gib,
            "activations_bf16_per_sample_gib": per_sample / gib}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="kosmos2", choices=["kosmos2", "cosa"])
    parser.add_argument("--arch", default="base",
                        help="kosmos2: bench | base | xl (benchmarks/kosmos2_step.py shapes); cosa: a cosa arch "
                             "(cosa_tiny, cosa_base, cosa_base_clip, cosa_large)")
    parser.add_argument("--batch-size", type=int, default=2, help="samples per step")
    parser.add_argument("--text-len", type=int, default=32, help="caption tokens per sample")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs of the FSDP row of the per-GPU table")
    args = parser.parse_args(argv)
    setup_logging()
    torch.set_num_threads(2)
    results = {"config": vars(args)}
    for mode in ("off", "on"):
        results[f"checkpointing_{mode}"] = measure(args.model, args.arch, args.batch_size, args.text_len,
                                                   mode == "on")
    off, on = results["checkpointing_off"], results["checkpointing_on"]
    results["saved_ratio_on_over_off"] = on["saved_bytes"] / max(off["saved_bytes"], 1)
    for mode, r in (("off", off), ("on", on)):
        results[f"per_gpu_{mode}"] = per_gpu_table(r["params"], r["trainable"], r["saved_bytes"], args.batch_size,
                                                   args.gpus)
    logger.info("%s %s: %.1fM params (%.1fM trainable), batch %d x %d text tokens", args.model, args.arch,
                off["params"] / 1e6, off["trainable"] / 1e6, args.batch_size, args.text_len)
    logger.info("activations saved for the backward: %.1f MiB without / %.1f MiB with --checkpoint-activations "
                "(ratio %.3f, fp32; loss %.5f / %.5f)", off["saved_bytes"] / MiB, on["saved_bytes"] / MiB,
                results["saved_ratio_on_over_off"], off["loss"], on["loss"])
    for mode in ("off", "on"):
        row = results[f"per_gpu_{mode}"]
        logger.info("per GPU (checkpointing %s): %s", mode, ", ".join(f"{k} {v:.2f}" for k, v in row.items()))
    report("activation_memory", results)
    logger.info("machine %s", machine())
    return 0


if __name__ == "__main__":
    sys.exit(main())
