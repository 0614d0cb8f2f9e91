"""The lexical index, the untrained-backbone baselines and the scoring they share."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

from naics_mlflow.config import load_config
from naics_mlflow.data.pretrained import DEFAULT_BACKBONE, load_tokenizer
from naics_mlflow.data.taxonomy import Taxonomy
from naics_mlflow.data.tokenization import SEMANTIC_CHANNELS
from naics_mlflow.evaluation.baselines import UntrainedBackbone, score_retrieval
from naics_mlflow.evaluation.lexical import (
    EXCEPTED,
    EXCEPTION,
    K1,
    B,
    LexicalIndex,
    code_documents,
    one_edit_away,
    singular,
    six_digit_rows,
    text_words,
    whole_words,
)
from naics_mlflow.evaluation.metrics import retrieval_metrics
from naics_mlflow.model.lorentz import expmap0

REPO = Path(__file__).resolve().parents[1]
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


def test_six_digit_rows_and_code_documents():
    taxonomy = _tiny_taxonomy()
    rows = six_digit_rows(taxonomy)
    assert rows.tolist() == [1, 2, 3]
    assert code_documents(taxonomy, rows) == [
        "Soybean Farming. Growing soybeans. soybean farming. soybean farms",
        "Oilseed Farming. canola farming",  # the empty description leaves no ". ." behind
        "Dry Pea Farming. Growing peas",
    ]


def test_lexical_index_ranks_the_matching_code_first():
    queries = ["soybean farming", "software publishing company", "freight trucking"]
    scores = LexicalIndex(CODE_TEXTS).scores(queries)
    assert scores.shape == (3, 3)
    assert scores.argmax(axis=1).tolist() == [0, 1, 2]


def _bm25_by_the_formula(
    documents: list[str], queries: list[str], read_as: Callable[[str], list[str]]
) -> np.ndarray:
    """BM25 as written in textbooks, over scikit-learn's word and word-pair counts of singular
    words, an "(except ...)" clause's marked (a query's as ``read_as`` reads them): each query's
    distinct known terms summed, over their most (every term's ``idf * (k1 + 1)``)."""
    from sklearn.feature_extraction.text import CountVectorizer

    words = CountVectorizer().build_tokenizer()

    def marked_words(text: str) -> list[str]:
        read, start = [], 0
        for clause in EXCEPTION.finditer(text):
            read += [singular(word) for word in words(text[start : clause.start()])]
            read += [EXCEPTED + singular(word) for word in words(clause.group(1))]
            start = clause.end()
        return read + [singular(word) for word in words(text[start:])]

    vectorizer = CountVectorizer(ngram_range=(1, 2), tokenizer=marked_words, token_pattern=None)
    tf = vectorizer.fit_transform(documents).toarray().astype(np.float64)
    query_vectorizer = CountVectorizer(
        ngram_range=(1, 2),
        tokenizer=lambda text: [known for word in marked_words(text) for known in read_as(word)],
        token_pattern=None,
        vocabulary=vectorizer.vocabulary_,
    )
    present = query_vectorizer.transform(queries).toarray() > 0
    df = (tf > 0).sum(axis=0)
    idf = np.log(1 + (len(documents) - df + 0.5) / (df + 0.5))
    length = tf.sum(axis=1, keepdims=True)
    saturation = K1 * (1 - B + B * length / length.mean())
    weights = idf * tf * (K1 + 1) / (tf + saturation)
    best = present @ (idf * (K1 + 1))
    return np.divide(
        present @ weights.T,
        best[:, None],
        where=best[:, None] > 0,
        out=np.zeros((len(queries), len(documents))),
    )


@pytest.mark.parametrize("real_documents", [False, True], ids=["made_up", "national_industries"])
def test_lexical_scores_are_bm25_by_the_formula(request, real_documents):
    """The index computes BM25 itself (see ``LexicalIndex``); it must count repeated words, case,
    punctuation, accents, word pairs and unknown words as scikit-learn's tokenizer does."""
    queries = [
        "soybean soybean soybean farming farms",
        "Software-publishing, software PUBLISHING",
        "zebra",
        "",
        "freight trucking of soybean",
        "Café crème brûlée, naïve résumé writing services",
        "Casino hotels (except motels)",
    ]
    documents = [
        *CODE_TEXTS,
        "Crème brûlée café. Résumé writing services",
        "Hotels (except Casino Hotels) and Motels",
    ]
    if real_documents:
        taxonomy = request.getfixturevalue("taxonomy")
        documents = code_documents(taxonomy, six_digit_rows(taxonomy))
        queries += [taxonomy.examples[row][0] for row in six_digit_rows(taxonomy)[::50]]
    index = LexicalIndex(documents)
    scores = index.scores(queries)
    np.testing.assert_allclose(
        scores, _bm25_by_the_formula(documents, queries, index.read_as), rtol=1e-5
    )
    assert ((scores >= 0) & (scores <= 1)).all()


def test_lexical_scores_reach_one_only_at_saturation():
    # A term repeated many times saturates: a query of that term alone nears the most it can score.
    index = LexicalIndex(["soybean " * 200, "freight trucking", "software"])
    scores = index.scores(["soybean", "freight trucking", "soybean freight"])
    assert 0.98 < scores[0, 0] < 1.0
    assert 0.3 < scores[1, 1] < scores[0, 0]
    # Half of the query's weight matches each document: neither reaches one.
    assert scores[2, 0] < 0.6 and scores[2, 1] < 0.6


def test_lexical_index_is_fitted_on_code_documents_only():
    index = LexicalIndex(CODE_TEXTS)
    assert (index.scores(["zebra quantum"]) == 0.0).all()
    # Fitting on the queries too would change document counts, hence IDF, hence these scores.
    alone = index.scores(["soybean software"])
    with_others = index.scores(["soybean software", "software software software", "soybean zebra"])
    np.testing.assert_array_equal(with_others[:1], alone)


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("cars", "car"),
        ("dealers", "dealer"),
        ("batteries", "battery"),
        ("shoes", "shoe"),
        ("trees", "tree"),
        ("glass", "glass"),
        ("bus", "bus"),
        ("gas", "gas"),
        ("farming", "farming"),
    ],
)
def test_singular_folds_plural_endings_only(word, expected):
    assert singular(word) == expected


def test_lexical_index_matches_words_in_either_number():
    index = LexicalIndex(["Used car dealers", "Used merchandise retailers", "Battery stores"])
    scores = index.scores(["we sell used cars", "used car dealer", "batteries"])
    assert scores.argmax(axis=1).tolist() == [0, 0, 2]
    # The same words in the other number score as those of the document.
    np.testing.assert_array_equal(index.scores(["used cars"]), index.scores(["used car"]))


def test_excepted_words_only_meet_excepted_words():
    documents = ["Hotels (except Casino Hotels) and Motels", "Casino Hotels", "Potato Farming"]
    index = LexicalIndex([*documents, "Other Vegetable (except Potato) and Melon Farming"])
    assert text_words("Wheat (except oilseed(s)) farming") == ["wheat", "~oilseed", "farming"]
    # What a code excludes is no match for a query about it...
    scores = index.scores(["casino", "potato"])
    assert scores[0, 0] == 0 and scores[0, 1] > 0
    assert scores[1, 3] == 0 and scores[1, 2] > 0
    # ...but two texts that exclude the same thing meet.
    assert index.scores(["Vegetable farming (except potato)"]).argmax() == 3


def test_one_edit_away_deletes_swaps_replaces_and_inserts_one_letter():
    near = one_edit_away("cart")
    assert {"cat", "crat", "card", "carts", "scart"} <= near
    assert not {"ca", "tracs", "carts s", "dog"} & near


def test_lexical_index_reads_a_misspelt_word_as_the_documents_word():
    documents = ["Full-service restaurants", "Stacker cranes", "Stocker cattle"]
    index = LexicalIndex([*documents, "Farming corn", "Farming", "Forming metal"])
    np.testing.assert_array_equal(index.scores(["resturant"]), index.scores(["restaurant"]))
    assert index.scores(["resturant"]).argmax() == 0
    # A word a document holds is never read as another.
    assert index.scores(["stocker"]).argmax() == 2 and index.scores(["stocker"])[0, 1] == 0
    # Of two words one edit away, the one more documents hold ("farming", not "forming").
    np.testing.assert_array_equal(index.scores(["fxrming"]), index.scores(["farming"]))
    # Short words have too many neighbours to guess from: "frm" stays unknown.
    assert (index.scores(["frm"]) == 0).all()
    np.testing.assert_array_equal(index.scores(["cattlle crane"]), index.scores(["cattle crane"]))


def test_corrected_text_reads_each_word_as_bm25_does():
    index = LexicalIndex(["Full-service restaurants", "Seed production"], frozenset({"across"}))
    assert index.corrected("Resturant, seedproduction") == "restaurant, seed production"
    # Words it reads as written stay as written: known in either number, or spelt right.
    assert index.corrected("Restaurants across town") == "Restaurants across town"


def test_words_spelt_right_are_never_corrected():
    documents = ["Cross-country skiing instruction", "Farm drainage", "Hand tools", "Crank shafts"]
    unguarded = LexicalIndex(documents)
    assert unguarded.read_as("across") == ["cross"]
    assert unguarded.read_as("farmhand") == ["farm", "hand"]
    assert unguarded.read_as("crane") == ["crank"]
    index = LexicalIndex(documents, spelt_right=frozenset({"across", "farmhand", "cranes"}))
    assert index.read_as("across") == ["across"]
    assert index.read_as("farmhand") == ["farmhand"]
    # Held in the singular, as a query's words are read: "cranes" is "crane".
    assert index.read_as("crane") == ["crane"]
    assert index.read_as("crosss") == ["cross"]  # a slip is still corrected
    assert (index.scores(["across the region"]) == 0).all()


def test_whole_words_of_a_tokenizer_are_its_words_not_its_pieces():
    tokenizer = load_tokenizer(DEFAULT_BACKBONE)
    words = whole_words(tokenizer.get_vocab())
    assert {"across", "downtown", "restaurant"} <= words
    assert not {"##ing", "[CLS]", "resturant", "1998"} & words


def test_lexical_index_reads_two_words_run_together_as_both():
    index = LexicalIndex(["Seed production", "Metal forming", "Cattle feed", "Stacker cranes"])
    np.testing.assert_array_equal(
        index.scores(["seedproduction", "metalsforming"]),
        index.scores(["seed production", "metal forming"]),
    )
    assert index.read_as("cattlesfeed") == ["cattle", "feed"]
    # One slip is tried first, and a word a document holds is never split ("stacker": not "stack").
    assert index.read_as("cranez") == ["crane"]
    assert index.read_as("stacker") == ["stacker"]
    # Halves of at least 3 letters only: "feedxy" is not "feed" and "xy".
    assert index.read_as("feedxy") == ["feedxy"]


def test_lexical_bigrams_reward_word_order():
    scores = LexicalIndex(["farm machinery", "machinery farm"]).scores(["farm machinery"])
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


@pytest.fixture(scope="module")
def untrained(tiny_overrides, taxonomy) -> UntrainedBackbone:
    # An embedding as wide as the backbone's hidden size (32): the projection keeps angles.
    overrides = [*tiny_overrides, "model.embedding_dim=32"]
    config = load_config(REPO / "conf" / "config.yaml", overrides)
    return UntrainedBackbone(config, taxonomy, torch.device("cpu"), config.search.query_max_length)


def test_nearest_item_scores_find_a_codes_own_item(untrained, taxonomy):
    rows = six_digit_rows(taxonomy)
    with_items = [i for i, row in enumerate(rows) if taxonomy.examples[row]][:5]
    texts = [taxonomy.examples[rows[i]][0] for i in with_items]
    scores = untrained.nearest_item_scores(texts, rows)
    assert scores.shape == (len(texts), len(rows))
    for query, column in enumerate(with_items):
        assert scores[query, column] == pytest.approx(1.0, abs=1e-5)  # the item itself
    without_items = [i for i, row in enumerate(rows) if not taxonomy.examples[row]]
    assert without_items and (scores[:, without_items] == 0.0).all()
    # Blocks of queries change nothing.
    torch.testing.assert_close(
        untrained.nearest_item_scores(texts[:2], rows), scores[:2], atol=1e-6, rtol=0
    )


def test_untrained_model_ranks_by_the_backbones_cosine(untrained, taxonomy):
    rows = six_digit_rows(taxonomy)[:200]
    texts = ["grow soybeans", "write and sell computer software", "haul cargo by truck"]
    distances = untrained.embedding_distances(texts, rows)
    queries = untrained._query_features(texts)
    query_means = torch.nn.functional.normalize(queries["title"] + queries["examples"], dim=-1)
    codes = untrained.features.of_codes(torch.from_numpy(rows))
    code_means = torch.nn.functional.normalize(sum(codes[c] for c in SEMANTIC_CHANNELS), dim=-1)
    cosine = query_means @ code_means.T
    for query in range(len(texts)):
        correlation = scipy.stats.spearmanr(distances[query], -cosine[query]).statistic
        assert correlation > 0.999
