# cosmos: COSMOS, cross-modality self-distillation over multi-crop image views and text crops of the long caption
# with an EMA teacher, then held-out retrieval, zero-shot classification and zero-shot segmentation.
source "$RECIPES/_contrastive.sh"
MAX_UPDATE="${MAX_UPDATE:-1000}"                # 1000 x 64 samples: the clip recipe's 500 x 128 (~23 min on CPU)
recipe_args=(
  --use-imagecrop-aug                           # multi-crop batches (view-major): global + local crops, caption views
  --global-crops-number 2                       # 2 global crops at the model's 64 px (reference: 224 px)
  --local-crops-number 6                        # 6 local crops per sample, as the reference
  --local-crop-size 32                          # local side: half the global one (reference 96 at 224; 4 x 4 patches)
  --crop-scale 0.4                              # global RandomResizedCrop scale (0.4, 1), local (0.05, 0.4)
  --caption-sampling-mode textcrop              # caption views from [caption] + sentences of the long caption
  --num-sampled-captions 8                      # 2 global (1-5 joined sentences) + 6 local (one sentence) crops
  --long-caption-key long_caption               # the synthetic world's multi-sentence description (wds json field)
  --arch cosmos_tiny                            # clip_tiny towers + 2 cross poolers (4 heads) + EMA teacher
  --momentum-teacher 0.99                       # EMA rate: the reference's large-data value (0.999 on CC3M is too
                                                # slow for a few hundred updates)
  --momentum-schedule fixed                     # constant rate (the reference's --fix-momentum)
  --ema-order before_step                       # the reference's order: EMA of the pre-step student weights
  --criterion cosmos                            # distill (student cross views vs teacher globals) + CLIP (globals)
  --batch-size 64 --batch-size-valid 64         # 8 image + 8 caption views per sample: half the clip batch
)
contrastive_train "$@"
contrastive_eval
segmentation_eval
