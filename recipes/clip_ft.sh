# clip_ft: the control of negclip and fsc_clip, the same fine-tuning of the clip checkpoint with the plain CLIP
# loss and no hard negatives.
source "$RECIPES/_clip_finetune.sh"
recipe_args=("${finetune_args[@]}"
  --criterion clip                              # symmetric InfoNCE on the positives only
)
contrastive_train "$@"
contrastive_eval
compositionality_eval
