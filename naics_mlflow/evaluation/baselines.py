"""Text-to-code retrieval baselines reported next to the trained model.

Both rank the six-digit codes for each free-text query and are scored by ``score_retrieval``,
which goes through the same ``metrics.ranking_metrics`` as the model, so the numbers compare:

- ``tfidf_scores``: lexical overlap with each code's title, description and training index items,
  the bar any learned model must clear on queries that reuse the taxonomy's words.
- ``backbone_scores``: the untrained backbone, mean-pooled; what the model's fine-tuning adds on
  top of the pretrained encoder it starts from.
"""

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from transformers import AutoModel, PreTrainedModel, PreTrainedTokenizerBase

from naics_mlflow.data.taxonomy import MAX_LEVEL, Taxonomy
from naics_mlflow.evaluation.metrics import ranking_metrics
from naics_mlflow.model.encoder import load_tokenizer, mean_pool, resolve_backbone

SEPARATOR = ". "


def six_digit_rows(taxonomy: Taxonomy) -> np.ndarray:
    """``(C,)`` int64 rows of the national industries (level 6), in taxonomy order.

    Queries describe a business, which the Census files under one six-digit code, so only those
    are candidates.
    """
    return np.flatnonzero(taxonomy.levels == MAX_LEVEL)


def _join(parts: Sequence[str]) -> str:
    """Non-empty parts joined by ``". "``; empty ones would leave ``". . "`` noise."""
    return SEPARATOR.join(part for part in parts if part)


def title_and_description(taxonomy: Taxonomy, rows: Sequence[int]) -> list[str]:
    """``title. description`` per row: the backbone baseline's code text.

    Index items are left out because the backbone truncates at ``max_length`` tokens, so a long
    list would push the description out of the window.
    """
    return [_join([taxonomy.titles[row], taxonomy.descriptions[row]]) for row in rows]


def code_documents(taxonomy: Taxonomy, rows: Sequence[int]) -> list[str]:
    """``title. description. item. item...`` per row: the TF-IDF baseline's code text.

    The training index items (``taxonomy.examples``) add the everyday words businesses use; the
    held-out items are not in ``examples``, so evaluating on them does not leak.
    """
    return [
        _join([taxonomy.titles[row], taxonomy.descriptions[row], *taxonomy.examples[row]])
        for row in rows
    ]


def tfidf_scores(code_texts: Sequence[str], queries: Sequence[str]) -> np.ndarray:
    """``(Q, C)`` float64 cosine similarity of TF-IDF vectors of queries and code texts.

    The vocabulary and IDF are fitted on the code texts only, so a query's scores do not depend
    on the other queries and a word no code uses contributes nothing. Sublinear TF keeps a word
    repeated across many index items from dominating; bigrams reward phrases such as "oil
    seed". Rows are L2-normalised (``norm="l2"``), so the dot product is the cosine.
    """
    vectorizer = TfidfVectorizer(
        lowercase=True, ngram_range=(1, 2), min_df=1, sublinear_tf=True, norm="l2"
    )
    code_vectors = vectorizer.fit_transform(code_texts)
    query_vectors = vectorizer.transform(queries)
    return (query_vectors @ code_vectors.T).toarray()


@torch.no_grad()
def embed_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int,
    max_length: int,
) -> torch.Tensor:
    """``(N, H)`` float32 unit-norm mean-pooled last hidden states, in the order of ``texts``.

    Texts are batched in order of length so that each batch pads to nearly its own length
    (character count tracks token count well enough for that); the rows are put back in input
    order at the end.
    """
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    pooled = []
    for start in range(0, len(order), batch_size):
        batch = tokenizer(
            [texts[i] for i in order[start : start + batch_size]],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        hidden = model(**batch).last_hidden_state
        pooled.append(mean_pool(hidden, batch["attention_mask"]))
    sorted_embeddings = torch.cat(pooled)
    embeddings = torch.empty_like(sorted_embeddings)
    embeddings[torch.tensor(order, dtype=torch.long)] = sorted_embeddings
    return torch.nn.functional.normalize(embeddings, dim=1)


def backbone_scores(
    code_texts: Sequence[str],
    queries: Sequence[str],
    backbone_name: str,
    batch_size: int = 64,
    max_length: int = 128,
) -> np.ndarray:
    """``(Q, C)`` float32 cosine similarity of the untrained backbone's mean-pooled embeddings.

    Mean pooling over the attention mask is what the model's encoder does (``mean_pool``), so
    the baseline isolates the effect of training. Eval mode turns dropout off, making scores
    deterministic. ``backbone_name`` goes through ``resolve_backbone``, so the default MiniLM
    loads from its installed package without network access.
    """
    model = AutoModel.from_pretrained(resolve_backbone(backbone_name), dtype=torch.float32).eval()
    tokenizer = load_tokenizer(backbone_name)
    codes = embed_texts(model, tokenizer, code_texts, batch_size, max_length)
    query_embeddings = embed_texts(model, tokenizer, queries, batch_size, max_length)
    return (query_embeddings @ codes.T).numpy()


def score_retrieval(
    scores: np.ndarray, true_codes: Sequence[str], candidate_codes: Sequence[str]
) -> dict[str, float]:
    """``retrieval_metrics``' keys (top1, top5, mrr, prefix2/3/4_accuracy) for similarity scores.

    Negated scores are a distance with the same order, so ranking, tie handling and prefixes are
    exactly those of the model's metrics.

    Args:
        scores: ``(Q, C)`` similarities, higher is better.
        true_codes: ``Q`` codes.
        candidate_codes: ``C`` distinct codes, the columns of ``scores``.
    """
    distances = torch.from_numpy(-np.asarray(scores))
    return ranking_metrics([distances], true_codes, candidate_codes)
