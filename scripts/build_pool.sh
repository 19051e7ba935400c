#!/usr/bin/env bash
# Build the offline instruction pool (train / val / held-out JSONL + MANIFEST.json).
#   scripts/build_pool.sh [OUT]            default OUT: outputs/pool
# BIGBENCH_SDIST overrides the sdist location; POOL_ARGS passes extra flags (e.g. "--force").
# The default build also refreshes dataset/pool_MANIFEST.json, the committed record of the pool.
# The bigbench sdist (358 MB) is fetched once into ~/.cache/uniattn/sdist and read as a
# tar.gz: it is never installed (only its task.json files are read).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-$ROOT/outputs/pool}
COPY=()
[ $# -ge 1 ] || COPY=(--copy_manifest "$ROOT/dataset/pool_MANIFEST.json")
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  [ -x "$ROOT/.venv/bin/python" ] || bash "$ROOT/scripts/setup_env.sh"  # a fresh machine: build the venv first
  PY="$ROOT/.venv/bin/python"
fi
SDIST_DIR=${SDIST_DIR:-$HOME/.cache/uniattn/sdist}
SDIST=${BIGBENCH_SDIST:-$SDIST_DIR/bigbench-1.0.0.tar.gz}

# The sdist that uniattn/eval/tasks/data/MANIFEST.json was built from.
SDIST_SHA256=1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2
fetch() {  # python: pip still prepares the sdist's metadata, so pip needs its build backend (isolated env)
  "$1" -m pip download --no-deps --no-binary :all: bigbench==1.0.0 -d "$SDIST_DIR"
}
if [ ! -s "$SDIST" ]; then
  echo "fetching the bigbench==1.0.0 sdist into $SDIST_DIR (358 MB, once)" >&2
  mkdir -p "$SDIST_DIR"
  if ! fetch "$PY"; then
    # pip >= 24 rejects it ("Distributions from PyPI cannot declare direct URL dependencies": bigbench's
    # metadata names a local bleurt zip) even with --no-deps; pip 23.2.1 only downloads it.
    echo "retrying with pip 23.2.1 in a scratch venv" >&2
    SCRATCH=$(mktemp -d)
    if ! { python3 -m venv "$SCRATCH/venv" && "$SCRATCH/venv/bin/python" -m pip install -q pip==23.2.1 \
           && fetch "$SCRATCH/venv/bin/python"; }; then
      rm -rf "$SCRATCH"
      echo "error: pip could not download bigbench==1.0.0; fetch its sdist bigbench-1.0.0.tar.gz from the" \
           "package index by hand and put it at $SDIST (or set BIGBENCH_SDIST)" >&2
      exit 2
    fi
    rm -rf "$SCRATCH"
  fi
  [ -s "$SDIST" ] || { echo "error: pip finished but $SDIST is missing; look for the .tar.gz pip saved in $SDIST_DIR" >&2; exit 2; }
  if [ "$(sha256sum "$SDIST" | cut -d' ' -f1)" != "$SDIST_SHA256" ]; then
    echo "error: $SDIST does not have the SHA-256 of bigbench-1.0.0.tar.gz ($SDIST_SHA256); delete it and rerun" >&2
    exit 2
  fi
fi

cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# shellcheck disable=SC2086
exec "$PY" -m uniattn.pool --bigbench "$SDIST" --out "$OUT" \
  --tulu "$ROOT/dataset/tulu3_sft_filtered_1000.json" --pmc "$ROOT/dataset/pmc_llama_instructions_1000.json" \
  "${COPY[@]}" ${POOL_ARGS:-}
