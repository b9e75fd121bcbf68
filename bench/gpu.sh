#!/usr/bin/env bash
# The device checks on a lent GPU machine, in one prepared call each (docs/results/gpu.md, docs/results/cifar10.md).
#
# Full MNIST (issue 8): bench/gpu.py. Here, once per checkout, fill the ignored folder .gpu/ with full
# MNIST's four .gz files and the judge's weights (about 12 MB):
#     bash bench/gpu.sh --pack
# then, with the device tool:  run(command="bash bench/gpu.sh", carry=[".gpu"], timeout_s=540)
#
# CIFAR-10 (issue 31): bench/gpu.py --dataset cifar10. The lossless CIFAR-10 file (140 MB) is over a
# call's 64 MiB, so here, once, split it into three parts in the ignored .gpu-cifar/ with the CIFAR-10
# judge's weights:
#     bash bench/gpu.sh --pack-cifar10
# then three calls back to back (a warm machine keeps what the earlier calls carried; it waits 30 s):
#     run(command="bash bench/gpu.sh --received", carry=[".gpu-cifar/part1.npz", ".gpu-cifar/parts.json"])
#     run(command="bash bench/gpu.sh --received", carry=[".gpu-cifar/part2.npz"])
#     run(command="bash bench/gpu.sh cifar10", carry=[".gpu-cifar/part3.npz", ".gpu-cifar/cifar10_cnn.pt"], timeout_s=540)
# The last one joins the parts and runs the CIFAR-10 preset (--parts quality --budget-s 300
# --networks cifar10-preset, about 8 minutes); a part left behind is named before any work.
#
# Arguments after the script's name (after "cifar10" for CIFAR-10) go to bench/gpu.py. The tables, the
# grids and the log land in $OUT (gpu.md, gpu.log, nvidia-smi.txt, gpu-*.png), also when the run is
# stopped part-way.
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
if [[ "${1:-}" == "--pack-cifar10" ]]; then
    "$PYTHON" bench/npz_parts.py split ../shared/data/cifar10/cifar10.npz .gpu-cifar --parts 3
    "$PYTHON" bench/mnist_judge.py --dataset cifar10  # trains the judge into bench/.cache if it is not there yet
    cp bench/.cache/cifar10_cnn.pt .gpu-cifar/
    du -sh .gpu-cifar/*
    exit 0
fi
if [[ "${1:-}" == "--received" ]]; then
    ls -l .gpu-cifar
    exit 0
fi
out=${OUT:-.}
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
mkdir -p bench/.cache
if [[ "${1:-}" == "cifar10" ]]; then
    shift
    [[ -f .gpu-cifar/cifar10_cnn.pt ]] || { echo "error: .gpu-cifar/cifar10_cnn.pt is not there: carry it (bash bench/gpu.sh --pack-cifar10 makes it)" >&2; exit 2; }
    "$PYTHON" bench/npz_parts.py join .gpu-cifar /tmp/cifar10.npz  # names a missing part and stops
    cp .gpu-cifar/cifar10_cnn.pt bench/.cache/
    export BENCH_CIFAR_NPZ=/tmp/cifar10.npz  # bench/mnist_judge.SHARED_CIFAR: the data and the judge's real images
    set -- --dataset cifar10 --parts quality --budget-s 300 --networks cifar10-preset "$@"
else
    [[ -f .gpu/mnist_cnn.pt ]] || { echo "error: .gpu/ is not filled: run 'bash bench/gpu.sh --pack' first and carry .gpu" >&2; exit 2; }
    export BENCH_MNIST_GZ=.gpu  # bench/common.mnist_root unpacks full MNIST from there
    cp .gpu/mnist_cnn.pt bench/.cache/
fi
PYTHONUNBUFFERED=1 "$PYTHON" bench/gpu.py --out "$out/gpu.md" "$@" 2>&1 | tee "$out/gpu.log"
