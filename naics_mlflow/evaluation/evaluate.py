"""``naics-embedder evaluate``: hierarchy metrics over all codes and text-to-code retrieval on the
evaluation query sets, for the trained model and two baselines computed on the same queries."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from naics_mlflow.data.taxonomy import HOLDOUT_FILE, Taxonomy
from naics_mlflow.errors import UserError
from naics_mlflow.evaluation.baselines import (
    backbone_scores,
    code_documents,
    score_retrieval,
    six_digit_rows,
    tfidf_scores,
    title_and_description,
)
from naics_mlflow.evaluation.metrics import hierarchy_metrics, retrieval_metrics
from naics_mlflow.evaluation.retrieval import SearchEngine

SYSTEMS = ("model", "backbone", "tfidf")
SYSTEM_NAMES = {
    "model": "trained model",
    "backbone": "untrained backbone (cosine, title + description)",
    "tfidf": "TF-IDF (title + description + training items)",
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


@dataclass(frozen=True)
class QuerySet:
    name: str
    texts: list[str]
    codes: list[str]


def load_query_sets(data_dir: Path, unseen_queries: Path, known_codes: set[str]) -> list[QuerySet]:
    """The held-out index items (never trained on) and the NAICS 2017 unseen phrasings
    (evaluation only: never used for training or tuning)."""
    holdout = pq.read_table(data_dir / HOLDOUT_FILE).to_pydict()
    if not unseen_queries.is_file():
        raise UserError(
            f"evaluation queries {unseen_queries} not found; pass --unseen-queries PATH or set "
            "evaluation.unseen_queries"
        )
    with unseen_queries.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not {"code", "text"} <= set(reader.fieldnames or []):
            raise UserError(f"{unseen_queries} must have the columns code,text")
        unseen = list(reader)
    for line, row in enumerate(unseen, start=2):
        if row["code"].strip() not in known_codes:
            raise UserError(
                f"{unseen_queries} line {line}: code {row['code']!r} is not a NAICS 2022 code"
            )
    return [
        QuerySet("holdout", holdout["text"], holdout["code"]),
        QuerySet(
            "unseen_2017", [row["text"] for row in unseen], [row["code"].strip() for row in unseen]
        ),
    ]


@dataclass
class EvaluationReport:
    hierarchy: dict[str, float]
    # query set -> system -> metric -> value
    retrieval: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)

    def beats_baselines(self, query_set: str, metric: str = "top5") -> bool:
        scores = self.retrieval[query_set]
        return all(scores["model"][metric] > scores[s][metric] for s in SYSTEMS[1:] if s in scores)

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
            "retrieval": self.retrieval,
            "model_beats_baselines_top5": {q: self.beats_baselines(q) for q in self.retrieval},
        }

    def table(self) -> str:
        lines = [
            "hierarchy (all codes): "
            + ", ".join(
                f"{name}={self.hierarchy[f'val/{name}']:.4f}"
                for name in ("spearman", "pearson", "ndcg_at_10", "mean_distortion")
            )
        ]
        header = f"{'query set':<12} {'system':<50}" + "".join(
            f"{column:>9}" for column in TABLE_COLUMNS.values()
        )
        for query_set, systems in self.retrieval.items():
            lines += ["", header]
            for system, values in systems.items():
                cells = "".join(f"{values[metric]:>9.4f}" for metric in TABLE_COLUMNS)
                lines.append(f"{query_set:<12} {SYSTEM_NAMES[system]:<50}{cells}")
            verdict = "beats" if self.beats_baselines(query_set) else "does NOT beat"
            lines.append(f"the trained model {verdict} both baselines on top-5 for {query_set}")
        return "\n".join(lines)


def evaluate(
    engine: SearchEngine, taxonomy: Taxonomy, query_sets: list[QuerySet], baselines: bool = True
) -> EvaluationReport:
    curvature = engine.embedder.config.loss.curvature
    report = EvaluationReport(
        hierarchy=hierarchy_metrics(
            engine.code_embeddings, taxonomy.distance, taxonomy.levels, curvature
        )
    )
    rows = six_digit_rows(taxonomy)
    candidates = [taxonomy.codes[row] for row in rows]
    candidate_embeddings = engine.code_embeddings[rows]
    backbone = engine.embedder.config.model.base_model_name
    for query_set in query_sets:
        systems = {
            "model": retrieval_metrics(
                engine.embed_queries(query_set.texts),
                candidate_embeddings,
                query_set.codes,
                candidates,
                curvature,
            )
        }
        if baselines:
            scores = {
                "backbone": backbone_scores(
                    title_and_description(taxonomy, rows), query_set.texts, backbone
                ),
                "tfidf": tfidf_scores(code_documents(taxonomy, rows), query_set.texts),
            }
            systems.update(
                {
                    name: score_retrieval(np.asarray(value), query_set.codes, candidates)
                    for name, value in scores.items()
                }
            )
        report.retrieval[query_set.name] = systems
    return report
