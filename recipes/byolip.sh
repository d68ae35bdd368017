# byolip: SiamLIP with an EMA momentum copy as the target (clip-rocket's BYOLIP), then held-out retrieval and
# zero-shot classification.
source "$RECIPES/_rocket.sh"
recipe_args=("${rocket_args[@]}"
  --arch clip_rocket_byolip_tiny                # siamlip heads + EMA momentum copy of the whole model
  --momentum-tau 0.99                           # constant EMA rate, applied after every optimiser step
  --criterion byolip --label-smoothing 0.1      # SiamLIP with the momentum copy's projections as targets
)
contrastive_train "$@"
contrastive_eval
