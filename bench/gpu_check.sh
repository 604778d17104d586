#!/usr/bin/env bash
# The GPU check: the real-size pipeline on one GPU machine with no network, through
# the stage code, each part beside its model-only bound; one table, then one JSON line.
#
#   embed     ViT-B/32 and ViT-L/14 (random weights) on generated 640x480 JPEGs in
#             tar shards: embed_shards with decode workers vs the model alone
#   train     transformer mapper (8 layers, prefix 10) + frozen GPT-2 small, bf16:
#             pipeline.train.run.train end to end, and the training step alone:
#             samples/s, tokens/s, MFU (FLOPs counted by torch; peak 790 TFLOP/s
#             bf16 on an H200, --peak-tflops otherwise)
#   generate  beam 5, batches of 256, through pipeline.generate.run.generate
#   torchrun  with 2+ GPUs: `capline train` (DDP) and `capline generate` in 2
#             processes; generate must equal 1 process
#
#   bash bench/gpu_check.sh                 # from the repository root: at most 8 minutes
#   bash bench/gpu_check.sh --budget 300    # a part that no longer fits is skipped, saying so
#   bash bench/gpu_check.sh --tiny --device cpu   # every code path with small models on a CPU
#
# Needs: Python 3.10-3.13 with torch (CUDA), transformers, tokenizers, safetensors,
# h5py, pillow, numpy, pyyaml, tqdm; nothing is downloaded and nothing installed
# into the environment. The stage code also needs pydantic (the params schema): when
# it is missing, it is installed from wheels in .whl/ (pydantic, pydantic-core for
# CPython 3.10-3.13 on x86_64 and aarch64 Linux) into a temporary folder; without a
# wheel that fits, the stage-code parts are skipped, saying so, and the model-only
# bounds still run. Not needed and not used: dvc, pycocoevalcap, Java.
# Fill .whl/ on a machine with network (it is git-ignored):
#   for py in 3.10 3.11 3.12 3.13; do pip download --only-binary=:all: --python-version $py \
#       --platform manylinux2014_x86_64 --platform manylinux2014_aarch64 -d .whl pydantic; done
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python3}"

"$PY" - <<'EOF'
import importlib.util, sys
needed = ("torch", "transformers", "tokenizers", "safetensors", "h5py", "PIL", "numpy", "yaml", "tqdm")
missing = [m for m in needed if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing Python packages (needed, not installable offline): {', '.join(missing)}")
EOF

SITE=""
if ! "$PY" -c "import pydantic" 2>/dev/null; then
  if compgen -G ".whl/pydantic-*.whl" >/dev/null; then
    SITE="$(mktemp -d)"
    trap 'rm -rf "$SITE"' EXIT
    if "$PY" -m pip install --quiet --disable-pip-version-check --no-index --find-links .whl --target "$SITE" \
         pydantic >/dev/null 2>&1 && PYTHONPATH="$PYTHONPATH:$SITE" "$PY" -c "import pydantic" 2>/dev/null; then
      export PYTHONPATH="$PYTHONPATH:$SITE"
      echo "gpu_check: pydantic installed from .whl/ into a temporary folder"
    else
      echo "gpu_check: pydantic is missing and no wheel in .whl/ fits this Python ($("$PY" -V 2>&1), $(uname -m)):" \
           "the stage-code parts will be skipped"
    fi
  else
    echo "gpu_check: pydantic is missing and there is no .whl/ folder: the stage-code parts will be skipped"
  fi
fi

# 8 minutes in all: the parts get 450 s, the wrapper stops everything at 470 s.
timeout --kill-after=10 470 "$PY" bench/_gpu_check.py "$@"
