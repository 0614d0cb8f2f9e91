"""Time the data build and one epoch of curriculum sampling on the real Census files.

    python benchmarks/data_pipeline.py [--raw-dir ../shared/naics2022]

Prints wall time and peak resident memory; goals: build <= 60 s and < 2 GB, sampling all 2,125
anchors with 32 negatives <= 2 s (2-core CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import tempfile
import time
from pathlib import Path

from naics_mlflow.data.build import build_data
from naics_mlflow.data.census import load_release
from naics_mlflow.data.curriculum import CurriculumSampler, load_curriculum
from naics_mlflow.data.taxonomy import load_taxonomy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--raw-dir", type=Path, default=Path("../shared/naics2022"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        build_data(args.raw_dir, Path(out), load_release(), force=True)
        build_seconds = time.perf_counter() - start
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        taxonomy = load_taxonomy(out)
    spec = dataclasses.replace(
        load_curriculum("conf/text_curriculum/03_stage.yaml"), n_negatives=32
    )
    start = time.perf_counter()
    sampler = CurriculumSampler(
        spec, taxonomy.levels, taxonomy.relation, taxonomy.distance, taxonomy.excluded_matrix()
    )
    sample = sampler.sample_epoch(seed=0)
    sample_seconds = time.perf_counter() - start
    print(f"data build: {build_seconds:.2f} s, peak RSS {peak_mb:.0f} MB")
    print(
        f"sampler set-up + one epoch ({len(sample.anchors)} anchors, 32 negatives): "
        f"{sample_seconds:.2f} s"
    )


if __name__ == "__main__":
    main()
