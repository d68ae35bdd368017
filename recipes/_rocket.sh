# The improved CLIP recipe (clip-rocket), shared by clip_rocket, siamlip, byolip, barlip and swalip: 2 strong image
# and text views per sample through separate l2l heads. Each of them adds its --arch and --criterion.
source "$RECIPES/_contrastive.sh"
MAX_UPDATE="${MAX_UPDATE:-300}"                 # multi-view recipes: 3 forward passes per sample
rocket_args=(
  --num-augs 2                                  # A strong views per sample (RandomResizedCrop .08-1, jitter, blur,
                                                # flip)
  --text-augment --clean-before-augment         # EDA op per text view (synonym/swap/delete); stop-word drop p=.8
  --loss-avg-or-sum sum                         # CLIP-rocket recipe (YFCC15M): L_img + L_txt
)
