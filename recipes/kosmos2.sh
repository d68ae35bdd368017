# kosmos2 (the default recipe): a tiny Kosmos-2 trained on the synthetic world's grounded captions (3000 updates x
# 32 captions, ~12 min on 2 cores), then held-out referring-expression comprehension and grounded captions of 4
# held-out images drawn as PNGs.
MAX_UPDATE="${MAX_UPDATE:-3000}"
VOCAB="$DATA_DIR/vocab"
# The synthetic world's own sentencepiece vocabulary in the released layout (the released 64k one is used by
# passing its files instead: --spm-model sentencepiece.bpe.model --dict-path dict.txt).
py -m unilm_vl.data.build_vocab --data "train/grit/part-*.tsv" --root "$DATA_DIR" --out "$VOCAB" \
  --vocab-size 1000 --if-missing
k2_args=(
  "$DATA_DIR"
  --task kosmos2                                # grounded captions: <grounding> ..<phrase>..</phrase><object>..
  --train-data "train/grit/part-*.tsv"          # GRIT-layout TSV shards (base64 image + noun chunks / ref exps)
  --valid-data "val/grit/part-*.tsv"
  --spm-model "$VOCAB/sentencepiece.bpe.model" --dict-path "$VOCAB/dict.txt"
  --location-bin-size 16                        # 16 x 16 grid of <patch_index_k> tokens (released: 32)
  --image-token-length 16                       # image slots = the arch's latent queries
  --phrase-mode phrase                          # ground every noun chunk (released: outermost expressions)
  --use-object-bbox-prob 1.0                    # always grounded (released: 0.5, half plain captions)
  --training-image-only-resize                  # squash to 64 x 64: the same view as generation uses
  --arch kosmos2_tiny                           # 64 px open_clip tower, 16 queries, 128-wide decoder
  --decoder-layers 4                            # 2 layers never learn where (README "Kosmos-2", Status)
  --connector-locality-sigma 0.5                # locality prior: query j starts on its 1/16 of the image
  --train-vision                                # no pretrained tower here: train it (released: frozen CLIP)
  --criterion kosmos2_lm                        # token-mean NLL of the caption tokens only
  --optimizer adam --adam-betas "(0.9,0.98)" --lr 2e-3 --lr-scheduler cosine --warmup-updates 100
  --batch-size 32 --batch-size-valid 32         # image-caption pairs per rank and step
  --max-update "$MAX_UPDATE" --num-workers "$NUM_WORKERS"
  --cpu                                         # drop on a GPU machine
  --save-dir "$SAVE_DIR" --save-interval-updates $(( (MAX_UPDATE + 1) / 2 )) --keep-interval-updates 1
  --no-epoch-checkpoints --validate-interval-updates $(( (MAX_UPDATE + 1) / 2 ))   # checkpoint + validation
                                                # half-way and at the end
  --log-format simple --log-interval 100
)
train "${k2_args[@]}" "$@"

CKPT="$SAVE_DIR/checkpoint_last.pt"
echo "== held-out referring-expression comprehension (synthetic RefCOCO testA; every image holds an unseen combo)"
py -m unilm_vl.eval.refcoco --checkpoint "$CKPT" --data "$DATA_DIR/eval/refcoco/finetune_refcoco_testA.json" \
  --image-root "$DATA_DIR/eval/images" --limit 400 --cpu --output "$SAVE_DIR/eval_refcoco.json"
echo "== grounded captions of 4 held-out images -> $SAVE_DIR/grounded/*.png"
# one `image<TAB><grounding>` prompt per image on stdin: the model writes the caption and boxes its phrases
for i in 000000 000001 000002 000003; do
  printf '%s\t<grounding>\n' "$DATA_DIR/eval/images/$i.jpg"
done | run_stdin "$PY" -m unilm_vl.kosmos2_infer --checkpoint "$CKPT" --input - --draw "$SAVE_DIR/grounded" --cpu \
  --max-len-b 60
