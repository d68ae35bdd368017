# swalip: CL2L + SwAV swapped prediction between image and text codes (clip-rocket's SwALIP), then held-out
# retrieval and zero-shot classification.
source "$RECIPES/_rocket.sh"
recipe_args=("${rocket_args[@]}"
  --arch clip_rocket_swalip_tiny                # the l2l heads double as SwAV codes
  --criterion swalip --label-smoothing 0.0      # CL2L + 0.2 x swapped Sinkhorn-Knopp prediction (3 iters, eps .05)
)
contrastive_train "$@"
contrastive_eval
