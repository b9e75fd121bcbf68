#!/usr/bin/env bash
# The device check of issue 8: bench/gpu.py on a lent GPU machine, in one call (docs/results/gpu.md).
# Here, once per checkout, fill the ignored folder .gpu/ with full MNIST's four .gz files and the judge's weights (about 12 MB):
#     bash bench/gpu.sh --pack
# then, with the device tool:  run(command="bash bench/gpu.sh", carry=[".gpu"], timeout_s=540)
# Arguments after the script's name go to bench/gpu.py. The tables and the log land in $OUT
# (gpu.md, gpu.log, nvidia-smi.txt), also when the run is stopped part-way.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [[ "${1:-}" == "--pack" ]]; then
    mkdir -p .gpu
    cp ../shared/data/mnist/*.gz .gpu/
    "$PYTHON" bench/mnist_judge.py  # trains the judge into bench/.cache if it is not there yet
    cp bench/.cache/mnist_cnn.pt .gpu/
    du -sh .gpu
    exit 0
fi
[[ -f .gpu/mnist_cnn.pt ]] || { echo "error: .gpu/ is not filled: run 'bash bench/gpu.sh --pack' first and carry .gpu" >&2; exit 2; }
export BENCH_MNIST_GZ=.gpu  # bench/common.mnist_root unpacks full MNIST from there
mkdir -p bench/.cache && cp .gpu/mnist_cnn.pt bench/.cache/
out=${OUT:-.}
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
PYTHONUNBUFFERED=1 "$PYTHON" bench/gpu.py --out "$out/gpu.md" "$@" 2>&1 | tee "$out/gpu.log"
