#!/usr/bin/env bash
# bash train.sh [recipe] [extra fairseq-train flags...]
#
# Installs the environment if needed, generates the synthetic world if missing, then runs recipes/<recipe>.sh:
# its training on the synthetic world, then its evaluation on the held-out split. Each recipe is one readable file
# (recipes/_*.sh hold what several recipes share); extra flags are appended to every training command of the
# recipe (argparse keeps the last value, so they override the recipe's). A recipe is a shell fragment sourced here
# with the extra flags as "$@"; it may read ROOT, RECIPES, DATA_DIR, SAVE_DIR, NUM_WORKERS and PY, and runs every
# command through `run`, `py` (the venv's python), `train` (unilm_vl.train), `run_stdin` or `write_file` (below).
# Recipes: kosmos2 (default: grounded captions, then held-out REC accuracy and grounded PNGs), clip, clip_rocket,
# siamlip, byolip, barlip, swalip (the clip-rocket family), negclip and fsc_clip (hard-negative fine-tuning of the
# clip recipe's checkpoint, which they train first if it is missing; clip_ft is their control: the same fine-tuning
# without negatives), cosmos (cross-modality self-distillation with an EMA teacher), cosa (concatenated-sample
# pretraining on images + clips, then retrieval and captioning finetuning).
# Environment overrides: DATA_DIR (default data/synthetic), SAVE_DIR (default checkpoints/<recipe>),
# MAX_UPDATE (training length), NUM_WORKERS (loader workers, default 1), CLIP_DIR / CLIP_MAX_UPDATE (the clip
# checkpoint the fine-tuning recipes start from), FT_UPDATE / COSA_PRETRAIN_TASKS (cosa), and
# DRY_RUN=1: print the commands (and files) the recipe would run or write instead of running them.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RECIPES="$ROOT/recipes"
RECIPE="${1:-kosmos2}"
[[ $# -gt 0 ]] && shift

available() {
  local path names=()
  for path in "$RECIPES"/*.sh; do
    path="$(basename "$path" .sh)"
    [[ "$path" == _* ]] || names+=("$path")
  done
  echo "${names[*]}"
}
if [[ "$RECIPE" == _* || ! "$RECIPE" =~ ^[A-Za-z0-9_]+$ || ! -f "$RECIPES/$RECIPE.sh" ]]; then
  echo "error: unknown recipe '$RECIPE'; available: $(available)" >&2
  exit 2
fi

# `run CMD...` runs a command, or prints it (shell-quoted) with DRY_RUN=1; every command of a recipe goes through
# it, so `DRY_RUN=1 bash train.sh <recipe>` lists exactly what the recipe runs.
DRY_RUN="${DRY_RUN:-0}"
quote() {
  local arg out=()
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=("$arg"); else out+=("'${arg//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}
run() {
  if [[ "$DRY_RUN" == 1 ]]; then quote "$@"; else "$@"; fi
}
# `... | run_stdin CMD...` runs a command that reads the pipeline's output (printed with DRY_RUN=1 as CMD with a
# here-document holding that input); `write_file PATH <<'EOF' ... EOF` writes stdin to PATH (printed likewise).
run_stdin() {
  if [[ "$DRY_RUN" == 1 ]]; then echo "$(quote "$@") <<'EOF'"; cat; echo "EOF"; else "$@"; fi
}
write_file() {
  if [[ "$DRY_RUN" == 1 ]]; then echo "cat > $(quote "$1") <<'EOF'"; cat; echo "EOF"; else cat > "$1"; fi
}
PY="$ROOT/.venv/bin/python"
py() { run "$PY" "$@"; }
train() { run "$PY" -m unilm_vl.train "$@"; }  # fairseq-train with --user-dir unilm_vl

run bash "$ROOT/scripts/install.sh"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::FutureWarning}"
DATA_DIR="${DATA_DIR:-$ROOT/data/synthetic}"
SAVE_DIR="${SAVE_DIR:-$ROOT/checkpoints/$RECIPE}"
NUM_WORKERS="${NUM_WORKERS:-1}"

# The built-in data: 10k train / 500 val / 500 held-out test scenes of coloured shapes (seconds to make; kept
# when it already exists with the same arguments).
py -m unilm_vl.data.synthetic --out "$DATA_DIR" --seed 0 --if-missing

# shellcheck source=/dev/null
source "$RECIPES/$RECIPE.sh" "$@"
