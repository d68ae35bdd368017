# clip_rocket: CL2L, the improved CLIP recipe of clip-rocket (strong views through l2l heads), then held-out
# retrieval and zero-shot classification.
source "$RECIPES/_rocket.sh"
recipe_args=("${rocket_args[@]}"
  --arch clip_rocket_tiny                       # clip_tiny towers + l2l MLP heads (256 -> 64) for the views
  --criterion clip_rocket --label-smoothing 0.1 # CL2L: global terms + all view pairs, smoothing on views only
)
contrastive_train "$@"
contrastive_eval
