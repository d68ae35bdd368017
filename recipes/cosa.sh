# cosa: COSA pretraining with concatenated samples on images + clips of the synthetic world, then two finetunings
# of the pretrained weights (clip retrieval, clip captioning) and their held-out benchmarks.
#
# From scratch (no BERT/CLIP weights) ITC first collapses (all features alike, loss = ln B) and escapes only
# after tens of updates at a high lr; the former 5e-4 / 2e-4 recipe never escaped (retrieval at chance), and
# 80 updates x 16 pairs at lr 1e-3 still ended collapsed (only finetuning escaped). 150 updates x 64 pairs at
# lr 1e-3 leave the collapse during pretraining (concatenated arm: ITC 4.16 = ln 64 -> 3.28 by update 120).
# Numbers of both ablation arms: README "COSA".
PRE_UPDATE="${MAX_UPDATE:-150}"                 # pretraining updates
FT_UPDATE="${FT_UPDATE:-60}"                    # updates of each finetuning run (retrieval, captioning)
# COSA_PRETRAIN_TASKS=ret_cap_mlm gives the same budget without concatenation (the ablation of README "COSA").
PRE_TASKS="${COSA_PRETRAIN_TASKS:-ret_cret_ccap_cmlm}"
VOCAB="$DATA_DIR/cosa_vocab.txt"
# A WordPiece vocab.txt of the synthetic training texts (specials, characters, ##characters, words); the release
# uses bert-base-uncased's, which works here from a local path: --vocab-file PATH/vocab.txt.
py -m unilm_vl.data.cosa_vocab --data "videos/train.json::train/wds/part-*.tar" --root "$DATA_DIR" \
  --out "$VOCAB" --if-missing
# Image-text and video-text sources mixed 1:1 per step (the release's 5m mixture: cc3m + webvid, p = 0.5 each).
write_file "$DATA_DIR/cosa_pretrain.json" <<'JSON'
[{"name": "images", "source": "train/wds/part-*.tar", "weight": 1.0},
 {"name": "videos", "source": "videos/train.json", "kind": "frames", "frames_root": "videos/frames", "weight": 1.0}]
JSON
cosa_common=(
  "$DATA_DIR"
  --vocab-file "$VOCAB"
  --max-text-tokens 24                          # caption row length (released: 40); paragraphs 24 * ceil(K/2)
  --arch cosa_tiny                              # 64 px open_clip ViT 2x128 per frame + 2-layer 128-wide BERT
  --criterion cosa                              # the released objectives, each logged as <term>_loss_<pass>
  --optimizer adam --adam-betas "(0.9,0.98)" --adam-eps 1e-6 --weight-decay 0.01   # the release's AdamW
  --clip-norm 5.0                               # released grad_norm
  --lr-scheduler polynomial_decay               # = the release's warmup_linear: 10% linear warm-up, linear to 0
  --num-workers "$NUM_WORKERS"                  # loader processes (frame decoding, transforms, WordPiece)
  --cpu                                         # drop on a GPU machine
  --no-epoch-checkpoints --disable-validation   # the benchmarks below evaluate the held-out clips
  --log-format simple --log-interval 25
)

# 1. Pretraining.
pretrain=(
  --task cosa_pretrain --train-data cosa_pretrain.json
  --num-frames 1                                # one random frame per clip, as the release pretrains on WebVid
  --cosa-tasks "$PRE_TASKS"                     # ITC+ITM on samples; ITC+ITM, captioning, MLM on concatenations
  --concatenated-nums 4                         # K = 4: each sample + 3 partners from the batch (released)
  --num-frame-embeddings 4                      # 1 frame x K pseudo-video frames
  --lr 1e-3 --warmup-updates $(( PRE_UPDATE / 10 )) --total-num-update "$PRE_UPDATE" --max-update "$PRE_UPDATE"
  --batch-size 64                               # pairs per rank and step, one source per batch (16 stays
                                                # collapsed at ln B; 64 leaves it after ~60 updates)
  --save-dir "$SAVE_DIR/pretrain"
)
train "${cosa_common[@]}" "${pretrain[@]}" "$@"

# 2. Two finetunings of the pretrained weights on the training clips.
finetune=(
  --task cosa_finetune --train-data videos/train.json --valid-data videos/test.json
  --num-frames 4 --num-frames-test 4            # segments per clip (released: 8 train / 16 test; clips have 6-12)
  --num-frame-embeddings 4                      # the pretrained frame embedding, nearest-resized if it differs
  --finetune-from-model "$SAVE_DIR/pretrain/checkpoint_last.pt"   # weights only: fresh optimiser and schedule
  --lr 1e-3 --warmup-updates $(( FT_UPDATE / 10 )) --total-num-update "$FT_UPDATE" --max-update "$FT_UPDATE"
  --batch-size 16                               # clips per rank and step
)
retrieval=(
  --finetune-task retrieval --cosa-tasks ret    # ITC + ITM with ITC-guided hard negatives
  --itm-ratio 0.1                               # released retrieval finetuning weight of ITM
  --save-dir "$SAVE_DIR/retrieval"
)
train "${cosa_common[@]}" "${finetune[@]}" "${retrieval[@]}" "$@"
caption=(
  --finetune-task caption --cosa-tasks cap      # masked-causal captioning (60% masked, predicted in place)
  --save-dir "$SAVE_DIR/caption"
)
train "${cosa_common[@]}" "${finetune[@]}" "${caption[@]}" "$@"

# 3. Held-out benchmarks.
echo "== held-out clip retrieval (80 test clips x 2 descriptions, each clip holds an unseen combo; chance R@1 1.25%)"
py -m unilm_vl.eval.cosa_retrieval --checkpoint "$SAVE_DIR/retrieval/checkpoint_last.pt" \
  --data "$DATA_DIR/videos/test.json" --itm-k 16 --output "$SAVE_DIR/eval_retrieval.json"
echo "== held-out clip captioning (beam 3; BLEU-4, METEOR, ROUGE-L, CIDEr)"
py -m unilm_vl.eval.cosa_caption --checkpoint "$SAVE_DIR/caption/checkpoint_last.pt" \
  --data "$DATA_DIR/videos/test.json" --predictions "$SAVE_DIR/captions_test.json" \
  --output "$SAVE_DIR/eval_caption.json"
