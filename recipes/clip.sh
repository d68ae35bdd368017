# clip: a tiny CLIP trained from scratch (500 updates x 128 pairs = 6.4 epochs of the synthetic world), then
# held-out retrieval, zero-shot classification and zero-shot segmentation. The fine-tuning recipes (clip_ft,
# negclip, fsc_clip) start from its checkpoint.
source "$RECIPES/_contrastive.sh"
MAX_UPDATE="${MAX_UPDATE:-500}"
recipe_args=(
  --arch clip_tiny                              # open_clip ViT 2x128 / text 2x128, 64 px: CPU-sized
  --criterion clip                              # symmetric InfoNCE, features gathered across ranks with grad
)
contrastive_train "$@"
contrastive_eval
segmentation_eval
