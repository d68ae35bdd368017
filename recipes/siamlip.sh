# siamlip: CL2L + SimSiam-style cross-modal prediction (clip-rocket's SiamLIP), then held-out retrieval and
# zero-shot classification.
source "$RECIPES/_rocket.sh"
recipe_args=("${rocket_args[@]}"
  --arch clip_rocket_siamlip_tiny               # + SimSiam projector and image->text / text->image predictors
  --criterion siamlip --label-smoothing 0.1     # CL2L + mean stop-gradient cosine distance over cross-modal pairs
)
contrastive_train "$@"
contrastive_eval
