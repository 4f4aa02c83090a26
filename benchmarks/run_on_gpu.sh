#!/usr/bin/env bash
# On the lent GPU machine (no network): install the carried wheels, run the gpu tests, then the benchmark.
# Usage: bash benchmarks/run_on_gpu.sh [tests|bench|all]   (results go to $OUT)
set -u
what=${1:-all}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-index .whl/bitsandbytes-*.whl $(ls .whl/py/*.whl | grep -vE 'typing_extensions|psutil|pygments') 2>&1 | tail -2
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, bitsandbytes, IPython; print('torch', torch.__version__, 'transformers', transformers.__version__, 'bitsandbytes', bitsandbytes.__version__, 'ipython', IPython.__version__)"
if [ "$what" != bench ]; then
    python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -x 2>&1 | tee "$OUT/gpu_tests.txt" | tail -40
fi
if [ "$what" != tests ]; then
    python3 benchmarks/bench_decode.py --out "$OUT" 2>&1 | grep -vE 'Loading weights|Writing model' | tee "$OUT/bench.txt" | tail -30
fi
