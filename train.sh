#!/usr/bin/env bash
# bash train.sh [recipe] [extra fairseq-train flags...]
#
# Installs the environment if needed, generates the synthetic world if missing, trains the recipe on it and
# prints its evaluation on the held-out split. Recipes: clip (default).
# Environment overrides: DATA_DIR (default data/synthetic), SAVE_DIR (default checkpoints/<recipe>),
# MAX_UPDATE (training length), NUM_WORKERS (loader workers, default 1).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RECIPE="${1:-clip}"
[[ $# -gt 0 ]] && shift

bash "$ROOT/scripts/install.sh"
PY="$ROOT/.venv/bin/python"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::FutureWarning}"
DATA_DIR="${DATA_DIR:-$ROOT/data/synthetic}"
SAVE_DIR="${SAVE_DIR:-$ROOT/checkpoints/$RECIPE}"
NUM_WORKERS="${NUM_WORKERS:-1}"

# The built-in data: 10k train / 500 val / 500 held-out test scenes of coloured shapes (seconds to make; kept
# when it already exists with the same arguments).
"$PY" -m unilm_vl.data.synthetic --out "$DATA_DIR" --seed 0 --if-missing

case "$RECIPE" in
  clip)
    MAX_UPDATE="${MAX_UPDATE:-500}"
    args=(
      "$DATA_DIR"
      --task image_text_contrastive                 # image-caption pairs, contrastive
      --train-data "train/wds/part-*.tar"           # img2dataset-layout webdataset shards of the synthetic world
      --valid-data "val/wds/part-*.tar"
      --arch clip_tiny                              # open_clip ViT 2x128 / text 2x128, 64 px: CPU-sized
      --criterion clip                              # symmetric InfoNCE, features gathered across ranks with grad
      --optimizer adam --adam-betas "(0.9,0.98)" --adam-eps 1e-6   # open_clip's betas/eps for ViTs
      --lr 1e-3 --lr-scheduler cosine --warmup-updates 50          # cosine decay to 0 after linear warm-up
      --max-update "$MAX_UPDATE"
      --batch-size 128 --batch-size-valid 128       # image-text pairs per rank and step
      --num-workers "$NUM_WORKERS"                  # loader processes (decode + augment + tokenise)
      --cpu                                         # drop on a GPU machine
      --save-dir "$SAVE_DIR" --save-interval-updates 250 --keep-interval-updates 1 --no-epoch-checkpoints
      --validate-interval-updates 250
      --log-format simple --log-interval 50
    )
    "$PY" -m unilm_vl.train "${args[@]}" "$@"
    CKPT="$SAVE_DIR/checkpoint_last.pt"
    echo "== held-out retrieval (synthetic Karpathy split, 500 images x 5 captions; chance R@1 = 0.2%)"
    "$PY" -m unilm_vl.eval.retrieval --checkpoint "$CKPT" --data "$DATA_DIR/eval/karpathy.json" \
      --output "$SAVE_DIR/eval_retrieval.json"
    echo "== held-out zero-shot classification (48 colour-shape classes, chance top-1 = 2.1%)"
    "$PY" -m unilm_vl.eval.zeroshot_classification --checkpoint "$CKPT" --root "$DATA_DIR/eval/zeroshot/test" \
      --classnames "$DATA_DIR/eval/zeroshot/classnames.txt" --templates "$DATA_DIR/eval/zeroshot/templates.txt" \
      --output "$SAVE_DIR/eval_zeroshot.json"
    ;;
  *)
    echo "unknown recipe '$RECIPE'; available: clip" >&2
    exit 2
    ;;
esac
