#!/usr/bin/env bash
# bash train.sh [recipe] [extra fairseq-train flags...]
#
# Installs the environment if needed, generates the synthetic world if missing, trains the recipe on it and
# prints its evaluation on the held-out split.
# Recipes: kosmos2 (default: grounded captions, then held-out REC accuracy and grounded PNGs), clip, clip_rocket,
# siamlip, byolip, barlip, swalip (the clip-rocket family), negclip and fsc_clip (hard-negative fine-tuning of the
# clip recipe's checkpoint, which they train first if it is missing; clip_ft is their control: the same fine-tuning
# without negatives),
# cosmos (cross-modality self-distillation with an EMA teacher), cosa (concatenated-sample pretraining on images +
# clips, then retrieval and captioning finetuning; FT_UPDATE sets the finetuning length).
# Environment overrides: DATA_DIR (default data/synthetic), SAVE_DIR (default checkpoints/<recipe>),
# MAX_UPDATE (training length), NUM_WORKERS (loader workers, default 1).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RECIPE="${1:-kosmos2}"
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
  cosmos)
    # COSMOS: cross-modality self-distillation over multi-crop image views and text crops of the long caption.
    MAX_UPDATE="${MAX_UPDATE:-1000}"              # 1000 x 64 samples: the clip recipe's 500 x 128 (~23 min on CPU)
    recipe_args=(
      --use-imagecrop-aug                       # multi-crop batches (view-major): global + local crops, caption views
      --global-crops-number 2                   # 2 global crops at the model's 64 px (reference: 224 px)
      --local-crops-number 6                    # 6 local crops per sample, as the reference
      --local-crop-size 32                      # local side: half the global one (reference 96 at 224; 4 x 4 patches)
      --crop-scale 0.4                          # global RandomResizedCrop scale (0.4, 1), local (0.05, 0.4)
      --caption-sampling-mode textcrop          # caption views from [caption] + sentences of the long caption
      --num-sampled-captions 8                  # 2 global (1-5 joined sentences) + 6 local (one sentence) crops
      --long-caption-key long_caption           # the synthetic world's multi-sentence description (wds json field)
      --arch cosmos_tiny                        # clip_tiny towers + 2 cross poolers (4 heads) + EMA teacher
      --momentum-teacher 0.99                   # EMA rate: the reference's large-data value (0.999 on CC3M is too
                                                # slow for a few hundred updates)
      --momentum-schedule fixed                 # constant rate (the reference's --fix-momentum)
      --ema-order before_step                   # the reference's order: EMA of the pre-step student weights
      --criterion cosmos                        # distill (student cross views vs teacher globals) + CLIP (globals)
      --batch-size 64 --batch-size-valid 64     # 8 image + 8 caption views per sample: half the clip batch
    )
    ;;
  clip_ft|negclip|fsc_clip)
    # clip_ft is the control: the same fine-tuning with the plain CLIP loss and no hard negatives.
    # Fine-tuning from the clip recipe (CLIP_DIR, default checkpoints/clip; trained here first when missing),
    # exported as a plain open_clip state dict for --pretrained. Extra flags override, e.g. FSC-CLIP with LoRA:
    # `bash train.sh fsc_clip --lora-rank 4 --lr 1e-3` (the reference's LoRA recipe: rank 4, 10x the LR).
    MAX_UPDATE="${MAX_UPDATE:-200}"
    CLIP_DIR="${CLIP_DIR:-$ROOT/checkpoints/clip}"
    if [[ ! -f "$CLIP_DIR/checkpoint_last.pt" ]]; then
      SAVE_DIR="$CLIP_DIR" MAX_UPDATE="${CLIP_MAX_UPDATE:-500}" bash "$ROOT/train.sh" clip
    fi
    mkdir -p "$SAVE_DIR"
    "$PY" -m unilm_vl.export_open_clip --checkpoint "$CLIP_DIR/checkpoint_last.pt" --out "$SAVE_DIR/init_open_clip.pt"
    recipe_args=(
      --arch clip_tiny                          # the clip recipe's towers
      --pretrained "$SAVE_DIR/init_open_clip.pt"   # ... and its trained weights (logit scale included)
      --lr 1e-4                                 # fine-tuning LR (reference 5e-6 for OpenAI ViT-B/32; raised for
                                                # a tiny model trained 500 steps at 1e-3)
      --weight-decay 0.1                        # the reference's fine-tuning weight decay
    )
    if [[ "$RECIPE" == clip_ft ]]; then
      recipe_args+=(--criterion clip)           # symmetric InfoNCE on the positives only
    elif [[ "$RECIPE" == negclip ]]; then
      recipe_args+=(
        --hard-negatives negclip                # 1 span-swap negative per caption (neg_text / neg_mask, type-major)
        --criterion negclip                     # negatives join the image->text softmax (missing ones: logit-0 columns)
      )
    else
      recipe_args+=(
        --hard-negatives fsc-clip               # up to 3 negatives per caption: span swap, replace, bigram shuffle
        --criterion fsc_clip                    # CLIP loss on positives + global and local hard-negative losses
        --apply-global-neg-loss                 # (1+T)-way image->[positive; negatives] loss per sample
        --apply-local-neg-loss --return-dense-tokens   # same over token-grouped patch scores (needs dense tokens)
        --neg-loss-name focal_loss --focal-gamma 2.0   # selective: focal modulation of the hard-negative losses
        --neg-label-smoothing 0.02              # calibrated: negative-side label smoothing eps / K per row
        --neg-loss-weight 0.5 --local-neg-weight 0.2   # lambda_g, lambda_l of the README's B/32 recipes
      )
    fi
    ;;
  kosmos2)
    MAX_UPDATE="${MAX_UPDATE:-3000}"
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
      --arch kosmos2_tiny                           # 64 px open_clip tower, 16 queries, 128-wide decoder
      --decoder-layers 4                            # 2 layers never learn where (README "Kosmos-2", Status)
      --connector-locality-sigma 0.5                # locality prior: query j starts on its 1/16 of the image
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
  cosa)
    # From scratch (no BERT/CLIP weights) ITC first collapses (all features alike, loss = ln B) and escapes only
    # after tens of updates at a high lr; the former 5e-4 / 2e-4 recipe never escaped (retrieval at chance), and
    # 80 updates x 16 pairs at lr 1e-3 still ended collapsed (only finetuning escaped). 150 updates x 64 pairs at
    # lr 1e-3 leave the collapse during pretraining (concatenated arm: ITC 4.16 = ln 64 -> 3.28 by update 120).
    # Numbers of both ablation arms: README "COSA".
    PRE_UPDATE="${MAX_UPDATE:-150}"                 # pretraining updates
    FT_UPDATE="${FT_UPDATE:-60}"                    # updates of each finetuning run (retrieval, captioning)
    # COSA_PRETRAIN_TASKS=ret_cap_mlm gives the same budget without concatenation (the ablation of README "COSA").
    PRE_TASKS="${COSA_PRETRAIN_TASKS:-ret_cret_ccap_cmlm}"
    VOCAB="$DATA_DIR/cosa_vocab.txt"
    # A WordPiece vocab.txt of the synthetic training texts (specials, characters, ##characters, words); the release
    # uses bert-base-uncased's, which works here from a local path: --vocab-file PATH/vocab.txt.
    "$PY" -m unilm_vl.data.cosa_vocab --data "videos/train.json::train/wds/part-*.tar" --root "$DATA_DIR" \
      --out "$VOCAB" --if-missing
    # Image-text and video-text sources mixed 1:1 per step (the release's 5m mixture: cc3m + webvid, p = 0.5 each).
    cat > "$DATA_DIR/cosa_pretrain.json" <<'JSON'
[{"name": "images", "source": "train/wds/part-*.tar", "weight": 1.0},
 {"name": "videos", "source": "videos/train.json", "kind": "frames", "frames_root": "videos/frames", "weight": 1.0}]
JSON
    cosa_common=(
      "$DATA_DIR"
      --vocab-file "$VOCAB"
      --max-text-tokens 24                          # caption row length (released: 40); paragraphs 24 * ceil(K/2)
      --arch cosa_tiny                              # 64 px open_clip ViT 2x128 per frame + 2-layer 128-wide BERT
      --criterion cosa                              # the released objectives, each logged as <term>_loss_<pass>
      --optimizer adam --adam-betas "(0.9,0.98)" --adam-eps 1e-6 --weight-decay 0.01   # the release's AdamW
      --clip-norm 5.0                               # released grad_norm
      --lr-scheduler polynomial_decay               # = the release's warmup_linear: 10% linear warm-up, linear to 0
      --num-workers "$NUM_WORKERS"                  # loader processes (frame decoding, transforms, WordPiece)
      --cpu                                         # drop on a GPU machine
      --no-epoch-checkpoints --disable-validation   # the benchmarks below evaluate the held-out clips
      --log-format simple --log-interval 25
    )
    pretrain=(
      --task cosa_pretrain --train-data cosa_pretrain.json
      --num-frames 1                                # one random frame per clip, as the release pretrains on WebVid
      --cosa-tasks "$PRE_TASKS"                     # ITC+ITM on samples; ITC+ITM, captioning, MLM on concatenations
      --concatenated-nums 4                         # K = 4: each sample + 3 partners from the batch (released)
      --num-frame-embeddings 4                      # 1 frame x K pseudo-video frames
      --lr 1e-3 --warmup-updates $(( PRE_UPDATE / 10 )) --total-num-update "$PRE_UPDATE" --max-update "$PRE_UPDATE"
      --batch-size 64                               # pairs per rank and step, one source per batch (16 stays
                                                    # collapsed at ln B; 64 leaves it after ~60 updates)
      --save-dir "$SAVE_DIR/pretrain"
    )
    "$PY" -m unilm_vl.train "${cosa_common[@]}" "${pretrain[@]}" "$@"
    finetune=(
      --task cosa_finetune --train-data videos/train.json --valid-data videos/test.json
      --num-frames 4 --num-frames-test 4            # segments per clip (released: 8 train / 16 test; clips have 6-12)
      --num-frame-embeddings 4                      # the pretrained frame embedding, nearest-resized if it differs
      --finetune-from-model "$SAVE_DIR/pretrain/checkpoint_last.pt"   # weights only: fresh optimiser and schedule
      --lr 1e-3 --warmup-updates $(( FT_UPDATE / 10 )) --total-num-update "$FT_UPDATE" --max-update "$FT_UPDATE"
      --batch-size 16                               # clips per rank and step
    )
    retrieval=(
      --finetune-task retrieval --cosa-tasks ret    # ITC + ITM with ITC-guided hard negatives
      --itm-ratio 0.1                               # released retrieval finetuning weight of ITM
      --save-dir "$SAVE_DIR/retrieval"
    )
    "$PY" -m unilm_vl.train "${cosa_common[@]}" "${finetune[@]}" "${retrieval[@]}" "$@"
    caption=(
      --finetune-task caption --cosa-tasks cap      # masked-causal captioning (60% masked, predicted in place)
      --save-dir "$SAVE_DIR/caption"
    )
    "$PY" -m unilm_vl.train "${cosa_common[@]}" "${finetune[@]}" "${caption[@]}" "$@"
    echo "== held-out clip retrieval (80 test clips x 2 descriptions, each clip holds an unseen combo; chance R@1 1.25%)"
    "$PY" -m unilm_vl.eval.cosa_retrieval --checkpoint "$SAVE_DIR/retrieval/checkpoint_last.pt" \
      --data "$DATA_DIR/videos/test.json" --itm-k 16 --output "$SAVE_DIR/eval_retrieval.json"
    echo "== held-out clip captioning (beam 3; BLEU-4, METEOR, ROUGE-L, CIDEr)"
    "$PY" -m unilm_vl.eval.cosa_caption --checkpoint "$SAVE_DIR/caption/checkpoint_last.pt" \
      --data "$DATA_DIR/videos/test.json" --predictions "$SAVE_DIR/captions_test.json" \
      --output "$SAVE_DIR/eval_caption.json"
    exit 0
    ;;
  *)
    echo "unknown recipe '$RECIPE'; available: kosmos2 clip clip_rocket siamlip byolip barlip swalip negclip fsc_clip cosmos cosa" >&2
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
if [[ "$RECIPE" == clip || "$RECIPE" == cosmos ]]; then
  # Patch tokens @ proj scored against class prompts on object pixels only (the reference's without-background
  # setting); the shape masks, then the same images labelled by colour, the attribute these tiny models learn.
  echo "== held-out zero-shot segmentation, object pixels (shape masks: 6 classes; colour masks: 8 classes)"
  for set in segmentation segmentation_colour; do
    "$PY" -m unilm_vl.eval.segmentation --checkpoint "$CKPT" --data "$DATA_DIR/eval/$set" \
      --background ignore --prob-thd 0 --area-thd 0 --logit-scale 40 --output "$SAVE_DIR/eval_$set.json"
  done
fi
if [[ "$RECIPE" == clip_ft || "$RECIPE" == negclip || "$RECIPE" == fsc_clip ]]; then
  echo "== compositionality (synthetic SugarCrepe: swapped / replaced attributes, objects, relations; chance 50%)"
  for model in "$CLIP_DIR" "$SAVE_DIR"; do          # the starting clip checkpoint, then the fine-tuned one
    "$PY" -m unilm_vl.eval.compositionality --checkpoint "$model/checkpoint_last.pt" \
      --data "$DATA_DIR/eval/sugarcrepe" --image-root "$DATA_DIR/eval/images" \
      --output "$model/eval_compositionality.json"
  done
fi
