"""``naics-embedder evaluate``: hierarchy metrics over all codes and text-to-code retrieval on the
dev, held-out and unseen query sets, for the trained model (as search ranks, and its embedding
alone) and the baselines, all computed on the same queries."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import torch

from naics_mlflow.data.taxonomy import DEV_FILE, HOLDOUT_FILE, Taxonomy
from naics_mlflow.errors import UserError
from naics_mlflow.evaluation.baselines import UntrainedBackbone, score_retrieval
from naics_mlflow.evaluation.lexical import six_digit_rows
from naics_mlflow.evaluation.metrics import hierarchy_metrics
from naics_mlflow.evaluation.queries import UnseenQueries
from naics_mlflow.evaluation.retrieval import SearchEngine

SYSTEM_NAMES = {
    "model": "trained model, as search ranks",
    "embedding": "trained model, embedding alone",
    "untrained": "untrained model (backbone, same channels)",
    "knn": "untrained backbone, nearest example",
    "bm25": "BM25 (title + description + examples)",
}
# Metric -> table column; prefixN: share of queries whose top code has the right first N digits.
TABLE_COLUMNS = {
    "top1": "top1",
    "top5": "top5",
    "mrr": "mrr",
    "prefix2_accuracy": "prefix2",
    "prefix3_accuracy": "prefix3",
    "prefix4_accuracy": "prefix4",
}
HIERARCHY_COLUMNS = (
    "spearman",
    "pearson",
    "ndcg_at_10",
    "mean_distortion",
    "radius_depth_spearman",
    "radius_level_monotonic",
)


@dataclass(frozen=True)
class QuerySet:
    name: str  # dev, holdout or unseen: the first part of its metrics' names
    texts: list[str]
    codes: list[str]
    source: Path  # the file it was read from, recorded with the evaluation


def load_query_sets(data_dir: Path, unseen: UnseenQueries, taxonomy: Taxonomy) -> list[QuerySet]:
    """The dev index items (where every modelling choice is made), the held-out index items and
    the unseen queries (by default the NAICS 2017 phrasings; both reported only: never trained or
    tuned on). Every query names a national industry, the only codes retrieval ranks."""
    dev = pq.read_table(data_dir / DEV_FILE).to_pydict()
    holdout = pq.read_table(data_dir / HOLDOUT_FILE).to_pydict()
    national_industries = {taxonomy.codes[row] for row in six_digit_rows(taxonomy)}
    wrong = [
        (line, code)
        for line, code in enumerate(unseen.codes, start=2)
        if code not in national_industries
    ]
    if len(wrong) == 1:
        ((line, code),) = wrong
        raise UserError(
            f"{unseen.path} line {line}: code {code!r} is not a six-digit NAICS 2022 code; "
            "give each query the national industry it belongs to"
        )
    if wrong:
        # A sample coded in another NAICS edition can hold dozens of such codes: the line says
        # how many and where the first are, rather than naming one a run.
        shown = ", ".join(f"line {line}: {code!r}" for line, code in wrong[:3])
        more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        raise UserError(
            f"{unseen.path}: {len(wrong)} of {len(unseen.codes)} codes are not six-digit NAICS "
            f"2022 codes ({shown}{more}); give each query the national industry it belongs to"
        )
    return [
        QuerySet("dev", dev["text"], dev["code"], data_dir / DEV_FILE),
        QuerySet("holdout", holdout["text"], holdout["code"], data_dir / HOLDOUT_FILE),
        # Named for its place, not its file: any file given to --unseen-queries logs the same
        # metrics, and the run's datasets say which file it was.
        QuerySet("unseen", unseen.texts, unseen.codes, unseen.path),
    ]


@dataclass
class EvaluationReport:
    hierarchy: dict[str, float]
    # query set -> system -> metric -> value
    retrieval: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    # query set -> {"source": the file it was read from, "queries": how many}
    query_sets: dict[str, dict[str, str | int]] = field(default_factory=dict)

    def winners(self, query_set: str) -> dict[str, list[str]]:
        """For each retrieval metric, the systems with the best value (several on a tie)."""
        systems = self.retrieval[query_set]
        best = {metric: max(v[metric] for v in systems.values()) for metric in TABLE_COLUMNS}
        return {
            metric: [name for name, values in systems.items() if values[metric] == value]
            for metric, value in best.items()
        }

    def metrics(self) -> dict[str, float]:
        """Flat metric names for MLflow: ``hierarchy/spearman``, ``holdout/model/top5``, ..."""
        flat = {f"hierarchy/{k.removeprefix('val/')}": v for k, v in self.hierarchy.items()}
        for query_set, systems in self.retrieval.items():
            for system, values in systems.items():
                flat.update({f"{query_set}/{system}/{k}": v for k, v in values.items()})
        return flat

    def as_dict(self) -> dict:
        return {
            "hierarchy": self.hierarchy,
            "query_sets": self.query_sets,
            "retrieval": self.retrieval,
            "winners": {query_set: self.winners(query_set) for query_set in self.retrieval},
        }

    def table(self) -> str:
        lines = [
            "hierarchy (all codes): "
            + ", ".join(f"{name}={self.hierarchy[f'val/{name}']:.4f}" for name in HIERARCHY_COLUMNS)
        ]
        header = f"{'query set':<12} {'system':<46}" + "".join(
            f"{column:>9}" for column in TABLE_COLUMNS.values()
        )
        for query_set, systems in self.retrieval.items():
            winners = self.winners(query_set)
            read = self.query_sets[query_set]
            lines += ["", f"{query_set}: {read['queries']:,} queries from {read['source']}", header]
            for system, values in systems.items():
                cells = "".join(
                    f"{values[metric]:>8.4f}{'*' if system in winners[metric] else ' '}"
                    for metric in TABLE_COLUMNS
                )
                lines.append(f"{query_set:<12} {SYSTEM_NAMES[system]:<46}{cells}")
            best_at = {
                system: [TABLE_COLUMNS[m] for m in TABLE_COLUMNS if system in winners[m]]
                for system in systems
            }
            summary = "; ".join(
                f"{SYSTEM_NAMES[system]}: {', '.join(columns)}"
                for system, columns in best_at.items()
                if columns
            )
            lines.append(f"best on {query_set} (*): {summary}")
        return "\n".join(lines)


def evaluate(
    engine: SearchEngine,
    taxonomy: Taxonomy,
    query_sets: list[QuerySet],
    baselines: bool = True,
    outputs_dir: Path | None = None,
) -> EvaluationReport:
    """The report of ``engine``'s model; the baselines' features are cached under
    ``outputs_dir`` (a head-only model's equal them)."""
    config = engine.embedder.config
    report = EvaluationReport(
        hierarchy=hierarchy_metrics(
            engine.code_embeddings, taxonomy.distance, taxonomy.levels, config.loss.curvature
        )
    )
    rows = six_digit_rows(taxonomy)
    candidates = [taxonomy.codes[row] for row in rows]
    untrained = (
        UntrainedBackbone(
            config,
            taxonomy,
            engine.embedder.device,
            engine.settings.query_max_length,
            outputs_dir,
        )
        if baselines
        else None
    )
    for query_set in query_sets:
        texts, codes = query_set.texts, query_set.codes
        queries = engine.read_queries(texts)
        distances = engine.distances(queries.encoded.embeddings, rows)
        count = len(texts)
        scores = {
            "model": queries.best(
                engine.scores(queries.texts, queries.encoded, distances, 6), count
            ),
            "embedding": queries.best(-distances, count),
        }
        if untrained is not None:
            scores["untrained"] = -untrained.embedding_distances(texts, rows)
            scores["knn"] = untrained.nearest_item_scores(texts, rows)
            scores["bm25"] = torch.from_numpy(engine.lexical.scores(texts))
        report.query_sets[query_set.name] = {"source": str(query_set.source), "queries": count}
        report.retrieval[query_set.name] = {
            name: score_retrieval(value, codes, candidates) for name, value in scores.items()
        }
    return report
