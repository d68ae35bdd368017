"""The grounding demo page (``python -m unilm_vl.demo``): the caption's HTML and colours, the command line's errors
and wiring, and the page itself in a real headless Chromium driven by selenium: upload an image, press Ground, find
the phrases highlighted in their boxes' colours and the boxes drawn on the returned image.

The browser test runs on a tiny random Kosmos-2 checkpoint whose decoding is fixed (the search returns a chosen
grounded token sequence; decoding itself is tested in test_kosmos2_generate.py): the test is about the page. It
needs gradio and selenium (``pip install gradio "numpy<2" selenium``) and Debian's Chromium
(``apt-get install -y chromium chromium-driver``) and skips, naming what is missing, without them. Set
``UNILM_VL_DEMO_SCREENSHOT=1`` to also copy the page's screenshot to tests/artifacts/demo.png (not committed).
"""

import io
import os
import re
import shutil
import socket
import sys
import urllib.request

import pytest
import torch
from PIL import Image, ImageDraw

from unilm_vl import convert as C
from unilm_vl import demo
from unilm_vl.data import build_vocab
from unilm_vl.data.grounding import build_kosmos2_tokenizer, parse_grounded_text
from unilm_vl.kosmos2_infer import PALETTE, draw_entities
from unilm_vl.modules.generation import Hypothesis
from unilm_vl.modules.kosmos2 import Kosmos2Module, kosmos2_tiny_config

from conftest import REPO

CAPTIONS = [
    "a red dog on the grass",
    "two blue cats play with a ball",
    "a man rides a green bike",
    "the sky is blue and the grass is green",
] * 20
NUM_BINS = 8  # 8 x 8 location grid of the tiny model
L = 4  # image slots
# the fixed continuation the stubbed search returns: two grounded phrases, entity 0 and entity 1
CONTINUATION = (
    "<phrase> a red dog</phrase><object><patch_index_0010><patch_index_0036></object> on"
    "<phrase> the grass</phrase><object><patch_index_0048><patch_index_0063></object>"
)
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
)


# ---- the caption's HTML -----------------------------------------------------------------------------------------


def marks(fragment):
    """(entity, background rgb, text) of each <mark> of caption_html, in order."""
    found = re.findall(
        r'<mark class="k2-phrase" data-entity="(\d+)"[^>]*background-color: rgb\((\d+), (\d+), '
        r"(\d+)\)[^>]*>(.*?)</mark>",
        fragment,
    )
    return [(int(k), (int(r), int(g), int(b)), text) for k, r, g, b, text in found]


def test_caption_html_marks_each_phrase_in_its_box_colour():
    clean, entities = parse_grounded_text("<grounding>" + CONTINUATION, NUM_BINS)
    assert clean == "a red dog on the grass" and [e[0] for e in entities] == ["a red dog", "the grass"]
    fragment = demo.caption_html(clean, entities)
    caption = fragment.split('<ul class="k2-entities">')[0]
    assert marks(caption) == [(0, PALETTE[0], "a red dog"), (1, PALETTE[1], "the grass")]
    assert re.sub(r"<[^>]+>", "", caption) == clean  # the caption's text is the clean text, nothing dropped
    # the entity list repeats each phrase in its colour with its boxes (box of cells 10 -> 36 on the 8 x 8 grid)
    listed = fragment.split('<ul class="k2-entities">')[1]
    assert marks(listed) == [(0, PALETTE[0], "a red dog"), (1, PALETTE[1], "the grass")]
    assert "(0.3125, 0.1875, 0.5625, 0.5625)" in listed


def test_caption_html_escapes_and_places_unnamed_objects():
    entities = [
        ("<b>", (2, 5), [(0.0, 0.0, 0.5, 0.5)]),
        ("<patch_index_1><patch_index_9>", (9, 9), [(0.1, 0.1, 0.9, 0.9)]),
        ("x", (3, 4), [(0.0, 0.0, 1.0, 1.0)]),
    ]  # overlaps entity 0: listed, not marked
    fragment = demo.caption_html("a <b> & c.", entities)
    caption = fragment.split('<ul class="k2-entities">')[0]
    assert marks(caption) == [(0, PALETTE[0], "&lt;b&gt;"), (1, PALETTE[1], "\u25a0")]
    assert re.sub(r"<[^>]+>", "", caption) == "a &lt;b&gt; &amp; c\u25a0."
    assert len(marks(fragment.split('<ul class="k2-entities">')[1])) == 3
    assert "no grounded phrase" in demo.caption_html("plain text", [])


def test_entity_colours_and_ink():
    assert [demo.entity_colour(k) for k in (0, 1, len(PALETTE))] == [PALETTE[0], PALETTE[1], PALETTE[0]]
    assert demo.css_rgb((230, 25, 75)) == "rgb(230, 25, 75)"
    # relative luminance: white 1.0 and black 0.0; (70, 240, 240) 0.70 -> black ink; (145, 30, 180) 0.10 -> white
    assert [demo.ink(c) for c in ((255, 255, 255), (0, 0, 0), (70, 240, 240), (145, 30, 180))] == [
        "#000",
        "#fff",
        "#000",
        "#fff",
    ]


# ---- the command line -------------------------------------------------------------------------------------------


def test_missing_default_checkpoint_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "REPO_ROOT", str(tmp_path / "checkout"))
    assert demo.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: checkpoint not found: ")
    assert str(tmp_path / "checkpoints" / "kosmos2" / "checkpoint_last.pt") in err[0]
    assert str(tmp_path / "checkout" / "checkpoints" / "kosmos2" / "checkpoint_last.pt") in err[0]
    assert "bash train.sh" in err[0]
    assert demo.main(["--checkpoint", str(tmp_path / "nope.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        (
            f"error: checkpoint not found: {tmp_path / 'nope.pt'}; train one with `bash train.sh` (the "
            "default kosmos2 recipe writes checkpoints/kosmos2/checkpoint_last.pt) or pass --checkpoint "
            "CKPT_OR_HF_DIR"
        )
    ]


def test_missing_gradio_is_one_error_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "ckpt.pt").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio raises ImportError
    assert demo.main(["--checkpoint", str(tmp_path / "ckpt.pt")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        'error: the demo needs gradio: pip install gradio "numpy<2"'
    ]


def test_bad_decoding_option_stops_before_serving(checkpoint, monkeypatch, capsys):
    gr = pytest.importorskip("gradio", reason='gradio is not installed (pip install gradio "numpy<2")')
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: pytest.fail("launched with a bad option"))
    assert demo.main(["--checkpoint", str(checkpoint[0]), "--cpu", "--max-new-tokens", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the model's loading logs, then one error line
    errors = [line for line in err if line.startswith("error: ")]
    assert errors == err[-1:] and "max_new_tokens" in errors[0]


def test_example_images_are_the_first_few_in_name_order(tmp_path):
    for name in ("000003.jpg", "000001.jpg", "notes.txt", "000002.png", "000000.jpg", "000004.jpg"):
        (tmp_path / name).write_bytes(b"")
    assert [os.path.basename(p) for p in demo.example_images(str(tmp_path))] == [
        "000000.jpg",
        "000001.jpg",
        "000002.png",
        "000003.jpg",
    ]
    assert demo.example_images(str(tmp_path / "absent")) == []


def test_main_serves_the_checkpoint_on_localhost_only(checkpoint, tmp_path, monkeypatch):
    """main() loads the checkpoint, offers the example folder's images and launches on 127.0.0.1 with no share
    link and analytics off (launch is captured instead of serving)."""
    gr = pytest.importorskip("gradio", reason='gradio is not installed (pip install gradio "numpy<2")')
    launched = {}
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "True")  # main turns it off; restored at teardown
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))  # Gradio's file cache
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: launched.update(kwargs, blocks=self))
    scene(tmp_path / "a.png")
    scene(tmp_path / "b.png")
    assert demo.main(["--checkpoint", str(checkpoint[0]), "--cpu", "--port", "7999", "--examples", str(tmp_path)]) == 0
    assert (launched["server_name"], launched["server_port"], launched["share"]) == ("127.0.0.1", 7999, False)
    assert "allowed_paths" not in launched  # examples are served from Gradio's cache, not from their folder
    blocks = launched["blocks"]
    [examples] = [b for b in blocks.blocks.values() if isinstance(b, gr.Dataset)]
    assert [os.path.basename(row[0]["path"]) for row in examples.samples] == ["a.png", "b.png"]
    assert blocks.analytics_enabled is False and os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    ids = {block.elem_id for block in blocks.blocks.values()}
    assert {"input-image", "prompt", "run", "output-image", "caption", "grounded-text"} <= ids


# ---- a tiny checkpoint with a fixed decoding ------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random kosmos2_tiny model (8 x 8 grid, 4 image slots) in our checkpoint format, with its vocabulary."""
    root = tmp_path_factory.mktemp("demo")
    build_vocab.train_vocab(CAPTIONS, str(root / "vocab"), vocab_size=60)
    spm, dict_path = str(root / "vocab" / "sentencepiece.bpe.model"), str(root / "vocab" / "dict.txt")
    tokenizer = build_kosmos2_tokenizer(spm, dict_path, NUM_BINS)
    cfg = kosmos2_tiny_config()
    cfg.decoder.vocab_size, cfg.connector.latent_query_num = len(tokenizer.dictionary), L
    torch.manual_seed(0)
    C.save_our_checkpoint(str(root / "ckpt.pt"), Kosmos2Module(cfg).state_dict(), cfg, spm, dict_path, NUM_BINS)
    return root / "ckpt.pt", tokenizer


@pytest.fixture
def search_calls():
    """The SearchConfig of each call of the fixed search (:func:`grounder`)."""
    return []


@pytest.fixture
def grounder(checkpoint, monkeypatch, search_calls):
    """The checkpoint loaded by unilm_vl.Kosmos2Grounder, its search replaced by one that returns
    :data:`CONTINUATION` for every prompt (recording its options in ``search_calls``)."""
    from unilm_vl import Kosmos2Grounder
    from unilm_vl.inference import kosmos2 as inference

    path, tokenizer = checkpoint
    ids = tokenizer.encode(CONTINUATION, split_symbols=True) + [tokenizer.dictionary.eos()]

    def fixed_search(model, src_tokens, image=None, image_mask=None, cfg=None, **kwargs):
        search_calls.append(cfg)
        hyp = Hypothesis(torch.tensor(ids), 0.0, torch.zeros(len(ids)), torch.zeros(src_tokens.size(1) - 1))
        return [[hyp] for _ in range(src_tokens.size(0))]

    monkeypatch.setattr(inference, "generate", fixed_search)
    return Kosmos2Grounder.load(str(path), device="cpu")


def scene(path):
    """A 128 x 96 picture drawn from the fixed boxes: a dark red dog just inside entity 0's box on olive grass
    just inside entity 1's."""
    _, entities = parse_grounded_text(CONTINUATION, NUM_BINS)
    image = Image.new("RGB", (128, 96), (150, 200, 240))
    draw = ImageDraw.Draw(image)
    for (_, _, [box]), colour in zip(entities[::-1], ((110, 140, 40), (120, 20, 20)), strict=True):
        draw.rectangle((box[0] * 128 + 2, box[1] * 96 + 2, box[2] * 128 - 3, box[3] * 96 - 3), fill=colour)
    image.save(path)
    return image, entities


def same_pixels(a, b) -> bool:
    return a.mode == b.mode and a.size == b.size and a.tobytes() == b.tobytes()


def test_ground_image_draws_and_marks_the_fixed_entities(grounder, search_calls, tmp_path):
    image, entities = scene(tmp_path / "scene.png")
    drawing, fragment, text = demo.ground_image(grounder, image, "<grounding>", {"decoding": "release", "beam": 2})
    assert [(c.beam, c.no_repeat_ngram_size, c.max_len_b) for c in search_calls] == [(2, 3, 500)]  # release + beam
    assert text == "<grounding>" + CONTINUATION  # prompt text + continuation, as fairseq writes it
    assert same_pixels(drawing, draw_entities(image, entities, "squash"))
    assert [m[2] for m in marks(fragment.split("<ul")[0])] == ["a red dog", "the grass"]
    with pytest.raises(ValueError, match="no image"):
        demo.ground_image(grounder, None, "<grounding>")


# ---- the page in a real browser -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def browser(tmp_path, monkeypatch):
    """Headless Debian Chromium through /usr/bin/chromedriver (selenium-manager, which downloads drivers, must
    not run: it fails the test if asked), closed at teardown."""
    pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.selenium_manager import SeleniumManager

    def no_manager(*args, **kwargs):
        raise AssertionError("selenium-manager was asked for a driver: the test passes the driver path")

    monkeypatch.setattr(SeleniumManager, "binary_paths", no_manager)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(grounder, tmp_path, monkeypatch):
    """The demo served on 127.0.0.1 in this process (server threads), closed at teardown: its URL."""
    pytest.importorskip("gradio", reason='gradio is not installed (pip install gradio "numpy<2")')
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    scene(tmp_path / "example.png")
    app = demo.build_demo(grounder, [str(tmp_path / "example.png")], {"decoding": "release", "beam": 2})
    port = free_port()
    app.launch(
        server_name="127.0.0.1",
        server_port=port,
        prevent_thread_lock=True,
        share=False,
        quiet=True,
        ssr_mode=False,
        mcp_server=False,
        enable_monitoring=False,
    )
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


def test_page_in_headless_chromium(page, browser, search_calls, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image, entities = scene(tmp_path / "scene.png")
    wait = WebDriverWait(browser, 30)
    browser.get(page)
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#run")).click()  # no image yet: an error toast, no search
    toast = wait.until(lambda d: [t for t in d.find_elements(By.CSS_SELECTOR, ".toast-body.error") if t.text])[0]
    assert "no image: upload one or pick an example first" in toast.text and search_calls == []
    toast.find_element(By.CSS_SELECTOR, ".toast-close").click()
    upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#input-image input[type=file]"))
    upload.send_keys(str(tmp_path / "scene.png"))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#input-image img"))
    browser.find_element(By.CSS_SELECTOR, "#run").click()
    found = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#caption p mark.k2-phrase"))
    shot = tmp_path / "demo.png"
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#output-image img"))
    browser.save_screenshot(str(shot))
    if os.environ.get("UNILM_VL_DEMO_SCREENSHOT") == "1":
        os.makedirs(os.path.join(REPO, "tests", "artifacts"), exist_ok=True)
        shutil.copy(shot, os.path.join(REPO, "tests", "artifacts", "demo.png"))
    assert Image.open(shot).size[0] > 0

    # the phrases, highlighted in their entity's colour, and the raw grounded text
    assert [m.text for m in found] == ["a red dog", "the grass"]
    for k, mark in enumerate(found):
        assert mark.get_attribute("data-entity") == str(k)
        rgb = tuple(int(v) for v in re.findall(r"\d+", mark.value_of_css_property("background-color"))[:3])
        assert rgb == PALETTE[k]
    assert browser.find_element(By.CSS_SELECTOR, "#caption p").text == "a red dog on the grass"
    raw = browser.find_element(By.CSS_SELECTOR, "#grounded-text textarea").get_attribute("value")
    assert "<phrase> a red dog</phrase><object><patch_index_0010><patch_index_0036></object>" in raw
    assert [c.beam for c in search_calls] == [2]  # one search, with the page's decoding options
    # everything the page loaded (scripts, styles, fonts, images) came from the demo itself: no CDN, no font service
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert any("/static/fonts/" in url for url in loaded) and [u for u in loaded if not u.startswith(page)] == []

    # the returned image is the boxes drawn on the uploaded picture, each box edge in its entity's colour
    src = browser.find_element(By.CSS_SELECTOR, "#output-image img").get_attribute("src")
    assert src.startswith(page)  # served by the demo itself
    shown = Image.open(io.BytesIO(urllib.request.urlopen(src, timeout=10).read())).convert("RGB")
    assert same_pixels(shown, draw_entities(image, entities, "squash"))
    assert shown.size == (384, 288)  # 128 x 96 enlarged 3 times (shorter side at least 256)
    for k, (_, _, [box]) in enumerate(entities):
        x0, y0, x1, y1 = box[0] * 384, box[1] * 288, box[2] * 384, box[3] * 288  # cell centres: whole pixels
        assert shown.getpixel((int(x0), int((y0 + y1) / 2))) == PALETTE[k]  # left edge
        assert shown.getpixel((int((x0 + x1) / 2), int(y1))) == PALETTE[k]  # bottom edge
