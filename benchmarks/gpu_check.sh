#!/usr/bin/env bash
# bash benchmarks/gpu_check.sh --out DIR [--smoke] [more options of benchmarks/gpu_check.py, see --help]
#
# One prepared check of a GPU machine, time-boxed (total budget 450 s by default): a few training steps of every
# family with --fp16, --memory-efficient-fp16, --amp, --bf16-autocast and FSDP2 (bf16) on one GPU, the CLIP
# ViT-B/16 step vs open_clip, Kosmos-2 base and xl training step and greedy tokens/s vs HF transformers with MFU,
# and the data pipeline with 8 and 16 loader workers vs open_clip's; writes DIR/gpu_check.json and
# DIR/gpu_check.md (failures are recorded there with their error text, the run goes on). On the GPU machine:
#
#   bash scripts/install.sh && bash benchmarks/gpu_check.sh --out "$OUT"
#
# --smoke: the same steps at tiny shapes on CPU (about a minute; tests/test_gpu_check.py runs it).
# Python: $PYTHON if set, else the repository's .venv, else python3 on PATH.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"
else PY="$(command -v python3 || true)"
fi
if [[ -z "$PY" ]]; then
  echo "error: gpu_check needs python3 with the pinned packages: run bash scripts/install.sh first" >&2
  exit 2
fi
# Fail early with one line if a package is missing (find_spec: no import, so this costs no time).
"$PY" - <<'PYEOF' || exit 2
import importlib.util
import sys

wanted = ("torch", "fairseq", "open_clip", "open_clip_train", "torchscale", "transformers", "webdataset",
          "sentencepiece", "unilm_vl")
missing = [m for m in wanted if importlib.util.find_spec(m) is None]
if missing:
    print(f"error: gpu_check: {sys.executable} lacks {', '.join(missing)}; run bash scripts/install.sh first "
          "(or set PYTHON to an interpreter that has them)", file=sys.stderr)
    sys.exit(2)
PYEOF
smoke=0
for arg in "$@"; do [[ "$arg" == "--smoke" ]] && smoke=1; done
if [[ "$smoke" == 0 ]] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
then
  echo "error: gpu_check: torch sees no CUDA GPU (use --smoke for the CPU run of the same steps)" >&2
  exit 2
fi
cd "$ROOT"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
exec "$PY" "$ROOT/benchmarks/gpu_check.py" "$@"
