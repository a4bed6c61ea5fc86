#!/usr/bin/env bash
# The prepared GPU run, in two halves of under 6 minutes each, so that a 15-minute GPU window runs both with
# time to rerun one that failed:
#
#   bash bench/gpu_session.sh first    # compile warm-up, compiled tests, GEMM floor, halo-ops' schedules, TRL,
#                                      # the KTO step, the frozen head, the fused KTO loss
#   bash bench/gpu_session.sh second   # schedule="auto" on first use, the schedule and block-config sweep, then
#                                      # the other peers (cut-cross-entropy with and without its filter, plain,
#                                      # torch's linear_cross_entropy, torch.compile; one process each)
#   bash bench/gpu_session.sh run      # both halves, one after the other (for a single longer call)
#   bash bench/gpu_session.sh smoke    # both halves at toy sizes on CPU (Triton interpreted): checks the script.
#                                      # HALO_BENCH_FAULTS=1 injects a failing test, a raising provider and a
#                                      # hanging one: the summary must show each as such and keep every other row
#   bash bench/gpu_session.sh tune     # longer block-config autotuning over D and V buckets
#
# Device calls (bench/fetch_wheels.sh first, here, to fill .whl/ with the peers the image lacks):
#   run(command="bash bench/gpu_session.sh first", carry=[".whl"], timeout_s=420)
#   run(command="bash bench/gpu_session.sh second", carry=[".whl"], timeout_s=420)
#
# Every step runs under its own deadline (one hung step costs only itself), with pipefail; the deadlines of a
# half add up to its budget. python -m bench rewrites its CSV after every row, so a step stopped at its deadline
# keeps what it measured, and a provider that raises costs only its own row. Files, three per half, into $OUT
# (the device tool's folder) or bench/results/gpu-session: summary-<half>.md (printed last: every row, failed and
# unmeasured ones named, and each step's outcome), session-<half>.log, and gpu-session-<half>.tar.gz with every
# CSV, Markdown table and log. Unpack the archives into bench/results/ on the development machine.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-run}
OUT=${OUT:-bench/results/gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# halo-ops[auto] rows show the unmeasured choice (table, then prediction); the autotune step measures first use
export HALO_OPS_AUTOTUNE=0
PY=python3

if [ "$MODE" = smoke ]; then
    # Toy sizes through the interpreter: the same code paths, seconds instead of minutes
    export TRITON_INTERPRET=1
    [ -x .venv/bin/python ] && PY=$PWD/.venv/bin/python
    N=256; D=32; V=1000; SEQ=64; DTYPE=fp32; DEVICE=cpu; SLAB="256,256,32;256,256,1000"; WARM_N=64
    # deadlines in seconds; each half's add up to its BUDGET
    T_SETUP=0; T_ENV=30; T_WARM=60; T_TESTS=90; T_FLOOR=30; T_SCHED=150; T_PEER=60; T_KTO=120; T_FROZEN=60
    T_LOSS=60; T_SWEEP=150; T_COMPILE=90; T_FAULT=30; T_AUTO=90
    BUDGET=900
else
    N=16384; D=4096; V=128256; SEQ=1024; DTYPE=bf16; DEVICE=cuda; SLAB="8192,16384,4096;16384,8192,4096"; WARM_N=1024
    # first: 25+25+15+45+40+20+55+35+35+25+30 = 350; second: 25+25+15+40+55+35+35+35+35+50 = 350
    T_SETUP=25; T_ENV=15; T_WARM=45; T_TESTS=40; T_FLOOR=20; T_SCHED=55; T_PEER=35; T_KTO=35; T_FROZEN=25
    T_LOSS=30; T_SWEEP=55; T_COMPILE=50; T_FAULT=0; T_AUTO=40
    BUDGET=350
fi
SHAPE="--tokens $N --hidden $D --vocab $V --dtype $DTYPE --device $DEVICE"
ARCH=""; [ "$MODE" = smoke ] && ARCH="--arch sm_90"  # the interpreter has no GPU to name the table's key
FAULTS=${HALO_BENCH_FAULTS:-0}

step() {  # step NAME SECONDS 'command': run under a deadline, log everything, record the outcome
    local name=$1 seconds=$2 command=$3
    local t0=$(date +%s)
    local left=$((BUDGET - (t0 - START)))  # the half's budget caps every deadline
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

table() {  # table STEP SECONDS NAME ARGS: one python -m bench table, written as it is measured
    step "$1" "$2" "$PY -m bench $SHAPE --out $WORK --name $3 $4"
}

setup() {
    if [ "$MODE" != smoke ]; then
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        if ls .whl/*.whl >/dev/null 2>&1; then  # the peers, offline (bench/fetch_wheels.sh fills .whl/)
            step wheels "$T_SETUP" "$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target /tmp/site .whl/*.whl"
        fi
        # halo-ops as it ships (a built wheel, not the source tree), offline: no dependencies, no build isolation
        step install "$T_SETUP" "$PY -m pip install -q --no-deps --no-build-isolation --no-index --upgrade \
            --target /tmp/site ."
    fi
    step environment "$T_ENV" "{ nvidia-smi || true; $PY -c 'import torch, triton, halo_ops; print(\"torch\",
        torch.__version__, \"triton\", triton.__version__, \"cuda\", torch.cuda.is_available(), \"halo_ops\",
        halo_ops.__file__)'; } 2>&1 | tee $WORK/environment.txt"
}

first_half() {
    # compile every schedule's kernels once at the target D and V (a small N), so later steps time, not compile
    table warm "$T_WARM" warm "--tokens $WARM_N --cases forward+backward --repeats 1 \
        --providers 'halo-ops[slab],halo-ops[gemm],halo-ops[atomic],halo-ops[owner]'"
    # compiled correctness: every schedule, dtype and option of the token op, and the fused KTO op
    local tests="tests/test_linear_logprobs.py tests/test_kto.py tests/test_compile.py" select=""
    [ "$MODE" = smoke ] && tests="tests/test_linear_logprobs.py" && select="softcap"
    if [ "$FAULTS" = 1 ]; then  # an injected failing test: the tests step must report a failure
        printf 'def test_injected_fault():\n    assert False, "injected (HALO_BENCH_FAULTS)"\n' > "$WORK/test_injected_fault.py"
        tests="$tests $WORK/test_injected_fault.py"
        [ -n "$select" ] && select="$select or injected_fault"
    fi
    step tests "$T_TESTS" "$PY -m pytest -q -p no:cacheprovider -rs $tests ${select:+-k '$select'} 2>&1 \
        | tee $WORK/tests.txt | tail -5"
    step floor "$T_FLOOR" "$PY -m bench.floor --device $DEVICE --dtype $DTYPE --gemm '$N,$D,$V;$SLAB' \
        --shapes $N,$D,$V --out $WORK"
    local schedules="halo-ops[slab],halo-ops[gemm],halo-ops[atomic],halo-ops[owner]"
    [ "$FAULTS" = 1 ] && schedules="$schedules,fault-raise"  # an injected raising provider: its row says failed
    table schedules "$T_SCHED" schedules "--cases forward,backward,forward+backward,forward-only \
        --providers '$schedules'"
    table "peer trl" "$T_PEER" peer-trl "--cases forward+backward,forward-only --providers trl"
    table kto-step "$T_KTO" kto-step "--cases kto-step --seq $SEQ --distribution random \
        --providers halo-ops,trl,liger,plain"
    # fewer GEMMs: the frozen head's Jacobian (2) against its recompute (3), the fused KTO's eager schedule (3)
    # against its recompute (4) and against the composed public pieces
    table frozen-head "$T_FROZEN" frozen "--cases frozen-head --providers 'halo-ops,halo-ops[recompute],trl'"
    table kto-loss "$T_LOSS" kto-loss "--cases kto-loss --seq $SEQ --distribution random \
        --providers 'halo-ops,halo-ops[recompute],halo-ops[composed]'"
    if [ "$FAULTS" = 1 ]; then  # an injected hang: the step meets its deadline, the row before it survives
        table "peer fault-hang" "$T_FAULT" peer-fault-hang "--cases forward-only --providers plain,fault-hang"
    fi
}

second_half() {
    # schedule="auto" on first use, as a user meets it: what it measures, chooses and costs (compiles included)
    # (from outside the clone: there python -m would find the source tree's halo_ops, which is not a package)
    step autotune "$T_AUTO" "cd /tmp && HALO_OPS_AUTOTUNE=1 HALO_OPS_CACHE_DIR=$WORK/autotune-cache $PY -m \
        halo_ops.autotune --tokens $N --hidden $D --vocab $V --dtype $DTYPE --device $DEVICE \
        | tee $WORK/autotune-first-use.json"
    # what impl='auto' should run here: every schedule timed and checked, then the slab and forward tiles
    step sweep "$T_SWEEP" "$PY -m bench.autotune --device $DEVICE --tokens $N --hidden $D --vocab $V \
        --dtype $DTYPE --kernels schedule,slab,fold,forward $ARCH --repeats 1 --out $WORK"  # kernels.config's candidates
    for peer in cce plain torch.linear_cross_entropy cce-no-filter; do
        table "peer $peer" "$T_PEER" "peer-$peer" "--cases forward+backward,forward-only --providers '$peer'"
    done
    table "peer torch.compile" "$T_COMPILE" peer-torch.compile "--cases forward+backward,forward-only \
        --providers torch.compile"
}

finish() {  # finish HALF: the summary from whatever exists, and the files for the device tool
    local half=$1
    $PY -m bench.summary "$WORK" > "$WORK/summary.md" 2>> "$WORK/session.log" \
        || echo "summary failed: see session.log" >> "$WORK/summary.md"
    cp "$WORK/summary.md" "$OUT/summary-$half.md"
    cp "$WORK/session.log" "$OUT/session-$half.log"
    tar czf "$OUT/gpu-session-$half.tar.gz" -C "$WORK" .
    echo "wrote $OUT/summary-$half.md, session-$half.log and gpu-session-$half.tar.gz ($(ls "$WORK" | wc -l) files)" \
         "in $(( $(date +%s) - START ))s"
    cat "$WORK/summary.md"
}

half() {  # half NAME: one half in a fresh work folder, under its own budget
    WORK=$(mktemp -d); START=$(date +%s); : > "$WORK/steps.tsv"
    setup
    "${1}_half"
    finish "$1"
}

case "$MODE" in
    first|second) half "$MODE" ;;
    run|smoke) half first; half second ;;
    tune)
        WORK=$(mktemp -d); START=$(date +%s); BUDGET=560; : > "$WORK/steps.tsv"
        setup
        step tune 540 "$PY -m bench.autotune --tokens 16384 --hidden 2048,4096 --vocab 32000,128256,256000 \
            --dtype bf16 --out $WORK"
        finish tune
        ;;
    *) echo "unknown mode $MODE (first, second, run, smoke, tune)"; exit 2 ;;
esac
