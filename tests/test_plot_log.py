"""``python -m unilm_vl.plot_log``: fairseq's simple and json logs parsed into exact series, the PNG written, one
error line for a log without progress lines."""

import pytest

from unilm_vl.cli import run_cli
from unilm_vl.plot_log import default_metrics, main, parse_log

# fairseq 0.12's SimpleProgressBar.log / .print lines as fairseq-train writes them (other lines in between)
SIMPLE = """\
2026-12-03 15:00:40 | INFO | fairseq_cli.train | task: ImageTextContrastiveTask
2026-12-03 15:00:41 | INFO | fairseq.trainer | begin training epoch 1
2026-12-03 15:00:42 | INFO | train_inner | epoch 001:      2 / 4 loss=4.158, clip_loss=4.158, logit_scale=14.286, \
wps=0, ups=0.51, wpb=8, bsz=8, num_updates=2, lr=0.001, gnorm=1.25, train_wall=3, gb_free=0, wall=4
2026-12-03 15:00:44 | INFO | train_inner | epoch 001:      4 / 4 loss=3.9, clip_loss=3.9, logit_scale=14.3, \
wps=0, ups=0.52, wpb=8, bsz=8, num_updates=4, lr=0.001, gnorm=1.5, train_wall=3, gb_free=0, wall=8
2026-12-03 15:00:45 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 3.8 | clip_loss 3.8 | \
logit_scale 14.3 | wps 0 | wpb 8 | bsz 8 | num_updates 4
2026-12-03 15:00:45 | INFO | fairseq.checkpoint_utils | Saved checkpoint checkpoint_last.pt (epoch 1 @ 4 updates)
2026-12-03 15:00:45 | INFO | train | epoch 001 | loss 4.029 | clip_loss 4.029 | logit_scale 14.293 | wps 0 | \
ups 0.5 | wpb 8 | bsz 8 | num_updates 4 | lr 0.001 | gnorm 1.375 | train_wall 6 | gb_free 0 | wall 9
2026-12-03 15:00:47 | INFO | train_inner | epoch 002:      2 / 4 loss=3.5, clip_loss=3.5, logit_scale=14.31, \
wps=0, ups=0.5, wpb=8, bsz=8, num_updates=6, lr=0.001, gnorm=1.1, train_wall=3, gb_free=0, wall=12
"""

# JsonProgressBar: log() keys as they are, print() keys prefixed with the tag; values are strings
JSON = """\
2026-12-03 15:00:42 | INFO | train_inner | {"epoch": 1, "update": 0.5, "loss": "4.158", "nll_loss": "3.2", \
"wps": "0", "bsz": "8", "num_updates": "2", "lr": "0.001"}
2026-12-03 15:00:45 | INFO | valid | {"epoch": 1, "valid_loss": "3.8", "valid_nll_loss": "3.0", \
"valid_num_updates": "4", "valid_best_loss": "3.8"}
2026-12-03 15:00:45 | INFO | train | {"epoch": 1, "train_loss": "4.029", "train_nll_loss": "3.1", \
"train_num_updates": "4", "train_lr": "0.001"}
"""


def test_simple_log_series():
    parsed = parse_log(SIMPLE.splitlines())
    assert list(parsed) == ["train_inner", "valid", "train"]
    assert parsed["train_inner"]["loss"] == [(2, 4.158), (4, 3.9), (6, 3.5)]
    assert parsed["train_inner"]["gnorm"] == [(2, 1.25), (4, 1.5), (6, 1.1)]
    assert parsed["valid"]["loss"] == [(4, 3.8)] and parsed["valid"]["logit_scale"] == [(4, 14.3)]
    assert parsed["train"]["loss"] == [(4, 4.029)] and parsed["train"]["lr"] == [(4, 0.001)]
    assert "num_updates" not in parsed["train"]
    assert default_metrics(parsed) == ["loss", "clip_loss", "logit_scale"]


def test_json_log_series():
    parsed = parse_log(JSON.splitlines())
    assert parsed == {
        "train_inner": {
            "epoch": [(2, 1.0)],
            "update": [(2, 0.5)],
            "loss": [(2, 4.158)],
            "nll_loss": [(2, 3.2)],
            "wps": [(2, 0.0)],
            "bsz": [(2, 8.0)],
            "lr": [(2, 0.001)],
        },
        "valid": {"epoch": [(4, 1.0)], "loss": [(4, 3.8)], "nll_loss": [(4, 3.0)], "best_loss": [(4, 3.8)]},
        "train": {"epoch": [(4, 1.0)], "loss": [(4, 4.029)], "nll_loss": [(4, 3.1)], "lr": [(4, 0.001)]},
    }
    assert default_metrics(parsed) == ["loss", "nll_loss"]


def test_cli_writes_the_png(tmp_path):
    log = tmp_path / "train.log"
    log.write_text(SIMPLE)
    out = tmp_path / "curves.png"
    assert run_cli(main, [str(log), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    assert run_cli(main, [str(log), "-o", str(tmp_path / "lr.png"), "--metrics", "lr", "gnorm"]) == 0


@pytest.mark.parametrize(
    "content,argv,expected",
    [
        ("no progress here\n", [], "error: {log}: no fairseq progress lines (train_inner / train / valid stats"),
        (SIMPLE, ["--metrics", "accuracy"], "error: --metrics accuracy: not in the log; it has bsz, clip_loss, "),
        (None, [], "error: log file not found: {log}"),
    ],
)
def test_errors_are_one_line(tmp_path, capsys, content, argv, expected):
    log = tmp_path / "train.log"
    if content is not None:
        log.write_text(content)
    assert run_cli(main, [str(log), "-o", str(tmp_path / "x.png"), *argv]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(expected.format(log=log)), lines
    assert not (tmp_path / "x.png").exists()
