# barlip: CL2L + Barlow Twins between image and text (clip-rocket's BarLIP), then held-out retrieval and
# zero-shot classification.
source "$RECIPES/_rocket.sh"
recipe_args=("${rocket_args[@]}"
  --arch clip_rocket_barlip_tiny                # + Barlow Twins projectors ending in BatchNorm (128 -> 256)
  --criterion barlip --label-smoothing 0.1      # CL2L + Barlow Twins (lambda 5e-3, scale 0.025) image<->text
)
contrastive_train "$@"
contrastive_eval
