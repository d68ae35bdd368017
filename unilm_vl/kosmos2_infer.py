"""``python -m unilm_vl.kosmos2_infer``: grounded generation with a trained ``kosmos2`` checkpoint, one image and
prompt per line, with the entities parsed out and optionally drawn.

::

    python -m unilm_vl.kosmos2_infer --checkpoint ckpt.pt|HF_DIR [--input FILE|-] [--preset release|hf]
        [--beam 1] [--beam-rule fairseq|hf] [--no-repeat-ngram-size 3]
        [--max-len-b 500] [--sampling --sampling-topp 0.9 --temperature 0.7 --seed 0] [--batch-size 8]
        [--draw OUT_DIR] [--output out.jsonl] [--spm-model M --dict-path D] [--image-view squash|crop] [--cpu]

``--checkpoint`` takes our ``kosmos2`` checkpoint or a directory written by HF's ``save_pretrained`` of
``Kosmos2ForConditionalGeneration`` and its processor (converted on load: :mod:`unilm_vl.checkpoint`). Decoding
starts from ``--preset`` (:func:`unilm_vl.inference.kosmos2.preset_search_options`): ``release`` (default; the
released demo: greedy, no repeated trigram, 500 new tokens) or ``hf`` (HF's ``generate`` as HF's Kosmos-2 example
calls it: greedy, 64 new tokens, the HF directory's ``generation_config.json``; HF's tokens on the same weights);
the decoding flags given replace single settings.

Input lines are ``image_path<TAB>prompt`` (the released scripts' literal ``<tab>`` also separates), e.g.
``snowman.png<TAB><grounding>An image of``; image paths are relative to the input file's directory (stdin: the
current directory). With stdin a terminal, lines are read interactively. For each input (and each of ``--nbest``
hypotheses) it prints the grounded text (prompt text + continuation), the clean text and the entities
``(phrase, (start, end), [boxes])`` of :func:`unilm_vl.data.grounding.parse_grounded_text`; ``--output`` writes the
same as json lines (with ``hf_text``, the text as HF's processor writes it), ``--draw`` a PNG per input with the
boxes and phrases on the original image.

Boxes are normalised to the model's view of the image: the whole image with the default ``--image-view squash``
(as the released demo), the central square with ``crop`` (the training view); they are drawn on the original image
through :func:`unilm_vl.data.grounding.box_to_pixels`, the float mapping the evaluations score with.

Decoding is :class:`unilm_vl.inference.kosmos2.Kosmos2Inference` (shared with the grounding evaluations); the
checkpoint is read without running code from it (:func:`unilm_vl.checkpoint.load_model`). Bad input (a prompt file line,
a missing image, a checkpoint that is refused or whose vocabulary is not the dictionary's) stops with one
``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, Iterator, Optional, Sequence, TextIO, Tuple

from unilm_vl.checkpoint import load_kosmos2_inference
from unilm_vl.cli import progress
from unilm_vl.data.decode import load_image
from unilm_vl.data.grounding import box_to_pixels
from unilm_vl.inference.kosmos2 import (
    DECODING_PRESETS,
    IMAGE_VIEWS,
    Kosmos2Inference,
    parse_prompt_line,
    read_prompt_file,
)
from unilm_vl.logging_utils import setup_cli_logging
from unilm_vl.modules.generation import BEAM_RULES, SearchConfig

MIN_DRAW_SIDE = 256
"""Drawings of images with a shorter side below this are enlarged by an integer factor (boxes are normalised)."""
PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m unilm_vl.kosmos2_infer",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="kosmos2 fairseq checkpoint (.pt) or HF Kosmos-2 directory (save_pretrained of the model and "
        "its processor)",
    )
    p.add_argument("--input", default="-", help="file of image_path<TAB>prompt lines, or - for stdin")
    p.add_argument("--output", default=None, help="also write one json line per hypothesis to this file")
    p.add_argument("--draw", default=None, metavar="OUT_DIR", help="write a PNG per input with its boxes drawn")
    p.add_argument("--spm-model", default=None, help="override the checkpoint's sentencepiece model path")
    p.add_argument(
        "--dict-path",
        default=None,
        help="override the checkpoint's dict.txt path (none: derived from the sentencepiece model)",
    )
    p.add_argument(
        "--image-view",
        choices=IMAGE_VIEWS,
        default=None,
        help="squash the image to S x S (released inference) or resize + centre-crop (training view); "
        "default: an HF directory's image processor, else squash",
    )
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (file input)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    p.add_argument("--fp16", action="store_true", help="run the model in half precision (CUDA)")
    g = p.add_argument_group("decoding (fairseq's flags; unset ones take the --preset's value)")
    g.add_argument(
        "--preset",
        choices=DECODING_PRESETS,
        default="release",
        help="decoding settings to start from: release (the released demo: greedy, "
        "--no-repeat-ngram-size 3, --max-len-b 500, --min-len 1, fairseq's beam rule) or hf (HF's "
        "generate as its Kosmos-2 example calls it: greedy, 64 new tokens = --max-len-b 63, "
        "--min-len 0, --beam-rule hf, no_repeat_ngram_size of the HF directory's "
        "generation_config.json)",
    )
    g.add_argument("--beam", type=int, default=None, help="beam size (1 = greedy; preset: 1)")
    g.add_argument("--nbest", type=int, default=None, help="hypotheses printed per input (preset: 1)")
    g.add_argument("--max-len-a", type=float, default=None, help="max new tokens = a * prompt length + b (preset: 0)")
    g.add_argument(
        "--max-len-b",
        type=int,
        default=None,
        help="max new tokens = a * prompt length + b (preset: release 500, hf 63)",
    )
    g.add_argument("--min-len", type=int, default=None, help="minimum new tokens before </s> (preset: release 1, hf 0)")
    g.add_argument("--lenpen", type=float, default=None, help="score = sum log-prob / length ** lenpen (preset: 1)")
    g.add_argument(
        "--no-repeat-ngram-size",
        type=int,
        default=None,
        help="never repeat an n-gram of the prompt + output (0 = off; preset: release 3 as released, hf "
        "the HF directory's generation_config.json, else 0)",
    )
    g.add_argument(
        "--beam-rule",
        choices=BEAM_RULES,
        default=None,
        help="how beam search ends and ranks its hypotheses: fairseq's (</s> forced and scored at the "
        "length limit, as released; the release preset's) or HF transformers' generate (HF "
        "max_new_tokens = --max-len-b + 1; the hf preset's); see unilm_vl.modules.generation",
    )
    g.add_argument("--sampling", action="store_true", help="sample instead of beam search")
    g.add_argument("--sampling-topk", type=int, default=-1, help="sample from the k most likely tokens")
    g.add_argument("--sampling-topp", type=float, default=-1.0, help="sample from the top-p nucleus")
    g.add_argument("--temperature", type=float, default=1.0, help="divide the logits by this")
    g.add_argument("--seed", type=int, default=1, help="seed of the sampling generator")
    return p


def draw_entities(image, entities, view: str = "squash"):
    """A copy of the PIL ``image`` with each entity's boxes outlined and labelled with its phrase."""
    from PIL import Image, ImageDraw, ImageFont

    out = image.convert("RGB").copy()
    if min(out.size) < MIN_DRAW_SIDE:  # small images (e.g. the synthetic world's) are enlarged so labels fit
        factor = -(-MIN_DRAW_SIDE // min(out.size))
        out = out.resize((out.width * factor, out.height * factor), Image.NEAREST)
    draw = ImageDraw.Draw(out)
    width, height = out.size
    line = max(1, round(min(width, height) / 160))
    font = ImageFont.load_default(size=max(10, round(min(width, height) / 32)))
    for k, (phrase, _, boxes) in enumerate(entities):
        colour = PALETTE[k % len(PALETTE)]
        for box in boxes:
            x0, y0, x1, y1 = box_to_pixels(box, width, height, view)
            draw.rectangle((x0, y0, x1, y1), outline=colour, width=line)
            tx0, ty0, tx1, ty1 = draw.textbbox((0, 0), phrase, font=font)
            label_top = max(0, y0 - ty1 - 4)
            draw.rectangle((x0, label_top, x0 + tx1 + 4, label_top + ty1 + 4), fill=colour)
            draw.text((x0 + 2, label_top + 2), phrase, fill=(255, 255, 255), font=font)
    return out


def read_stdin() -> Iterator[Tuple[str, str]]:
    """``(where, line)`` pairs from stdin; interactive (with a prompt) when stdin is a terminal."""
    interactive = sys.stdin.isatty()
    number = 0
    while True:
        if interactive:
            try:
                line = input("image_path<TAB>prompt> ")
            except EOFError:
                return
        else:
            line = sys.stdin.readline()
            if not line:
                return
        number += 1
        if line.strip():
            yield f"<stdin>:{number}", line


PRESET_FLAGS = ("beam", "nbest", "max_len_a", "max_len_b", "min_len", "lenpen", "no_repeat_ngram_size", "beam_rule")
"""Decoding flags whose unset value (None) is the ``--preset``'s."""


def search_config(args, preset: Dict[str, Any]) -> SearchConfig:
    """The decoding options of the parsed command line: ``preset`` (SearchConfig fields) with the flags given."""
    fields = {**preset, **{name: getattr(args, name) for name in PRESET_FLAGS if getattr(args, name) is not None}}
    return SearchConfig(
        **{
            **fields,
            "sampling": args.sampling,
            "sampling_topk": args.sampling_topk,
            "sampling_topp": args.sampling_topp,
            "temperature": args.temperature,
        }
    )


def load_engine(args) -> Kosmos2Inference:
    """The decoding engine of the parsed command line's checkpoint and options (the ``hf`` preset reads the HF
    directory's generation config, so the search is set once the checkpoint is loaded)."""
    engine = load_kosmos2_inference(
        args.checkpoint,
        SearchConfig(),
        image_view=args.image_view,
        seed=args.seed,
        cpu=args.cpu,
        fp16=args.fp16,
        spm_model=args.spm_model,
        dict_path=args.dict_path,
    )
    engine.set_search(search_config(args, engine.preset(args.preset)))
    return engine


def format_record(record: dict) -> str:
    entities = ", ".join(
        f"({phrase!r}, {span}, [{', '.join(str(tuple(round(v, 4) for v in b)) for b in boxes)}])"
        for phrase, span, boxes in record["entities"]
    )
    return (
        f"[{record['where']}] {record['image']}  (hypothesis {record['rank']}, score {record['score']:.4f})\n"
        f"  text:     {record['text']}\n  clean:    {record['clean_text']}\n  entities: [{entities}]"
    )


def main(argv: Optional[Sequence[str]] = None, stdout: TextIO = None) -> int:
    args = build_parser().parse_args(argv)
    setup_cli_logging(sys.stderr)
    stdout = stdout or sys.stdout
    interactive = args.input == "-" and sys.stdin.isatty()
    # a file is checked whole (every line has a tab, every image exists) before the model loads
    lines = read_prompt_file(args.input) if args.input != "-" else None
    engine = load_engine(args)
    if args.draw:
        os.makedirs(args.draw, exist_ok=True)
    out = open(args.output, "w", encoding="utf-8") if args.output else None
    batch_size = 1 if interactive else max(1, args.batch_size)
    count = 0
    try:
        batch = []
        prompts = progress(lines, "prompts", unit="prompt") if lines is not None else _stdin_prompts(interactive)
        for line in prompts:
            batch.append(line)
            if len(batch) == batch_size:
                count = _emit(engine, batch, args, out, stdout, count)
                batch = []
        if batch:
            count = _emit(engine, batch, args, out, stdout, count)
    finally:
        if out is not None:
            out.close()
    return 0


def _stdin_prompts(interactive: bool):
    """Parsed stdin lines (image paths relative to the current directory); in interactive mode a bad line is
    reported and skipped, otherwise it stops the run."""
    for where, text in read_stdin():
        try:
            line = parse_prompt_line(text, where, os.getcwd())
            if not os.path.isfile(line.image):
                raise FileNotFoundError(f"{where}: image not found: {line.image}")
        except (ValueError, FileNotFoundError) as exc:
            if not interactive:
                raise
            print(f"error: {exc}", file=sys.stderr)
            continue
        yield line


def _emit(engine: Kosmos2Inference, lines, args, out, stdout, count: int) -> int:
    records = engine.run(lines)
    for record in records:
        print(format_record(record), file=stdout, flush=True)
        if record["rank"] == 0 and args.draw:
            image = load_image(record["image"])
            stem = os.path.splitext(os.path.basename(record["image"]))[0]
            record["drawing"] = os.path.join(args.draw, f"{count:05d}_{stem}.png")
            draw_entities(image, record["entities"], engine.view).save(record["drawing"])
            count += 1
        if out is not None:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return count


if __name__ == "__main__":
    from unilm_vl.cli import run_cli

    raise SystemExit(run_cli(main))
