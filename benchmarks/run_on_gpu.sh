#!/usr/bin/env bash
# On the lent GPU machine (no network): install the carried wheels, run the gpu tests, then the benchmarks.
# Usage: bash benchmarks/run_on_gpu.sh [tests|bench|shapes|profile|step|sweep|free|load|vision|split|fused|wave2|wave3|wave4|probe|alts|all]   (results go to $OUT)
set -u
what=${1:-all}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-index .whl/bitsandbytes-*.whl $(ls .whl/py/*.whl | grep -vE 'typing_extensions|psutil|pygments') 2>&1 | tail -2
# Vision: torchvision built for the machine's torch (pip download --no-deps torchvision==0.26.* -d .whl), if carried.
python3 -c "import torchvision" 2>/dev/null || { ls .whl/torchvision-*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-deps --no-index .whl/torchvision-*.whl 2>&1 | tail -2; }
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, bitsandbytes, IPython; print('torch', torch.__version__, 'transformers', transformers.__version__, 'bitsandbytes', bitsandbytes.__version__, 'ipython', IPython.__version__)"
model=/tmp/qwen7b-shape
case $what in tests|all)
    python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_gpu_families.py tests/test_gpu_quantized.py tests/test_soak.py \
        tests/test_gpu_nf4.py tests/test_gpu_decode.py tests/test_gpu_fused.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt" | tail -25 ;;
esac
case $what in bench|all)
    python3 benchmarks/bench_decode.py --out "$OUT" --model-dir $model 2>&1 | grep -vE 'Loading weights|Writing model' | tee "$OUT/bench.txt" | tail -16 ;;
esac
case $what in shapes|all)  # the Qwen3-8B and hybrid Qwen3.5-9B shapes, each against the recipe
    for shape in qwen3-8b qwen3.5-9b; do
        python3 benchmarks/bench_decode.py --out "$OUT" --shape $shape --model-dir /tmp/$shape-shape 2>&1 | grep -vE 'Loading weights|Writing model|falling back' | tee "$OUT/bench-$shape.txt" | tail -16
        rm -rf /tmp/$shape-shape
    done ;;
esac
case $what in vision|all)  # a Qwen2.5-VL-7B-shaped model in NF4: one 1024x768 figure
    python3 -m pytest -q -m gpu tests/test_gpu_vision.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_vision_tests.txt" | tail -15
    python3 benchmarks/bench_vision.py --out "$OUT" --model-dir /tmp/qwen-vl-7b-shape 2>&1 | grep -vE 'Loading weights|Writing model' | tee "$OUT/bench_vision.txt" | tail -16 ;;
esac
case $what in profile|all)
    python3 benchmarks/profile_turn.py --out "$OUT" --model-dir $model 2>&1 | grep -vE 'Loading weights|Writing model|Warning|_warn_once' | cut -c1-160 | head -14 ;;
esac
case $what in step|all)  # one decode step's GPU kernels by name (issue 13)
    python3 benchmarks/profile_step.py --out "$OUT" --model-dir $model 2>&1 | grep -vE 'Loading weights|Writing model|Warning|warn' | head -40 ;;
esac
case $what in sweep)  # the NF4 float16 kernel's tiles on this card; its bench_nf4-tuned.json feeds QWEN_MAGIC_NF4_TUNED
    python3 benchmarks/bench_nf4.py --out "$OUT" --dtype float16 --no-others --sweep --sweep-seconds 170 --models qwen2.5-7b 2>&1 \
        | grep -E "best of|^\||Sweep|    \(" | tee "$OUT/bench_nf4_sweep.txt" | tail -16 ;;
esac
case $what in free|all)
    python3 benchmarks/free_check.py --model-dir $model 2>&1 | grep -vE 'Loading weights|Writing model' | tail -24 ;;
esac
case $what in split)  # two GPUs (issue 16): the split tests, then the 7B split by balanced and a 32B shape (--no-32b to skip)
    timeout 90 python3 -m pytest -q -m gpu tests/test_gpu_split.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_split_tests.txt" | tail -25
    timeout ${SPLIT_LIMIT:-480} python3 benchmarks/bench_split.py --out "$OUT" --model-dir $model 2>&1 | grep -vE 'Loading weights|Writing model' | tee "$OUT/bench_split.txt" | tail -16 ;;
esac
case $what in load|all)
    python3 benchmarks/bench_load.py --out "$OUT" --model-dir $model --copy-dir /tmp/qwen7b-shape-nf4 2>&1 | grep -vE 'Loading weights|Writing model' | tee "$OUT/load.txt" | tail -12 ;;
esac
case $what in fused|all)  # the fused Triton kernels (issue 13): exactness on the GPU, then ms/step and kernels/step
    python3 -m pytest -q -s -m gpu tests/test_gpu_fused.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_fused_tests.txt" | grep -E "differ|relative error|graph patched|passed|failed|Error" | tail -60
    python3 benchmarks/bench_fused.py --out "$OUT" 2>&1 | tee "$OUT/bench_fused.txt" | tail -8
    python3 benchmarks/bench_fused.py --nf4 --model-dir $model --out "$OUT/nf4" 2>&1 | grep -vE 'Loading weights|Writing model' | tee "$OUT/bench_fused_nf4.txt" | tail -8 ;;
esac
case $what in wave2)  # one lease for everything: split tests on two GPUs, then timings on GPU 0 beside the other tests on GPU 1
    gpus=$(nvidia-smi -L | wc -l)
    if [ "$gpus" -ge 2 ]; then
        timeout 120 python3 -m pytest -v --tb=short -m gpu tests/test_gpu_split.py -p no:cacheprovider > "$OUT/gpu_split_tests.txt" 2>&1
        grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed" "$OUT/gpu_split_tests.txt" | tail -14
        tests_gpu=1
    else
        tests_gpu=0
    fi
    (   export CUDA_VISIBLE_DEVICES=0
        timeout 45 python3 benchmarks/bench_nf4.py --out "$OUT" --dtype float16 --no-others
        timeout 290 python3 benchmarks/bench_decode.py --out "$OUT" --model-dir $model --history 512 8000
    ) 2>&1 | grep -vE 'Loading weights|Writing model' > "$OUT/lane_bench.txt" &
    (   export CUDA_VISIBLE_DEVICES=$tests_gpu
        timeout 280 python3 -m pytest -v --tb=short -m gpu tests/test_gpu_nf4.py tests/test_gpu_fused.py tests/test_gpu.py \
            tests/test_gpu_vision.py tests/test_gpu_families.py -p no:cacheprovider
    ) > "$OUT/lane_tests.txt" 2>&1 &
    wait
    grep -E "FAILED|ERROR|passed|failed" "$OUT/lane_tests.txt" | tail -30
    tail -40 "$OUT/lane_bench.txt" ;;
esac
case $what in wave3)  # the short second lease: split tests, then a first question's profile and a trimmed bench beside the GPU tests
    timeout 55 python3 -m pytest -q --tb=line -m gpu tests/test_gpu_split.py -p no:cacheprovider > "$OUT/gpu_split_tests.txt" 2>&1
    tail -4 "$OUT/gpu_split_tests.txt"
    (   export CUDA_VISIBLE_DEVICES=0
        timeout 60 python3 benchmarks/profile_first.py --model-dir $model
        timeout 165 python3 benchmarks/bench_decode.py --out "$OUT" --model-dir $model --tokens 64 --history 8000
    ) 2>&1 | grep -vE 'Loading weights|Writing model' | cut -c1-200 > "$OUT/lane_bench.txt" &
    (   export CUDA_VISIBLE_DEVICES=1
        timeout 215 python3 -m pytest -q --tb=short -m gpu tests/test_gpu.py tests/test_gpu_fused.py tests/test_gpu_vision.py \
            tests/test_gpu_nf4.py tests/test_gpu_families.py -p no:cacheprovider
    ) > "$OUT/lane_tests.txt" 2>&1 &
    wait
    grep -E "FAILED|ERROR|passed|failed" "$OUT/lane_tests.txt" | tail -20
    tail -60 "$OUT/lane_bench.txt" ;;
esac
case $what in probe)  # split tests on both cards; then a first question's profile and the peak memory beside the GPU tests
    timeout 45 python3 -m pytest -q --tb=line -m gpu tests/test_gpu_split.py -p no:cacheprovider > "$OUT/gpu_split_tests.txt" 2>&1
    tail -4 "$OUT/gpu_split_tests.txt"
    (   export CUDA_VISIBLE_DEVICES=0
        timeout 70 python3 benchmarks/profile_first.py --model-dir $model
        timeout 40 python3 benchmarks/bench_decode.py --peak ours --model-dir $model --tokens 256 --history 8000 | tail -1
    ) 2>&1 | grep -vE 'Loading weights|Writing model' | cut -c1-180 > "$OUT/lane_probe.txt" &
    (   export CUDA_VISIBLE_DEVICES=1
        timeout 115 python3 -m pytest -q --tb=short -m gpu tests/test_gpu.py tests/test_gpu_vision.py tests/test_gpu_fused.py \
            tests/test_gpu_families.py -p no:cacheprovider
    ) > "$OUT/lane_tests.txt" 2>&1 &
    wait
    grep -E "FAILED|ERROR|passed|failed" "$OUT/lane_tests.txt" | tail -20
    cat "$OUT/lane_probe.txt" ;;
esac
case $what in wave4)  # two GPUs: split tests; the vision tests on card 1 while the 7B shape is built; then bench_split
    timeout 90 python3 -m pytest -q --tb=short -m gpu tests/test_gpu_split.py -p no:cacheprovider > "$OUT/gpu_split_tests.txt" 2>&1
    tail -4 "$OUT/gpu_split_tests.txt"
    ( CUDA_VISIBLE_DEVICES=1 timeout 200 python3 -m pytest -v --tb=short -m gpu tests/test_gpu_vision.py -p no:cacheprovider \
        > "$OUT/gpu_vision_tests.txt" 2>&1 ) &
    [ -e $model/config.json ] || python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from bench_decode import build_model; build_model('$model')" 2>&1 | grep -vE 'Writing model' | tail -3
    wait
    grep -E "PASSED|FAILED|ERROR|passed|failed|^E " "$OUT/gpu_vision_tests.txt" | cut -c1-220 | tail -40
    timeout ${SPLIT_LIMIT:-400} python3 benchmarks/bench_split.py --out "$OUT" --model-dir $model 2>&1 | grep -vE 'Loading weights|Writing model' | tee "$OUT/bench_split.txt" | tail -16 ;;
esac
case $what in alts|all)  # the 4-bit products against maintained libraries (issue 13): wheels carried in .whl/alt
    if ls .whl/alt/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-deps --no-index --target /tmp/alt-site .whl/alt/*.whl 2>&1 | tail -2
        PYTHONPATH=$PWD:/tmp/alt-site python3 benchmarks/bench_nf4.py --out "$OUT" --dtype float16 2>&1 | tee "$OUT/bench_nf4_alts.txt" | tail -14
    else
        echo "no .whl/alt wheels (gemlite, hqq, torchao): see benchmarks/RESULTS.md"
    fi ;;
esac
