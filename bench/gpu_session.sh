#!/usr/bin/env bash
# One GPU session's measurements, in phases that each fit one device call (10 minutes):
#   bash bench/gpu_session.sh tests   # compiled-Triton test suite
#   bash bench/gpu_session.sh tune    # matmul floor, then block-config autotuning (bf16, D and V buckets)
#   bash bench/gpu_session.sh bench   # sweeps against every peer, with the tuned table; pytest-benchmark
#   bash bench/gpu_session.sh quick   # tests, then the target shape only (N=16384, D=4096, V=128256)
# Each phase packs its files into $OUT/gpu-<phase>.tar.gz (a device call brings back at most 8 files)
# and prints its summary last. Unpack into bench/results/ on the development machine.
#
# The device image has torch, triton, transformers, peft, accelerate, pytest, hypothesis,
# pytest-benchmark and matplotlib, and reaches no package index. Carry the peers as wheels in .whl/
# (pip download --only-binary=:all: --python-version 3.12 --no-deps trl liger-kernel cut-cross-entropy
# datasets ...); tests and providers whose package is missing are skipped and say so.
set -uo pipefail
cd "$(dirname "$0")/.."
PHASE=${1:-quick}
OUT=${OUT:-bench/results}
WORK=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# halo-ops itself, offline: no dependencies, no build isolation
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -2
nvidia-smi > "$WORK/nvidia-smi.txt" 2>&1

run_tests() {
    # tests/conftest.py leaves TRITON_INTERPRET unset when CUDA is there: the kernels run compiled
    python3 -m pytest -q -p no:cacheprovider -rs 2>&1 | tail -40 > "$WORK/gpu-tests.txt"
    tail -3 "$WORK/gpu-tests.txt"
}

run_tune() {
    python3 -m bench.floor --shapes "16384,4096,128256;16384,2048,128256;16384,4096,256000" --out "$WORK" | tail -8
    python3 -m bench.autotune --tokens 16384 --hidden 2048,4096 --vocab 32000,128256,256000 --dtype bf16 \
        --out "$WORK" 2>&1 | tail -30
}

run_bench() {  # $1: token list, $2: vocabulary list
    if [ -f "$OUT/tuned_configs.json" ]; then export HALO_OPS_TUNED_CONFIGS="$OUT/tuned_configs.json"; fi
    if [ -f "$WORK/tuned_configs.json" ]; then export HALO_OPS_TUNED_CONFIGS="$WORK/tuned_configs.json"; fi
    python3 -m bench --tokens "$1" --hidden 4096 --vocab "$2" --cases forward+backward,forward-only \
        --out "$WORK" --name logprobs-gpu 2>&1 | tail -3
    python3 -m bench --tokens "$1" --hidden 4096 --vocab 128256 --cases kto-step --distribution random,peaked \
        --seq 1024 --out "$WORK" --name kto-step-gpu 2>&1 | tail -3
    python3 -m bench --tokens 16384 --hidden 4096 --vocab 128256 --cases kto-step --distribution peaked \
        --seq 1024 --providers halo-ops --grad-filter-eps 0.000244140625 --out "$WORK" --name kto-step-gpu-filter \
        2>&1 | tail -3
    python3 -m bench --tokens 16384 --hidden 4096 --vocab 128256 --cases forward+backward \
        --providers "halo-ops,halo-ops[deterministic]" --out "$WORK" --name deterministic-gpu 2>&1 | tail -3
    HALO_BENCH_TOKENS=16384 HALO_BENCH_VOCAB=128256 HALO_BENCH_HIDDEN=4096 \
        python3 -m pytest bench/ --benchmark-only -q -p no:cacheprovider --benchmark-json "$WORK/gpu-benchmark.json" \
        2>&1 | tail -40 > "$WORK/gpu-benchmark.txt"
    cat "$WORK"/logprobs-gpu.md "$WORK"/kto-step-gpu.md | grep -E "^\| (halo-ops|trl|cce|liger|plain|torch.compile)" \
        | head -40
}

case "$PHASE" in
    tests) run_tests ;;
    tune) run_tune ;;
    bench) run_bench 1024,4096,16384,32768 32000,128256,151936,256000 ;;
    quick) run_tests; run_bench 16384 128256 ;;
    *) echo "unknown phase $PHASE (tests, tune, bench, quick)"; exit 2 ;;
esac
tar czf "$OUT/gpu-$PHASE.tar.gz" -C "$WORK" .
if [ -f "$WORK/tuned_configs.json" ]; then cp "$WORK/tuned_configs.json" "$OUT/"; fi
echo "packed $(ls "$WORK" | wc -l) files into $OUT/gpu-$PHASE.tar.gz"
