"""HF Kosmos-2 directories as checkpoints and the Python API (issue 19, deliverables 1 and 2).

One tiny random ``Kosmos2ForConditionalGeneration`` and its ``Kosmos2Processor`` (a unigram sentencepiece model
trained here on a few sentences, as the released ``sentencepiece.bpe.model`` is a unigram model; the released 32 x 32
box grid;
a 30 px / patch 6 / width 48 vision tower that open_clip's registry does not have) are written with HF's
``save_pretrained``. The expected outputs are HF's own: ``model.generate`` as HF's Kosmos-2 example calls it
(``use_cache=True, max_new_tokens=64``), ``processor.batch_decode(..., skip_special_tokens=True)`` and
``processor.post_process_generation`` (transformers ``models/kosmos2/modeling_kosmos2.py`` docstring example).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import REPO, SHARED

RELEASED = os.path.join(SHARED, "reference", "kosmos2")
SENTENCES = [
    "a red dog on the grass",
    "two blue cats play with a ball",
    "a man rides a green bike",
    "the sky is blue and the grass is green",
    "a yellow bus waits near the red house",
    "an image of a snowman warming himself by a fire",
    "two dogs run over the grass",
] * 10
GRID = 32  # P of the P x P box grid, the release's: HF's post_process_generation assumes 32 whatever the processor
SIZE = 30  # image side of the tiny tower (patch 6: 25 patches)
PROMPTS = [
    "<grounding>An image of",
    "<grounding><phrase> a red dog</phrase><object><patch_index_0000><patch_index_1023></object> runs",
    "two",
]


def hf_vision_config():
    """A ViT geometry open_clip's registry lacks: 30 px, patch 6, width 48, 2 heads, MLP 96, 1 layer."""
    return dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2, image_size=SIZE, patch_size=6
    )


def open_clip_package_configs():
    """``{file: (size, mtime)}`` of the installed open_clip package's model_configs directory."""
    import open_clip

    folder = os.path.join(os.path.dirname(open_clip.__file__), "model_configs")
    return {
        name: (os.stat(os.path.join(folder, name)).st_size, os.stat(os.path.join(folder, name)).st_mtime_ns)
        for name in os.listdir(folder)
    }


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """``(hf_dir, model, processor, spm_path)``: the tiny HF model and processor saved with ``save_pretrained``."""
    transformers = pytest.importorskip(
        "transformers", reason="transformers (test-only: the HF side of the comparison) is not installed"
    )
    import sentencepiece

    package_configs = open_clip_package_configs()
    root = tmp_path_factory.mktemp("k2hf")
    vocab = root / "vocab"
    vocab.mkdir()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES),
        model_prefix=str(vocab / "sentencepiece.bpe"),
        vocab_size=60,
        model_type="unigram",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    spm_path = str(vocab / "sentencepiece.bpe.model")
    tokenizer = transformers.XLMRobertaTokenizer.from_pretrained(str(vocab))
    image_processor = transformers.CLIPImageProcessor(
        size={"height": SIZE, "width": SIZE}, do_center_crop=False, crop_size={"height": SIZE, "width": SIZE}
    )
    processor = transformers.Kosmos2Processor(image_processor, tokenizer, num_patch_index_tokens=GRID * GRID)
    config = transformers.Kosmos2Config(
        text_config=dict(
            vocab_size=len(processor.tokenizer),
            embed_dim=32,
            layers=2,
            ffn_dim=64,
            attention_heads=2,
            max_position_embeddings=256,
        ),
        vision_config=hf_vision_config(),
        latent_query_num=64,
    )
    torch.manual_seed(0)
    model = transformers.Kosmos2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # sharper than the init, so greedy decoding varies instead of repeating one token
        for name, p in model.named_parameters():
            if ".layers." in name and p.dim() == 2:
                p.mul_(4.0)
    hf_dir = root / "hf"
    model.save_pretrained(str(hf_dir))
    processor.save_pretrained(str(hf_dir))
    if not (hf_dir / "sentencepiece.bpe.model").exists():
        # transformers >= 5 writes tokenizer.json only; HF's hub directories (microsoft/kosmos-2-patch14-224) ship
        # the sentencepiece model, as transformers 4's save_pretrained writes it
        shutil.copy(spm_path, hf_dir / "sentencepiece.bpe.model")
    return hf_dir, model, processor, spm_path, package_configs


def image(seed, size=(45, 37)):
    """A random RGB image of another size than the tower's (both sides resize it)."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def hf_ground(hf, picture, prompt):
    """HF's pipeline as its Kosmos-2 example writes it: ``(generated ids, text, clean_text, entities)``."""
    _, model, processor, _, _ = hf
    inputs = processor(text=prompt, images=picture, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(
            pixel_values=inputs["pixel_values"],
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            image_embeds=None,
            image_embeds_position_mask=inputs["image_embeds_position_mask"],
            use_cache=True,
            max_new_tokens=64,
        )
    generated = processor.batch_decode(ids, skip_special_tokens=True)[0]
    text = processor.post_process_generation(generated, cleanup_and_extract=False)
    clean_text, entities = processor.post_process_generation(generated)
    return inputs["input_ids"][0].tolist(), ids[0].tolist(), text, clean_text, entities


@pytest.fixture(scope="module")
def expected(hf):
    """HF's result for each (image seed, prompt) of the tests."""
    return {(seed, prompt): hf_ground(hf, image(seed), prompt) for seed, prompt in enumerate(PROMPTS)}


@pytest.fixture(scope="module")
def grounder(hf):
    from unilm_vl import Kosmos2Grounder

    return Kosmos2Grounder.load(str(hf[0]), device="cpu")


# ---- the dictionary ------------------------------------------------------------------------------------------------


def test_derived_dictionary_gives_hf_tokenizer_ids(hf, grounder):
    """The fairseq dictionary derived from the sentencepiece model (no dict.txt) holds every token of HF's Kosmos-2
    tokenizer (pieces, <mask>, the 11 tags, the 1024 patch tokens) at HF's id, and nothing else."""
    _, _, processor, _, _ = hf
    d = grounder.engine.task.dictionary
    vocab = processor.tokenizer.get_vocab()
    assert len(d) == len(vocab) == len(processor.tokenizer)
    assert {d[i]: i for i in range(len(d))} == vocab


def test_write_dict_reproduces_the_released_dict_txt(tmp_path):
    """``convert kosmos2 --write-dict`` of the released sentencepiece model writes the released dict.txt: the same
    63,997 lines, byte for byte (each piece at the same line, so the same fairseq id, with the same count 1)."""
    spm = os.path.join(RELEASED, "sentencepiece.bpe.model")
    released = os.path.join(RELEASED, "dict.txt")
    if not (os.path.isfile(spm) and os.path.isfile(released)):
        pytest.skip(f"the released Kosmos-2 vocabulary (sentencepiece.bpe.model, dict.txt) is not in {RELEASED}")
    from unilm_vl import convert

    assert convert.main(["kosmos2", "--write-dict", "--spm-model", spm, "--out", str(tmp_path / "dict.txt")]) == 0
    ours = (tmp_path / "dict.txt").read_bytes()
    theirs = open(released, "rb").read()
    assert len(ours.splitlines()) == len(theirs.splitlines()) == 63997
    assert ours == theirs


# ---- HF's output through kosmos2_infer and the Python API ----------------------------------------------------------


def test_hf_reference_is_not_degenerate(expected):
    """The comparisons below mean something: HF generates several distinct tokens, and the grounded prompt gives an
    entity with a box."""
    for prompt_ids, ids, text, _, _ in expected.values():
        assert len(set(ids[len(prompt_ids) :])) >= 3, ids
    # cells in different rows and columns: HF's box runs from centre to centre, (k + 0.5) / 32
    assert expected[1, PROMPTS[1]][4] == [("a red dog", (0, 9), [(0.5 / 32, 0.5 / 32, 31.5 / 32, 31.5 / 32)])]


def test_engine_gives_hf_tokens(grounder, expected):
    """Our prompt ids are the processor's input_ids, and greedy decoding with the "hf" preset generates HF's ids."""
    from unilm_vl.inference.kosmos2 import Kosmos2Generator, collate_prompts, prompt_tokens

    engine = grounder.engine
    search = grounder.search_config("hf")
    for (seed, prompt), (prompt_ids, ids, _, _, _) in expected.items():
        tokens = prompt_tokens(engine.task.tokenizer, engine.task.cfg.image_token_length, prompt)
        assert tokens == prompt_ids
        sample = collate_prompts(
            [{"id": 0, "tokens": tokens, "image": engine.transform(image(seed))}],
            engine.task.dictionary.pad(),
            engine.task.cfg.image_token_length,
        )
        hypo = Kosmos2Generator(search, engine.task.dictionary, continuation_only=True).generate(
            [engine.model], sample
        )[0][0]
        assert prompt_ids + hypo["tokens"].tolist() == ids


def test_kosmos2_infer_on_the_hf_dir_gives_hf_text(hf, expected, tmp_path):
    """``kosmos2_infer --checkpoint HF_DIR --preset hf``: each record's hf_text is HF's
    ``post_process_generation(..., cleanup_and_extract=False)`` text of the same image and prompt."""
    from unilm_vl import kosmos2_infer

    lines = []
    for seed, prompt in enumerate(PROMPTS):
        image(seed).save(tmp_path / f"{seed}.png")
        lines.append(f"{seed}.png\t{prompt}\n")
    (tmp_path / "prompts.tsv").write_text("".join(lines))
    out = tmp_path / "out.jsonl"
    assert (
        kosmos2_infer.main(
            [
                "--checkpoint",
                str(hf[0]),
                "--preset",
                "hf",
                "--input",
                str(tmp_path / "prompts.tsv"),
                "--output",
                str(out),
                "--cpu",
            ],
            stdout=open(os.devnull, "w"),
        )
        == 0
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["hf_text"] for r in records] == [expected[seed, prompt][2] for seed, prompt in enumerate(PROMPTS)]


def test_grounder_on_the_hf_dir_gives_hf_results(grounder, expected):
    """``Kosmos2Grounder.load(HF_DIR).ground(image, prompt)`` is HF's (text, clean_text, entities), exactly."""
    for (seed, prompt), (_, _, text, clean_text, entities) in expected.items():
        assert grounder.ground(image(seed), prompt) == [(text, clean_text, entities)]


def test_batch_of_different_lengths_equals_each_alone(grounder, expected):
    """Three prompts of different lengths (left-padded in one batch) give what each gives alone, which is HF's."""
    images = [image(seed) for seed in range(len(PROMPTS))]
    together = grounder.ground(images, PROMPTS)
    assert together == [tuple(expected[seed, prompt][2:]) for seed, prompt in enumerate(PROMPTS)]
    assert len({len(grounder.engine.task.tokenizer.encode(p, split_symbols=True)) for p in PROMPTS}) == 3


def test_missing_and_mis_sized_images_are_one_line_value_errors(grounder):
    """No image for a prompt (image slots but no image), or a tensor that is not the tower's 3 x 30 x 30 input:
    one ValueError with a one-line message naming the problem, raised before anything is decoded."""
    cases = [
        ((None, PROMPTS[0]), "image 0 is None"),
        (([image(0), None], PROMPTS[:2]), "image 1 is None"),
        ((torch.zeros(3, 31, 31), PROMPTS[0]), "float 3 x 30 x 30 tensor; got torch.float32 3 x 31 x 31"),
        ((torch.zeros(3, 30, 30, dtype=torch.uint8), PROMPTS[0]), "got torch.uint8 3 x 30 x 30"),
    ]
    for args, words in cases:
        with pytest.raises(ValueError) as info:
            grounder.ground(*args)
        assert words in str(info.value) and "\n" not in str(info.value), str(info.value)
    # one level down, the engine (kosmos2_infer, the evaluations) refuses a batch of the wrong image size too
    with pytest.raises(ValueError, match=r"^images must be 3 x 30 x 30 \(the image tower's input\), got 3 x 32 x 32$"):
        grounder.engine.decode(PROMPTS[:1], torch.zeros(1, 3, 32, 32), grounder.search_config("hf"))


def test_fairseq_generate_reads_the_hf_dir(hf, grounder, expected, tmp_path, monkeypatch, capsys):
    """``python -m unilm_vl.generate --path HF_DIR`` (fairseq-generate reading through unilm_vl.checkpoint) decodes
    with the HF directory as it is; with HF's greedy settings its hypothesis is HF's tokens after </image>."""
    from unilm_vl import generate
    from unilm_vl.inference.kosmos2 import grounded_string

    hf_dir = hf[0]
    image(2).save(tmp_path / "two.png")
    (tmp_path / "prompts.tsv").write_text(f"two.png\t{PROMPTS[2]}\n")
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "generate",
            str(tmp_path),
            "--task",
            "kosmos2",
            "--path",
            str(hf_dir),
            "--spm-model",
            str(hf_dir / "sentencepiece.bpe.model"),
            "--location-bin-size",
            str(GRID),
            "--image-token-length",
            "64",
            "--prompts",
            str(tmp_path / "prompts.tsv"),
            "--gen-subset",
            "test",
            "--batch-size",
            "1",
            "--cpu",
            "--beam",
            "1",
            "--max-len-b",
            "63",
            "--min-len",
            "0",
            "--gen-beam-rule",
            "hf",
            "--no-repeat-ngram-size",
            "0",
            "--post-process",
            "sentencepiece",
        ],
    )
    generate.cli_main()
    out = capsys.readouterr().out
    [hypothesis] = [line.split("\t")[2] for line in out.splitlines() if line.startswith("D-0\t")]
    prompt_ids, ids, _, _, _ = expected[2, PROMPTS[2]]
    dictionary = grounder.engine.task.dictionary
    image_end = dictionary.index("</image>")
    after_image = ids[len(prompt_ids) - prompt_ids[::-1].index(image_end) :]
    assert hypothesis == grounded_string(dictionary, torch.tensor(after_image))


def test_hf_dir_without_sentencepiece_model_names_the_fix(hf, expected, tmp_path):
    """A directory without sentencepiece.bpe.model (transformers >= 5 save_pretrained writes tokenizer.json only)
    is refused with one line saying what to add; with ``spm_model=`` it loads and gives HF's output."""
    from unilm_vl import Kosmos2Grounder

    bare = tmp_path / "bare"
    shutil.copytree(hf[0], bare, ignore=shutil.ignore_patterns("sentencepiece.bpe.model"))
    with pytest.raises(ValueError) as info:
        Kosmos2Grounder.load(str(bare), device="cpu")
    message = str(info.value)
    assert message.startswith(f"{bare} has no sentencepiece.bpe.model and no sentencepiece model was given")
    assert "--spm-model / spm_model=" in message and "\n" not in message
    grounder = Kosmos2Grounder.load(str(bare), device="cpu", spm_model=hf[3])
    assert grounder.ground(image(2), PROMPTS[2]) == [tuple(expected[2, PROMPTS[2]][2:])]


def test_image_view_of_either_processor_file(hf, tmp_path):
    """The image view comes from preprocessor_config.json (transformers 4) or processor_config.json's
    image_processor (transformers 5): a resize to 30 x 30 is the squash view, shortest edge 30 + centre crop 30
    the crop view; no image processor: None (the caller's default)."""
    from unilm_vl.checkpoint import hf_image_view

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    assert hf_image_view(str(hf[0]), SIZE, mean, std) == "squash"
    crop = {
        "size": {"shortest_edge": SIZE},
        "do_center_crop": True,
        "crop_size": {"height": SIZE, "width": SIZE},
        "image_mean": list(mean),
        "image_std": list(std),
    }
    squash = {**crop, "size": {"height": SIZE, "width": SIZE}, "do_center_crop": False}
    for name, content, view in [
        ("v4", {"preprocessor_config.json": crop}, "crop"),
        ("v5", {"processor_config.json": {"image_processor": crop}}, "crop"),
        ("v5_squash", {"processor_config.json": {"image_processor": squash}}, "squash"),
        ("none", {"processor_config.json": {"num_patch_index_tokens": 1024}}, None),
    ]:
        folder = tmp_path / name
        folder.mkdir()
        for file, data in content.items():
            (folder / file).write_text(json.dumps(data))
        assert hf_image_view(str(folder), SIZE, mean, std) == view, name


# ---- converted once, loaded later without the HF directory -------------------------------------------------------

FRESH_PROCESS = """
import json, sys
import open_clip
from unilm_vl import Kosmos2Grounder

checkpoint, name, picture, prompt = sys.argv[1:]
registered_before = open_clip.get_model_config(name) is not None
result = Kosmos2Grounder.load(checkpoint, device="cpu").ground(picture, prompt)
print(json.dumps({"registered_before": registered_before, "result": result}))
"""


def test_converted_checkpoint_keeps_the_tower_and_gives_hf_output(hf, expected, tmp_path):
    """``convert kosmos2 --from-hf HF_DIR --out x.pt``: the tower geometry open_clip lacks is stored in x.pt
    (``vision_config_json``), so x.pt loads after the HF directory is gone, in a fresh interpreter whose open_clip
    registry does not know the tower; ``kosmos2_infer --checkpoint x.pt --preset hf`` and the Python API on x.pt
    give HF's output."""
    from unilm_vl import convert, kosmos2_infer

    hf_dir, _, _, spm_path, _ = hf
    copy = tmp_path / "hf_copy"
    shutil.copytree(hf_dir, copy)
    out = tmp_path / "x.pt"
    assert convert.main(["kosmos2", "--from-hf", str(copy), "--spm-model", spm_path, "--out", str(out)]) == 0
    shutil.rmtree(copy)
    model_cfg = torch.load(out, weights_only=True)["cfg"]["model"]
    name = model_cfg["vision_model"]
    assert json.loads(model_cfg["vision_config_json"])["vision_cfg"] == dict(
        image_size=SIZE, layers=1, width=48, head_width=24, mlp_ratio=2.0, patch_size=6
    )
    assert f"{name}.json" not in open_clip_package_configs()

    for seed, prompt in enumerate(PROMPTS):
        image(seed).save(tmp_path / f"{seed}.png")
    (tmp_path / "prompts.tsv").write_text("".join(f"{seed}.png\t{p}\n" for seed, p in enumerate(PROMPTS)))
    records = tmp_path / "out.jsonl"
    assert (
        kosmos2_infer.main(
            [
                "--checkpoint",
                str(out),
                "--preset",
                "hf",
                "--input",
                str(tmp_path / "prompts.tsv"),
                "--output",
                str(records),
                "--cpu",
            ],
            stdout=open(os.devnull, "w"),
        )
        == 0
    )
    assert [json.loads(line)["hf_text"] for line in records.read_text().splitlines()] == [
        expected[seed, prompt][2] for seed, prompt in enumerate(PROMPTS)
    ]

    proc = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(out), name, str(tmp_path / "1.png"), PROMPTS[1]],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    assert fresh["registered_before"] is False
    text, clean_text, entities = expected[1, PROMPTS[1]][2:]
    assert fresh["result"] == [
        [text, clean_text, [[p, list(span), [list(b) for b in boxes]] for p, span, boxes in entities]]
    ]


def test_to_hf_takes_an_hf_dir(hf, tmp_path):
    """``convert kosmos2 --to-hf --checkpoint HF_DIR`` reads the directory as a checkpoint: the HF model it writes
    has the same config sizes and the same tensors as the one saved."""
    import transformers

    from unilm_vl import convert

    _, model, _, _, _ = hf
    assert convert.main(["kosmos2", "--to-hf", "--checkpoint", str(hf[0]), "--out", str(tmp_path / "again")]) == 0
    again = transformers.Kosmos2ForConditionalGeneration.from_pretrained(str(tmp_path / "again"))
    assert again.config.vision_config.patch_size == 6 and again.config.latent_query_num == 64
    theirs, ours = model.state_dict(), again.state_dict()
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)


def test_installed_open_clip_package_is_unchanged(hf, grounder):
    """Everything above built the tower open_clip lacks; nothing was written into the installed package's
    model_configs (same files, sizes and modification times as before the module's first load)."""
    assert open_clip_package_configs() == hf[4]
