#!/usr/bin/env bash
# bash benchmarks/synthetic_compare.sh [OUT_DIR]
#
# Trains every contrastive recipe of train.sh (clip and the clip-rocket family) on the synthetic world with one
# budget (MAX_UPDATE updates of 128 pairs each, same data order, optimiser and schedule), evaluates each on the
# held-out split, and writes OUT_DIR/compare.md (markdown table) and OUT_DIR/compare.png (bar plot).
# Environment: MAX_UPDATE (default 200), RECIPES (default "clip clip_rocket siamlip byolip barlip swalip clip_ft negclip
# fsc_clip cosmos"; cosmos steps are 64 samples x 8 image and 8 caption views),
# DATA_DIR, NUM_WORKERS as in train.sh. Extra fairseq-train flags can go in EXTRA_ARGS (e.g. "--seed 2").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-$ROOT/checkpoints/synthetic_compare}"
export MAX_UPDATE="${MAX_UPDATE:-200}"
RECIPES="${RECIPES:-clip clip_rocket siamlip byolip barlip swalip clip_ft negclip fsc_clip cosmos}"
# clip_ft / negclip / fsc_clip fine-tune the clip checkpoint of this comparison (so list them after clip), MAX_UPDATE more steps
export CLIP_DIR="${CLIP_DIR:-$OUT_DIR/clip}"
mkdir -p "$OUT_DIR"

for recipe in $RECIPES; do
  echo "== $recipe ($MAX_UPDATE updates)"
  rm -rf "${OUT_DIR:?}/$recipe"
  start=$(date +%s)
  # shellcheck disable=SC2086
  SAVE_DIR="$OUT_DIR/$recipe" bash "$ROOT/train.sh" "$recipe" ${EXTRA_ARGS:-} > "$OUT_DIR/$recipe.log" 2>&1 \
    || { echo "recipe $recipe failed; see $OUT_DIR/$recipe.log" >&2; exit 1; }
  echo "$(( $(date +%s) - start ))" > "$OUT_DIR/$recipe/wall_seconds.txt"
  tail -n 12 "$OUT_DIR/$recipe.log" | grep -E "image->text|text->image|top-1" || true
done

# shellcheck disable=SC2086
"$ROOT/.venv/bin/python" "$ROOT/benchmarks/compare_table.py" --out-dir "$OUT_DIR" --recipes $RECIPES \
  --max-update "$MAX_UPDATE"
