# Shared by the fine-tuning recipes clip_ft, negclip and fsc_clip: they fine-tune the clip recipe's checkpoint
# (CLIP_DIR, default checkpoints/clip; trained here first when it is missing, CLIP_MAX_UPDATE updates, default
# 500), exported as a plain open_clip state dict for --pretrained, then report held-out retrieval, zero-shot
# classification and compositionality of the starting and the fine-tuned checkpoint. Extra flags override, e.g.
# FSC-CLIP with LoRA: `bash train.sh fsc_clip --lora-rank 4 --lr 1e-3` (the reference's LoRA recipe: rank 4, 10x
# the LR).
source "$RECIPES/_contrastive.sh"
MAX_UPDATE="${MAX_UPDATE:-200}"
CLIP_DIR="${CLIP_DIR:-$ROOT/checkpoints/clip}"
if [[ ! -f "$CLIP_DIR/checkpoint_last.pt" ]]; then
  # the clip recipe as `bash train.sh clip` runs it (without this run's extra flags), into CLIP_DIR
  (SAVE_DIR="$CLIP_DIR"; MAX_UPDATE="${CLIP_MAX_UPDATE:-500}"; set --; source "$RECIPES/clip.sh")
fi
run mkdir -p "$SAVE_DIR"
py -m unilm_vl.export_open_clip --checkpoint "$CLIP_DIR/checkpoint_last.pt" --out "$SAVE_DIR/init_open_clip.pt"
finetune_args=(
  --arch clip_tiny                              # the clip recipe's towers
  --pretrained "$SAVE_DIR/init_open_clip.pt"    # ... and its trained weights (logit scale included)
  --lr 1e-4                                     # fine-tuning LR (reference 5e-6 for OpenAI ViT-B/32; raised for
                                                # a tiny model trained 500 steps at 1e-3)
  --weight-decay 0.1                            # the reference's fine-tuning weight decay
)

# Synthetic SugarCrepe of the starting clip checkpoint, then of the fine-tuned one.
compositionality_eval() {
  local model
  echo "== compositionality (synthetic SugarCrepe: swapped / replaced attributes, objects, relations; chance 50%)"
  for model in "$CLIP_DIR" "$SAVE_DIR"; do
    py -m unilm_vl.eval.compositionality --checkpoint "$model/checkpoint_last.pt" \
      --data "$DATA_DIR/eval/sugarcrepe" --image-root "$DATA_DIR/eval/images" \
      --output "$model/eval_compositionality.json"
  done
}
