"""``python -m unilm_vl.plot_log LOG [LOG ...] -o curves.png``: loss and metric curves from a fairseq training log.

Reads what ``fairseq-train`` (and ``python -m unilm_vl.train`` / ``bash train.sh``) prints with ``--log-format simple``
(the default when the output is not a terminal), ``tqdm`` (its end-of-epoch lines) or ``json``:

* ``train_inner`` lines, every ``--log-interval`` updates:
  ``... | INFO | train_inner | epoch 001:     10 / 50 loss=4.1, clip_loss=4.1, ..., num_updates=10, lr=0.001``
  (json: ``... | INFO | train_inner | {"epoch": 1, "update": 0.2, "loss": "4.1", ..., "num_updates": "10"}``);
* end-of-epoch summaries of the training split: ``... | INFO | train | epoch 001 | loss 4.0 | ... | num_updates 50``
  (json: ``{"epoch": 1, "train_loss": "4.0", ..., "train_num_updates": "50"}``);
* validation summaries, tagged with the subset name: ``... | INFO | valid | epoch 001 | valid on 'valid' subset |
  loss 3.9 | ... | num_updates 50`` (json: ``valid_loss`` ...).

Every series is plotted against ``num_updates``, one subplot per metric: ``loss`` and every other numeric key except
bookkeeping ones (throughput, learning rate, gradient norm, batch sizes, timings; see :data:`BOOKKEEPING`), or the
keys named with ``--metrics``. A log without such lines stops with one ``error:`` line."""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

Series = Dict[str, List[Tuple[int, float]]]  # metric -> [(num_updates, value)], in log order

BOOKKEEPING = frozenset(
    {
        "epoch",
        "update",
        "num_updates",
        "wps",
        "ups",
        "wpb",
        "bsz",
        "lr",
        "gnorm",
        "clip",
        "loss_scale",
        "train_wall",
        "gb_free",
        "wall",
        "ntokens",
        "nsentences",
        "sample_size",
        "logit_scale_raw",
    }
)

_LINE = re.compile(r"\| [A-Z]+ \| (?P<tag>[A-Za-z0-9_.\-]+) \| (?P<rest>.*)$")  # after "| INFO |"
_INNER = re.compile(r"^epoch \d+:\s+\d+ / \d+ (?P<stats>.*)$")
_PAIR_COMMA = re.compile(r"^(?P<key>[^=\s]+)=(?P<value>\S+)$")
_PAIR_SPACE = re.compile(r"^(?P<key>\S+) (?P<value>\S+)$")


def _number(text) -> Optional[float]:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _record(tag: str, rest: str) -> Optional[Dict[str, float]]:
    """The numeric stats of one progress-bar line body (after ``| <tag> | ``), or None for any other line."""
    rest = rest.strip()
    stats: Dict[str, float] = {}
    if rest.startswith("{"):
        try:
            raw = json.loads(rest)
        except ValueError:
            return None
        if not isinstance(raw, dict):
            return None
        prefix = f"{tag}_"
        for key, value in raw.items():
            number = _number(value)
            if number is not None:
                stats[key[len(prefix) :] if key.startswith(prefix) else key] = number
    else:
        inner = _INNER.match(rest)
        if inner:  # log(): "epoch 001:      2 / 7 loss=4.158, num_updates=2, ..."
            pairs = [_PAIR_COMMA.match(part.strip()) for part in inner.group("stats").split(", ")]
        elif rest.startswith("epoch ") and " | " in rest:  # print(): "epoch 001 | loss 4.1 | ... | num_updates 7"
            pairs = [_PAIR_SPACE.match(part.strip()) for part in rest.split(" | ")[1:]]
        else:
            return None
        for pair in pairs:
            if pair is not None and _number(pair.group("value")) is not None:
                stats[pair.group("key")] = _number(pair.group("value"))
    return stats if "num_updates" in stats else None


def parse_log(lines: Iterable[str]) -> Dict[str, Series]:
    """``{series: {metric: [(num_updates, value), ...]}}`` of a fairseq log; the series are the progress-bar tags
    (``train_inner``, ``train``, and the validation subsets such as ``valid``), in order of first appearance."""
    out: Dict[str, Series] = OrderedDict()
    for line in lines:
        match = _LINE.search(line.rstrip("\n"))
        if match is None:
            continue
        tag = match.group("tag")
        stats = _record(tag, match.group("rest"))
        if stats is None:
            continue
        step = int(stats["num_updates"])
        series = out.setdefault(tag, OrderedDict())
        for key, value in stats.items():
            if key != "num_updates":
                series.setdefault(key, []).append((step, value))
    return out


def default_metrics(parsed: Dict[str, Series]) -> List[str]:
    """``loss`` first, then every other numeric key of any series that is not bookkeeping, in order of appearance."""
    keys: List[str] = []
    for series in parsed.values():
        for key in series:
            if key not in BOOKKEEPING and not key.startswith("best_") and key not in keys:
                keys.append(key)
    return sorted(keys, key=lambda k: k != "loss")


def plot_curves(parsed: Dict[str, Series], metrics: Sequence[str], out: str, title: Optional[str] = None) -> None:
    """One subplot per metric (up to 3 a row), a line per series against num_updates; written to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for name, series in parsed.items():
            points = series.get(metric)
            if not points:
                continue
            steps, values = zip(*points)
            style = {"linewidth": 1.0, "alpha": 0.8} if name == "train_inner" else {"marker": "o", "markersize": 4}
            ax.plot(steps, values, label=name, **style)
        ax.set_title(metric)
        ax.set_xlabel("num_updates")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Plot loss / metric curves of fairseq training logs.")
    parser.add_argument(
        "logs",
        nargs="+",
        help="fairseq log file(s) (--log-format simple, tqdm or json); several "
        "files are read in order, as one run (e.g. a resumed training)",
    )
    parser.add_argument("-o", "--output", default="curves.png", help="image to write (the suffix picks the format)")
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=None,
        help="metrics to plot (default: loss and every numeric key except bookkeeping ones)",
    )
    parser.add_argument("--title", default=None, help="figure title (default: the log file names)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Series]:
    import logging
    import os

    from unilm_vl.logging_utils import setup_cli_logging

    args = get_parser().parse_args(argv)
    setup_cli_logging()
    lines: List[str] = []
    for path in args.logs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"log file not found: {path}")
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines.extend(fh)
    parsed = parse_log(lines)
    if not parsed:
        raise ValueError(
            f"{', '.join(args.logs)}: no fairseq progress lines (train_inner / train / valid stats with "
            "num_updates) found; pass the stdout of fairseq-train or python -m unilm_vl.train"
        )
    metrics = args.metrics or default_metrics(parsed)
    known = {key for series in parsed.values() for key in series}
    missing = [m for m in metrics if m not in known]
    if missing or not metrics:
        raise ValueError(f"--metrics {' '.join(missing)}: not in the log; it has {', '.join(sorted(known))}")
    plot_curves(parsed, metrics, args.output, args.title or ", ".join(os.path.basename(p) for p in args.logs))
    logging.getLogger(__name__).info("wrote %s (%s; series %s)", args.output, ", ".join(metrics), ", ".join(parsed))
    return parsed


if __name__ == "__main__":
    from unilm_vl.cli import run_cli

    raise SystemExit(run_cli(main))
