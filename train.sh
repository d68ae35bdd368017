#!/usr/bin/env bash
# bash train.sh [recipe] [extra fairseq-train flags...]
#
# Installs the environment if needed, generates the synthetic world if missing, trains the recipe on it and
# prints its evaluation on the held-out split.
# Recipes: clip (default), clip_rocket, siamlip, byolip, barlip, swalip (the clip-rocket family).
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

# Shared by every contrastive recipe, so that they compare on one data stream and one optimiser.
contrastive_args=(
  "$DATA_DIR"
  --task image_text_contrastive                 # image-caption pairs, contrastive
  --train-data "train/wds/part-*.tar"           # img2dataset-layout webdataset shards of the synthetic world
  --valid-data "val/wds/part-*.tar"
  --optimizer adam --adam-betas "(0.9,0.98)" --adam-eps 1e-6   # open_clip's betas/eps for ViTs
  --lr 1e-3 --lr-scheduler cosine --warmup-updates 50          # cosine decay to 0 after linear warm-up
  --batch-size 128 --batch-size-valid 128       # image-text pairs per rank and step
  --num-workers "$NUM_WORKERS"                  # loader processes (decode + augment + tokenise)
  --cpu                                         # drop on a GPU machine
  --save-dir "$SAVE_DIR" --keep-interval-updates 1 --no-epoch-checkpoints
  --log-format simple --log-interval 50
)
# The improved CLIP recipe (clip-rocket): 2 strong image and text views per sample through separate l2l heads.
rocket_args=(
  --num-augs 2                                  # A strong views per sample (RandomResizedCrop .08-1, jitter, blur, flip)
  --text-augment --clean-before-augment         # EDA op per text view (synonym/swap/delete); stop-word drop p=.8
  --loss-avg-or-sum sum                         # CLIP-rocket recipe (YFCC15M): L_img + L_txt
)

case "$RECIPE" in
  clip)
    MAX_UPDATE="${MAX_UPDATE:-500}"
    recipe_args=(
      --arch clip_tiny                          # open_clip ViT 2x128 / text 2x128, 64 px: CPU-sized
      --criterion clip                          # symmetric InfoNCE, features gathered across ranks with grad
    )
    ;;
  clip_rocket)
    recipe_args=("${rocket_args[@]}"
      --arch clip_rocket_tiny                   # clip_tiny towers + l2l MLP heads (256 -> 64) for the views
      --criterion clip_rocket --label-smoothing 0.1   # CL2L: global terms + all view pairs, smoothing on views only
    )
    ;;
  siamlip)
    recipe_args=("${rocket_args[@]}"
      --arch clip_rocket_siamlip_tiny           # + SimSiam projector and image->text / text->image predictors
      --criterion siamlip --label-smoothing 0.1 # CL2L + mean stop-gradient cosine distance over cross-modal pairs
    )
    ;;
  byolip)
    recipe_args=("${rocket_args[@]}"
      --arch clip_rocket_byolip_tiny            # siamlip heads + EMA momentum copy of the whole model
      --momentum-tau 0.99                       # constant EMA rate, applied after every optimiser step
      --criterion byolip --label-smoothing 0.1  # SiamLIP with the momentum copy's projections as targets
    )
    ;;
  barlip)
    recipe_args=("${rocket_args[@]}"
      --arch clip_rocket_barlip_tiny            # + Barlow Twins projectors ending in BatchNorm (128 -> 256)
      --criterion barlip --label-smoothing 0.1  # CL2L + Barlow Twins (lambda 5e-3, scale 0.025) image<->text
    )
    ;;
  swalip)
    recipe_args=("${rocket_args[@]}"
      --arch clip_rocket_swalip_tiny            # the l2l heads double as SwAV codes
      --criterion swalip --label-smoothing 0.0  # CL2L + 0.2 x swapped Sinkhorn-Knopp prediction (3 iters, eps .05)
    )
    ;;
  kosmos2)
    MAX_UPDATE="${MAX_UPDATE:-1500}"
    VOCAB="$DATA_DIR/vocab"
    # The synthetic world's own sentencepiece vocabulary in the released layout (the released 64k one is used by
    # passing its files instead: --spm-model sentencepiece.bpe.model --dict-path dict.txt).
    "$PY" -m unilm_vl.data.build_vocab --data "train/grit/part-*.tsv" --root "$DATA_DIR" --out "$VOCAB" \
      --vocab-size 1000 --if-missing
    k2_args=(
      "$DATA_DIR"
      --task kosmos2                                # grounded captions: <grounding> ..<phrase>..</phrase><object>..
      --train-data "train/grit/part-*.tsv"          # GRIT-layout TSV shards (base64 image + noun chunks / ref exps)
      --valid-data "val/grit/part-*.tsv"
      --spm-model "$VOCAB/sentencepiece.bpe.model" --dict-path "$VOCAB/dict.txt"
      --location-bin-size 16                        # 16 x 16 grid of <patch_index_k> tokens (released: 32)
      --image-token-length 16                       # image slots = the arch's latent queries
      --phrase-mode phrase                          # ground every noun chunk (released: outermost expressions)
      --use-object-bbox-prob 1.0                    # always grounded (released: 0.5, half plain captions)
      --training-image-only-resize                  # squash to 64 x 64: the same view as generation uses
      --arch kosmos2_tiny                           # 64 px open_clip tower, 16 queries, 2 x 128 decoder
      --train-vision                                # no pretrained tower here: train it (released: frozen CLIP)
      --criterion kosmos2_lm                        # token-mean NLL of the caption tokens only
      --optimizer adam --adam-betas "(0.9,0.98)" --lr 2e-3 --lr-scheduler cosine --warmup-updates 100
      --batch-size 32 --batch-size-valid 32         # image-caption pairs per rank and step
      --max-update "$MAX_UPDATE" --num-workers "$NUM_WORKERS"
      --cpu                                         # drop on a GPU machine
      --save-dir "$SAVE_DIR" --save-interval-updates $(( (MAX_UPDATE + 1) / 2 )) --keep-interval-updates 1
      --no-epoch-checkpoints --validate-interval-updates $(( (MAX_UPDATE + 1) / 2 ))
      --log-format simple --log-interval 100
    )
    "$PY" -m unilm_vl.train "${k2_args[@]}" "$@"
    CKPT="$SAVE_DIR/checkpoint_last.pt"
    echo "== held-out referring-expression comprehension (synthetic RefCOCO testA; every image holds an unseen combo)"
    "$PY" -m unilm_vl.eval.refcoco --checkpoint "$CKPT" --data "$DATA_DIR/eval/refcoco/finetune_refcoco_testA.json" \
      --image-root "$DATA_DIR/eval/images" --limit 400 --cpu --output "$SAVE_DIR/eval_refcoco.json"
    echo "== grounded captions of 4 held-out images -> $SAVE_DIR/grounded/*.png"
    for i in 000000 000001 000002 000003; do
      printf '%s\t<grounding>\n' "$DATA_DIR/eval/images/$i.jpg"
    done | "$PY" -m unilm_vl.kosmos2_infer --checkpoint "$CKPT" --input - --draw "$SAVE_DIR/grounded" --cpu \
      --max-len-b 60
    exit 0
    ;;
  *)
    echo "unknown recipe '$RECIPE'; available: kosmos2 clip clip_rocket siamlip byolip barlip swalip" >&2
    exit 2
    ;;
esac
MAX_UPDATE="${MAX_UPDATE:-300}"                 # multi-view recipes: 3 forward passes per sample
"$PY" -m unilm_vl.train "${contrastive_args[@]}" "${recipe_args[@]}" --max-update "$MAX_UPDATE" \
  --save-interval-updates $(( (MAX_UPDATE + 1) / 2 )) --validate-interval-updates $(( (MAX_UPDATE + 1) / 2 )) "$@"
CKPT="$SAVE_DIR/checkpoint_last.pt"
echo "== held-out retrieval (synthetic Karpathy split, 500 images x 5 captions; chance R@1 = 0.2%)"
"$PY" -m unilm_vl.eval.retrieval --checkpoint "$CKPT" --data "$DATA_DIR/eval/karpathy.json" \
  --output "$SAVE_DIR/eval_retrieval.json"
echo "== held-out zero-shot classification (48 colour-shape classes, chance top-1 = 2.1%)"
"$PY" -m unilm_vl.eval.zeroshot_classification --checkpoint "$CKPT" --root "$DATA_DIR/eval/zeroshot/test" \
  --classnames "$DATA_DIR/eval/zeroshot/classnames.txt" --templates "$DATA_DIR/eval/zeroshot/templates.txt" \
  --output "$SAVE_DIR/eval_zeroshot.json"
