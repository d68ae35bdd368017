"""Every command line ends a user mistake with one ``error:`` line naming the file or flag, and exit status 2
(unilm_vl/cli.py). The cases run in-process through :func:`unilm_vl.cli.run_cli` (what each module's
``if __name__ == "__main__":`` block calls); one runs as a real ``python -m`` process to check the exit status and
that stderr holds no traceback."""

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from unilm_vl.cli import error_message, is_user_error, run_cli

from conftest import BIN, REPO

CAPTIONS = [
    "a red dog on the grass",
    "two blue cats play with a ball",
    "a man rides a green bike",
    "the sky is blue and the grass is green",
] * 20
NUM_BINS = 8
L = 4  # image slots of the tiny model


def error_lines(text):
    return [line for line in text.splitlines() if line.startswith("error:")]


def run_module(module, argv, capsys):
    """``run_cli(main, argv)`` of ``unilm_vl.<module>``: (exit status, the ``error:`` lines of stderr)."""
    main = importlib.import_module(f"unilm_vl.{module}").main
    code = run_cli(main, [str(a) for a in argv])
    return code, error_lines(capsys.readouterr().err)


# ---- the rule --------------------------------------------------------------------------------------------------


def _raise_inside_torch():
    torch.zeros(2).view(3)  # RuntimeError inside torch: a bug, not a user mistake


def test_what_counts_as_a_user_mistake():
    from unilm_vl.data.jsonio import JsonError
    from unilm_vl.models.kosmos2 import VocabularyMismatchError

    assert is_user_error(FileNotFoundError("x")) and is_user_error(IsADirectoryError("x"))
    assert is_user_error(VocabularyMismatchError("x")) and is_user_error(JsonError("x.json", "not valid JSON"))
    try:
        int("not a number")  # a ValueError raised by Python, not by a check of this package
    except ValueError as exc:
        assert not is_user_error(exc)
    assert not is_user_error(KeyError("x")) and not is_user_error(RuntimeError("x"))
    try:
        open("/nonexistent/dir/file.txt")
    except FileNotFoundError as exc:
        assert error_message(exc) == "/nonexistent/dir/file.txt: no such file or directory"
    assert error_message(ValueError("first line\n  second line\n")) == "first line second line"


def test_a_bug_keeps_its_traceback(capsys):
    with pytest.raises(RuntimeError):
        run_cli(lambda: _raise_inside_torch())
    assert error_lines(capsys.readouterr().err) == []
    assert run_cli(lambda argv: None, ["x"]) == 0 and run_cli(lambda: 3) == 3


# ---- fixtures --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kosmos2(tmp_path_factory):
    """A random kosmos2_tiny checkpoint with its vocabulary, a prompt file and a RefCOCO-style json."""
    from unilm_vl import convert as C
    from unilm_vl.data import build_vocab
    from unilm_vl.data.grounding import build_kosmos2_tokenizer
    from unilm_vl.modules.kosmos2 import Kosmos2Module, kosmos2_tiny_config

    root = tmp_path_factory.mktemp("k2")
    build_vocab.train_vocab(CAPTIONS, str(root / "vocab"), vocab_size=60)
    spm, dict_path = root / "vocab" / "sentencepiece.bpe.model", root / "vocab" / "dict.txt"
    tokenizer = build_kosmos2_tokenizer(str(spm), str(dict_path), NUM_BINS)
    cfg = kosmos2_tiny_config()
    cfg.decoder.vocab_size, cfg.connector.latent_query_num = len(tokenizer.dictionary), L
    torch.manual_seed(0)
    C.save_our_checkpoint(
        str(root / "ckpt.pt"), Kosmos2Module(cfg).state_dict(), cfg, str(spm), str(dict_path), NUM_BINS
    )
    lines = dict_path.read_text().splitlines()
    (root / "dict_short.txt").write_text("\n".join(lines[:-3]) + "\n")  # 3 symbols fewer than the checkpoint's
    (root / "dict_bad.txt").write_text("\n".join(lines[:5] + ["no-count-on-this-line"]) + "\n")
    Image.new("RGB", (32, 24), (200, 30, 30)).save(root / "a.png")
    (root / "prompts.tsv").write_text("a.png\t<grounding>An image of\n")
    (root / "refs.json").write_text(
        json.dumps(
            {
                "images": [{"id": 7, "file_name": "a.png", "caption": "the red square", "width": 32, "height": 24}],
                "annotations": [{"image_id": 7, "bbox": [0, 0, 16, 12]}],
            }
        )
    )
    return root


def vocabulary_message(path, rows, dict_path, symbols):
    return f"error: {path} has {rows} token embeddings but the kosmos2 dictionary has {symbols} symbols ({dict_path}:"


# ---- Kosmos-2: vocabulary and dictionary -----------------------------------------------------------------------


def test_kosmos2_infer_dictionary_of_another_size(kosmos2, capsys):
    rows = torch.load(kosmos2 / "ckpt.pt", weights_only=True)["model"]["net.decoder.embed_tokens.weight"].shape[0]
    code, lines = run_module(
        "kosmos2_infer",
        [
            "--checkpoint",
            kosmos2 / "ckpt.pt",
            "--input",
            kosmos2 / "prompts.tsv",
            "--dict-path",
            kosmos2 / "dict_short.txt",
            "--cpu",
        ],
        capsys,
    )
    assert code == 2 and len(lines) == 1
    assert "--location-bin-size" in lines[0] and str(kosmos2 / "dict_short.txt") in lines[0]
    assert f"has {rows} token embeddings but the kosmos2 dictionary has {rows - 3} symbols" in lines[0]


def test_kosmos2_infer_malformed_dictionary(kosmos2, capsys):
    code, lines = run_module(
        "kosmos2_infer",
        [
            "--checkpoint",
            kosmos2 / "ckpt.pt",
            "--input",
            kosmos2 / "prompts.tsv",
            "--dict-path",
            kosmos2 / "dict_bad.txt",
            "--cpu",
        ],
        capsys,
    )
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f"error: {kosmos2 / 'ckpt.pt'}: {kosmos2 / 'dict_bad.txt'}: not a fairseq dictionary (")
    assert "each line is '<token> <count>'" in lines[0]


def test_refcoco_checkpoint_whose_dictionary_changed(kosmos2, tmp_path, capsys):
    """The checkpoint records its dict.txt; a file of another size there (re-made vocabulary) is named."""
    import shutil

    moved = tmp_path / "ckpt.pt"
    state = torch.load(kosmos2 / "ckpt.pt", weights_only=False)
    shutil.copy(kosmos2 / "dict_short.txt", tmp_path / "dict.txt")
    state["cfg"]["task"]["dict_path"] = str(tmp_path / "dict.txt")
    torch.save(state, moved)
    code, lines = run_module("eval.refcoco", ["--checkpoint", moved, "--data", kosmos2 / "refs.json", "--cpu"], capsys)
    assert code == 2 and len(lines) == 1 and str(tmp_path / "dict.txt") in lines[0], lines
    assert "token embeddings but the kosmos2 dictionary has" in lines[0]


# ---- missing files, per command --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module,argv,expected",
    [
        (
            "kosmos2_infer",
            ["--checkpoint", "{k}/nope.pt", "--input", "{k}/prompts.tsv", "--cpu"],
            "error: checkpoint not found: {k}/nope.pt",
        ),
        (
            "kosmos2_infer",
            ["--checkpoint", "{k}/ckpt.pt", "--input", "{k}/nope.tsv", "--cpu"],
            "error: prompt file not found: {k}/nope.tsv",
        ),
        (
            "eval.refcoco",
            ["--checkpoint", "{k}/ckpt.pt", "--data", "{k}/nope.json"],
            "error: referring-expression file {k}/nope.json: not found",
        ),
        (
            "eval.refcoco",
            ["--checkpoint", "{k}/ckpt.pt", "--data", "{k}/refs.json", "--image-root", "{k}/noimages"],
            "error: 1 images of {k}/refs.json not found, e.g. {k}/noimages/a.png",
        ),
        (
            "eval.refcoco",
            ["--checkpoint", "{k}/nope.pt", "--data", "{k}/refs.json", "--cpu"],
            "error: checkpoint not found: {k}/nope.pt",
        ),
        (
            "eval.flickr_entities",
            ["--checkpoint", "{k}/ckpt.pt", "--data", "{k}/nope.json", "--flickr-root", "{k}"],
            "error: Flickr30k Entities MDETR file {k}/nope.json: not found",
        ),
        (
            "eval.retrieval",
            ["--checkpoint", "{k}/nope.pt", "--data", "{k}/refs.json"],
            "error: checkpoint not found: {k}/nope.pt",
        ),
        (
            "eval.zeroshot_classification",
            ["--checkpoint", "{k}/nope.pt", "--root", "{k}", "--classnames", "a", "--templates", "b"],
            "error: checkpoint not found: {k}/nope.pt",
        ),
        (
            "eval.compositionality",
            ["--checkpoint", "{k}/nope.pt", "--data", "{k}/refs.json"],
            "error: checkpoint not found: {k}/nope.pt",
        ),
        (
            "eval.segmentation",
            ["--checkpoint", "{k}/nope.pt", "--data", "{k}"],
            "error: checkpoint not found: {k}/nope.pt",
        ),
        (
            "eval.cosa_retrieval",
            ["--checkpoint", "{k}/nope.pt", "--data", "{k}/refs.json"],
            "error: checkpoint not found: {k}/nope.pt",
        ),
        (
            "eval.cosa_caption",
            ["--checkpoint", "{k}/nope.pt", "--data", "{k}/refs.json"],
            "error: checkpoint not found: {k}/nope.pt",
        ),
        (
            "eval.cosa_qa",
            ["--checkpoint", "{k}/nope.pt", "--data", "{k}/refs.json"],
            "error: checkpoint not found: {k}/nope.pt",
        ),
        (
            "eval.caption",
            ["--predictions", "{k}/nope.json", "--references", "{k}/refs.json"],
            "error: predictions file {k}/nope.json: not found",
        ),
        (
            "eval.caption",
            ["--predictions", "{k}/prompts.tsv", "--references", "{k}/refs.json"],
            "error: predictions file {k}/prompts.tsv: not valid JSON: ",
        ),
        (
            "eval.vqa",
            ["--predictions", "{k}/nope.json", "--annotations", "{k}/refs.json"],
            "error: predictions file {k}/nope.json: not found",
        ),
        (
            "data.build_vocab",
            ["--data", "shards/*.tar", "--root", "{k}", "--out", "{k}/v"],
            "error: no file matches '{k}/shards/*.tar' (from 'shards/*.tar')",
        ),
        (
            "data.cosa_vocab",
            ["--data", "nope.json", "--root", "{k}", "--out", "{k}/v.txt"],
            "error: data config file {k}/nope.json: not found",
        ),
        ("data.prepare_grit", ["--input", "{k}/nope", "--out", "{k}/grit"], "error: input not found: {k}/nope"),
        ("data.synthetic.cli", ["--out", "{k}/a.png/world", "--num-train", "2"], "error: {k}/a.png"),
        ("consolidate", ["{k}/nope.pt", "--out", "{k}/x.pt"], "error: {k}/nope.pt: no such checkpoint file"),
        (
            "export_open_clip",
            ["--checkpoint", "{k}/nope.pt", "--out", "{k}/x.pt"],
            "error: checkpoint not found: {k}/nope.pt",
        ),
        (
            "wise_ft",
            ["--finetuned", "{k}/nope.pt", "--alpha", "0.5", "--out", "{k}/x.pt"],
            "error: checkpoint not found: {k}/nope.pt",
        ),
        (
            "convert",
            ["kosmos2", "--from-release", "{k}/nope.pt", "--out", "{k}/x.pt"],
            "error: checkpoint not found: {k}/nope.pt",
        ),
    ],
)
def test_missing_file_is_one_error_line(kosmos2, capsys, module, argv, expected):
    code, lines = run_module(module, [a.format(k=kosmos2) for a in argv], capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(expected.format(k=kosmos2)), lines


def test_missing_image_root_of_an_encoder_eval(kosmos2, tmp_path, capsys, monkeypatch):
    """compositionality / retrieval read their images after the model loads: the encoder is stubbed, the missing
    image directory is what the line names."""
    from unilm_vl.eval import common

    monkeypatch.setattr(common, "load_encoder", lambda *a, **k: object())
    data = tmp_path / "aro.json"
    data.write_text(
        json.dumps([{"image_path": "a.png", "true_caption": "a red square", "false_caption": "a square red"}])
    )
    code, lines = run_module(
        "eval.compositionality", ["--checkpoint", "x.pt", "--data", data, "--image-root", tmp_path / "noimages"], capsys
    )
    assert code == 2 and len(lines) == 1 and str(tmp_path / "noimages") in lines[0], lines


def test_train_missing_data(tmp_path, capsys, monkeypatch):
    """``python -m unilm_vl.train`` on a data directory without the shards the data flags name: the line names the
    flag, the spec and the directory (raised by the task's load_dataset; fairseq loads the valid split first)."""
    from unilm_vl import train

    (tmp_path / "world").mkdir()
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "train",
            str(tmp_path / "world"),
            "--task",
            "image_text_contrastive",
            "--arch",
            "clip_tiny",
            "--criterion",
            "clip",
            "--optimizer",
            "adam",
            "--lr",
            "1e-3",
            "--batch-size",
            "2",
            "--max-update",
            "1",
            "--cpu",
            "--save-dir",
            str(tmp_path / "ck"),
            "--no-save",
        ],
    )
    with pytest.raises(SystemExit) as exc:
        train.console_main()
    assert exc.value.code == 2
    lines = error_lines(capsys.readouterr().err)
    assert lines == [
        f"error: --valid-data 'val/wds/part-*.tar': no file matches '{tmp_path}/world/val/wds/"  # first
        f"part-*.tar' (from 'val/wds/part-*.tar'); relative paths resolve against the data directory "
        f"'{tmp_path}/world' (the first positional argument)"
    ], lines


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--restore-file", "{t}/nope.pt"], "error: --restore-file {t}/nope.pt: no such checkpoint file"),
        (["--finetune-from-model={t}/nope.pt"], "error: --finetune-from-model {t}/nope.pt: no such checkpoint file"),
    ],
)
def test_train_missing_checkpoint_to_start_from(tmp_path, capsys, monkeypatch, argv, expected):
    """A --restore-file that does not exist would silently start from scratch; both flags stop before fairseq."""
    from unilm_vl import train

    monkeypatch.setattr(
        sys,
        "argv",
        ["train", str(tmp_path), "--task", "image_text_contrastive", "--cpu", *[a.format(t=tmp_path) for a in argv]],
    )
    with pytest.raises(SystemExit) as exc:
        train.console_main()
    assert exc.value.code == 2
    assert error_lines(capsys.readouterr().err) == [expected.format(t=tmp_path)]
    train.check_checkpoint_paths(["train", "--restore-file", "checkpoint_last.pt"])  # fairseq's default: its business


# ---- the real command line -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,fragment",
    [  # one process: a cold interpreter importing fairseq costs 10-50 s
        (
            [
                "-m",
                "unilm_vl.kosmos2_infer",
                "--checkpoint",
                "{k}/ckpt.pt",
                "--input",
                "{k}/prompts.tsv",
                "--dict-path",
                "{k}/dict_short.txt",
                "--cpu",
            ],
            "token embeddings but the kosmos2 dictionary has",
        ),
    ],
)
def test_python_m_exits_2_with_one_line_and_no_traceback(kosmos2, argv, fragment):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [f"{BIN}/python", *[a.format(k=kosmos2) for a in argv]],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and fragment.format(k=kosmos2) in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
