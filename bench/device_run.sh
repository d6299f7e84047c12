#!/usr/bin/env bash
# The one prepared run for a lent GPU (the device tool: 15 minutes of device time per issue,
# every start counted). From the repository root on the device machine:
#
#     bash bench/device_run.sh            # everything below, logs and results under $OUT
#     ONLY="env tune results" DEADLINE=470 bash bench/device_run.sh
#                                         # issue 17's call: <= 8 minutes, room for a rerun
#
# Ordered by value per minute, each step under its own time limit so that one slow step
# (first-call Triton compiles, torch.compile of the unrolled reference loop) cannot eat the
# rest: build with CUDA, the GPU tests, the GPU suite at batch 1000 fp32 (the headline
# configuration), the CUDA RMSProp bandwidth, then the wider suite configurations and the rest
# of the tests if time is left. Results land in $OUT (and bench/results/ on the device copy);
# commit them here with the card's name. A step that fails or times out is recorded in
# $OUT/steps.txt and the run goes on.
set -uo pipefail
OUT=${OUT:-/tmp/locoprop-device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
# Logs and results collect in $LOGS; after every step they are packed into ONE file,
# $OUT/device-logs.tgz (the device tool brings back at most 8 files), beside steps.txt.
LOGS=${LOGS:-/tmp/locoprop-device-logs}
mkdir -p "$LOGS"
STEPS="$OUT/steps.txt"
: > "$STEPS"
# Only these steps, when ONLY is set (names separated by spaces); all otherwise.
ONLY=${ONLY:-}
# Python packages the device image lacks (expecttest, for torch's optim_db in the optimizer
# tests), carried as wheels in .whl/ (see the device tool's README).
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# Triton compiles are CPU-bound: the tests run in 8 processes (pytest-xdist is in the image).
XDIST=${XDIST:--n 8}

# One device call may run 600 s; DEADLINE (s) leaves room for the reply. A step whose limit
# would pass it is cut to what is left, and skipped when under 20 s are left.
DEADLINE=${DEADLINE:-540}
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $LOGS/NAME.log, record rc
  local name=$1 limit=$2; shift 2
  if [[ -n "$ONLY" && " $ONLY " != *" $name "* ]]; then return; fi
  local left=$((DEADLINE - SECONDS))
  if (( left < 20 )); then echo "$name skipped: ${left}s left" | tee -a "$STEPS"; return; fi
  (( limit > left )) && limit=$left
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc limit=${limit}s took=$((SECONDS - t0))s" | tee -a "$STEPS"
  tail -n 12 "$LOGS/$name.log"
  cp bench/results/*.json bench/results/*.md "$LOGS/" 2>/dev/null
  tar -czf "$OUT/device-logs.tgz" -C "$LOGS" . 2>/dev/null
}

step env 60 bash -c "nvidia-smi; $PY -c 'import torch, triton; print(torch.__version__, \
triton.__version__, torch.cuda.get_device_name())'; which nvcc cmake ninja; \
$PY -m pybind11 --version; $PY -m pytest --version; $PY -c 'import hypothesis'"

# Issue 17: the tuning step (every spill-free launch config of the per-op rows timed at the
# issue's shapes, interleaved, stage 2's at every split cap of triton_tune.SPLIT_K_CAPS too; the fastest written into triton_kernels/config_table.py with
# the card and the medians; a JSON copy in $LOGS), then the results step with that table:
# matched_loss_grad tanh/softmax/relu at 1000x1000 B=1000 and 8192x768->3072, ieee/tf32/bf16,
# ours vs eager at the same precision, medians and spread, interleaved, errors vs float64.
# Pure Python + Triton: no build needed. Budget: tune <= 200 s, results <= 200 s.
step tune 200 $PY bench/triton_tune.py --time --budget-s 150 --out "$LOGS"
cp triton_kernels/config_table.py "$LOGS/" 2>/dev/null  # packed by the next step
step results 200 $PY bench/matched_loss_grad_device.py --out "$LOGS"

# The editable install builds locoprop_kernels._C with the CUDA kernels (sm_90 for Hopper).
step build 180 env LOCOPROP_CUDA=ON LOCOPROP_REQUIRE_EXT=1 \
  $PY -m pip install --no-deps --no-build-isolation -e .
step build_info 60 $PY -c "from locoprop_kernels.backends import cpp; print(cpp.build_info())"

# GPU-only tests first (native bf16/fp16 dots, tf32, wide softmax rows, CUDA C++, the CUDA
# graph inner loop, cross-device checkpoints), then the per-op tests on CUDA tensors.
step tests_gpu 180 $PY -m pytest -q $XDIST --timeout 120 tests/test_gpu.py tests/test_cpp_backend.py \
  tests/test_inner_loop.py tests/test_grouped.py tests/test_checkpoint.py tests/test_trainer.py
# Both LocoProp APIs: fp32 on CUDA vs fp64 on the CPU after 3 steps, and one step's time.
step optim_locoprop 120 $PY -m bench.optim_locoprop_gpu
# Issue 12: the conv op and lk.optim.LocoProp's conv layers on CUDA; the refactored shared inner
# loop (issue 10) through the trainer and optimizer tests.
step tests_round2 120 $PY -m pytest -q $XDIST --timeout 100 tests/test_gpu.py \
  tests/test_inner_loop.py tests/test_grouped.py tests/test_trainer.py tests/test_conv2d.py \
  tests/test_optim_conv.py tests/test_optim_locoprop.py tests/test_cpp_backend.py
# The Fashion-MNIST CNN step: matched conv losses vs linearized vs Adam (+ fp64 check).
step optim_conv 90 $PY -m bench.optim_conv_gpu
# The race at an equal (short: a GPU step is ~100x a CPU one) budget per optimizer; MNIST and
# the peers come as carried wheels (.whl).
step race_gpu 170 $PY -m bench.race --device cuda --budget 15 --slice-seconds 1 \
  --eval-seconds 1 --optimizers locoprop-m,locoprop-m-fast,adam,rmsprop,shampoo,kfac,pypi-locoprop-t2 \
  --lrs adam=1e-3,rmsprop=3e-4,shampoo=1e-3,kfac=0.1 --memory inprocess --progress lines \
  --name nvidia-h200
step suite_b1000_fp32 180 $PY -m bench.gpu_suite --out "$LOGS/suite-b1000-fp32" \
  --batches 1000 --dtypes float32
step rmsprop_bandwidth 90 $PY -m bench.cuda_rmsprop_bandwidth
# lk.optim.RMSprop: GB/s vs a copy (2^26 values, ResNet-50's 161 tensors) and capturable=True
# replayed in a CUDA graph (bitwise vs eager, lr changed between replays).
step optim_rmsprop 120 $PY -m bench.optim_rmsprop_gpu
step tests_optim 120 $PY -m pytest -q $XDIST --timeout 100 tests/test_optim_rmsprop.py \
  tests/test_optim_locoprop.py
step suite_b4096_fp32 180 $PY -m bench.gpu_suite --out "$LOGS/suite-b4096-fp32" \
  --batches 4096 --dtypes float32
step suite_bf16 180 $PY -m bench.gpu_suite --out "$LOGS/suite-bf16" \
  --batches 1000,4096 --dtypes bfloat16
step tests_rest 300 $PY -m pytest -q $XDIST --timeout 120 tests
echo "=== summary"
cat "$STEPS"
cat "$LOGS"/suite-b1000-fp32/*.md "$LOGS"/optim-locoprop-nvidia*.md "$LOGS"/optim-conv-nvidia*.md \
  "$LOGS"/race-nvidia*.md 2>/dev/null
