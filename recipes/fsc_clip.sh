# fsc_clip: FSC-CLIP fine-tuning of the clip checkpoint: hard negatives scored globally and per token group, with
# focal modulation and negative-side label smoothing.
source "$RECIPES/_clip_finetune.sh"
recipe_args=("${finetune_args[@]}"
  --hard-negatives fsc-clip                     # up to 3 negatives per caption: span swap, replace, bigram shuffle
  --criterion fsc_clip                          # CLIP loss on positives + global and local hard-negative losses
  --apply-global-neg-loss                       # (1+T)-way image->[positive; negatives] loss per sample
  --apply-local-neg-loss --return-dense-tokens  # same over token-grouped patch scores (needs dense tokens)
  --neg-loss-name focal_loss --focal-gamma 2.0  # selective: focal modulation of the hard-negative losses
  --neg-label-smoothing 0.02                    # calibrated: negative-side label smoothing eps / K per row
  --neg-loss-weight 0.5 --local-neg-weight 0.2  # lambda_g, lambda_l of the README's B/32 recipes
)
contrastive_train "$@"
contrastive_eval
compositionality_eval
