# Shared by every contrastive recipe (clip, the clip-rocket family, cosmos, the clip fine-tuning recipes), so that
# they compare on one data stream and one optimiser. Sourced by train.sh's recipes, which set `recipe_args` (their
# model and criterion flags) and MAX_UPDATE, then call contrastive_train and the evaluations they report.
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

# contrastive_train [extra flags...]: the shared flags, then the recipe's, then the length (MAX_UPDATE updates,
# a checkpoint and a validation half-way and at the end), then the extra flags of `bash train.sh <recipe> ...`.
contrastive_train() {
  local half=$(( (MAX_UPDATE + 1) / 2 ))
  train "${contrastive_args[@]}" "${recipe_args[@]}" --max-update "$MAX_UPDATE" \
    --save-interval-updates "$half" --validate-interval-updates "$half" "$@"
}

# Held-out retrieval and zero-shot classification of $SAVE_DIR/checkpoint_last.pt (every contrastive recipe).
contrastive_eval() {
  local ckpt="$SAVE_DIR/checkpoint_last.pt"
  echo "== held-out retrieval (synthetic Karpathy split, 500 images x 5 captions; chance R@1 = 0.2%)"
  py -m unilm_vl.eval.retrieval --checkpoint "$ckpt" --data "$DATA_DIR/eval/karpathy.json" \
    --output "$SAVE_DIR/eval_retrieval.json"
  echo "== held-out zero-shot classification (48 colour-shape classes, chance top-1 = 2.1%)"
  py -m unilm_vl.eval.zeroshot_classification --checkpoint "$ckpt" --root "$DATA_DIR/eval/zeroshot/test" \
    --classnames "$DATA_DIR/eval/zeroshot/classnames.txt" --templates "$DATA_DIR/eval/zeroshot/templates.txt" \
    --output "$SAVE_DIR/eval_zeroshot.json"
}

# Patch tokens @ proj scored against class prompts on object pixels only (the reference's without-background
# setting); the shape masks, then the same images labelled by colour, the attribute these tiny models learn.
segmentation_eval() {
  local set
  echo "== held-out zero-shot segmentation, object pixels (shape masks: 6 classes; colour masks: 8 classes)"
  for set in segmentation segmentation_colour; do
    py -m unilm_vl.eval.segmentation --checkpoint "$SAVE_DIR/checkpoint_last.pt" --data "$DATA_DIR/eval/$set" \
      --background ignore --prob-thd 0 --area-thd 0 --logit-scale 40 --output "$SAVE_DIR/eval_$set.json"
  done
}
