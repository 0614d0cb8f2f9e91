# Sourced by benchmarks/gpu_chain.sh and benchmarks/gpu_step.sh, from the repository's root on the
# lent GPU machine: the environment from the carry (.gpu_carry/, `make gpu-carry`) with no
# network, everything printed also written to $OUT/$LOG_NAME, the GPU's memory logged every second
# to $OUT/gpu_memory.csv (its peak is the largest value), a conf/ copy whose config.yaml points
# every folder into $WORK, and the data built there.
#
# Both scripts may run on one machine in turn (two device calls while it stays warm): the second
# finds the packages installed in $WORK and skips installing them again.
# Needs LOG_NAME; takes CARRY, PYTHON (python3), OUT, WORK (/tmp/naics_gpu_chain).
REPO=$PWD
CARRY=$(realpath "${CARRY:-.gpu_carry}")
PYTHON=${PYTHON:-python3}
OUT=${OUT:?set OUT to the folder that receives the store, the figures and the log}
WORK=${WORK:-/tmp/naics_gpu_chain}
if [[ ! -d $CARRY/wheels || ! -d $CARRY/site ]]; then
  echo "error: no carry at $CARRY (wheels/, site/); run make gpu-carry first, or set CARRY" >&2
  exit 2
fi

mkdir -p "$OUT" "$WORK"
OUT=$(realpath "$OUT") WORK=$(realpath "$WORK")
SITE=$WORK/site
exec > >(tee "$OUT/$LOG_NAME") 2>&1

echo "== set-up $(date -u +%FT%TZ)"
if [[ ! -f $SITE/.from_carry ]]; then
  "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$CARRY"/wheels/*.whl
  cp -r "$CARRY"/site/. "$SITE"/
  touch "$SITE/.from_carry"
fi
export PYTHONPATH="$SITE:$REPO"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export MLFLOW_TRACKING_URI="sqlite:///$WORK/mlflow.db"
export NAICS_RAW_DIR="$CARRY/naics2022"
cli() { "$PYTHON" -m naics_mlflow "$@"; }
"$PYTHON" -c "import torch, mlflow, geoopt, transformers, lightning; print('torch', \
torch.__version__, 'cuda', torch.cuda.is_available(), '| mlflow', mlflow.__version__, \
'| transformers', transformers.__version__)"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=timestamp,memory.used --format=csv -l 1 >"$OUT/gpu_memory.csv" &
  monitor=$!
  # Stopped with the script, so that no process outlives it holding the log's pipe open.
  trap 'kill "$monitor" 2>/dev/null' EXIT
fi

mkdir -p "$WORK/conf"
cp -r "$REPO/conf/." "$WORK/conf/"
config="$WORK/conf/config.yaml"
"$PYTHON" - "$config" dirs.data="$WORK/data" dirs.checkpoints="$WORK/checkpoints" \
  dirs.outputs="$WORK/outputs" <<'PYTHON'
"""A copy of conf/ whose config.yaml has the overrides baked in, so that every command reads the
same folders and settings; the curricula and data.yaml are found beside it."""
import sys
from pathlib import Path

import yaml

from naics_mlflow.config import load_config

path, *overrides = sys.argv[1:]
config = load_config(Path("conf/config.yaml"), overrides).to_dict()  # the repository's own
Path(path).write_text(yaml.safe_dump(config, sort_keys=False))
PYTHON

echo "== data build $(date -u +%FT%TZ)"
(cd "$WORK" && cli data build --config "$config")
