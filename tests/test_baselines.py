import re
from pathlib import Path

import numpy as np
import pytest
import torch

from naics_mlflow.data.taxonomy import Taxonomy
from naics_mlflow.evaluation.baselines import (
    backbone_scores,
    code_documents,
    score_retrieval,
    six_digit_rows,
    tfidf_scores,
    title_and_description,
)
from naics_mlflow.evaluation.metrics import retrieval_metrics
from naics_mlflow.model.encoder import DEFAULT_BACKBONE
from naics_mlflow.model.lorentz import expmap0

CODE_TEXTS = [
    "Soybean Farming. Growing soybeans and producing soybean seeds",
    "Software Publishers. Publishing computer software and software applications",
    "General Freight Trucking. Trucking of general freight over long distances",
]
KEYS = {"top1", "top5", "mrr", "prefix2_accuracy", "prefix3_accuracy", "prefix4_accuracy"}


def _tiny_taxonomy() -> Taxonomy:
    """A sector and three six-digit codes, one without a description."""
    n = 4
    return Taxonomy(
        codes=["11", "111110", "111120", "111130"],
        levels=np.array([2, 6, 6, 6], np.int8),
        parents=np.array([-1, 0, 0, 0], np.int32),
        titles=["Agriculture", "Soybean Farming", "Oilseed Farming", "Dry Pea Farming"],
        descriptions=["Farms.", "Growing soybeans", "", "Growing peas"],
        examples=[[], ["soybean farming", "soybean farms"], ["canola farming"], []],
        excluded=[[]] * n,
        excluded_codes=[[]] * n,
        distance=np.zeros((n, n), np.int8),
        relation=np.zeros((n, n), np.int8),
    )


def test_six_digit_rows_and_code_texts():
    taxonomy = _tiny_taxonomy()
    rows = six_digit_rows(taxonomy)
    assert rows.tolist() == [1, 2, 3]
    assert code_documents(taxonomy, rows) == [
        "Soybean Farming. Growing soybeans. soybean farming. soybean farms",
        "Oilseed Farming. canola farming",  # the empty description leaves no ". ." behind
        "Dry Pea Farming. Growing peas",
    ]
    assert title_and_description(taxonomy, rows) == [
        "Soybean Farming. Growing soybeans",
        "Oilseed Farming",
        "Dry Pea Farming. Growing peas",
    ]


def test_tfidf_ranks_the_matching_code_first():
    queries = ["soybean farming", "software publishing company", "freight trucking"]
    scores = tfidf_scores(CODE_TEXTS, queries)
    assert scores.shape == (3, 3)
    assert scores.argmax(axis=1).tolist() == [0, 1, 2]


def test_tfidf_is_fitted_on_code_texts_only():
    unseen = tfidf_scores(CODE_TEXTS, ["zebra quantum"])
    assert (unseen == 0.0).all()
    # Fitting on the queries too would change document counts, hence IDF, hence these scores.
    alone = tfidf_scores(CODE_TEXTS, ["soybean software"])
    with_others = tfidf_scores(
        CODE_TEXTS, ["soybean software", "software software software", "soybean zebra"]
    )
    np.testing.assert_array_equal(with_others[:1], alone)


def test_tfidf_bigrams_reward_word_order():
    scores = tfidf_scores(["farm machinery", "machinery farm"], ["farm machinery"])
    assert scores[0, 0] > scores[0, 1] > 0.0


# Columns, and per query the true code and its scores. Ranks 1, 3, 0, 2, 6, 6, 0.
CANDIDATES = ["311111", "321111", "111111", "112111", "111120", "441111"]
SCORED = [
    ("311111", [0.9, 0.1, 0.2, 0.3, 0.0, 0.0]),  # rank 1, every prefix hits
    ("321111", [0.8, 0.5, 0.5, 0.1, 0.0, 0.0]),  # tie with 111111: rank 3; top 311111 hits 31
    ("999999", [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]),  # not a candidate: rank 0, top 111111 misses
    ("111120", [0.1, 0.2, 0.9, 0.3, 0.4, 0.0]),  # rank 2, top 111111 hits 11, 111, 1111
    ("112111", [0.6, 0.5, 0.4, 0.0, 0.7, 0.1]),  # last: rank 6, top 111120 hits 11 only
    ("111111", [0.3, 0.3, 0.3, 0.3, 0.3, 0.3]),  # all tied: rank 6, top (first) 311111 misses
    ("452111", [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]),  # absent, but top 441111 shares sector 44
]


def test_score_retrieval_by_hand():
    scores = np.array([row for _, row in SCORED])
    metrics = score_retrieval(scores, [code for code, _ in SCORED], CANDIDATES)
    assert set(metrics) == KEYS
    assert metrics["top1"] == pytest.approx(1 / 7)
    assert metrics["top5"] == pytest.approx(3 / 7)
    assert metrics["mrr"] == pytest.approx((1 + 1 / 3 + 0 + 1 / 2 + 1 / 6 + 1 / 6 + 0) / 7)
    assert metrics["prefix2_accuracy"] == pytest.approx(5 / 7)
    assert metrics["prefix3_accuracy"] == pytest.approx(2 / 7)
    assert metrics["prefix4_accuracy"] == pytest.approx(2 / 7)


def test_score_retrieval_rejects_a_row_count_mismatch():
    with pytest.raises(ValueError, match="rows"):
        score_retrieval(np.zeros((2, 2)), ["311111"], ["311111", "321111"])


def test_scores_and_lorentz_distances_of_the_same_ranking_score_the_same():
    # Points on one geodesic through the origin, where distance is |t_q - t_c|; scores that
    # decrease with it give the same ranking, so both paths must report identical metrics.
    code_positions = torch.tensor([-3.0, -2.0, -1.0, 0.0, 1.0, 2.0])
    query_positions = torch.tensor([-2.9, -2.6, -0.8, 1.3, 0.35, -1.55, 1.9])
    true_codes = [code for code, _ in SCORED]
    scores = torch.exp(-(query_positions[:, None] - code_positions[None, :]).abs()).numpy()

    def on_line(positions: torch.Tensor) -> torch.Tensor:
        return expmap0(torch.stack([positions, torch.zeros_like(positions)], dim=1), 1.0)

    lorentz = retrieval_metrics(
        on_line(query_positions), on_line(code_positions), true_codes, CANDIDATES, 1.0, chunk_size=3
    )
    from_scores = score_retrieval(scores, true_codes, CANDIDATES)
    assert from_scores == lorentz
    assert 0.0 < lorentz["top1"] < lorentz["top5"] < 1.0  # a ranking that tells them apart


QUERIES = ["grow soybeans", "write and sell computer software", "haul cargo", CODE_TEXTS[2]]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised one-layer BERT saved like any Hugging Face model folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    words = sorted(
        {w for text in [*CODE_TEXTS, *QUERIES] for w in re.findall(r"[a-z]+", text.lower())}
    )
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *words]
    (folder / "vocab.txt").write_text("\n".join(vocabulary) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocabulary),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    BertModel(config).save_pretrained(folder)
    return folder


def test_backbone_scores_are_cosines(tiny_bert: Path):
    scores = backbone_scores(CODE_TEXTS, QUERIES, str(tiny_bert))
    assert scores.shape == (len(QUERIES), len(CODE_TEXTS))
    assert (np.abs(scores) <= 1.0 + 1e-6).all()
    assert scores[3, 2] == pytest.approx(1.0, abs=1e-6)  # the same text on both sides


def test_backbone_scores_do_not_depend_on_order_or_batching(tiny_bert: Path):
    scores = backbone_scores(CODE_TEXTS, QUERIES, str(tiny_bert))
    code_order, query_order = [2, 0, 1], [1, 3, 0, 2]
    shuffled = backbone_scores(
        [CODE_TEXTS[i] for i in code_order],
        [QUERIES[i] for i in query_order],
        str(tiny_bert),
        batch_size=2,
    )
    np.testing.assert_allclose(shuffled, scores[np.ix_(query_order, code_order)], atol=1e-5)
    one_by_one = backbone_scores(CODE_TEXTS, QUERIES, str(tiny_bert), batch_size=1)
    np.testing.assert_allclose(one_by_one, scores, atol=1e-5)  # padding is masked out


def test_default_backbone_finds_the_obvious_code():
    queries = ["grow soybeans", "develop and sell computer programs", "haul cargo by truck"]
    scores = backbone_scores(CODE_TEXTS, queries, DEFAULT_BACKBONE)
    assert scores.argmax(axis=1).tolist() == [0, 1, 2]
