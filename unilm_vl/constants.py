"""Constants defined once for the whole package."""

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CLIP_INIT_LOGIT_SCALE = 2.6592600258356795  # ln(1 / 0.07)
CLIP_MAX_LOGIT_SCALE = 100.0  # exp(logit_scale) is clamped to at most this after every optimiser step
