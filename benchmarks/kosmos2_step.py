"""Kosmos-2: training step and greedy generation (KV cache) of ours vs HF transformers'
``Kosmos2ForConditionalGeneration`` with the SAME weights (mapped by :func:`unilm_vl.convert.to_hf_state_dict`).

Training step (both sides: forward, caption-token NLL, backward, ``torch.optim.AdamW`` step, image tower frozen):
ours is :class:`~unilm_vl.modules.kosmos2.Kosmos2Module` + the ``kosmos2_lm`` criterion (token-mean NLL over the
caption tokens; fairseq's Trainer overhead is not included here, see clip_step.py for that); HF is the model's own
``labels`` loss over the same tokens (-100 elsewhere). The first losses of both sides are logged: they agree when
the weight mapping is right.

Generation: B prompts ``<s> <image> [L slots] </image> text``, greedy (or ``--beam k``), exactly ``--new-tokens``
new tokens per row (``</s>`` banned before), ours :func:`unilm_vl.modules.generation.generate` vs HF ``generate``
(both with a KV cache); tokens/s = B x new tokens / median time. Ours runs ``beam_rule="hf"`` with
``max_len_b = new tokens - 1``: like HF's ``max_new_tokens`` it stops after the n-th token, so both sides run the
prompt and n - 1 single-token steps (fairseq's rule would add one step to score a forced ``</s>``); at ``--beam k``
both run HF's beam search (``num_beams=k``, length penalty 1, no early stopping). ``--no-repeat-ngram-size n``
bans repeated n-grams on both sides (the released Kosmos-2 decodes with 3). The share of rows whose (best) tokens
agree is logged.

Ours runs its fp32 CPU GEMMs that need no gradient through oneDNN (:mod:`unilm_vl.modules.onednn`; HF's go to
MKL); ``UNILM_VL_ONEDNN=0`` in the environment measures ours without it. The ``RESULT`` line says which
(``ours_onednn``).

    .venv/bin/python benchmarks/kosmos2_step.py [--arch bench] [--batch-size 8] [--warmup 2] [--iters 8] \
        [--beam 1] [--no-repeat-ngram-size 0] [--skip-training]

``--arch``: ``bench`` (CPU default: 32 px 2 x 64 ViT, 16 queries, 4 x 256 decoder, vocab 8000), ``base``
(ViT-B/16, 64 queries, 12 x 768) and ``xl`` (the released 1.6B shape). ``--device cuda --precision bf16`` runs
both sides under bf16 autocast and reports the model FLOPs utilisation: training FLOPs = 3 x the forward FLOPs of
connector + decoder (forward and backward) + 1 x the frozen image tower's forward (it has no backward), each counted
by torch's ``FlopCounterMode`` on one forward, over the GPU's dense 16-bit peak or ``--peak-tflops``. Models are
built directly on ``--device``. ``--precision bf16`` on CPU runs the same code paths
(``benchmarks/gpu_check.sh --smoke``); its timings say nothing about a GPU.
"""

import argparse
import copy
import sys

import torch

from _timing import interleaved, logger, mfu, peak_tflops, report, setup_logging

BOS, PAD, EOS, IMAGE, IMAGE_END = 0, 1, 2, 5, 6


def our_config(arch: str, vocab_size: int):
    from unilm_vl.modules.kosmos2 import (
        Kosmos2Config,
        Kosmos2ConnectorConfig,
        Kosmos2DecoderConfig,
        Kosmos2VisionConfig,
        kosmos2_xl_config,
    )

    if arch == "xl":
        cfg = kosmos2_xl_config()
    elif arch == "base":
        cfg = Kosmos2Config(
            vision=Kosmos2VisionConfig("ViT-B-16", force_quick_gelu=True),
            connector=Kosmos2ConnectorConfig(64, 12),
            decoder=Kosmos2DecoderConfig(
                vocab_size=65037, embed_dim=768, layers=12, attention_heads=12, ffn_embed_dim=3072
            ),
        )
    else:
        cfg = Kosmos2Config(
            vision=Kosmos2VisionConfig("unilm-vl-kosmos2-vision-tiny", force_quick_gelu=True),
            connector=Kosmos2ConnectorConfig(16, 4),
            decoder=Kosmos2DecoderConfig(
                vocab_size=vocab_size, embed_dim=256, layers=4, attention_heads=4, ffn_embed_dim=1024
            ),
        )
    # no dropout anywhere: both sides must compute the same function (HF uses one dropout for both)
    cfg.connector.attention_dropout = 0.0
    cfg.decoder.dropout = cfg.decoder.attention_dropout = cfg.decoder.activation_dropout = 0.0
    return cfg


def build_models(args):
    from transformers import Kosmos2Config as HFKosmos2Config
    from transformers import Kosmos2ForConditionalGeneration

    from unilm_vl.convert import hf_config_dict, to_hf_state_dict
    from unilm_vl.modules.kosmos2 import Kosmos2Module

    torch.manual_seed(0)
    cfg = our_config(args.arch, args.vocab_size)
    with torch.device(args.device):  # initialise on the device: the xl shape's CPU init alone takes minutes
        ours = Kosmos2Module(cfg)
        hf = Kosmos2ForConditionalGeneration(HFKosmos2Config(**hf_config_dict(cfg)))
    result = hf.load_state_dict(to_hf_state_dict(copy.deepcopy(ours.state_dict()), cfg), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(
            f"weight mapping incomplete: missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    hf.vision_model.requires_grad_(False)  # frozen, as ours by default
    return cfg, ours.to(args.device), hf.to(args.device)


def train_flops(model, tokens, image, mask, autocast) -> dict:
    """Training FLOPs of one step of ``model`` (Kosmos2Module): 3 x forward for the trained parts (forward +
    backward), 1 x forward for a frozen image tower (no backward), each forward counted by ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    with autocast:  # with gradients on, as in training (FlopCounterMode's module tracker expects them)
        with FlopCounterMode(display=False) as total:
            model(tokens, image, mask)
        with FlopCounterMode(display=False) as tower:
            model.vision(image)
    total, tower = total.get_total_flops(), tower.get_total_flops()
    frozen = bool(model.cfg.freeze_vision)
    flops = 3.0 * (total - tower) + (1.0 if frozen else 3.0) * tower
    return {
        "step_flops": flops,
        "forward_flops": float(total),
        "tower_forward_flops": float(tower),
        "tower_frozen": frozen,
    }


def prompts(cfg, batch_size, text_len, device):
    """B x T tokens ``<s> <image> [L slots] </image> text`` and the image mask (no padding)."""
    g = torch.Generator().manual_seed(1)
    L = cfg.connector.latent_query_num
    text = torch.randint(20, cfg.decoder.vocab_size, (batch_size, text_len), generator=g)
    head = torch.tensor([BOS, IMAGE, *range(10, 10 + L), IMAGE_END]).repeat(batch_size, 1)
    tokens = torch.cat([head, text], dim=1)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, 2 : 2 + L] = True
    size = int(cfg.vision.model_name != "unilm-vl-kosmos2-vision-tiny") * 192 + 32  # 32 px tiny, 224 otherwise
    image = torch.randn(batch_size, 3, size, size, generator=g)
    return tokens.to(device), mask.to(device), image.to(device)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="bench", choices=["bench", "base", "xl"], help="model shape")
    parser.add_argument("--vocab-size", type=int, default=8000, help="vocabulary of the bench shape")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per step / prompts per generate call")
    parser.add_argument("--text-len", type=int, default=48, help="caption tokens per training sample")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated per prompt")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per side")
    parser.add_argument("--iters", type=int, default=8, help="timed calls per side (median reported)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both sides run")
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="bf16: autocast on both sides (on CPU a code-path check, not a speed measurement)",
    )
    parser.add_argument("--skip-generation", action="store_true", help="time the training step only")
    parser.add_argument("--skip-training", action="store_true", help="time generation only")
    parser.add_argument("--beam", type=int, default=1, help="beam size of both generate calls (1 = greedy)")
    parser.add_argument(
        "--no-repeat-ngram-size",
        type=int,
        default=0,
        help="ban repeated n-grams of this size in both generate calls (0 = off)",
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
    import types

    from unilm_vl.criterions.kosmos2_lm import Kosmos2LmCriterion, Kosmos2LmCriterionConfig
    from unilm_vl.modules.generation import SearchConfig, generate

    cfg, ours, hf = build_models(args)
    tokens, mask, image = prompts(cfg, args.batch_size, args.text_len, args.device)
    caption = torch.zeros_like(mask)
    caption[:, 3 + cfg.connector.latent_query_num :] = True  # positions whose token is predicted: the caption
    target = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], PAD)], dim=1)
    sample = {
        "net_input": {"src_tokens": tokens, "image": image, "image_mask": mask},
        "target": target,
        "loss_mask": torch.cat([caption[:, 1:], torch.zeros_like(caption[:, :1])], dim=1),
        "ntokens": tokens.numel(),
        "nsentences": args.batch_size,
    }
    labels = tokens.masked_fill(~caption, -100)  # HF shifts labels inside its loss
    criterion = Kosmos2LmCriterion(
        Kosmos2LmCriterionConfig(), types.SimpleNamespace(target_dictionary=types.SimpleNamespace(pad=lambda: PAD))
    )
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-4)
    opt_hf = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-4)
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    first = {}

    def step_ours():
        ours.train()
        opt_ours.zero_grad(set_to_none=True)
        with autocast:
            loss, sample_size, _ = criterion(ours, sample)
            loss = loss / sample_size
        loss.backward()
        opt_ours.step()
        first.setdefault("ours", loss.item())

    def step_hf():
        hf.train()
        opt_hf.zero_grad(set_to_none=True)
        with autocast:
            loss = hf(
                pixel_values=image,
                input_ids=tokens,
                image_embeds_position_mask=mask.long(),
                attention_mask=torch.ones_like(tokens),
                labels=labels,
            ).loss
        loss.backward()
        opt_hf.step()
        first.setdefault("hf", loss.item())

    from unilm_vl.modules.onednn import onednn_enabled

    # ours runs its fp32 CPU GEMMs without autograd through oneDNN unless UNILM_VL_ONEDNN=0 (modules/onednn.py)
    results = {"config": vars(args), "ours_onednn": onednn_enabled()}
    if not args.skip_training:
        results["train_step"] = interleaved(step_ours, step_hf, args.warmup, args.iters)
        logger.info("first training loss (same weights, same batch): ours %.5f, HF %.5f", first["ours"], first["hf"])
        results["first_loss"] = first
    peak = peak_tflops(args.device, args.peak_tflops)
    if not args.skip_training and (args.device == "cuda" or peak):
        counted = train_flops(ours, tokens, image, mask, autocast)
        flops = counted["step_flops"]
        results["flops"] = counted
        results["step_tflops"] = flops / 1e12
        if peak and (args.precision == "bf16" or args.peak_tflops is not None):  # the table holds 16-bit peaks
            results["peak_tflops"] = peak
            results["mfu_ours"] = mfu(flops, results["train_step"]["ours_s"], peak)
            results["mfu_peer"] = mfu(flops, results["train_step"]["peer_s"], peak)

    if not args.skip_generation:
        # the weights moved during the timed steps: re-copy ours into HF so both decode the same model
        from unilm_vl.convert import to_hf_state_dict

        hf.load_state_dict(to_hf_state_dict(copy.deepcopy(ours.state_dict()), cfg), strict=False)
        ours.eval()
        hf.eval()
        n = args.new_tokens
        prompt_tokens = tokens[:, : 3 + cfg.connector.latent_query_num + 4]  # image + 4 text tokens
        prompt_mask = mask[:, : prompt_tokens.size(1)]
        search = SearchConfig(
            beam=args.beam, max_len_b=n - 1, min_len=n, beam_rule="hf", no_repeat_ngram_size=args.no_repeat_ngram_size
        )
        outputs = {}

        @torch.no_grad()
        def gen_ours():
            with autocast:
                hyps = generate(ours, prompt_tokens, image, prompt_mask, search, pad_idx=PAD, eos_idx=EOS)
            outputs["ours"] = [h[0].tokens[:n].tolist() for h in hyps]

        @torch.no_grad()
        def gen_hf():
            with autocast:
                out = hf.generate(
                    pixel_values=image,
                    input_ids=prompt_tokens,
                    image_embeds_position_mask=prompt_mask.long(),
                    attention_mask=torch.ones_like(prompt_tokens),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    num_beams=args.beam,
                    eos_token_id=EOS,
                    pad_token_id=PAD,
                    no_repeat_ngram_size=args.no_repeat_ngram_size,
                    length_penalty=1.0,
                    early_stopping=False,
                )
            outputs["hf"] = out[:, prompt_tokens.size(1) :].tolist()

        timing = interleaved(gen_ours, gen_hf, max(1, args.warmup // 2), max(3, args.iters // 2))
        generated = args.batch_size * n
        results["greedy_generation" if args.beam == 1 else f"beam{args.beam}_generation"] = timing
        results["tokens_per_s"] = {"ours": generated / timing["ours_s"], "peer": generated / timing["peer_s"]}
        results["new_tokens"] = {
            "ours": [len(t) for t in outputs["ours"]][:1],
            "hf": [len(t) for t in outputs["hf"]][:1],
        }
        agree = sum(a == b for a, b in zip(outputs["ours"], outputs["hf"])) / args.batch_size
        results["greedy_rows_identical"] = agree  # the key gpu_check.py reads (the best beam at --beam k)
        logger.info("generated tokens identical on %.0f%% of rows", 100 * agree)
    report("kosmos2_step", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
