"""``python -m unilm_vl.demo``: a local web page for grounded captions with a Kosmos-2 checkpoint (Gradio).

::

    python -m unilm_vl.demo [--checkpoint CKPT_OR_HF_DIR] [--host 127.0.0.1] [--port 7860] [--cpu | --device D]
        [--prompt "<grounding>"] [--examples DIR] [--decoding release|hf] [--beam N] [--max-new-tokens N]
        [--no-repeat-ngram-size N]

Upload or pick an image, choose or write a prompt, press *Ground*: the page shows the image with a coloured box per
grounded phrase, the caption with each phrase highlighted in its box's colour (entity ``k`` takes colour ``k`` of
:data:`unilm_vl.kosmos2_infer.PALETTE`, as ``kosmos2_infer --draw`` colours its PNGs), the phrases with their
normalised boxes, and the raw grounded text (``<phrase>..</phrase><object><patch_index_..>..</object>``).

The checkpoint is anything :class:`unilm_vl.Kosmos2Grounder` loads (our ``kosmos2`` checkpoint or an HF
``save_pretrained`` directory); the default is what the default recipe (``bash train.sh``) writes,
``checkpoints/kosmos2/checkpoint_last.pt``, looked up in the current directory, then in the checkout this package
runs from. Decoding is the grounder's ``release`` preset (the released demo's: greedy, no repeated trigram) unless
``--decoding hf`` or single settings say otherwise. Example images are the synthetic world's held-out ones
(``data/synthetic/eval/images``, looked up the same way) when they exist. The default prompt is ``<grounding>``, the
prompt the synthetic recipe trains; the released demo's prompts (``<grounding>An image of``,
``<grounding>Describe this image in detail:``, microsoft/unilm ``kosmos-2/demo/gradio_app.py``) are in the list.

The page serves 127.0.0.1 only unless ``--host`` says otherwise; it makes no network call of its own: Gradio's
analytics are off, no share link is made, and the theme's fonts ship with Gradio. Gradio is an optional
dependency (``pip install gradio "numpy<2"``); without it the command stops with one ``error:`` line.
"""

from __future__ import annotations

import argparse
import html
import logging
import os
import sys
from typing import List, Optional, Sequence, Tuple

from unilm_vl.kosmos2_infer import PALETTE, draw_entities
from unilm_vl.logging_utils import setup_cli_logging

logger = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = os.path.join("checkpoints", "kosmos2", "checkpoint_last.pt")
"""Where the default recipe (``bash train.sh``, recipes/kosmos2.sh) writes its checkpoint."""
DEFAULT_EXAMPLES = os.path.join("data", "synthetic", "eval", "images")
"""The synthetic world's held-out images (``python -m unilm_vl.data.synthetic --out data/synthetic``)."""
PROMPTS = ("<grounding>", "<grounding>An image of", "<grounding>Describe this image in detail:")
"""The prompt list: the synthetic recipe's prompt, then the released demo's brief and detailed grounded captions."""
MAX_EXAMPLES = 4
IMAGE_HEIGHT = 320
"""Display height of the input and output images in pixels (the drawing's PNG keeps its own size)."""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""The directory above the package: the checkout when the package runs from one (``pip install -e``)."""


# ---- pure helpers: colours and the caption's HTML --------------------------------------------------------------


def entity_colour(k: int) -> Tuple[int, int, int]:
    """The colour of entity ``k``: the one :func:`unilm_vl.kosmos2_infer.draw_entities` draws its boxes in."""
    return PALETTE[k % len(PALETTE)]


def css_rgb(colour: Sequence[int]) -> str:
    """``rgb(r, g, b)``, as browsers report a computed colour."""
    return "rgb({}, {}, {})".format(*colour)


def ink(colour: Sequence[int]) -> str:
    """Black or white text, whichever contrasts more with ``colour``: black above WCAG 2 relative luminance 0.179,
    where the two contrast ratios are equal (``1.05 / (L + 0.05) = (L + 0.05) / 0.05``)."""

    def channel(v: int) -> float:
        v = v / 255
        return v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(v) for v in colour)
    return "#000" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.179 else "#fff"


def _mark(text: str, k: int, title: str) -> str:
    colour = entity_colour(k)
    return (
        f'<mark class="k2-phrase" data-entity="{k}" title="{html.escape(title)}" '
        f'style="background-color: {css_rgb(colour)}; color: {ink(colour)}; padding: 0 2px; '
        f'border-radius: 3px">{html.escape(text)}</mark>'
    )


def caption_html(clean_text: str, entities) -> str:
    """The clean caption as HTML, each entity's phrase in a ``<mark class="k2-phrase" data-entity="k">`` coloured
    :func:`entity_colour` ``(k)``, followed by a list of the entities and their boxes.

    ``entities`` are ``(phrase, (start, end), boxes)`` with ``clean_text[start:end] == phrase`` (HF
    ``post_process_generation``, :func:`unilm_vl.data.grounding.parse_grounded_text`). An object without a phrase
    (empty span) shows as a coloured square where it stood; a span overlapping an earlier one, or outside the text,
    is listed but not marked. The text is HTML-escaped.
    """
    pieces: List[str] = []
    position = 0
    for k, (phrase, (start, end), _) in sorted(enumerate(entities), key=lambda item: (item[1][1][0], item[0])):
        start, end = int(start), int(end)
        if start < position or end < start or start > len(clean_text):
            continue
        pieces.append(html.escape(clean_text[position:start]))
        if end > start:
            pieces.append(_mark(clean_text[start:end], k, phrase))
        else:
            pieces.append(_mark("\u25a0", k, phrase))
        position = max(start, end)
    pieces.append(html.escape(clean_text[position:]))
    rows = []
    for k, (phrase, _, boxes) in enumerate(entities):
        coords = "; ".join("(" + ", ".join(f"{v:.4g}" for v in box) + ")" for box in boxes)
        rows.append(f"<li>{_mark(phrase, k, phrase)} {html.escape(coords)}</li>")
    entity_list = (
        f'<ul class="k2-entities">{"".join(rows)}</ul>' if rows else '<p class="k2-entities">no grounded phrase</p>'
    )
    return f'<div class="k2-caption"><p>{"".join(pieces)}</p>{entity_list}</div>'


# ---- grounding one image --------------------------------------------------------------------------------------


def ground_image(grounder, image, prompt: str, options: Optional[dict] = None):
    """``(drawing, caption_html, grounded_text)`` of one PIL ``image`` and ``prompt`` through
    :meth:`unilm_vl.Kosmos2Grounder.ground` with keyword ``options`` (``decoding`` preset and single settings):
    the image with the boxes drawn (:func:`unilm_vl.kosmos2_infer.draw_entities`, in the view the model saw it
    in), :func:`caption_html` and the raw grounded text. Raises ``ValueError`` without an image."""
    if image is None:
        raise ValueError("no image: upload one or pick an example first")
    text, clean_text, entities = grounder.ground([image], [prompt], **(options or {}))[0]
    drawing = draw_entities(image, entities, grounder.engine.view)
    return drawing, caption_html(clean_text, entities), text


# ---- the page -------------------------------------------------------------------------------------------------


def build_demo(grounder, examples: Sequence[str] = (), options: Optional[dict] = None, prompt: str = PROMPTS[0]):
    """The Gradio page over a loaded :class:`unilm_vl.Kosmos2Grounder`; ``examples`` are image paths offered under
    the input, ``options`` the keyword arguments of every ``ground`` call (:func:`ground_options`), ``prompt`` the
    prompt it starts with. Element ids (for tests and styling): ``input-image``, ``prompt``, ``run``,
    ``output-image``, ``caption``, ``grounded-text``."""
    import gradio as gr

    def run(image, text):
        try:
            return ground_image(grounder, image, text or "", options)
        except ValueError as exc:
            raise gr.Error(str(exc)) from None

    prompts = list(PROMPTS) if prompt in PROMPTS else [prompt, *PROMPTS]
    with gr.Blocks(title="Kosmos-2 grounding (unilm_vl)", analytics_enabled=False) as demo:
        gr.Markdown(
            "## Kosmos-2 grounded captions\nUpload or pick an image, choose or write a prompt, press "
            "**Ground**: each grounded phrase and its box share a colour."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(
                    type="pil",
                    image_mode="RGB",
                    label="Image",
                    elem_id="input-image",
                    sources=["upload", "clipboard"],
                    height=IMAGE_HEIGHT,
                )
                text = gr.Dropdown(prompts, value=prompt, allow_custom_value=True, label="Prompt", elem_id="prompt")
                button = gr.Button("Ground", variant="primary", elem_id="run")
                if examples:
                    gr.Examples([[path, prompt] for path in examples], inputs=[image, text], label="Examples")
            with gr.Column():
                drawing = gr.Image(
                    type="pil",
                    format="png",
                    label="Boxes",
                    elem_id="output-image",
                    interactive=False,
                    height=IMAGE_HEIGHT,
                )
                caption = gr.HTML(label="Grounded caption", elem_id="caption")
                grounded = gr.Textbox(label="Grounded text (raw)", elem_id="grounded-text", lines=3, interactive=False)
        button.click(run, inputs=[image, text], outputs=[drawing, caption, grounded])
    return demo


# ---- command line ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m unilm_vl.demo",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help=f"kosmos2 checkpoint (.pt) or HF Kosmos-2 directory (default: {DEFAULT_CHECKPOINT}, the "
        "default recipe's, in the current directory or the package's checkout)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    where.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--prompt", default=PROMPTS[0], help="the prompt the page starts with")
    p.add_argument(
        "--examples",
        default=None,
        help=f"folder of example images (default: {DEFAULT_EXAMPLES} when it exists); the first "
        f"{MAX_EXAMPLES} in name order are offered",
    )
    g = p.add_argument_group("decoding (Kosmos2Grounder.ground's options; unset: the preset's value)")
    g.add_argument(
        "--decoding",
        choices=("release", "hf"),
        default="release",
        help="preset: the released demo's (greedy, no repeated trigram, up to 500 new tokens) or HF "
        "generate's as HF's Kosmos-2 example calls it (greedy, 64 new tokens)",
    )
    g.add_argument("--beam", type=int, default=None, help="beam size (1 = greedy)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="most tokens generated after the prompt")
    g.add_argument(
        "--no-repeat-ngram-size", type=int, default=None, help="never repeat an n-gram of the prompt + output (0 = off)"
    )
    return p


def _find(path: Optional[str], default: str) -> Tuple[str, List[str]]:
    """(the path to use, the places looked at): ``path`` as given, else ``default`` in the current directory,
    then under :data:`REPO_ROOT`."""
    if path is not None:
        return path, [path]
    tried = [os.path.abspath(default), os.path.join(REPO_ROOT, default)]
    return next((p for p in tried if os.path.exists(p)), tried[0]), list(dict.fromkeys(tried))


def example_images(folder: str, limit: int = MAX_EXAMPLES) -> List[str]:
    """The first ``limit`` image files of ``folder`` in name order (none when it does not exist)."""
    if not os.path.isdir(folder):
        return []
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
    return [os.path.join(os.path.abspath(folder), n) for n in names[:limit]]


def ground_options(args) -> dict:
    """The ``ground`` keyword arguments of the parsed command line: the preset and the settings given."""
    given = {
        "beam": args.beam,
        "max_new_tokens": args.max_new_tokens,
        "no_repeat_ngram_size": args.no_repeat_ngram_size,
    }
    return {"decoding": args.decoding, **{k: v for k, v in given.items() if v is not None}}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_cli_logging(sys.stderr)
    checkpoint, tried = _find(args.checkpoint, DEFAULT_CHECKPOINT)
    if not os.path.exists(checkpoint):
        print(
            f"error: checkpoint not found: {' or '.join(tried)}; train one with `bash train.sh` (the default "
            f"kosmos2 recipe writes {DEFAULT_CHECKPOINT}) or pass --checkpoint CKPT_OR_HF_DIR",
            file=sys.stderr,
        )
        return 2
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read when gradio is imported (and by each Blocks)
    try:
        import gradio  # noqa: F401  (optional dependency: checked before the model loads)
    except ImportError:
        print('error: the demo needs gradio: pip install gradio "numpy<2"', file=sys.stderr)
        return 2
    from unilm_vl import Kosmos2Grounder

    options = ground_options(args)
    try:
        grounder = Kosmos2Grounder.load(checkpoint, device="cpu" if args.cpu else args.device)
        grounder.search_config(**options)  # bad decoding options stop here, not on the first click
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    folder, looked = _find(args.examples, DEFAULT_EXAMPLES)
    examples = example_images(folder)
    if examples:
        logger.info("checkpoint %s; %d example images from %s", checkpoint, len(examples), folder)
    else:
        logger.info("checkpoint %s; no example images (looked in %s): upload images", checkpoint, " and ".join(looked))
    demo = build_demo(grounder, examples, options, args.prompt)
    # example images are copied into Gradio's cache when the page is built: no folder is opened to the browser
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=False,
        ssr_mode=False,
        mcp_server=False,
        enable_monitoring=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
