#!/usr/bin/env bash
# The tests that need a GPU and the training step's levers on the lent GPU machine, in one
# device call with no network; after benchmarks/gpu_chain.sh's call, while the machine is warm
# (it then finds the packages installed), or on its own:
#
#   the device:   run(command="bash benchmarks/gpu_step.sh", carry=[".gpu_carry"], timeout_s=270)
#
# $OUT receives: throughput.json (`benchmarks/throughput.py --device cuda`, at most
# THROUGHPUT_SECONDS, default 150), gpu_memory.csv and step.log (everything printed, with the
# GPU tests, at most GPU_TESTS_SECONDS, default 90).
set -euo pipefail

THROUGHPUT_SECONDS=${THROUGHPUT_SECONDS:-150}
GPU_TESTS_SECONDS=${GPU_TESTS_SECONDS:-90}
LOG_NAME=step.log
source benchmarks/gpu_setup.sh

echo "== tests that need a GPU $(date -u +%FT%TZ)"
# search, embed and evaluate on the GPU (search.device) against the CPU, and a training step's
# passes under CUDA's check that nothing waits for the GPU, and a stage that runs out of GPU
# memory; skipped without one.
timeout --kill-after=10 "$GPU_TESTS_SECONDS" "$PYTHON" -m pytest -q -p no:cacheprovider \
  tests/test_inference.py tests/test_training_stage.py -k gpu || echo "GPU tests exit status $?"

if ! command -v nvidia-smi >/dev/null; then
  echo "no GPU: the training step is not timed"
  exit 0
fi
# The training step of chain_default's LoRA stage (finetune: 32 anchors, 8 negatives each,
# without the backbone's own dropout), each step on a new batch of the curriculum as a fit's
# are, as a fit runs it now, and as it ran before each lever (frozen weights cast per call; one
# pass per channel; cuDNN's attention allowed), then at 64, 128 and 256 anchors (where they
# fit), then with its texts in 2 and 8 passes instead of model.length_buckets' 4, then with the
# backbone compiled (its first step, compiling, timed apart); pairs/s and the share of each step
# the GPU is busy. Each set-up's figures reach the log as it finishes, so the cap cuts the last
# ones first.
echo "== throughput $(date -u +%FT%TZ)"
timeout --kill-after=10 "$THROUGHPUT_SECONDS" "$PYTHON" "$REPO/benchmarks/throughput.py" \
  --device cuda --skip-seed --skip-inference --curriculum finetune --negatives 8 \
  --batch-size 32 --length-buckets 2 8 --larger-batches 64 128 256 --compile --data-dir "$WORK/data" \
  --json model.backbone_dropout=false >"$OUT/throughput.json" || echo "throughput exit status $?"
echo "== done $(date -u +%FT%TZ)"
