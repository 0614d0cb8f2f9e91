"""Inference speed of a trained model: `embed` of all codes, single-query `search` latency and
where it goes, and the batched query path.

    python benchmarks/inference.py --from-checkpoint PATH.ckpt --data-dir data
    python benchmarks/inference.py --from-checkpoint PATH.ckpt --repeats 5 --threads 1 --json
    python benchmarks/inference.py --from-checkpoint PATH.ckpt --backbone-dtype float32
    python benchmarks/inference.py --from-checkpoint PATH.ckpt --device cuda

Each measure is repeated ``--repeats`` times; the minimum and the median of the repeats are
reported, since a shared machine makes single timings noisy. Latencies are given twice: wall
time, and the CPU time the process used. On a machine that other processes share, wall time
grows with their number (each runnable process gets its share of the cores); CPU time does not,
and with ``--threads 1`` it is the latency one idle core would give. On a GPU every timing waits
for the GPU's work to finish.

- ``embed``: every code's channel features (each distinct text once, through the merged
  adapters) and the head, what ``naics-embedder embed`` spends after loading the checkpoint.
- ``search``: ``SearchEngine.search`` of one held-out index item at a time (``--queries`` of
  them), p50 and p95 per repeat; then the parts of one query: tokenizing, the backbone pass of
  both query channels, the head, the lexical scores, the nearest index items, and the distances
  to every code.
- ``search`` of a code: ``SearchEngine.search`` of one code at a time (``--queries`` codes spread
  over the taxonomy's order, every level), p50 and p95: a code is answered from its own
  embedding, without the backbone.
- ``batched``: all ``--queries`` queries in one ``search`` call, queries per second.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from naics_mlflow.config import load_config
from naics_mlflow.data.taxonomy import HOLDOUT_FILE, MAX_LEVEL, display_code, load_taxonomy
from naics_mlflow.data.tokenization import TextBatch, query_ids, tokenize_codes
from naics_mlflow.evaluation.retrieval import SearchEngine
from naics_mlflow.model.merged import dtype_name, inference_device
from naics_mlflow.model.trained import TrainedEmbedder, load_embedder

REPO = Path(__file__).resolve().parents[1]


def finished(action: Callable[[], object]) -> None:
    """Run ``action`` and wait for the GPU work it queued, if any."""
    action()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def seconds(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    finished(action)
    return time.perf_counter() - start


def timed_ms(action: Callable[[], object]) -> tuple[float, float]:
    """(wall, CPU) milliseconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    finished(action)
    return (time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000


def summary(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values)}


def embed_seconds(module: TrainedEmbedder, engine: SearchEngine, taxonomy) -> float:
    """Seconds to embed every code from its tokens (tokenizing is cached, as in one process)."""
    tokens = tokenize_codes(taxonomy, engine.tokenizer, module.config.data_loader.tokenization)
    rows = np.arange(taxonomy.size)
    return seconds(
        lambda: module.encoder.embed_codes(
            module.encoder.code_features(tokens, dtype=engine.backbone.dtype), rows
        )
    )


def latencies_ms(action: Callable[[str], object], queries: list[str]) -> np.ndarray:
    """``(len(queries), 2)``: wall and CPU milliseconds of ``action`` on each query."""
    return np.array([timed_ms(lambda q=query: action(q)) for query in queries])


def percentiles(runs: list[np.ndarray], q: int) -> dict[str, dict[str, float]]:
    """The ``q``-th percentile of each repeat, wall and CPU, summarised over the repeats."""
    return {
        clock: summary([float(np.percentile(run[:, column], q)) for run in runs])
        for column, clock in enumerate(("wall", "cpu"))
    }


def query_parts(engine: SearchEngine) -> dict[str, Callable[[str], object]]:
    """One query's steps, each callable alone, in the order ``search`` runs them."""
    encoder = engine.embedder.encoder
    rows = engine.candidates(MAX_LEVEL)

    def batch(query: str) -> TextBatch:
        ids = query_ids([query], engine.tokenizer, engine.settings.query_max_length).ids
        ids = torch.from_numpy(ids[0])[None]
        texts = TextBatch(ids, torch.ones_like(ids), torch.zeros(1, dtype=torch.long))
        return TextBatch(*(t.to(engine.backbone.device) for t in texts))

    features = encoder.query_features(engine.backbone, batch("soybean farming"))
    embedded = encoder.head(features).embeddings
    return {
        "tokenize": batch,
        "backbone (both query channels)": lambda q: encoder.query_features(
            engine.backbone, batch(q)
        ),
        "head (mixture of experts, projection)": lambda q: encoder.head(features),
        "lexical (BM25)": lambda q: engine.lexical.scores([q]),
        "nearest index item": lambda q: engine.items.nearest_similarity(
            features["examples"], len(engine.codes)
        ),
        "distances to the candidates": lambda q: engine.distances(embedded, rows),
        "search, whole": lambda q: engine.search([q]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from-checkpoint", type=Path, required=True, metavar="PATH")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument(
        "--config",
        type=Path,
        default=REPO / "conf" / "config.yaml",
        help="the search settings (search.*) come from this file, as the commands take them",
    )
    parser.add_argument("--queries", type=int, default=200, help="held-out items searched")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument(
        "--backbone-dtype",
        choices=("auto", "float32", "bfloat16"),
        help="search.backbone_dtype (default: the config's)",
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), help="search.device (default: the config's)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)

    overrides = [
        f"search.{key}={value}"
        for key, value in (("backbone_dtype", args.backbone_dtype), ("device", args.device))
        if value
    ]
    settings = load_config(args.config, overrides).search
    module = load_embedder(args.from_checkpoint, inference_device(settings.device))
    taxonomy = load_taxonomy(args.data_dir)
    engine = SearchEngine.build(module, taxonomy, settings)
    queries = pd.read_parquet(args.data_dir / HOLDOUT_FILE)["text"].tolist()[: args.queries]
    engine.search(queries[:5])  # warm-up

    report: dict[str, object] = {
        "threads": torch.get_num_threads(),
        "backbone_dtype": dtype_name(engine.backbone.dtype),
        "device": str(engine.backbone.device),
        "queries": len(queries),
    }
    report["embed_all_codes_s"] = summary(
        [embed_seconds(module, engine, taxonomy) for _ in range(args.repeats)]
    )
    runs = [latencies_ms(lambda q: engine.search([q]), queries) for _ in range(args.repeats)]
    report["search_p50_ms"] = percentiles(runs, 50)
    report["search_p95_ms"] = percentiles(runs, 95)
    step = max(1, taxonomy.size // len(queries))
    codes = [display_code(code) for code in taxonomy.codes[::step]][: len(queries)]
    runs = [latencies_ms(lambda q: engine.search([q]), codes) for _ in range(args.repeats)]
    report["code_search_p50_ms"] = percentiles(runs, 50)
    report["code_search_p95_ms"] = percentiles(runs, 95)
    report["parts_p50_ms"] = {
        name: percentiles([latencies_ms(part, queries) for _ in range(args.repeats)], 50)
        for name, part in query_parts(engine).items()
    }
    batched = [seconds(lambda: engine.search(queries)) for _ in range(args.repeats)]
    report["batched_queries_per_s"] = summary([len(queries) / s for s in batched])
    if args.json:
        print(json.dumps(report))
        return
    print(
        f"{report['threads']} threads, {report['backbone_dtype']} backbone on "
        f"{report['device']} (search.backbone_dtype {settings.backbone_dtype}); min / median of "
        f"{args.repeats} repeats; wall | CPU time"
    )
    print(f"embed all {taxonomy.size} codes: {format_summary(report['embed_all_codes_s'], 's')}")
    for label, key in (
        (f"search, {len(queries)} single queries, ", "search"),
        (f"search, {len(codes)} codes, ", "code_search"),
    ):
        print(f"{label}p50: {format_clocks(report[f'{key}_p50_ms'])}")
        print(f"{'':>{len(label)}}p95: {format_clocks(report[f'{key}_p95_ms'])}")
    for name, values in report["parts_p50_ms"].items():
        print(f"  {name:<38} p50: {format_clocks(values)}")
    rate = report["batched_queries_per_s"]
    print(f"batched search: {rate['min']:.0f} / {rate['median']:.0f} queries/s")


def format_clocks(values: dict[str, dict[str, float]]) -> str:
    return f"{format_summary(values['wall'])} | {format_summary(values['cpu'])}"


def format_summary(values: dict[str, float], unit: str = "ms") -> str:
    return f"{values['min']:.1f} / {values['median']:.1f} {unit}"


if __name__ == "__main__":
    main()
