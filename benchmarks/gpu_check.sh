#!/usr/bin/env bash
# Everything ddpm checks and measures on a GPU, for a lent GPU machine, in parts that each fit one
# short call (caps in seconds):
#   checks   benchmarks/gpu_checks.py: CUDA-graph sampling, no host sync, data on the GPU     (150)
#   compare  compare_diffusers.py --device cuda: the whole comparison                         (300)
#   compile  the CIFAR-10 bf16 row with --compile, fewer rounds (the 35%-of-peak target)      (300)
#   bash benchmarks/gpu_check.sh                   # checks and compare (at most 7.5 minutes)
#   bash benchmarks/gpu_check.sh compile           # then this, if the session has time left
# Results go to $OUT (default out/gpu): gpu.txt, checks.txt, compare.txt, compare-compile.txt and
# the JSON of every timing (rewritten after each row, so a part stopped at its cap keeps its rows).
#
# That machine has PyTorch with CUDA but not diffusers and cannot download. Before sending the working
# tree there, fetch the two wheels it lacks into .whl/ (ignored by git; name it in the call's carry):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata==10.2.0
set -uo pipefail
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(checks compare)
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
for part in "${parts[@]}"; do
    case $part in
        checks) timeout 150 $python benchmarks/gpu_checks.py 2>&1 | tee "$out/checks.txt" || status=1 ;;
        compare) timeout 300 $python benchmarks/compare_diffusers.py --device cuda \
                     --json "$out/performance-cuda.json" 2>&1 | tee "$out/compare.txt" || status=1 ;;
        compile) timeout 300 $python benchmarks/compare_diffusers.py --device cuda --only cifar --precision bf16 \
                     --compile --rounds 5 --json "$out/performance-cuda-compile.json" 2>&1 \
                     | tee "$out/compare-compile.txt" || status=1 ;;
        *) echo "gpu_check.sh: unknown part '$part'; use checks, compare, compile" >&2; exit 2 ;;
    esac
done
exit $status
