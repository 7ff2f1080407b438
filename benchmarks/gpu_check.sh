#!/usr/bin/env bash
# Everything ddpm checks and measures on a GPU, as one command for a lent GPU machine: at most 9.5
# minutes (the three parts are capped at 150, 240 and 180 s). Results go to $OUT (default out/gpu):
# gpu.txt, checks.txt, compare.txt, compare-compile.txt and the JSON of every timing.
#
# That machine has PyTorch with CUDA but not diffusers and cannot download. Before sending the working
# tree there, fetch the two wheels it lacks into .whl/ (ignored by git; name it in the call's carry):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata==10.2.0
set -uo pipefail
out=${OUT:-out/gpu}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
status=0
timeout 150 $python benchmarks/gpu_checks.py 2>&1 | tee "$out/checks.txt" || status=1
timeout 240 $python benchmarks/compare_diffusers.py --device cuda --json "$out/performance-cuda.json" 2>&1 \
    | tee "$out/compare.txt" || status=1
# torch.compile on the CIFAR-10 U-Net in bf16, the row with a target (>= 35% of the bf16 peak).
timeout 180 $python benchmarks/compare_diffusers.py --device cuda --only cifar --precision bf16 --compile \
    --json "$out/performance-cuda-compile.json" 2>&1 | tee "$out/compare-compile.txt" || status=1
exit $status
