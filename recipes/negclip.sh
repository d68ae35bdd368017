# negclip: NegCLIP fine-tuning of the clip checkpoint with one span-swapped hard-negative caption per image.
source "$RECIPES/_clip_finetune.sh"
recipe_args=("${finetune_args[@]}"
  --hard-negatives negclip                      # 1 span-swap negative per caption (neg_text / neg_mask, type-major)
  --criterion negclip                           # negatives join the image->text softmax (missing ones: logit-0 columns)
)
contrastive_train "$@"
contrastive_eval
compositionality_eval
