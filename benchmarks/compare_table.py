"""Table (markdown) and bar plot (PNG) of the recipes trained by ``benchmarks/synthetic_compare.sh``.

Reads ``<out-dir>/<recipe>/eval_retrieval.json``, ``eval_zeroshot.json`` and ``wall_seconds.txt`` of every recipe
and writes ``<out-dir>/compare.md`` and ``<out-dir>/compare.png``.
"""

import argparse
import json
import os
from typing import Dict, List

COLUMNS = [
    ("i2t R@1", "retrieval", "i2t_R@1"),
    ("i2t R@5", "retrieval", "i2t_R@5"),
    ("t2i R@1", "retrieval", "t2i_R@1"),
    ("t2i R@5", "retrieval", "t2i_R@5"),
    ("zero-shot top-1", "zeroshot", "top1"),
    ("zero-shot top-5", "zeroshot", "top5"),
]


def load_results(out_dir: str, recipes: List[str]) -> Dict[str, Dict[str, float]]:
    rows = {}
    for recipe in recipes:
        base = os.path.join(out_dir, recipe)
        paths = {
            "retrieval": os.path.join(base, "eval_retrieval.json"),
            "zeroshot": os.path.join(base, "eval_zeroshot.json"),
        }
        for path in paths.values():
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} is missing: did recipe {recipe} finish?")
        loaded = {kind: json.load(open(path)) for kind, path in paths.items()}
        row = {}
        for title, kind, key in COLUMNS:
            if key not in loaded[kind]:
                raise KeyError(f"{paths[kind]} has no {key!r} (keys: {sorted(loaded[kind])[:12]})")
            row[title] = float(loaded[kind][key])
        wall = os.path.join(base, "wall_seconds.txt")
        row["wall (s)"] = float(open(wall).read()) if os.path.isfile(wall) else float("nan")
        rows[recipe] = row
    return rows


def markdown(rows: Dict[str, Dict[str, float]], max_update: int) -> str:
    titles = [c[0] for c in COLUMNS] + ["wall (s)"]
    lines = [
        f"Synthetic world, held-out split; {max_update} updates x 128 pairs per recipe "
        "(chance: R@1 0.2%, zero-shot top-1 2.1%).",
        "",
        "| recipe | " + " | ".join(titles) + " |",
        "|---" * (len(titles) + 1) + "|",
    ]
    for recipe, row in rows.items():
        lines.append(
            f"| {recipe} | "
            + " | ".join(f"{row[t]:.1f}" if t != "wall (s)" else f"{row[t]:.0f}" for t in titles)
            + " |"
        )
    return "\n".join(lines) + "\n"


def bar_plot(rows: Dict[str, Dict[str, float]], path: str, max_update: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = ["i2t R@1", "t2i R@1", "zero-shot top-1"]
    recipes = list(rows)
    x = np.arange(len(metrics))
    width = 0.8 / len(recipes)
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, recipe in enumerate(recipes):
        ax.bar(x + (i - (len(recipes) - 1) / 2) * width, [rows[recipe][m] for m in metrics], width, label=recipe)
    ax.set_xticks(x, metrics)
    ax.set_ylabel("percent")
    ax.set_title(f"Synthetic world, held-out split, {max_update} updates per recipe")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", required=True, help="directory holding one sub-directory per recipe")
    parser.add_argument("--recipes", nargs="+", required=True, help="recipe names, in table order")
    parser.add_argument("--max-update", type=int, required=True, help="updates per recipe (for the captions)")
    args = parser.parse_args(argv)
    rows = load_results(args.out_dir, args.recipes)
    table = markdown(rows, args.max_update)
    with open(os.path.join(args.out_dir, "compare.md"), "w") as fh:
        fh.write(table)
    bar_plot(rows, os.path.join(args.out_dir, "compare.png"), args.max_update)
    print(table)


if __name__ == "__main__":
    main()
