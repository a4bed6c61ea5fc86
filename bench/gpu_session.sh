#!/usr/bin/env bash
# One GPU session's measurements: compiled-Triton tests, then the benchmark sweeps, into $OUT.
# Usage (repository root, on the GPU machine): bash bench/gpu_session.sh [quick]
#
# The device image has torch, triton, transformers, peft, accelerate, pytest, hypothesis,
# pytest-benchmark and matplotlib, and reaches no package index. Carry the peers as wheels in .whl/
# (see the device tool's README: pip download --only-binary=:all: --python-version 3.12 ... for
# trl, liger-kernel, cut-cross-entropy, datasets and what they need); tests and providers whose
# package is missing are skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# halo-ops itself, offline: no dependencies, no build isolation
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -2
alias python=python3
nvidia-smi > "$OUT/gpu-nvidia-smi.txt" 2>&1

# 1. The test suite, compiled (tests/conftest.py leaves TRITON_INTERPRET unset when CUDA is there)
python3 -m pytest -q -x -p no:cacheprovider 2>&1 | tail -30 > "$OUT/gpu-tests.txt"

# 2. Sweeps against every peer (bf16): per-token log-probs, then the LM-head part of a KTO step
if [ "${1:-}" = "quick" ]; then
    TOKENS=4096,16384; VOCABS=128256
else
    TOKENS=1024,4096,16384,32768; VOCABS=32000,128256,151936,256000
fi
python3 -m bench --tokens "$TOKENS" --hidden 4096 --vocab "$VOCABS" --cases forward+backward,forward-only \
    --out "$OUT" --name logprobs-gpu 2>&1 | tail -5
python3 -m bench --tokens "$TOKENS" --hidden 4096 --vocab 128256 --cases kto-step --distribution random,peaked \
    --seq 1024 --out "$OUT" --name kto-step-gpu 2>&1 | tail -5

# 3. pytest-benchmark at the target shape
HALO_BENCH_TOKENS=16384 HALO_BENCH_VOCAB=128256 HALO_BENCH_HIDDEN=4096 \
    python3 -m pytest bench/ --benchmark-only -q -p no:cacheprovider --benchmark-json "$OUT/gpu-benchmark.json" \
    2>&1 | tail -40 > "$OUT/gpu-benchmark.txt"
echo "results in $OUT"
