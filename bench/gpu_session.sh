#!/usr/bin/env bash
# The prepared GPU run: every measurement a lent GPU session needs, within 8 minutes of wall time.
#
#   bash bench/gpu_session.sh             # the whole run (about 7.5 minutes at most on an H100)
#   bash bench/gpu_session.sh smoke       # the same steps at toy sizes, on CPU (Triton interpreted): checks the script
#   bash bench/gpu_session.sh tune        # longer block-config autotuning over D and V buckets (one more device call)
#
# Device call (bench/fetch_wheels.sh first, here, to fill .whl/ with the peers the image lacks):
#   run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=540)
#
# Steps, each under its own deadline so that one slow or hung step cannot eat the others:
#   setup (install .whl/ offline), tests (compiled Triton, focused), floor (cuBLAS GEMM rate at the target
#   shape and at the slab shapes, copy bandwidth), schedules (each halo-ops schedule: forward, backward,
#   forward+backward, forward-only, peak memory), TRL's head, kto-step (the whole LM-head part of a KTO
#   step against TRL and Liger), frozen-head (dH only: the Jacobian, its recompute, TRL), kto-loss (the fused
#   KTO op eager and recomputing, against the composed pieces), sweep (every backward schedule timed
#   for impl='auto', then block configs), the other peers (cut-cross-entropy with and without its filter,
#   torch's linear_cross_entropy where torch has it, plain, torch.compile; one process each).
# Files, at most 8, into $OUT (the device tool's folder) or bench/results/gpu-session: summary.md (printed
# last), session.log, and gpu-session.tar.gz holding every CSV, Markdown table and log. Unpack that into
# bench/results/ on the development machine.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-run}
OUT=${OUT:-bench/results/gpu-session}
WORK=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=python3
START=$(date +%s)
: > "$WORK/steps.tsv"

if [ "$MODE" = smoke ]; then
    # Toy sizes through the interpreter: the same code paths, seconds instead of minutes
    export TRITON_INTERPRET=1
    [ -x .venv/bin/python ] && PY=.venv/bin/python
    N=256; D=32; V=1000; SEQ=64; DTYPE=fp32; DEVICE=cpu; SLAB="256,256,32;256,256,1000"
    T_TESTS=60; T_FLOOR=60; T_SCHED=120; T_PEER=90; T_COMPILE=90; T_KTO=120; T_SWEEP=150; T_FROZEN=60; T_LOSS=60
    BUDGET=1300
else
    N=16384; D=4096; V=128256; SEQ=1024; DTYPE=bf16; DEVICE=cuda; SLAB="8192,16384,4096;16384,8192,4096"
    T_TESTS=100; T_FLOOR=25; T_SCHED=90; T_PEER=35; T_COMPILE=60; T_KTO=60; T_SWEEP=60; T_FROZEN=30; T_LOSS=40
    BUDGET=470
fi
SHAPE="--tokens $N --hidden $D --vocab $V --dtype $DTYPE --device $DEVICE --out $WORK"
ARCH=""; [ "$MODE" = smoke ] && ARCH="--arch sm_90"  # the interpreter has no GPU to name the table's key

step() {  # step NAME SECONDS 'command': run under a deadline, log everything, record the outcome
    local name=$1 seconds=$2 command=$3
    local t0=$(date +%s)
    local left=$((BUDGET - (t0 - START)))  # the whole run's budget caps every deadline
    if [ $left -lt 10 ]; then
        printf '%s\t0\tskipped: the run is out of time\n' "$name" >> "$WORK/steps.tsv"; return
    fi
    [ "$seconds" -gt "$left" ] && seconds=$left
    echo "=== $name (deadline ${seconds}s, at +$((t0 - START))s): $command" | tee -a "$WORK/session.log"
    timeout -k 5 "$seconds" bash -o pipefail -c "$command" >> "$WORK/session.log" 2>&1  # a pipe fails if any part does
    local rc=$? t1=$(date +%s)
    local outcome=ok
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then outcome=deadline; elif [ $rc -ne 0 ]; then outcome="failed (exit $rc)"; fi
    printf '%s\t%s\t%s\n' "$name" "$((t1 - t0))" "$outcome" >> "$WORK/steps.tsv"
    echo "    $name: $outcome in $((t1 - t0))s" | tee -a "$WORK/session.log"
}

if [ "$MODE" != smoke ]; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    if ls .whl/*.whl >/dev/null 2>&1; then  # the peers, offline (bench/fetch_wheels.sh fills .whl/)
        step wheels 60 "$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl"
    fi
    # halo-ops itself as it ships (a built wheel, not the source tree), offline: no dependencies, no build isolation
    step install 60 "$PY -m pip install -q --no-deps --no-build-isolation --no-index --upgrade --target /tmp/site ."
fi
step environment 30 "{ nvidia-smi || true; $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"triton\",
    triton.__version__, \"cuda\", torch.cuda.is_available())'; } 2>&1 | tee $WORK/environment.txt"

case "$MODE" in
    run|smoke)
        # compiled correctness: every schedule, dtype and option of the token op, and the fused KTO op
        TESTS="tests/test_linear_logprobs.py tests/test_kto.py tests/test_compile.py"
        [ "$MODE" = smoke ] && TESTS="tests/test_linear_logprobs.py -k softcap"
        step tests "$T_TESTS" "$PY -m pytest -q -p no:cacheprovider -x -rs $TESTS 2>&1 | tee $WORK/tests.txt | tail -5"
        step floor "$T_FLOOR" "$PY -m bench.floor --device $DEVICE --dtype $DTYPE --gemm '$N,$D,$V;$SLAB' \
            --shapes $N,$D,$V --out $WORK"
        step schedules "$T_SCHED" "$PY -m bench $SHAPE --cases forward,backward,forward+backward,forward-only \
            --providers 'halo-ops[slab],halo-ops[gemm],halo-ops[atomic],halo-ops[owner]' --name schedules"
        peer() {  # peer NAME SECONDS: one provider in its own process, so that a hang costs one row
            step "peer $1" "$2" "$PY -m bench $SHAPE --cases forward+backward,forward-only --providers '$1' \
                --name peer-$1"
        }
        peer trl "$T_PEER"
        step kto-step "$T_KTO" "$PY -m bench $SHAPE --cases kto-step --seq $SEQ --distribution random \
            --providers halo-ops,trl,liger,plain --name kto-step"
        # fewer GEMMs: the frozen head's Jacobian (2) against its recompute (3), the fused KTO's eager schedule (3)
        # against its recompute (4) and against the composed public pieces
        step frozen-head "$T_FROZEN" "$PY -m bench $SHAPE --cases frozen-head \
            --providers 'halo-ops,halo-ops[recompute],trl' --name frozen"
        step kto-loss "$T_LOSS" "$PY -m bench $SHAPE --cases kto-loss --seq $SEQ --distribution random \
            --providers 'halo-ops,halo-ops[recompute],halo-ops[composed]' --name kto-loss"
        # what impl='auto' should run here: every schedule timed and checked, then the slab and forward tiles
        step sweep "$T_SWEEP" "$PY -m bench.autotune --device $DEVICE --tokens $N --hidden $D --vocab $V \
            --dtype $DTYPE --kernels schedule,slab,fold,forward $ARCH --repeats 1 \
            --candidates '64,128,64,8,3;128,128,64,8,3;128,256,64,8,3;128,128,32,8,4' --out $WORK"
        peer cce "$T_PEER"
        peer plain "$T_PEER"
        peer torch.linear_cross_entropy "$T_PEER"
        peer cce-no-filter "$T_PEER"
        peer torch.compile "$T_COMPILE"
        ;;
    tune)
        step tune 540 "$PY -m bench.autotune --tokens 16384 --hidden 2048,4096 --vocab 32000,128256,256000 \
            --dtype bf16 --out $WORK"
        ;;
    *) echo "unknown mode $MODE (run, smoke, tune)"; exit 2 ;;
esac

$PY -m bench.summary "$WORK" > "$WORK/summary.md" 2>> "$WORK/session.log" \
    || echo "summary failed: see session.log" >> "$WORK/summary.md"
cp "$WORK/summary.md" "$WORK/session.log" "$OUT/"
tar czf "$OUT/gpu-session.tar.gz" -C "$WORK" .
echo "wrote $OUT/summary.md, $OUT/session.log and $OUT/gpu-session.tar.gz ($(ls "$WORK" | wc -l) files) in $(( $(date +%s) - START ))s"
cat "$WORK/summary.md"
