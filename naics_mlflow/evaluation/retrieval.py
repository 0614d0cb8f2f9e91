"""Place free text in the taxonomy: embed queries with a trained model and rank codes by Lorentz
distance, plus the lexical signal for national industries. Used by ``search``, ``evaluate`` and
the served MLflow model.

A query's score for a six-digit code is

    -d_H(query, code) / temperature + lexical_weight * bm25(query, code)
                                    + item_weight * nearest_item(query, code)

the model's own logit (its training turns distances into probabilities at ``loss.temperature``),
plus the BM25 score (0 to 1) of :mod:`naics_mlflow.evaluation.lexical`, plus the cosine of the
query with the nearest of the code's examples (its training index items and the activities
cross-references classify there, see ``data build``), both read by the examples channel
(:class:`IndexItems`): a business described the way the Census already words one of the code's
activities. The weights are
``search.lexical_weight`` and ``search.item_weight``, chosen on the dev split; 0 and 0 rank by the
embedding alone. Codes of levels 2-5 have no examples of their own, so they are ranked by the
embedding alone. A query of several sentences gives each code the best score of its sentences,
each read as a query of its own, and a sentence with a misspelt word is read a second time as
corrected (:meth:`SearchEngine.read_queries`). A query that is nothing but a code ("441120") is
that code's embedding, so ``search`` answers the code and its nearest neighbours.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from naics_mlflow.config import SearchConfig
from naics_mlflow.data.disk_cache import read_cached, source_digest, write_cached
from naics_mlflow.data.features import CHANNEL_FEATURES_CACHE, CodeFeatures
from naics_mlflow.data.pretrained import load_tokenizer
from naics_mlflow.data.taxonomy import (
    MAX_LEVEL,
    MIN_LEVEL,
    Taxonomy,
    ancestor_matrix,
    display_code,
)
from naics_mlflow.data.tokenization import (
    QUERY_CHANNELS,
    TextBatch,
    length_batches,
    pad,
    query_ids,
    tokenize_codes,
)
from naics_mlflow.evaluation.lexical import (
    LexicalIndex,
    code_documents,
    six_digit_rows,
    whole_words,
)
from naics_mlflow.evaluation.queries import Match, check_request, code_written_as
from naics_mlflow.model.checkpoint import weights_digest
from naics_mlflow.model.head import EncoderHead
from naics_mlflow.model.lorentz import pairwise_distance
from naics_mlflow.model.merged import (
    ChannelLinear,
    MergedBackbone,
    dtype_name,
    inference_dtype,
    pass_tokens,
)
from naics_mlflow.model.trained import TrainedEmbedder

logger = logging.getLogger(__name__)

# Under dirs.outputs: the codes' embeddings (and the national industries' index items as the
# model reads them) of each model that a command has built an engine of.
CODE_EMBEDDINGS_CACHE = "code_embeddings"
# Queries per block of (block, items) similarities: 512 x 16,347 float32 is 33 MB.
QUERY_BLOCK = 512


# Where a query is cut into sentences: the spaces after a semicolon, and after ". ! ?" where a
# capital starts what comes next, so that "Corp. is" and "approx. 40 staff" stay whole...
SENTENCE_BREAK = re.compile(r"(?<=;)\s+|(?<=[.!?])\s+(?=[A-Z])")
# ...unless a period ends an initial or one of the abbreviations that come before a capital in
# names and addresses ("U.S. Postal Service", "St. Lawrence Seaway", "Smith Bros. Farms").
ABBREVIATION_END = re.compile(
    r"\b(?:[A-Z]|Mr|Mrs|Ms|Dr|St|Mt|Ft|Ave|Inc|Co|Corp|Ltd|Jr|Sr|No|Bros)\.$"
)


class EncodedQueries(NamedTuple):
    embeddings: torch.Tensor  # (Q, D+1) points on the hyperboloid
    examples: torch.Tensor  # (Q, H) unit features as the examples channel reads them (as an item)


def sentences(text: str) -> list[str]:
    """``text`` cut at its sentence breaks (``SENTENCE_BREAK``, not after ``ABBREVIATION_END``),
    without the spaces around them: one piece where it has none."""
    text = text.strip()
    pieces, start = [], 0
    for sentence_break in SENTENCE_BREAK.finditer(text):
        if not ABBREVIATION_END.search(text, start, sentence_break.start()):
            pieces.append(text[start : sentence_break.start()])
            start = sentence_break.end()
    return [*pieces, text[start:]] if text else [text]


class QueryPieces(NamedTuple):
    """What the model reads of a list of queries: each query's :func:`sentences` (one piece for
    a query of one sentence), then the corrected reading of each sentence with a misspelt word
    (see :meth:`SearchEngine.read_queries`)."""

    texts: list[str]  # (P,) the pieces, each query's together and in query order
    owners: torch.Tensor  # (P,) int64 on the CPU: the query each piece belongs to
    encoded: EncodedQueries  # (P, ...) the pieces encoded
    named: list[int | None]  # (Q,) the row of the code each query is nothing but, else None

    def of(self, queries: list[int]) -> QueryPieces:
        """The pieces of ``queries`` (ascending), owned from 0 in that order."""
        chosen = torch.tensor(queries, dtype=torch.long)
        pieces = torch.isin(self.owners, chosen).nonzero().squeeze(1)
        encoded = EncodedQueries(*(tensor[pieces.to(tensor.device)] for tensor in self.encoded))
        return QueryPieces(
            [self.texts[piece] for piece in pieces.tolist()],
            torch.searchsorted(chosen, self.owners[pieces]),
            encoded,
            [self.named[query] for query in queries],
        )

    def best(self, values: torch.Tensor, count: int) -> torch.Tensor:
        """``(count, C)``: for each of ``count`` queries, the largest of its pieces' ``(P, C)``
        ``values``."""
        if len(values) == count:  # every query one piece
            return values
        owners = self.owners.to(values.device)[:, None].expand_as(values)
        best = values.new_full((count, values.shape[1]), -math.inf)
        return best.scatter_reduce_(0, owners, values, reduce="amax")


@dataclass(frozen=True)
class IndexItems:
    """The national industries' examples (training index items and cross-referenced activities)
    as the examples channel reads them, one row per (code, item) pair: what
    :meth:`nearest_similarity` compares a query with. Dev and held-out items are in no code's
    texts, so they are never here."""

    vectors: torch.Tensor  # (P, H) float32 unit features
    rows: torch.Tensor  # (P,) int64 taxonomy row of each item's code

    def __post_init__(self) -> None:
        # The vectors as a linear layer's weight, laid out once for the product: a query's
        # cosines with all 16,000 items then take 0.7 ms, against 3.2 ms for ``queries @
        # vectors.T``, which reads a transposed view (2-core AMD EPYC; docs/results.md).
        layer = None
        if len(self.vectors):  # oneDNN packs no empty weight
            bias = self.vectors.new_zeros(len(self.vectors))
            layer = ChannelLinear(self.vectors.unsqueeze(0), bias, torch.float32)
        object.__setattr__(self, "_similarity", layer)  # frozen dataclass: derived once, here

    @classmethod
    def of_national_industries(cls, features: CodeFeatures, taxonomy: Taxonomy) -> IndexItems:
        national = six_digit_rows(taxonomy)
        items = [features.code_items[row] for row in national]
        rows = [torch.full((len(i),), int(row)) for row, i in zip(national, items, strict=True)]
        return cls(features.items["examples"][torch.cat(items)].float(), torch.cat(rows))

    def to(self, device: torch.device) -> IndexItems:
        if self.vectors.device == torch.device(device):
            return self  # already there: no second copy of the laid-out vectors
        return IndexItems(self.vectors.to(device), self.rows.to(device))

    def nearest_similarity(self, queries: torch.Tensor, size: int) -> torch.Tensor:
        """``(Q, size)``: for every code row, the cosine of each query with the nearest of the
        code's items, floored at 0: a code without items, or with none like the query, gets no
        bonus.

        ``queries``: ``(Q, H)`` unit features read by the examples channel. Blocks of
        ``QUERY_BLOCK`` queries bound the ``(Q, P)`` similarities' memory.
        """
        if self._similarity is None:
            return queries.new_zeros((len(queries), size))
        blocks = []
        for block in queries.float().split(QUERY_BLOCK):
            similarity = self._similarity(block, [(0, len(block))])
            floor = similarity.new_zeros((len(block), size))
            owners = self.rows.expand(len(block), -1)
            blocks.append(floor.scatter_reduce(1, owners, similarity, reduce="amax"))
        return torch.cat(blocks) if blocks else queries.new_zeros((0, size))


def query_batches(
    encoder: EncoderHead, backbone: MergedBackbone, ids: list[np.ndarray], pad_token_id: int
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """The channel features of free-text queries, given as their token ids (:func:`query_ids`),
    batch by batch, with the positions of the queries each batch holds.

    Queries run shortest first, each batch one pass of the merged ``backbone`` for every query
    channel that reads differently, of at most :func:`pass_tokens` tokens: many queries cost
    little padding and few passes.
    """
    device = backbone.device
    budget = pass_tokens(device) // len({backbone.reading[channel] for channel in QUERY_CHANNELS})
    for rows in length_batches([len(sequence) for sequence in ids], budget):
        batch = pad([ids[i] for i in rows], list(range(len(rows))), pad_token_id)
        yield rows, encoder.query_features(backbone, TextBatch(*(t.to(device) for t in batch)))


def code_embeddings_key(embedder: TrainedEmbedder, taxonomy: Taxonomy, dtype: torch.dtype) -> str:
    """A digest of everything the codes' embeddings follow from: the trained weights, the
    configuration saved with them (backbone name, token limits), every code's texts, the dtype
    of the backbone and the source of the code that embeds."""
    digest = hashlib.sha256()
    digest.update(weights_digest(embedder.encoder.trainable_state_dict()).encode())
    texts = [taxonomy.codes, taxonomy.titles, taxonomy.descriptions, taxonomy.excluded]
    payload = [embedder.config.to_dict(), texts, taxonomy.examples, str(dtype)]
    encoder = embedder.encoder
    source = source_digest(
        type(embedder),
        type(encoder),
        EncoderHead,
        type(encoder.fusion),
        type(encoder.projection),
        MergedBackbone,
        CodeFeatures,
        IndexItems,
        tokenize_codes,
    )
    digest.update(json.dumps([*payload, source], sort_keys=True).encode())
    return digest.hexdigest()[:24]


def _read_cached(path: Path | None, size: int) -> tuple[torch.Tensor, IndexItems] | None:
    """The cached code embeddings and index items at ``path``, or None when there are none or
    they cannot be read (then they are computed again and the file replaced)."""
    cached = read_cached(path, "code embeddings")
    if cached is None:
        return None
    names = ("embeddings", "item_vectors", "item_rows")
    if (
        not all(name in cached for name in names)
        or len(cached["embeddings"]) != size
        or len(cached["item_vectors"]) != len(cached["item_rows"])
    ):
        logger.warning("ignoring cached code embeddings %s: not one row per code and item", path)
        return None
    logger.info("code embeddings read from %s", path)
    return cached["embeddings"], IndexItems(cached["item_vectors"], cached["item_rows"])


@dataclass
class SearchEngine:
    """A trained model with every code embedded once, its adapters merged for queries, and the
    national industries' lexical index and index items, ready to answer queries."""

    embedder: TrainedEmbedder
    tokenizer: PreTrainedTokenizerBase
    codes: list[str]
    titles: list[str]
    levels: np.ndarray  # (N,)
    code_embeddings: torch.Tensor  # (N, D+1), moved to the embedder's device
    lexical: LexicalIndex  # over the six-digit codes, in row order
    items: IndexItems  # moved to the embedder's device
    settings: SearchConfig  # search.*: the signals' weights, the backbone's dtype and device
    backbone: MergedBackbone = field(init=False)  # the embedder's, adapters merged, for queries
    rows_of_codes: dict[str, int] = field(init=False)
    ancestors: np.ndarray = field(init=False)  # (N, 5), see ancestor_matrix

    def __post_init__(self) -> None:
        self.rows_of_codes = {code: row for row, code in enumerate(self.codes)}
        self.ancestors = ancestor_matrix(self.codes)
        device = self.embedder.device
        self.code_embeddings = self.code_embeddings.to(device)
        self.items = self.items.to(device)
        self.backbone = self.embedder.encoder.merged_backbone(
            inference_dtype(self.settings.backbone_dtype, device)
        )

    @classmethod
    def build(
        cls,
        embedder: TrainedEmbedder,
        taxonomy: Taxonomy,
        settings: SearchConfig,
        outputs_dir: Path | None = None,
    ) -> SearchEngine:
        """The engine of a trained model; every code and index item is embedded now, or read
        from ``outputs_dir`` when an earlier build of the same model, texts and dtype left it
        there (the channel features too, which other models with the same adapters share)."""
        tokenizer = load_tokenizer(embedder.config.model.base_model_name)
        dtype = inference_dtype(settings.backbone_dtype, embedder.device)
        cache = features_cache = None
        if outputs_dir is not None:
            key = code_embeddings_key(embedder, taxonomy, dtype)
            cache = outputs_dir / CODE_EMBEDDINGS_CACHE / f"{key}.pt"
            features_cache = outputs_dir / CHANNEL_FEATURES_CACHE
        cached = _read_cached(cache, taxonomy.size)
        if cached is not None:
            embeddings, items = cached
        else:
            started = time.perf_counter()
            config = embedder.config.data_loader.tokenization
            tokens = tokenize_codes(taxonomy, tokenizer, config)
            features = embedder.encoder.code_features(tokens, dtype=dtype, cache_dir=features_cache)
            embeddings = embedder.encoder.embed_codes(features, np.arange(taxonomy.size))
            items = IndexItems.of_national_industries(features, taxonomy)
            logger.info(
                "embedded %d codes in %.1f s (%s backbone on %s)",
                taxonomy.size,
                time.perf_counter() - started,
                dtype_name(dtype),
                embedder.device,
            )
            cached_tensors = {
                "embeddings": embeddings,
                "item_vectors": items.vectors,
                "item_rows": items.rows,
            }
            write_cached(cache, cached_tensors, "code embeddings")
        lexical = LexicalIndex(
            code_documents(taxonomy, six_digit_rows(taxonomy)), whole_words(tokenizer.get_vocab())
        )
        return cls(
            embedder,
            tokenizer,
            taxonomy.codes,
            taxonomy.titles,
            taxonomy.levels,
            embeddings,
            lexical,
            items,
            settings,
        )

    def encode_queries(self, texts: list[str]) -> EncodedQueries:
        """Free-text queries, each read whole, as Lorentz embeddings and as the examples channel
        reads them: what the served model's ``output="embedding"`` gives. A text that is nothing
        but a code is that code's embedding, as :meth:`search` reads it."""
        return self._encode(texts, self.named_codes(texts), list(range(len(texts))))

    def read_queries(self, texts: list[str]) -> QueryPieces:
        """Queries as ranking reads them: sentence by sentence (:func:`sentences`), each sentence
        read and scored as a query of its own, and the query given each code's best score among
        its sentences (:meth:`ranking`); a query of one sentence, as every index item is, is read
        whole. A business description's activity is usually one of its sentences, and the
        others (the firm's history, size, place) pull a reading of the whole away from it: dev's
        index items with such sentences around them ranked their code first 0.43-0.70 of the
        time read whole, 0.76-0.81 sentence by sentence, against 0.82 for the items alone
        (docs/results.md).

        A sentence with a word that BM25 reads as others (:meth:`LexicalIndex.corrected`: a
        slip, two words run together) is read a second time as corrected, another piece of the
        same query: dev items with a slip ranked their code first 0.77-0.79 of the time read as
        written, 0.80-0.82 with the corrected reading beside it (docs/results.md).

        A text that is nothing but a code (:meth:`named_codes`) is one piece, the code's
        embedding, and does not pass through the backbone.
        """
        named = self.named_codes(texts)
        pieces: list[str] = []
        owners: list[int] = []
        for query, (text, row) in enumerate(zip(texts, named, strict=True)):
            read = [text] if row is not None else sentences(text)
            read += [
                fixed
                for sentence in read
                if row is None and (fixed := self.lexical.corrected(sentence)) != sentence
            ]
            pieces += read
            owners += [query] * len(read)
        encoded = self._encode(pieces, [named[owner] for owner in owners], owners)
        return QueryPieces(pieces, torch.tensor(owners, dtype=torch.long), encoded, named)

    def _say_how_many_are_cut(self, cut: set[int], count: int) -> None:
        """One line, where some (``cut``) of ``count`` queries have a piece longer than
        ``search.query_max_length``: only its beginning is read."""
        if cut:
            logger.warning(
                "%d of %d queries have a sentence longer than the model reads (%d tokens, "
                "search.query_max_length); its beginning is used",
                len(cut),
                count,
                self.settings.query_max_length,
            )

    @torch.no_grad()
    def _encode(
        self, texts: list[str], named: list[int | None], owners: list[int]
    ) -> EncodedQueries:
        """Each text cut at ``search.query_max_length`` tokens (see :func:`query_batches`; one
        line says how many queries that cuts, ``owners`` giving each text's), but a text that
        ``named`` gives a code's row for: that code's embedding, with no examples feature
        (zeros), as it has no words for the nearest item to read."""
        encoder = self.embedder.encoder
        embeddings = torch.empty((len(texts), self.code_embeddings.shape[1]))
        examples = torch.zeros((len(texts), encoder.hidden_size))
        read = [query for query, row in enumerate(named) if row is None]
        limit = self.settings.query_max_length
        tokens = query_ids([texts[query] for query in read], self.tokenizer, limit)
        cut = {owners[read[row]] for row, long in enumerate(tokens.cut) if long}
        self._say_how_many_are_cut(cut, len(set(owners)))
        batches = query_batches(encoder, self.backbone, tokens.ids, self.tokenizer.pad_token_id)
        for rows, features in batches:
            queries = [read[row] for row in rows]
            embeddings[queries] = encoder.head(features).embeddings.cpu()
            examples[queries] = features["examples"].float().cpu()
        for query, row in enumerate(named):
            if row is not None:
                embeddings[query] = self.code_embeddings[row].cpu()
        device = self.embedder.device
        return EncodedQueries(embeddings.to(device), examples.to(device))

    def candidates(self, level: int | None) -> np.ndarray:
        """Rows of the codes a query may match: one level, or all."""
        if level is None:
            return np.arange(len(self.codes))
        return np.flatnonzero(self.levels == level)

    def distances(self, queries: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """(Q, len(rows)) Lorentz distances of embedded queries to the codes at ``rows``.

        Computed to every code, then selected: gathering the candidates' embeddings first would
        copy them at every query, which costs a single query more than the extra distances."""
        curvature = self.embedder.config.loss.curvature
        return pairwise_distance(queries, self.code_embeddings, curvature)[:, rows]

    def scores(
        self, texts: list[str], queries: EncodedQueries, distances: torch.Tensor, level: int | None
    ) -> torch.Tensor:
        """(Q, C) ranking scores from the distances to the candidates of ``level``: with the
        lexical and nearest-item signals for the national industries, the embedding's alone for
        any other level (see the module's docstring)."""
        logits = -distances / self.embedder.config.loss.temperature
        if level != MAX_LEVEL:
            return logits
        if self.settings.lexical_weight > 0:
            lexical = torch.from_numpy(self.lexical.scores(texts)).to(logits.device)
            logits = logits + self.settings.lexical_weight * lexical
        if self.settings.item_weight > 0:
            rows = torch.from_numpy(self.candidates(level)).to(logits.device)
            nearest = self.items.nearest_similarity(queries.examples, len(self.codes))
            logits = logits + self.settings.item_weight * nearest[:, rows]
        return logits

    def ranking(
        self, queries: QueryPieces, count: int, level: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(count, C)`` scores and Lorentz distances of ``count`` queries to the candidates of
        ``level``: each code's best score among a query's pieces, and the distance of the piece
        that scored it (the nearest, where pieces tie)."""
        distances = self.distances(queries.encoded.embeddings, self.candidates(level))
        scores = self.scores(queries.texts, queries.encoded, distances, level)
        best = queries.best(scores, count)
        if len(queries.texts) == count:
            return best, distances
        owners = queries.owners.to(scores.device)
        at_best = torch.where(scores == best[owners], distances, math.inf)
        return best, -queries.best(-at_best, count)

    def named_codes(self, texts: list[str]) -> list[int | None]:
        """The row of the code each text is, where it is nothing but a NAICS 2022 code
        (:func:`code_written_as`), else None. One warning counts the texts written as codes that
        2022 does not have ("454110", a 2017 code; "1990"), which are read as descriptions."""
        written = [code_written_as(text) for text in texts]
        named = [self.rows_of_codes.get(code) if code else None for code in written]
        unknown = [
            text
            for text, code, row in zip(texts, written, named, strict=True)
            if code and row is None
        ]
        if unknown:
            logger.warning(
                "%d of %d queries are numbers that are not NAICS 2022 codes (%r first); they are "
                "read as business descriptions",
                len(unknown),
                len(texts),
                unknown[0].strip(),
            )
        return named

    def lineage(self, row: int, rows: np.ndarray) -> np.ndarray:
        """``(C,)`` bool: which of the codes at ``rows`` are the code at ``row``, one of its
        descendants or one of its ancestors."""
        level = int(self.levels[row])
        below = self.ancestors[rows, level - MIN_LEVEL] == row
        return below | np.isin(rows, self.ancestors[row])

    def around_code(
        self, row: int, rows: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(C,)`` distances, scores and ranking order of the candidates at ``rows`` for a
        query that names the code at ``row``.

        The code's own embedding is the query, scored by the model's logit alone (no words to
        read), and the code is at distance 0 from itself. Computed, that distance comes out near
        0.1: far from the origin a point's coordinates are large, and float32 cancels most of
        the digits of their squares.

        The code's :meth:`lineage` comes first, nearest first, then the other codes, nearest
        first: someone who types "4411" at the national industries asks for 441110 and 441120
        before any neighbour the model puts nearer. A match's margin over the next may then be
        negative, where the next is outside the lineage and nearer.
        """
        distances = self.distances(self.code_embeddings[row : row + 1], rows)[0]
        distances[torch.from_numpy(rows == row).to(distances.device)] = 0.0
        # + 0.0 turns the code's own -0.0 into 0.0, which prints without a minus sign.
        scores = -distances / self.embedder.config.loss.temperature + 0.0
        # lexsort is stable and sorts by its last key first: the lineage, then the score.
        order = np.lexsort((-scores.cpu().numpy(), ~self.lineage(row, rows)))
        return distances, scores, torch.from_numpy(order).to(distances.device)

    def ranked(
        self, queries: QueryPieces, level: int | None
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Each query's ``(C,)`` distances, scores and ranking order of the candidates at
        ``level``: a text by :meth:`ranking`, a code by :meth:`around_code` (a text's ranking
        would be thrown away, and took most of a code query's time)."""
        rows = self.candidates(level)
        read = [query for query, row in enumerate(queries.named) if row is None]
        ranked = {}
        if read:
            scores, distances = self.ranking(queries.of(read), len(read), level)
            # A stable sort, not topk, so that codes with equal scores come in taxonomy order on
            # every device.
            order = scores.argsort(dim=1, descending=True, stable=True)
            ranked = dict(zip(read, zip(distances, scores, order, strict=True), strict=True))
        return [
            ranked[query] if row is None else self.around_code(row, rows)
            for query, row in enumerate(queries.named)
        ]

    def search(
        self, texts: list[str], top_k: int = 5, level: int | None = MAX_LEVEL
    ) -> list[list[Match]]:
        """The ``top_k`` best codes (at ``level``, or any level for None) for each text. A text
        that is nothing but a NAICS 2022 code ("441120") is answered by the codes nearest that
        code, its lineage first (:meth:`around_code`).

        The texts are read together (:meth:`read_queries`) and ranked ``QUERY_BLOCK`` at a time,
        so that the (queries, codes) score matrices stay small however many texts come."""
        check_request(texts, top_k, level)
        rows = self.candidates(level)
        queries = self.read_queries(texts)
        matches = []
        for start in range(0, len(texts), QUERY_BLOCK):
            block = queries.of(list(range(start, min(start + QUERY_BLOCK, len(texts)))))
            distances, scores, order = (
                torch.stack(column) for column in zip(*self.ranked(block, level), strict=True)
            )
            # One more than asked, for the last match's margin.
            kept = min(top_k + 1, len(rows))
            best_indices = order[:, :kept]
            best_values = scores.gather(1, best_indices)
            shown = min(top_k, len(rows))
            best_distances = distances.gather(1, best_indices).tolist()
            for values, indices, lengths in zip(
                best_values.tolist(), best_indices.tolist(), best_distances, strict=True
            ):
                following = [*values[1:], math.nan]
                matches.append(
                    [
                        Match(
                            display_code(self.codes[rows[j]]),
                            self.titles[rows[j]],
                            int(self.levels[rows[j]]),
                            distance,
                            score,
                            score - below,
                        )
                        for score, below, j, distance in zip(
                            values, following, indices, lengths, strict=True
                        )
                    ][:shown]
                )
        return matches
