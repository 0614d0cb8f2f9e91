"""The lexical signal: TF-IDF over each national industry's own words.

Search adds it to the embedding's score (``SearchEngine``), and ``evaluate`` reports it alone as
the TF-IDF baseline, so both use this one index. A six-digit code's document is its title, its
description and its examples: its training index items and the activities cross-references
classify in it (dev and held-out items are never among them). Words carry
what an embedding of a short text can blur: a product name, a material, a regulated activity.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from naics_mlflow.data.taxonomy import MAX_LEVEL, Taxonomy

SEPARATOR = ". "
# A word: two or more word characters (scikit-learn's default token pattern).
WORD = re.compile(r"(?u)\b\w\w+\b")


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


def terms(text: str) -> list[str]:
    """The lowercased words of ``text`` and each pair of neighbouring words (a bigram)."""
    words = WORD.findall(text.lower())
    return [*words, *(" ".join(pair) for pair in itertools.pairwise(words))]


class LexicalIndex:
    """TF-IDF vectors of code documents; :meth:`scores` gives the cosine of queries with each.

    The weights are scikit-learn's ``TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)``:
    a term's weight is ``(1 + ln tf) * (1 + ln((1 + n) / (1 + df)))`` over ``n`` documents, each
    vector L2-normalised so that the dot product is the cosine (``tests/test_baselines.py`` holds
    the two equal). Computed here because importing scikit-learn costs a ``search`` about a
    second, more than its index takes to build.

    The vocabulary and IDF come from the documents only, so a query's scores do not depend on
    the other queries and a word no code uses contributes nothing. Sublinear TF keeps a word
    repeated across many index items from dominating; bigrams reward phrases such as "oil seed".
    """

    def __init__(self, documents: Sequence[str]) -> None:
        self.texts = list(documents)
        counts = [Counter(terms(text)) for text in self.texts]
        self._vocabulary = {term: i for i, term in enumerate(sorted(set().union(*counts)))}
        term_ids = [
            np.fromiter((self._vocabulary[t] for t in c), dtype=np.int64, count=len(c))
            for c in counts
        ]
        frequency = np.bincount(np.concatenate(term_ids), minlength=len(self._vocabulary))
        self._idf = np.log((1.0 + len(counts)) / (1.0 + frequency)) + 1.0
        weights = [self._weigh(ids, c.values()) for ids, c in zip(term_ids, counts, strict=True)]
        # By term: a query's few terms then read only the documents that hold them.
        term_of = np.concatenate(term_ids)
        document_of = np.repeat(np.arange(len(counts)), [len(ids) for ids in term_ids])
        order = np.argsort(term_of, kind="stable")
        self._starts = np.searchsorted(term_of[order], np.arange(len(self._vocabulary) + 1))
        self._documents = document_of[order]
        self._weights = np.concatenate(weights)[order]

    def _weigh(self, term_ids: np.ndarray, frequencies) -> np.ndarray:
        """The unit TF-IDF weights of one text's terms (``term_ids``, counted ``frequencies``)."""
        counts = np.fromiter(frequencies, dtype=np.float64, count=len(term_ids))
        weights = (1.0 + np.log(counts)) * self._idf[term_ids]
        norm = np.linalg.norm(weights)
        return weights / norm if norm > 0 else weights

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        """``(Q, C)`` float32 cosine of each query with each document, in [0, 1]."""
        scores = np.zeros((len(queries), len(self.texts)), dtype=np.float64)
        for row, text in enumerate(queries):
            counts = Counter(t for t in terms(text) if t in self._vocabulary)
            term_ids = np.fromiter((self._vocabulary[t] for t in counts), dtype=np.int64)
            for term, weight in zip(term_ids, self._weigh(term_ids, counts.values()), strict=True):
                start, end = self._starts[term], self._starts[term + 1]
                # A term occurs once in each document's vector: no document repeats in a slice.
                scores[row, self._documents[start:end]] += weight * self._weights[start:end]
        return scores.astype(np.float32)
