"""unilm_vl.checkpoint: user-supplied checkpoint files are read with torch's weights-only unpickler by every tool;
a file carrying a code payload is refused with one ``error:`` line (exit code 2) and the payload never runs."""

import argparse
import builtins
import os
import subprocess

import pytest
import torch

from unilm_vl.checkpoint import UnsafeCheckpointError, load_checkpoint_file, load_fairseq_checkpoint

from conftest import BIN, REPO


class Payload:
    """Unpickling this calls ``exec``, which writes ``marker``: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').write('payload ran')",)


@pytest.fixture
def evil(tmp_path):
    """(path of a fairseq-looking checkpoint with a payload, marker path the payload would create)."""
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save(
        {
            "model": {"towers.clip.w": torch.zeros(2)},
            "cfg": {"model": {}, "task": {}},
            "args": None,
            "extra_state": {"payload": Payload(marker)},
        },
        path,
    )
    return path, marker


def test_the_payload_is_real_and_the_safe_loader_refuses_it(evil):
    path, marker = evil
    torch.load(path, weights_only=False)  # what the tools did before: the payload runs
    assert marker.read_text() == "payload ran"
    marker.unlink()
    with pytest.raises(UnsafeCheckpointError) as err:
        load_checkpoint_file(str(path))
    assert str(err.value).startswith(f"{path}: refused: it needs the global(s) builtins.exec,")
    assert "\n" not in str(err.value) and not marker.exists()


def test_legacy_format_is_refused_naming_the_global(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "legacy.pt"
    torch.save({"payload": Payload(marker)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError, match=r"legacy\.pt: refused: it needs the global\(s\) exec,"):
        load_checkpoint_file(str(path))
    assert not marker.exists()


def test_what_our_checkpoints_hold_loads(tmp_path):
    """Tensors, OrderedDicts, numbers, strings and a legacy fairseq ``args`` Namespace load; a missing or
    unreadable file raises naming it."""
    from collections import OrderedDict

    state = {
        "model": OrderedDict(w=torch.arange(3.0)),
        "args": argparse.Namespace(arch="clip_tiny", lr=[0.1]),
        "cfg": None,
        "extra_state": {"metrics": OrderedDict(train=OrderedDict(loss={"val": 1.5, "n": 2}))},
    }
    torch.save(state, tmp_path / "ok.pt")
    loaded = load_checkpoint_file(str(tmp_path / "ok.pt"))
    assert torch.equal(loaded["model"]["w"], torch.arange(3.0)) and loaded["args"].lr == [0.1]
    assert loaded["extra_state"]["metrics"]["train"]["loss"]["val"] == 1.5
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*none\.pt"):
        load_checkpoint_file(str(tmp_path / "none.pt"))
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"text\.pt: not a readable torch checkpoint"):
        load_checkpoint_file(str(tmp_path / "text.pt"))
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:200])  # a truncated download
    with pytest.raises(ValueError, match=r"cut\.pt: not a readable torch checkpoint"):
        load_checkpoint_file(str(tmp_path / "cut.pt"))
    torch.save({"model": {}}, tmp_path / "nocfg.pt")
    with pytest.raises(ValueError, match=r"nocfg\.pt is not a fairseq checkpoint"):
        load_fairseq_checkpoint(str(tmp_path / "nocfg.pt"))


def error_lines(text):
    return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize(
    "tool,argv",
    [
        ("convert", ["kosmos2", "--to-hf", "--checkpoint", "{evil}", "--out", "{tmp}/hf"]),
        ("convert", ["kosmos2", "--from-release", "{evil}", "--out", "{tmp}/ours.pt"]),
        ("export_open_clip", ["--checkpoint", "{evil}", "--out", "{tmp}/out.pt"]),
        ("wise_ft", ["--finetuned", "{evil}", "--alpha", "0.5", "--out", "{tmp}/out.pt"]),
        ("wise_ft", ["--finetuned", "{good}", "--pretrained", "{evil}", "--alpha", "0.5", "--out", "{tmp}/out.pt"]),
    ],
)
def test_every_tool_prints_one_error_line_and_returns_2(evil, tmp_path, capsys, tool, argv):
    import importlib

    path, marker = evil
    good = tmp_path / "good.pt"
    torch.save({"model": {"towers.clip.w": torch.ones(2)}, "cfg": {"model": {}}}, good)
    module = importlib.import_module(f"unilm_vl.{tool}")
    argv = [a.format(evil=path, good=good, tmp=tmp_path) for a in argv]
    assert module.main(argv) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"error: {path}: refused: it needs the global(s) builtins.exec, which loading without running code "
        "(torch.load weights_only=True) does not build; checkpoints written by unilm_vl or fairseq-train never "
        "need them"
    ]
    assert not marker.exists() and not (tmp_path / "out.pt").exists() and not (tmp_path / "ours.pt").exists()


def test_cli_exit_code_and_kosmos2_infer(evil, tmp_path):
    """The real command line: ``python -m unilm_vl.convert`` exits 2 with the error line; ``kosmos2_infer`` (the
    eval modules' fairseq loading) refuses the file too."""
    from PIL import Image

    from unilm_vl import kosmos2_infer

    path, marker = evil
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [
            f"{BIN}/python",
            "-m",
            "unilm_vl.convert",
            "kosmos2",
            "--to-hf",
            "--checkpoint",
            str(path),
            "--out",
            str(tmp_path / "hf"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(error_lines(proc.stderr)) == 1 and "builtins.exec" in proc.stderr
    assert "Traceback" not in proc.stderr
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "p.tsv").write_text("a.png\t<grounding>An image of\n")
    with pytest.raises(UnsafeCheckpointError, match="builtins.exec"):
        kosmos2_infer.main(["--checkpoint", str(path), "--input", str(tmp_path / "p.tsv"), "--cpu"])
    assert not marker.exists()


@pytest.fixture
def sharded(tmp_path):
    """A sharded --fsdp2 checkpoint file as the trainer writes it: config, no weights, the shards directory named."""
    path = tmp_path / "checkpoint_last.pt"
    torch.save(
        {
            "model": None,
            "cfg": {"model": {}, "task": {}},
            "args": None,
            "sharded": {"dir": "checkpoint_last.pt.shards", "world_size": 2},
        },
        path,
    )
    return path


def sharded_error(path):
    return (
        f"{path} is a sharded --fsdp2 checkpoint (its weights are in checkpoint_last.pt.shards/ beside it); "
        f"make one file first: python -m unilm_vl.consolidate {path} --out FULL.pt"
    )


@pytest.mark.parametrize(
    "tool,argv",
    [
        ("convert", ["kosmos2", "--to-hf", "--checkpoint", "{sharded}", "--out", "{tmp}/hf"]),
        ("export_open_clip", ["--checkpoint", "{sharded}", "--out", "{tmp}/out.pt"]),
        ("wise_ft", ["--finetuned", "{sharded}", "--alpha", "0.5", "--out", "{tmp}/out.pt"]),
        ("wise_ft", ["--finetuned", "{good}", "--pretrained", "{sharded}", "--alpha", "0.5", "--out", "{tmp}/out.pt"]),
    ],
)
def test_every_tool_names_the_consolidate_command_for_a_sharded_checkpoint(sharded, tmp_path, capsys, tool, argv):
    """convert, export_open_clip and wise_ft read fairseq checkpoints through unilm_vl.checkpoint.read_fairseq_state:
    a sharded file stops with the one line the eval loaders print, not an error about a None state dict."""
    import importlib

    good = tmp_path / "good.pt"
    torch.save({"model": {"towers.clip.w": torch.ones(2)}, "cfg": {"model": {}}}, good)
    module = importlib.import_module(f"unilm_vl.{tool}")
    assert module.main([a.format(sharded=sharded, good=good, tmp=tmp_path) for a in argv]) == 2
    assert error_lines(capsys.readouterr().err) == [f"error: {sharded_error(sharded)}"]
    assert not (tmp_path / "out.pt").exists() and not (tmp_path / "hf").exists()


def test_load_model_refuses_a_sharded_checkpoint_before_building(sharded):
    from unilm_vl.checkpoint import load_model, read_fairseq_state

    for load in (read_fairseq_state, load_fairseq_checkpoint, load_model):
        with pytest.raises(ValueError) as err:
            load(str(sharded))
        assert str(err.value) == sharded_error(sharded)


def test_generate_reads_checkpoints_through_the_safe_loader(evil, sharded, tmp_path, monkeypatch):
    """``python -m unilm_vl.generate`` (fairseq-generate with this package) reads --path with
    load_fairseq_checkpoint: the payload never runs, a sharded file names the consolidate command, and fairseq's
    own reader is back after the run."""
    from fairseq import checkpoint_utils

    from unilm_vl import generate

    path, marker = evil
    fairseq_reader = checkpoint_utils.load_checkpoint_to_cpu
    for ckpt, error, message in [
        (path, UnsafeCheckpointError, f"{path}: refused: it needs the global(s) builtins.exec,"),
        (sharded, ValueError, sharded_error(sharded)),
    ]:
        monkeypatch.setattr(
            "sys.argv",
            [
                "unilm_vl.generate",
                str(tmp_path),
                "--task",
                "image_text_contrastive",
                "--path",
                str(ckpt),
                "--batch-size",
                "1",
                "--cpu",
            ],
        )
        with pytest.raises(error) as err:
            generate.cli_main()
        assert str(err.value).startswith(message)
        assert checkpoint_utils.load_checkpoint_to_cpu is fairseq_reader
    assert not marker.exists()
