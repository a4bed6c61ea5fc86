#!/usr/bin/env bash
# Download the peers' wheels that the GPU image lacks into .whl/ (git-ignored), for the device run.
# The device machine reaches no package index; bench/gpu_session.sh installs whatever lies in .whl/
# with --no-index --no-deps. The image has Python 3.12, torch 2.11, triton 3.6, transformers 5.17,
# accelerate, peft, pandas, pyarrow, xxhash, fsspec, huggingface-hub (/work/.library/device/KINDS.md)
# but not trl, liger-kernel, cut-cross-entropy or datasets, nor datasets' dill and multiprocess.
#   bash bench/fetch_wheels.sh        # run from any directory; about 3 MB
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(trl==1.16.0 liger-kernel==0.8.5 cut-cross-entropy==25.1.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "${WHEELS[@]}" 2>&1 | grep -v "is ignored" || true
# one version of each package, or the offline install stops
for name in trl liger_kernel cut_cross_entropy datasets dill multiprocess; do
    count=$(ls .whl/${name}-*.whl 2>/dev/null | wc -l)
    [ "$count" = 1 ] || { echo "expected one ${name} wheel in .whl/, found $count" >&2; exit 1; }
done
du -sh .whl
