"""``bash train.sh <recipe>``: the driver and recipes/. ``DRY_RUN=1`` prints each recipe's commands; they name the
task, model and criterion each recipe trains, its default length, and end with the extra flags; a real run (with
stand-ins for the set-up script and the venv's python) executes exactly the printed commands; an unknown recipe
is one error line listing the recipes."""

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys

import pytest

from conftest import REPO

RECIPES = [
    "barlip",
    "byolip",
    "clip",
    "clip_ft",
    "clip_rocket",
    "cosa",
    "cosmos",
    "fsc_clip",
    "kosmos2",
    "negclip",
    "siamlip",
    "swalip",
]
# recipe -> (task, arch, criterion, --max-update) of each training command it runs, in order
TRAININGS = {
    "kosmos2": [("kosmos2", "kosmos2_tiny", "kosmos2_lm", "3000")],
    "clip": [("image_text_contrastive", "clip_tiny", "clip", "500")],
    "clip_rocket": [("image_text_contrastive", "clip_rocket_tiny", "clip_rocket", "300")],
    "siamlip": [("image_text_contrastive", "clip_rocket_siamlip_tiny", "siamlip", "300")],
    "byolip": [("image_text_contrastive", "clip_rocket_byolip_tiny", "byolip", "300")],
    "barlip": [("image_text_contrastive", "clip_rocket_barlip_tiny", "barlip", "300")],
    "swalip": [("image_text_contrastive", "clip_rocket_swalip_tiny", "swalip", "300")],
    "cosmos": [("image_text_contrastive", "cosmos_tiny", "cosmos", "1000")],
    "clip_ft": [("image_text_contrastive", "clip_tiny", "clip", "200")],
    "negclip": [("image_text_contrastive", "clip_tiny", "negclip", "200")],
    "fsc_clip": [("image_text_contrastive", "clip_tiny", "fsc_clip", "200")],
    "cosa": [
        ("cosa_pretrain", "cosa_tiny", "cosa", "150"),
        ("cosa_finetune", "cosa_tiny", "cosa", "60"),
        ("cosa_finetune", "cosa_tiny", "cosa", "60"),
    ],
}
EXTRA = ["--seed", "2", "--note", "it's a test"]


def train_sh(*args, root=REPO, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("MAX_UPDATE", "SAVE_DIR", "DATA_DIR", "CLIP_DIR")}
    full.update(env)
    return subprocess.run(
        ["bash", os.path.join(root, "train.sh"), *args], capture_output=True, text=True, env=full, timeout=60
    )


def commands(stdout):
    """The printed commands as argv lists (here-document bodies and `==` headings left out)."""
    out, in_heredoc = [], False
    for line in stdout.splitlines():
        if in_heredoc:
            in_heredoc = line != "EOF"
        elif not line.startswith("== "):
            in_heredoc = line.endswith("<<'EOF'")
            out.append(shlex.split(line[: -len(" <<'EOF'")] if in_heredoc else line))
    return out


def flag(argv, name):
    """The last value of ``name`` (argparse keeps the last one)."""
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == name][-1]


def test_the_recipes_are_the_files_of_recipes():
    names = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "recipes")) if f.endswith(".sh") and f[0] != "_")
    assert names == RECIPES == sorted(TRAININGS)


@pytest.mark.parametrize("recipe", RECIPES)
def test_dry_run_prints_the_training_commands_of_each_recipe(recipe, tmp_path):
    result = train_sh(
        recipe,
        *EXTRA,
        DRY_RUN="1",
        CLIP_DIR=str(tmp_path / "clip"),
        SAVE_DIR=str(tmp_path / "run"),
        DATA_DIR=str(tmp_path / "data"),
    )
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()  # nothing ran
    argvs = commands(result.stdout)
    python = os.path.join(REPO, ".venv", "bin", "python")
    assert argvs[0] == ["bash", os.path.join(REPO, "scripts", "install.sh")]
    assert argvs[1] == [
        python,
        "-m",
        "unilm_vl.data.synthetic",
        "--out",
        str(tmp_path / "data"),
        "--seed",
        "0",
        "--if-missing",
    ]
    trainings = [argv for argv in argvs if argv[:3] == [python, "-m", "unilm_vl.train"]]
    if recipe in ("clip_ft", "negclip", "fsc_clip"):  # CLIP_DIR has no checkpoint: the clip recipe runs first
        first = trainings.pop(0)
        assert (flag(first, "--arch"), flag(first, "--save-dir"), flag(first, "--max-update")) == (
            "clip_tiny",
            str(tmp_path / "clip"),
            "500",
        )
        assert first[-2:] == ["--validate-interval-updates", "250"]  # without this run's extra flags
    assert [
        (flag(a, "--task"), flag(a, "--arch"), flag(a, "--criterion"), flag(a, "--max-update")) for a in trainings
    ] == TRAININGS[recipe]
    for argv in trainings:
        assert argv[1:3] == ["-m", "unilm_vl.train"] and argv[-len(EXTRA) :] == EXTRA
        assert str(tmp_path / "run") in flag(argv, "--save-dir")
    if recipe == "kosmos2":
        assert "--task kosmos2 --train-data 'train/grit/part-*.tsv'" in result.stdout
        assert " --arch kosmos2_tiny --decoder-layers 4 " in result.stdout
        assert (flag(trainings[0], "--save-interval-updates"), flag(trainings[0], "--validate-interval-updates")) == (
            "1500",
            "1500",
        )


def test_max_update_and_clip_dir_environment(tmp_path):
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "checkpoint_last.pt").write_bytes(b"")
    result = train_sh("negclip", DRY_RUN="1", MAX_UPDATE="7", CLIP_DIR=str(tmp_path / "clip"))
    assert result.returncode == 0, result.stderr
    argvs = commands(result.stdout)
    trainings = [argv for argv in argvs if "unilm_vl.train" in argv]
    assert len(trainings) == 1  # the clip checkpoint exists: no clip run
    assert (flag(trainings[0], "--max-update"), flag(trainings[0], "--save-interval-updates")) == ("7", "4")
    export = next(argv for argv in argvs if "unilm_vl.export_open_clip" in argv)
    assert flag(export, "--checkpoint") == str(tmp_path / "clip" / "checkpoint_last.pt")
    compositionality = [flag(a, "--checkpoint") for a in argvs if "unilm_vl.eval.compositionality" in a]
    assert compositionality == [
        str(tmp_path / "clip" / "checkpoint_last.pt"),
        os.path.join(REPO, "checkpoints", "negclip", "checkpoint_last.pt"),
    ]


def test_unknown_recipe_is_one_error_line_listing_the_recipes():
    for name in ("nope", "_contrastive", "../train"):
        result = train_sh(name, DRY_RUN="1")
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr == f"error: unknown recipe '{name}'; available: {' '.join(RECIPES)}\n"


def _stand_in(path, body):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.mark.parametrize("recipe", ["kosmos2", "cosa", "fsc_clip"])
def test_a_real_run_executes_exactly_the_dry_run_commands(recipe, tmp_path):
    """train.sh and recipes/ copied beside stand-ins: scripts/install.sh and .venv/bin/python only log their
    arguments (and the standard input of `--input -`), so the real code path runs without training anything."""
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(os.path.join(REPO, "train.sh"), root / "train.sh")
    shutil.copytree(os.path.join(REPO, "recipes"), root / "recipes")
    log = tmp_path / "log.jsonl"
    _stand_in(root / "scripts" / "install.sh", f"#!/usr/bin/env bash\necho '{json.dumps(['install'])}' >> {log}\n")
    _stand_in(
        root / ".venv" / "bin" / "python",
        f"#!{sys.executable}\nimport json, sys\n"
        "argv = sys.argv[1:]\n"
        "stdin = sys.stdin.read() if '--input' in argv and argv[argv.index('--input') + 1] == '-' else None\n"
        f"with open({str(log)!r}, 'a') as fh:\n"
        "    fh.write(json.dumps(argv + ([stdin] if stdin is not None else [])) + '\\n')\n",
    )
    env = dict(DATA_DIR=str(tmp_path / "data"), CLIP_DIR=str(tmp_path / "clip"), SAVE_DIR=str(tmp_path / "run"))
    (tmp_path / "data").mkdir()
    dry = train_sh(recipe, *EXTRA, root=str(root), DRY_RUN="1", **env)
    assert dry.returncode == 0, dry.stderr
    real = train_sh(recipe, *EXTRA, root=str(root), **env)
    assert real.returncode == 0, real.stderr
    ran = [json.loads(line) for line in log.read_text().splitlines()]
    printed = commands(dry.stdout)
    python = str(root / ".venv" / "bin" / "python")
    expected = []
    for argv in printed:
        if argv[0] == "bash":
            expected.append(["install"])
        elif argv[0] == python:
            expected.append(argv[1:])
    if recipe == "kosmos2":  # the prompts piped into kosmos2_infer, as the dry run's here-document shows them
        prompts = "".join(f"{tmp_path / 'data'}/eval/images/{i:06d}.jpg\t<grounding>\n" for i in range(4))
        expected[-1].append(prompts)
        assert prompts in dry.stdout
    assert ran == expected
    headings = [line for line in real.stdout.splitlines() if line.startswith("== ")]
    assert headings == [line for line in dry.stdout.splitlines() if line.startswith("== ")] and headings
    if recipe == "cosa":  # the mixture config is written, and shown by the dry run
        text = (tmp_path / "data" / "cosa_pretrain.json").read_text()
        assert [s["name"] for s in json.loads(text)] == ["images", "videos"] and text in dry.stdout
    if recipe == "fsc_clip":
        assert (tmp_path / "run").is_dir()  # `mkdir -p "$SAVE_DIR"` ran
