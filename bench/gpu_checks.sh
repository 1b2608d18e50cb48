#!/usr/bin/env bash
# Issue #22's CUDA targets in one call of the workplace's device tool (about 6 minutes on an
# H100 or H200; the tool lends 15 minutes of device time a session, start-up included).
#
#   bash bench/gpu_checks.sh prepare   # here, on the CPU machine, with DCC_DATA_ROOT set
#   device run: command "bash bench/gpu_checks.sh run", carry [".whl", ".gpu"], timeout_s 540
#
# prepare: wheels of what dcc's engine needs and the device image lacks (nibabel, nilearn for
# the phantom, omegaconf and its antlr4 runtime; the versions of this venv) into .whl/, and two
# misaligned MyoPS C0/LGE/T2 groups with their group.pt into .gpu/ (both ignored by git through
# .git/info/exclude; SimpleITK's 53 MB wheel would not fit the 64 MiB the tool carries, and the
# engine imports without it).
# run: the engine's cost per iteration on CUDA against N (targets: 2 ms at N = 3, 5 ms at
# N = 100), the 2D cardiac groups on one CPU thread and on CUDA in one process (target: under
# a second), the DCC training step at C = 16 (target: 8 ms at batch 1), plain and compiled;
# everything in $OUT/gpu_checks.tgz and the log in $OUT/gpu_checks.log.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
prepare)
    for path in /.whl/ /.gpu/; do
        grep -qxF "$path" .git/info/exclude 2>/dev/null || echo "$path" >> .git/info/exclude
    done
    version() { python -m pip show "$1" | sed -n 's/^Version: //p'; }
    rm -rf .whl .gpu && mkdir -p .whl .gpu
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "nibabel==$(version nibabel)" \
        "nilearn==$(version nilearn)" "omegaconf==$(version omegaconf)"
    # antlr4-python3-runtime 4.9 is published as a source archive only: built here (pure Python)
    python -m pip wheel -q --no-deps -w .whl \
        "antlr4-python3-runtime==$(version antlr4-python3-runtime)"
    python bench/bench_coreg_devices.py prepare --dir .gpu/groups --cases Case3001,Case3027 \
        --seed 0
    du -sh .whl .gpu
    ;;
run)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    results=/tmp/gpu_checks && mkdir -p "$results"
    log="${OUT:-/tmp}/gpu_checks.log"
    {
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
        python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
        python3 bench/bench_scaling.py --device cuda --sizes 3 8 16 32 64 128 --stage ffd \
            --iterations 30 --repeats 1 --warmup 3 --out "$results/scaling"
        python3 bench/bench_coreg_devices.py run --dir .gpu/groups --devices cpu cuda \
            --in-process --save "$results/cardiac_in_process"
        python3 bench/bench_dcc_speed.py --matrix --device cuda --channels 16 --batches 1 8 \
            --precisions fp32 bf16 --save "$results/dcc_speed"
        python3 bench/bench_dcc_speed.py --matrix --device cuda --channels 16 --batches 1 \
            --precisions fp32 --compile --save "$results/dcc_speed_compiled"
    } 2>&1 | tee "$log" || true
    tar czf "${OUT:-/tmp}/gpu_checks.tgz" -C "$results" .
    ;;
*)
    echo "usage: bash bench/gpu_checks.sh prepare|run" >&2
    exit 2
    ;;
esac
