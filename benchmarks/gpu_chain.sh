#!/usr/bin/env bash
# Train chain_default on the lent GPU machine through MLflow, evaluate its final stage, and leave
# the record under $OUT, in one device call with no network:
#
#   here, once:   make gpu-carry                       (.gpu_carry/, about 66 MB with the tree)
#   the device:   run(command="bash benchmarks/gpu_chain.sh", carry=[".gpu_carry"],
#                     timeout_s=600)
#   then, while the machine is warm: benchmarks/gpu_step.sh (the GPU tests and the step's levers)
#
# $OUT receives: mlflow.db (the sqlite store: the parent run, one run per stage with its metrics,
# and the evaluation run), evaluation.json (`evaluate --json`), summary.json (wall time per
# stage, from the store), gpu_memory.csv (nvidia-smi every second: the peak is its largest
# value), inference.json (`benchmarks/inference.py` of the evaluated stage, when more than 45 s
# are left), evaluation_<stage>.json for each earlier stage (without baselines, while more than
# 40 s are left: the stages compared on dev) and chain.log (everything printed). Checkpoints stay on the machine: they are larger
# than what comes back.
#
# Everything must end inside the device call's 10 minutes (BUDGET_SECONDS, default 540, leaves
# time to copy $OUT back and for gpu_step.sh's call within the session's 15 minutes). Training
# gets what is left after the set-up and the data build, less EVALUATE_SECONDS (default 120) kept
# for the evaluation, or TRAIN_SECONDS if set; it stops there, and the last stage that finished
# is the one evaluated (the log says so).
# The store and summary.json are written before the evaluation too, so that they come back even
# if it runs out of time. The MLflow commands run in $WORK, so that the store's artifacts
# (checkpoints, the logged model) land in $WORK/mlartifacts, not in the working tree.
# GPU_CHAIN_SMOKE=1 runs the same steps with one batch per stage, a small evaluation sample and
# no baselines: to check the set-up, on any machine (PYTHON=... picks the interpreter).
set -euo pipefail

BUDGET_SECONDS=${BUDGET_SECONDS:-540}
CHAIN=chain_default
EVALUATE_SECONDS=${EVALUATE_SECONDS:-120}
LOG_NAME=chain.log
source benchmarks/gpu_setup.sh

# The store and summary.json (wall time and status of every run, stage by stage) into $OUT.
record() {
  [[ -f $WORK/mlflow.db ]] || return 0
  cp "$WORK/mlflow.db" "$OUT/"
  "$PYTHON" - "$OUT/summary.json" <<'PYTHON' || echo "no summary.json"
import json
import sys

from mlflow.tracking import MlflowClient

client = MlflowClient()
runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
summary = [
    {
        "run": run.info.run_name,
        "status": run.info.status,
        "seconds": (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else None,
        "epochs_logged": len(client.get_metric_history(run.info.run_id, "val_loss")),
        # A stage's (a chain's: final_stage/...) best epoch: the figures stages are compared by.
        "best": {
            name: value
            for name, value in run.data.metrics.items()
            if "best_val_loss" in name or "best/" in name
        },
    }
    for run in sorted(runs, key=lambda run: run.info.start_time)
]
json.dump(summary, open(sys.argv[1], "w"), indent=1)
print(json.dumps(summary, indent=1))
PYTHON
}

evaluation=(--unseen-queries "$CARRY/eval/naics2017_index_unseen.csv")
training=()
if [[ ${GPU_CHAIN_SMOKE:-0} == 1 ]]; then
  # On the command line: they must win over the chain file's epochs per stage.
  # Short texts and few items per code keep a CPU's float32 LoRA step within a few GB.
  training=(training.trainer.max_epochs=1 training.trainer.limit_train_batches=1
    training.trainer.limit_val_batches=1 model.eval_sample_size=64 data_loader.batch_size=2
    data_loader.examples_per_code=2 data_loader.tokenization.description_max_length=32
    data_loader.tokenization.excluded_max_length=32)
  evaluation+=(--no-baselines)
fi

cd "$WORK"
train_seconds=${TRAIN_SECONDS:-$((BUDGET_SECONDS - SECONDS - EVALUATE_SECONDS))}
echo "== train-curriculum --chain $CHAIN $(date -u +%FT%TZ), at most $train_seconds s"
trained=0
timeout --signal=INT --kill-after=30 "$train_seconds" \
  "$PYTHON" -m naics_mlflow train-curriculum --chain "$CHAIN" --config "$config" \
  "${training[@]}" ||
  trained=$?
echo "train-curriculum exit status $trained (124: stopped after $train_seconds s)"
record
echo "== evaluate $(date -u +%FT%TZ), at most $((BUDGET_SECONDS - SECONDS)) s"
# The chain's stages from its file, last first: the last one that finished is evaluated.
mapfile -t stages < <("$PYTHON" -c '
import sys
from naics_mlflow.data.curriculum import load_chain
print("\n".join(stage.name for stage in reversed(load_chain(sys.argv[1]).stages)))
' "$WORK/conf/text_curriculum/$CHAIN.yaml")
for stage in "${stages[@]}"; do
  left=$((BUDGET_SECONDS - SECONDS))
  ((left > 10)) || { echo "no time left to evaluate"; break; }
  if timeout --kill-after=10 "$left" "$PYTHON" -m naics_mlflow evaluate \
    --from-checkpoint "$stage" --config "$config" --json "${evaluation[@]}" \
    >"$WORK/evaluation.out"; then
    tail -n 1 "$WORK/evaluation.out" >"$OUT/evaluation.json"
    echo "evaluated $stage"
    evaluated=$stage
    break
  fi
  echo "no evaluation of $stage (not finished, or out of time)"
done
record
left=$((BUDGET_SECONDS - SECONDS))
if [[ -n ${evaluated:-} ]] && ((left > 45)); then
  # The evaluated stage's best checkpoint (the lowest val_loss in its file names) on the GPU:
  # embedding every code, single queries and a batch of them (search.device auto).
  best=$(ls "$WORK"/checkpoints/*/"$evaluated"/*/"$evaluated"-epoch=*.ckpt 2>/dev/null |
    sort -t= -k3 -g | head -n 1) || true
  if [[ -z $best ]]; then
    echo "no inference timing: no checkpoint file of $evaluated under $WORK/checkpoints"
  else
    echo "== inference $(date -u +%FT%TZ), at most $((left - 5)) s: $best"
    timeout --kill-after=5 $((left - 5)) "$PYTHON" "$REPO/benchmarks/inference.py" \
      --from-checkpoint "$best" --config "$config" --data-dir "$WORK/data" --queries 100 \
      --repeats 2 --json >"$OUT/inference.json" || echo "inference exit status $?"
  fi
fi
# The chain's earlier stages on the same queries, while time is left, so that the stages can be
# compared on dev from one call (without the baselines, which the first evaluation has).
earlier=0
for stage in "${stages[@]}"; do
  [[ $stage == "${evaluated:-}" ]] && { earlier=1; continue; }
  ((earlier)) || continue
  left=$((BUDGET_SECONDS - SECONDS))
  ((left > 40)) || { echo "no time left to evaluate $stage"; break; }
  if timeout --kill-after=10 "$left" "$PYTHON" -m naics_mlflow evaluate \
    --from-checkpoint "$stage" --config "$config" --json "${evaluation[@]}" --no-baselines \
    >"$WORK/evaluation.out"; then
    tail -n 1 "$WORK/evaluation.out" >"$OUT/evaluation_$stage.json"
    echo "evaluated $stage too"
  else
    echo "no evaluation of $stage (not finished, or out of time)"
  fi
done
record
echo "== done $(date -u +%FT%TZ)"
# The store and the log come back either way; the status says whether the chain was evaluated.
[[ -n ${evaluated:-} ]] || { echo "no stage of $CHAIN was evaluated"; exit 1; }
