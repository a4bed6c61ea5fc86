#!/usr/bin/env bash
# The cross-compile check under other Triton releases than the one installed (the test suite checks that one):
#   bash bench/cross_compile_triton.sh 3.6.0 3.1.0        # writes bench/results/cross-compile-triton-<version>.md
# Each release is installed alone into a scratch folder that shadows .venv's Triton for that run. The report
# lists what each release builds (registers, spills, shared memory, matrix instructions, atomics) for sm_90
# and the PROBLEM lines of the test suite's check; a release that cannot build a kernel fails loudly.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ARCH=${ARCH:-90}
for version in "$@"; do
    site=/tmp/halo-ops-triton-$version
    [ -d "$site/triton" ] || $PY -m pip install -q --no-deps --target "$site" "triton==$version" 2>&1 | grep -v "is ignored"
    PYTHONPATH=$site $PY -m bench.cross_compile --arch "$ARCH" --out bench/results --name "cross-compile-triton-$version" \
        > "/tmp/cross-compile-triton-$version.log" 2>&1
    echo "triton $version: exit $? ($(grep -c '^PROBLEM' "/tmp/cross-compile-triton-$version.log") PROBLEM lines);" \
         "log /tmp/cross-compile-triton-$version.log"
done
