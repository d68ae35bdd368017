"""What a run prints and writes besides its results: fairseq's ``--tensorboard-logdir`` writes event files (the set-up
installs tensorboardX), and building towers does not warn "No pretrained weights loaded ... Model initialized
randomly" before the real weights load (unilm_vl.modules.clip.create_open_clip_model)."""

import glob
import logging
import os
import struct
import sys

from conftest import write_wds

RANDOM_INIT = "No pretrained weights loaded for model"


def test_tensorboardx_is_installed_so_fairseq_finds_a_writer():
    """fairseq's text_to_speech task logs "Please install tensorboardX" at import when this is None, and
    ``--tensorboard-logdir`` silently writes nothing (progress_bar's writer is None)."""
    from fairseq.logging import progress_bar
    from fairseq.tasks import text_to_speech

    assert text_to_speech.SummaryWriter is not None and progress_bar.SummaryWriter is not None


def test_random_towers_do_not_warn_but_other_warnings_pass(caplog):
    import open_clip

    from unilm_vl.modules.clip import ClipTowersConfig, build_open_clip, create_open_clip_model

    with caplog.at_level(logging.INFO):
        build_open_clip(ClipTowersConfig())
        create_open_clip_model("unilm-vl-clip-tiny")
        logging.warning("a real warning")
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if m.startswith(RANDOM_INIT)] and "a real warning" in messages
    assert any("creation process complete" in m for m in messages)  # open_clip's other records still pass
    assert not logging.getLogger().filters  # the filter was scoped to the call
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        open_clip.create_model("unilm-vl-clip-tiny", pretrained=None)  # open_clip's own call still warns
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith(RANDOM_INIT)]


def read_event_scalars(path):
    """(tag, step, value) of every scalar in a TensorBoard event file: TFRecord framing (u64 length, u32 crc,
    payload, u32 crc) around ``Event`` protos."""
    from tensorboardX.proto import event_pb2

    out, data = [], open(path, "rb").read()
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        event = event_pb2.Event()
        event.ParseFromString(data[pos + 12 : pos + 12 + length])
        pos += 12 + length + 4
        for value in event.summary.value:
            out.append((value.tag, event.step, value.simple_value))
    return out


def test_tensorboard_logdir_writes_the_training_curves(tmp_path, monkeypatch, caplog):
    """Two updates of clip_tiny through ``python -m unilm_vl.train``'s entry point (in-process): the train_inner
    event file holds the loss at updates 1 and 2, equal to what the text log printed; no random-init warning."""
    from unilm_vl import train

    write_wds(str(tmp_path / "data" / "part"), 8, 8)
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "train",
            str(tmp_path / "data"),
            "--task",
            "image_text_contrastive",
            "--train-data",
            "part-*.tar",
            "--valid-data",
            "part-00000.tar",
            "--arch",
            "clip_tiny",
            "--criterion",
            "clip",
            "--optimizer",
            "sgd",
            "--lr",
            "0.01",
            "--batch-size",
            "4",
            "--num-workers",
            "0",
            "--max-update",
            "2",
            "--cpu",
            "--no-save",
            "--disable-validation",
            "--log-format",
            "simple",
            "--log-interval",
            "1",
            "--tensorboard-logdir",
            str(tmp_path / "tb"),
        ],
    )
    with caplog.at_level(logging.INFO):
        train.cli_main()
    from fairseq.logging import progress_bar

    for writer in progress_bar._tensorboard_writers.values():
        writer.flush()
    files = glob.glob(str(tmp_path / "tb" / "train_inner" / "events.out.tfevents.*"))
    assert len(files) == 1, os.listdir(tmp_path / "tb")
    losses = {step: value for tag, step, value in read_event_scalars(files[0]) if tag == "loss"}
    assert sorted(losses) == [1, 2]
    logged = [r.getMessage() for r in caplog.records if "num_updates=" in r.getMessage()]
    for step, value in losses.items():
        line = next(m for m in logged if f"num_updates={step}," in m or m.endswith(f"num_updates={step}"))
        assert f"loss={value:.3f}" in line, line
    assert not [r for r in caplog.records if r.getMessage().startswith(RANDOM_INIT)]


def test_progress_bar_is_on_stderr_when_asked_and_off_in_logs(monkeypatch, capsys):
    """unilm_vl.cli.progress: tqdm on stderr; off when stderr is not a terminal (here: captured) unless
    UNILM_VL_PROGRESS=1; the loops keep their values and order."""
    import torch

    from unilm_vl.cli import progress
    from unilm_vl.eval.retrieval import encode_captions

    class Encoder:
        def encode_texts(self, texts):
            return torch.tensor([[float(len(t))] for t in texts])

    assert list(progress(range(3), "x")) == [0, 1, 2] and capsys.readouterr().err == ""
    monkeypatch.setenv("UNILM_VL_PROGRESS", "1")
    feats = encode_captions(Encoder(), ["a", "bb", "ccc"], batch_size=2)
    assert feats.flatten().tolist() == [1.0, 2.0, 3.0]
    err = capsys.readouterr().err
    assert "encoding texts" in err and "0/2" in err  # two batches of texts (leave=False clears the final 2/2)
    monkeypatch.setenv("UNILM_VL_PROGRESS", "0")
    assert list(progress(iter([4, 5]), "y")) == [4, 5] and capsys.readouterr().err == ""
