"""The lexical signal: TF-IDF over each national industry's own words.

Search adds it to the embedding's score (``SearchEngine``), and ``evaluate`` reports it alone as
the TF-IDF baseline, so both use this one index. A six-digit code's document is its title, its
description and its examples: its training index items and the activities cross-references
classify in it (dev and held-out items are never among them). Words carry
what an embedding of a short text can blur: a product name, a material, a regulated activity.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer

from naics_mlflow.data.taxonomy import MAX_LEVEL, Taxonomy

SEPARATOR = ". "


def six_digit_rows(taxonomy: Taxonomy) -> np.ndarray:
    """``(C,)`` int64 rows of the national industries (level 6), in taxonomy order.

    Queries describe a business, which the Census files under one six-digit code, so only those
    are candidates.
    """
    return np.flatnonzero(taxonomy.levels == MAX_LEVEL)


def join_texts(parts: Sequence[str]) -> str:
    """Non-empty parts joined by ``". "``; empty ones would leave ``". . "`` noise."""
    return SEPARATOR.join(part for part in parts if part)


def code_documents(taxonomy: Taxonomy, rows: Sequence[int]) -> list[str]:
    """``title. description. item. item...`` per row."""
    return [
        join_texts([taxonomy.titles[row], taxonomy.descriptions[row], *taxonomy.examples[row]])
        for row in rows
    ]


class LexicalIndex:
    """TF-IDF vectors of code documents; :meth:`scores` gives the cosine of queries with each.

    The vocabulary and IDF are fitted on the documents only, so a query's scores do not depend
    on the other queries and a word no code uses contributes nothing. Sublinear TF keeps a word
    repeated across many index items from dominating; bigrams reward phrases such as "oil seed".
    Rows are L2-normalised, so the dot product is the cosine.
    """

    def __init__(self, documents: Sequence[str]) -> None:
        self.texts = list(documents)
        self.vectorizer = TfidfVectorizer(
            lowercase=True, ngram_range=(1, 2), min_df=1, sublinear_tf=True, norm="l2"
        )
        self.documents = self.vectorizer.fit_transform(self.texts)
        # (terms, C) in CSR, built once: a query's few terms then read only their own rows.
        # ``documents.T`` is CSC, which every product would convert whole again (~15 ms a query).
        self.by_term = self.documents.T.tocsr()
        self._analyze = self.vectorizer.build_analyzer()
        self._vocabulary = self.vectorizer.vocabulary_
        self._idf = self.vectorizer.idf_

    def query_vector(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """A query's TF-IDF vector as (term ids, weights), weighted as the documents are.

        Computed here rather than by ``vectorizer.transform``, whose input checks cost a
        millisecond a query, most of what ``search`` spends on the lexical signal.
        """
        counts = Counter(
            self._vocabulary[term] for term in self._analyze(text) if term in self._vocabulary
        )
        terms = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
        frequencies = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
        weights = (1.0 + np.log(frequencies)) * self._idf[terms]
        norm = np.linalg.norm(weights)
        return terms, weights / norm if norm > 0 else weights

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        """``(Q, C)`` float32 cosine of each query with each document, in [0, 1]."""
        scores = np.zeros((len(queries), self.by_term.shape[1]), dtype=np.float32)
        for row, text in enumerate(queries):
            terms, weights = self.query_vector(text)
            if len(terms):
                scores[row] = self.by_term[terms].T @ weights
        return scores
