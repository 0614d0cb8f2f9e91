"""The lexical signal: BM25 over each national industry's own words.

Search adds it to the embedding's score (``SearchEngine``), and ``evaluate`` reports it alone as
the BM25 baseline, so both use this one index. A six-digit code's document is its title, its
description and its examples: its training index items and the activities cross-references
classify in it (dev and held-out items are never among them). Words carry
what an embedding of a short text can blur: a product name, a material, a regulated activity.
Words meet in either number ("used cars" and "used car dealers"), and a query's word that no
document holds is read as the documents' word one typing slip away ("resturant": "restaurant"),
or as two of their words run together ("seedproduction"). The words of an "(except ...)"
clause only meet the words of another.
"""

from __future__ import annotations

import itertools
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from naics_mlflow.data.taxonomy import MAX_LEVEL, Taxonomy

SEPARATOR = ". "
# A word: two or more word characters (scikit-learn's default token pattern).
WORD = re.compile(r"(?u)\b\w\w+\b")
# A clause that names what a code is not: "Hotels (except Casino Hotels) and Motels". One level
# of parentheses inside it is read as part of it ("(except oilseed(s) and grain(s))").
EXCEPTION = re.compile(r"\(except\b((?:[^()]|\([^()]*\))*)\)", re.IGNORECASE)
# What marks the words of such a clause as terms of their own ("~casino", "~hotel").
EXCEPTED = "~"


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


def singular(word: str) -> str:
    """``word`` (lowercase) with a plural ending removed, by Harman's S-stemmer.

    "cars" becomes "car", "batteries" "battery", "shoes" "shoe"; "glass", "bus" and "gas"
    stay. A description says "used cars" where the index says "used car dealers": folding
    number on both sides lets the words meet. The rule only touches ``-s`` endings, so words a
    full stemmer would join stay apart ("farming" and "farm"), and a few plurals do not meet
    their singular ("boxes" becomes "boxe"): on both sides alike, that costs only the match.
    """
    if len(word) <= 3 or word.endswith(("us", "ss")):
        return word
    if word.endswith("ies") and not word.endswith(("eies", "aies")):
        return word[:-3] + "y"
    if word.endswith("es") and not word.endswith(("aes", "ees", "oes")):
        return word[:-1]
    if word.endswith("s"):
        return word[:-1]
    return word


def text_words(text: str) -> list[str]:
    """The lowercased words of ``text``, each made singular (:func:`singular`), those of an
    "(except ...)" clause (:data:`EXCEPTION`) marked as excepted (``"~" + word``).

    What a code excludes is no match for a query about it: read as plain words, "casino hotel"
    would meet Hotels (except Casino Hotels) by the very words that exclude it. Marked, they
    only meet the same exclusion elsewhere, which two phrasings of one code often share
    ("Vegetable farming (except potato)" and Other Vegetable (except Potato) and Melon Farming).
    """
    text = text.lower()
    words, start = [], 0
    for clause in EXCEPTION.finditer(text):
        words += [singular(word) for word in WORD.findall(text, start, clause.start())]
        words += [EXCEPTED + singular(word) for word in WORD.findall(clause.group(1))]
        start = clause.end()
    return words + [singular(word) for word in WORD.findall(text, start)]


def terms(words: Sequence[str]) -> list[str]:
    """``words`` and each pair of neighbouring words (a bigram)."""
    return [*words, *(" ".join(pair) for pair in itertools.pairwise(words))]


def one_edit_away(word: str) -> set[str]:
    """Every string one deletion, swap of neighbours, replacement or insertion of a letter
    (a-z) away from ``word``, ``word`` itself among them: about ``54 * len(word)`` strings."""
    letters = string.ascii_lowercase
    splits = [(word[:i], word[i:]) for i in range(len(word) + 1)]
    return {
        *(head + tail[1:] for head, tail in splits if tail),
        *(head + tail[1] + tail[0] + tail[2:] for head, tail in splits if len(tail) > 1),
        *(head + letter + tail[1:] for head, tail in splits if tail for letter in letters),
        *(head + letter + tail for head, tail in splits for letter in letters),
    }


def whole_words(vocabulary: Iterable[str]) -> frozenset[str]:
    """The entries of a tokenizer's ``vocabulary`` that are whole words of letters: a WordPiece
    vocabulary's common English words ("across", "downtown"), not its pieces ("##ing")."""
    return frozenset(entry for entry in vocabulary if entry.isalpha())


# Shorter words have too many neighbours one edit away ("farm": "firm", "form", "harm") to guess
# which one was meant. Of 5, 6 and 7, 5 ranked dev and its misspelt copies best (docs/results.md).
MIN_CORRECTED_LENGTH = 5


# BM25's term-frequency saturation and document-length normalisation, chosen on dev with the
# search weights (docs/results.md): a plateau over k1 1.2-2.0 and b 0.1-0.3. A code's document is
# long because its index items are many, not because it is vague, hence the little weight on length.
K1 = 1.6
B = 0.2


class LexicalIndex:
    """BM25 scores of queries against code documents, scaled to [0, 1] by :meth:`scores`.

    A term (a word or a pair of neighbouring words, :func:`terms`) weighs
    ``idf * tf * (K1 + 1) / (tf + K1 * (1 - B + B * length / mean length))`` in a document where it
    occurs ``tf`` times, with Lucene's ``idf = ln(1 + (n - df + 0.5) / (df + 0.5))`` over ``n``
    documents (never negative). The TF-IDF cosine it replaced divided by each document's norm,
    so a word a query shares with a code of many index items weighed less than with a code of
    few; BM25 barely does (``B``), and ranked dev's queries better (docs/results.md).

    The vocabulary and IDF come from the documents only, so a query's scores do not depend on
    the other queries, and a query's word that no code uses counts only as the words it is
    taken to mean (:meth:`read_as`), or not at all. ``spelt_right`` holds words that are read as
    written though no document holds them (the backbone's :func:`whole_words`): a description's
    "across" is not a misspelt "cross".
    """

    def __init__(self, documents: Sequence[str], spelt_right: frozenset[str] = frozenset()) -> None:
        self.texts = list(documents)
        self._spelt_right = frozenset(singular(word) for word in spelt_right)
        counts = [Counter(terms(text_words(text))) for text in self.texts]
        self._documents_with_word = Counter(word for c in counts for word in c if " " not in word)
        self._vocabulary = {term: i for i, term in enumerate(sorted(set().union(*counts)))}
        term_ids = [
            np.fromiter((self._vocabulary[t] for t in c), dtype=np.int64, count=len(c))
            for c in counts
        ]
        term_of = np.concatenate(term_ids)
        frequency = np.bincount(term_of, minlength=len(self._vocabulary))
        self._idf = np.log1p((len(counts) - frequency + 0.5) / (frequency + 0.5))
        lengths = np.array([c.total() for c in counts], dtype=np.float64)
        saturations = K1 * (1.0 - B + B * lengths / max(lengths.mean(), 1.0))
        weights = [
            self._weigh(ids, c.values(), saturation)
            for ids, c, saturation in zip(term_ids, counts, saturations, strict=True)
        ]
        # By term: a query's few terms then read only the documents that hold them.
        document_of = np.repeat(np.arange(len(counts)), [len(ids) for ids in term_ids])
        order = np.argsort(term_of, kind="stable")
        self._starts = np.searchsorted(term_of[order], np.arange(len(self._vocabulary) + 1))
        self._documents = document_of[order]
        self._weights = np.concatenate(weights)[order]

    def _weigh(self, term_ids: np.ndarray, frequencies, saturation: float) -> np.ndarray:
        """One document's BM25 weights of its terms (``term_ids``, counted ``frequencies``)."""
        tf = np.fromiter(frequencies, dtype=np.float64, count=len(term_ids))
        return self._idf[term_ids] * tf * (K1 + 1.0) / (tf + saturation)

    def read_as(self, word: str) -> list[str]:
        """The documents' words that a query's ``word`` (lowercase, singular) is taken to mean:
        ``[word]`` where a document holds it, it is spelt right (``spelt_right``) or it is
        shorter than :data:`MIN_CORRECTED_LENGTH`; else the documents' word one edit away
        (:func:`one_edit_away`) that most documents hold (the first in alphabetical order among
        equals); else two of the documents' words of 3 letters or more run together
        ("seedproduction": "seed", "production"), split where the rarer one is held by most
        documents; else ``[word]``.
        """
        held = self._documents_with_word
        if (
            word in held
            or len(word) < MIN_CORRECTED_LENGTH
            or not word.isalpha()
            or word in self._spelt_right
        ):
            return [word]
        if known := [c for c in one_edit_away(word) if c in held]:
            return [min(known, key=lambda c: (-held[c], c))]
        halves = [(singular(word[:i]), word[i:]) for i in range(3, len(word) - 2)]
        if split := [pair for pair in halves if pair[0] in held and pair[1] in held]:
            return list(max(split, key=lambda pair: min(held[pair[0]], held[pair[1]])))
        return [word]

    def corrected(self, text: str) -> str:
        """``text`` with each word that :meth:`read_as` reads as others (a slip, two words run
        together) replaced by them ("acounting firm": "accounting firm"); ``text`` itself where
        there is none. Search embeds this reading beside the text as written
        (``SearchEngine.read_queries``), so a rare real word read as a common one ("mallets" as
        "pallet") leaves the reading as written to rank by."""
        pieces, start = [], 0
        for match in WORD.finditer(text):
            word = singular(match.group().lower())
            read = self.read_as(word)
            if read != [word]:
                pieces += [text[start : match.start()], " ".join(read)]
                start = match.end()
        return "".join([*pieces, text[start:]])

    def _query_terms(self, text: str) -> np.ndarray:
        """Sorted ids of the distinct terms of ``text`` that the documents hold, its words read
        as :meth:`read_as` reads them."""
        read = terms([known for word in text_words(text) for known in self.read_as(word)])
        return np.array(
            sorted({self._vocabulary[t] for t in read if t in self._vocabulary}), dtype=np.int64
        )

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        """``(Q, C)`` float32 BM25 score of each query's distinct terms in each document, over
        the most they could score (each term's ``idf * (K1 + 1)``): in [0, 1], 0 where no term
        matches."""
        scores = np.zeros((len(queries), len(self.texts)), dtype=np.float64)
        for row, text in enumerate(queries):
            term_ids = self._query_terms(text)
            for term in term_ids:
                start, end = self._starts[term], self._starts[term + 1]
                # A term occurs once in each document's vector: no document repeats in a slice.
                scores[row, self._documents[start:end]] += self._weights[start:end]
            if len(term_ids):
                scores[row] /= (K1 + 1.0) * self._idf[term_ids].sum()
        return scores.astype(np.float32)
