#!/usr/bin/env bash
# Hugging Face PEFT oracle: builds (once) a virtual environment with torch, transformers, peft
# and safetensors from PyPI, then runs scripts/peft_oracle.py with the given arguments.
#
#   scripts/peft_oracle.sh --setup-only
#   scripts/peft_oracle.sh --model DIR --adapter ADAPTER_DIR --prompt-ids '[1, 2]' [--max-new-tokens N]
#
# The environment lives in $LEAF_PEFT_VENV, default $HOME/.cache/leaf/peft/venv; its python is
# what integration-tests/tests/smollm2.rs looks for (or $LEAF_PEFT_PYTHON).
#
# About torch from PyPI: the Linux x86_64 wheels on PyPI are CUDA builds. `pip install
# --no-deps torch` does not work on a CPU machine: `import torch` then fails with
# "libcudart.so.13: cannot open shared object file" (its global-deps library links the CUDA
# runtime and cuBLAS). The CPU-only wheels live on PyTorch's own index, which this project does
# not use. So the plain install is used: torch with its nvidia-* dependencies (about 5.6 GB in
# the venv, a few minutes on a fast link); it runs on CPU, CUDA is simply not available.
# The versions are pinned to the ones checked against leaf.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${LEAF_PEFT_VENV:-$HOME/.cache/leaf/peft/venv}"
PY="${PYTHON:-python3}"
PINS=(torch==2.15.0 transformers==5.24.0 peft==0.21.2 safetensors==0.8.0)

if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c "import torch, transformers, peft, safetensors" >/dev/null 2>&1; then
    echo "peft_oracle: building $VENV (${PINS[*]})" >&2
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
    "$VENV/bin/python" -m pip install --quiet "${PINS[@]}" >&2
    "$VENV/bin/python" -c "import torch, transformers, peft; print('peft_oracle: torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" >&2
fi

if [[ "${1:-}" == "--setup-only" ]]; then
    echo "$VENV/bin/python"
    exit 0
fi
exec "$VENV/bin/python" "$HERE/peft_oracle.py" "$@"
