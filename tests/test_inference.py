"""Encoding without gradients (merged adapters, batched queries) gives what the training path
gives, on the tiny backbone with every channel's adapter moved away from LoRA's zero start."""

from __future__ import annotations

import copy
import importlib
import itertools
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch

from naics_mlflow.config import SearchConfig, load_config
from naics_mlflow.data.disk_cache import read_cached, source_digest, write_cached
from naics_mlflow.data.pretrained import BackboneError, load_tokenizer
from naics_mlflow.data.taxonomy import MAX_LEVEL
from naics_mlflow.data.tokenization import (
    CHANNELS,
    TEXT_CHANNELS,
    TextBatch,
    TextRows,
    length_batches,
    query_ids,
    tokenize_codes,
    tokenize_queries,
)
from naics_mlflow.evaluation import retrieval
from naics_mlflow.evaluation.evaluate import QuerySet, evaluate
from naics_mlflow.evaluation.lexical import LexicalIndex
from naics_mlflow.evaluation.queries import code_written_as
from naics_mlflow.evaluation.retrieval import IndexItems, SearchEngine, query_batches
from naics_mlflow.model import merged
from naics_mlflow.model.checkpoint import CheckpointError
from naics_mlflow.model.module import NaicsEmbedder
from naics_mlflow.model.trained import load_embedder

CONFIG = Path(__file__).resolve().parents[1] / "conf" / "config.yaml"
QUERIES = [
    "soybean farming",
    "retail bakery selling bread and cakes to the public",
    "software",
    " ".join(["farming"] * 200),  # cut at the token limit
]
# Float32 rounding of two summation orders (x W + (x A) B s against x (W + s B A)).
TOLERANCE = {"atol": 2e-5, "rtol": 2e-5}
CPU = torch.device("cpu")


def search_settings(
    lexical_weight: float = 0.0,
    item_weight: float = 0.0,
    device: str = "cpu",
    query_max_length: int = 64,
) -> SearchConfig:
    """``search.*`` with the backbone in float32 (the training path's dtype)."""
    return SearchConfig(
        lexical_weight=lexical_weight,
        item_weight=item_weight,
        backbone_dtype="float32",
        device=device,
        query_max_length=query_max_length,
    )


def _with_trained_adapters(overrides, taxonomy):
    """A tiny model whose four adapters each hold different, non-zero weights, and its tokens."""
    config = load_config(CONFIG, overrides)
    # Seeded before the model is built: its random initial weights otherwise came from whatever
    # the worker's earlier tests left in torch's generator.
    torch.manual_seed(1)
    module = NaicsEmbedder(config.to_dict()).eval()
    with torch.no_grad():
        for name, parameter in module.encoder.backbone.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    tokenizer = load_tokenizer(config.model.base_model_name)
    tokens = tokenize_codes(taxonomy, tokenizer, config.data_loader.tokenization)
    return module, tokenizer, tokens


@pytest.fixture(scope="module")
def trained_adapters(tiny_overrides, taxonomy):
    return _with_trained_adapters(tiny_overrides, taxonomy)


def _as_channel(texts: TextBatch, channel: str) -> TextRows:
    """``texts`` to be read by ``channel``'s adapter."""
    rows = torch.full((len(texts.owner),), CHANNELS.index(channel))
    counts = [len(rows) if c == channel else 0 for c in CHANNELS]
    lengths = texts.attention_mask.sum(dim=1).numpy()
    return TextRows(texts.input_ids, texts.attention_mask, rows, counts, lengths)


def test_the_adapters_change_what_each_channel_reads(trained_adapters):
    """Without this, the comparisons below could pass with the adapters ignored."""
    module, tokenizer, _ = trained_adapters
    tokens = tokenize_queries(QUERIES, tokenizer, module.config.data_loader.tokenization)
    titles = tokens.texts["title"]
    without_adapters = copy.deepcopy(module.encoder)
    for name, parameter in without_adapters.backbone.named_parameters():
        if "lora_B" in name:
            parameter.data.zero_()
    with torch.no_grad():
        adapted = module.encoder.encode_texts(_as_channel(titles, "title"))
        other = module.encoder.encode_texts(_as_channel(titles, "examples"))
        plain = without_adapters.encode_texts(_as_channel(titles, "title"))
    assert (adapted - plain).abs().max() > 0.1
    assert (adapted - other).abs().max() > 0.1


def test_passes_are_shortest_first_and_fill_the_token_budget():
    lengths = [5, 1, 30, 7, 7, 2, 12, 3]
    # Padded sizes 3 x 3, 2 x 7, 1 x 7, 1 x 12 of 16; the 30 tokens over the budget run alone.
    assert list(length_batches(lengths, budget=16)) == [[1, 5, 7], [0, 3], [4], [6], [2]]


@pytest.mark.parametrize(
    ("amd", "flags", "auto"),
    [
        (False, {"avx512f", "avx512_bf16", "amx_bf16"}, torch.bfloat16),
        (True, {"avx512f", "avx512_bf16"}, torch.bfloat16),
        (False, {"avx512f", "avx512_bf16"}, torch.float32),  # bfloat16 measured slower there
        (True, {"avx2"}, torch.float32),  # no bfloat16 products: every one converted
    ],
    ids=["intel_amx", "amd_avx512_bf16", "intel_avx512_bf16", "amd_avx2"],
)
def test_auto_takes_bfloat16_only_on_cpus_where_it_was_measured_faster(amd, flags, auto):
    cpu = merged.Cpu(amd=amd, flags=frozenset(flags))
    on_cpu = torch.device("cpu")
    assert merged.inference_dtype("auto", on_cpu, cpu) == auto
    assert merged.inference_dtype("float32", on_cpu, cpu) == torch.float32
    assert merged.inference_dtype("bfloat16", on_cpu, cpu) == torch.bfloat16


@pytest.mark.parametrize("bf16_supported", [True, False])
def test_auto_follows_the_gpu_not_the_host_cpu(monkeypatch, bf16_supported):
    """The GPU branch, checked without a GPU: a ``cuda`` device is only a name until used."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    on_gpu = torch.device("cuda", 0)
    expected = torch.bfloat16 if bf16_supported else torch.float32
    for host in (
        merged.Cpu(amd=False, flags=frozenset({"amx_bf16"})),
        merged.Cpu(False, frozenset()),
    ):
        assert merged.inference_dtype("auto", on_gpu, host) == expected
    assert merged.inference_dtype("float32", on_gpu) == torch.float32


@pytest.mark.parametrize("gpu_seen", [True, False])
def test_search_device_auto_takes_a_gpu_where_torch_sees_one(monkeypatch, gpu_seen):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu_seen)
    assert merged.inference_device("auto") == torch.device("cuda" if gpu_seen else "cpu")
    assert merged.inference_device("cpu") == CPU
    if gpu_seen:
        assert merged.inference_device("cuda") == torch.device("cuda")
    else:
        with pytest.raises(BackboneError, match=r"search\.device is cuda, but torch sees no CUDA"):
            merged.inference_device("cuda")


def test_this_cpu_is_read_from_linux():
    assert "fpu" in merged.this_cpu().flags  # every x86-64 CPU has it


@pytest.mark.parametrize("amd_cpu", [False, True], ids=["addmm", "onednn_packed"])
def test_code_features_equal_the_training_path(trained_adapters, monkeypatch, amd_cpu):
    """Both float32 products, whichever this machine's CPU would take."""
    monkeypatch.setattr(merged, "this_cpu", lambda: merged.Cpu(amd=amd_cpu, flags=frozenset()))
    module, _, tokens = trained_adapters
    backbone = module.encoder.merged_backbone()
    assert (backbone.layers[0].qkv.packed is not None) == amd_cpu
    rows = np.array([0, 1, 17, 300, 1024, 2124])
    expected = module.encoder.eval().channel_features(tokens.batch(rows))
    features = module.encoder.code_features(tokens).of_codes(torch.from_numpy(rows))
    for channel in CHANNELS:
        torch.testing.assert_close(features[channel], expected[channel], **TOLERANCE)


def test_merged_passes_never_run_cudnn_attention(trained_adapters):
    """cuDNN's attention builds a graph for every new shape (naics_mlflow.model.attention):
    every layer of a merged pass runs with that kernel disabled, restored after the pass."""
    module, tokenizer, _ = trained_adapters
    backbone = module.encoder.merged_backbone()
    allowed = []
    for layer in backbone.layers:
        layer.register_forward_pre_hook(
            lambda *_: allowed.append(torch.backends.cuda.cudnn_sdp_enabled())
        )
    queries = tokenize_queries(QUERIES, tokenizer, module.config.data_loader.tokenization)
    module.encoder.query_features(backbone, queries.texts["title"])
    assert allowed and not any(allowed)
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_every_linear_layer_adapted_still_equals_the_training_path(tiny_overrides, taxonomy):
    """Adapters on key, the attention output and the feed-forward layers too, not only the
    default query and value: each of those layers then holds one weight per channel."""
    overrides = [*tiny_overrides, "model.lora.target_modules=[query, key, value, dense]"]
    module, _, tokens = _with_trained_adapters(overrides, taxonomy)
    rows = np.array([0, 17, 1024, 2124])
    expected = module.encoder.eval().channel_features(tokens.batch(rows))
    features = module.encoder.code_features(tokens).of_codes(torch.from_numpy(rows))
    for channel in CHANNELS:
        torch.testing.assert_close(features[channel], expected[channel], **TOLERANCE)


def test_a_backbone_that_is_not_bert_is_refused_before_training(tmp_path, tiny_overrides):
    from transformers import DistilBertConfig, DistilBertModel

    tiny = DistilBertConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    DistilBertModel(tiny).save_pretrained(tmp_path)
    config = load_config(CONFIG, [*tiny_overrides, f"model.base_model_name={tmp_path}"])
    with pytest.raises(
        BackboneError, match=r"is a distilbert model; model\.base_model_name must be a BERT encoder"
    ):
        NaicsEmbedder(config.to_dict())


def test_an_adapter_that_merging_would_drop_is_refused_before_training(tiny_overrides):
    overrides = [*tiny_overrides, "model.lora.target_modules=[query, word_embeddings]"]
    config = load_config(CONFIG, overrides)
    with pytest.raises(
        BackboneError, match=r"adapts embeddings\.word_embeddings, which is not a linear"
    ):
        NaicsEmbedder(config.to_dict())


def test_adapters_that_match_no_layer_are_refused_in_one_line(tiny_overrides):
    config = load_config(CONFIG, [*tiny_overrides, "model.lora.target_modules=[qurey]"])
    with pytest.raises(BackboneError, match=r"target_modules \['qurey'\] do not match linear"):
        NaicsEmbedder(config.to_dict())


def test_item_features_read_through_each_query_channel(trained_adapters):
    module, tokenizer, tokens = trained_adapters
    items = [0, 5, 99]
    texts = [tokens.item_texts[i] for i in items]
    queries = tokenize_queries(texts, tokenizer, module.config.data_loader.tokenization)
    expected = module.encoder.eval().channel_features(queries)
    features = module.encoder.code_features(tokens, item_queries=True)
    for channel in CHANNELS:
        torch.testing.assert_close(
            features.of_queries(torch.tensor(items))[channel], expected[channel], **TOLERANCE
        )
    # Embedding codes reads the items through the examples adapter only: a third less work.
    assert set(module.encoder.code_features(tokens).items) == {"examples"}


def test_channel_features_are_cached_by_what_the_adapters_compute(
    tmp_path, tiny_overrides, taxonomy, caplog
):
    config = load_config(CONFIG, tiny_overrides)
    tokenizer = load_tokenizer(config.model.base_model_name)
    tokens = tokenize_codes(taxonomy, tokenizer, config.data_loader.tokenization)
    torch.manual_seed(0)
    first = NaicsEmbedder(config.to_dict()).eval().encoder
    torch.manual_seed(1)
    second = NaicsEmbedder(config.to_dict()).eval().encoder  # other A matrices, B still zero
    lora_a = [[p for n, p in e.named_parameters() if "lora_A" in n] for e in (first, second)]
    assert not any(torch.equal(a, b) for a, b in zip(*lora_a, strict=True))
    computed = first.code_features(tokens, cache_dir=tmp_path)
    (cached,) = tmp_path.glob("*.pt")

    caplog.set_level(logging.INFO, logger="naics_mlflow")
    read = second.code_features(tokens, cache_dir=tmp_path)  # adapters that add nothing: shared
    assert f"channel features read from {cached}" in caplog.text
    for channel in TEXT_CHANNELS:
        assert torch.equal(read.channels[channel], computed.channels[channel])
    assert torch.equal(read.items["examples"], computed.items["examples"])

    # bfloat16 asked for, float32 cached: the exact features stand in, nothing is computed.
    caplog.clear()
    halved = second.code_features(tokens, dtype=torch.bfloat16, cache_dir=tmp_path)
    assert f"channel features read from {cached}" in caplog.text
    assert torch.equal(halved.channels["title"], computed.channels["title"])
    # Not the other way round: float32 is never read from bfloat16's.
    only_halved = tmp_path / "bfloat16_only"
    first.code_features(tokens, dtype=torch.bfloat16, cache_dir=only_halved)
    caplog.clear()
    exact = first.code_features(tokens, cache_dir=only_halved)
    assert "read from" not in caplog.text
    assert len(list(only_halved.glob("*.pt"))) == 2
    assert torch.equal(exact.channels["title"], computed.channels["title"])

    # Asking for the items' title features, which the file lacks: computed, the file replaced.
    caplog.clear()
    with_titles = second.code_features(tokens, item_queries=True, cache_dir=tmp_path)
    assert "read from" not in caplog.text
    assert set(torch.load(cached, weights_only=True)) >= {"items.title", "items.examples"}
    assert set(second.code_features(tokens, item_queries=True, cache_dir=tmp_path).items) == {
        "examples",
        "title",
    }
    assert "read from" in caplog.text
    torch.testing.assert_close(with_titles.channels["title"], computed.channels["title"])

    # A moved adapter reads otherwise: its features are computed and kept in a file of their own.
    with torch.no_grad():
        for name, parameter in second.backbone.named_parameters():
            if "lora_B" in name and ".title" in name:
                parameter.normal_(std=0.5)
    caplog.clear()
    moved = second.code_features(tokens, cache_dir=tmp_path)
    assert "read from" not in caplog.text
    assert len(list(tmp_path.glob("*.pt"))) == 2
    assert (moved.channels["title"] - computed.channels["title"]).abs().max() > 0.01
    torch.testing.assert_close(moved.channels["excluded"], computed.channels["excluded"])

    # A file cut short is computed again and replaced, with one warning.
    cached.write_bytes(b"cut short")
    caplog.clear()
    again = first.code_features(tokens, cache_dir=tmp_path)
    assert f"ignoring unreadable cached channel features {cached}" in caplog.text
    assert torch.equal(again.channels["description"], computed.channels["description"])
    assert set(torch.load(cached, weights_only=True)) >= {"channels.title", "items.examples"}
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("content", [b"hello\n", b"cut short", b"", b"\x80\x04K\x01."], ids=repr)
def test_a_cached_file_of_any_other_bytes_is_ignored_with_one_warning(tmp_path, caplog, content):
    path = tmp_path / "cached.pt"
    write_cached(path, {"vectors": torch.ones(2, 3)}, "vectors")
    assert torch.equal(read_cached(path, "vectors")["vectors"], torch.ones(2, 3))
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        assert read_cached(path, "vectors") is None
    assert f"ignoring unreadable cached vectors {path}" in caplog.text


def test_a_cache_key_follows_the_source_of_the_code_that_computed_it(tmp_path, monkeypatch):
    module = tmp_path / "encoding_code.py"
    module.write_text("def encode(x):\n    return x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    encoding_code = importlib.import_module("encoding_code")
    before = source_digest(encoding_code.encode)
    assert source_digest(encoding_code.encode) == before
    module.write_text("def encode(x):\n    return 2 * x\n")  # edited, same version
    assert source_digest(encoding_code.encode) != before


def test_batched_queries_equal_the_training_path_one_by_one(trained_adapters, taxonomy):
    module, tokenizer, _ = trained_adapters
    hidden = module.encoder.hidden_size
    engine = SearchEngine(
        module,
        tokenizer,
        taxonomy.codes,
        taxonomy.titles,
        taxonomy.levels,
        torch.zeros((taxonomy.size, module.config.model.embedding_dim + 1)),
        LexicalIndex(["soybean farming"]),
        IndexItems(torch.zeros((0, hidden)), torch.zeros(0, dtype=torch.long)),
        # The training path cuts a query where it cuts an index item.
        search_settings(
            query_max_length=module.config.data_loader.tokenization.examples_max_length
        ),
    )
    config = module.config.data_loader.tokenization
    with torch.no_grad():
        one_by_one = [tokenize_queries([text], tokenizer, config) for text in QUERIES]
        embeddings = torch.cat([module(tokens).embeddings for tokens in one_by_one])
        examples = torch.cat(
            [module.encoder.channel_features(tokens)["examples"] for tokens in one_by_one]
        )
    batched = engine.encode_queries(QUERIES)
    torch.testing.assert_close(batched.embeddings, embeddings, **TOLERANCE)
    torch.testing.assert_close(batched.examples, examples, **TOLERANCE)
    single = engine.encode_queries(QUERIES[1:2])
    torch.testing.assert_close(single.embeddings, embeddings[1:2], **TOLERANCE)


@pytest.mark.parametrize("moved", [None, "title"])
def test_channels_that_read_alike_share_one_pass(tiny_overrides, moved):
    """Untrained adapters (LoRA's B at zero, as after head-only training) all read like the
    backbone: a query runs once, not once per query channel, and reads what the training path
    reads. Moving one adapter away from zero gives it its own pass again."""
    config = load_config(CONFIG, tiny_overrides)
    module = NaicsEmbedder(config.to_dict()).eval()
    encoder = module.encoder
    if moved is not None:
        torch.manual_seed(2)
        with torch.no_grad():
            for name, parameter in encoder.backbone.named_parameters():
                if f"lora_B.{moved}." in name:
                    parameter.normal_(std=0.5)
    tokenizer = load_tokenizer(config.model.base_model_name)
    backbone = encoder.merged_backbone()
    rows_read = []
    backbone.layers[0].qkv.register_forward_pre_hook(lambda _, args: rows_read.append(len(args[0])))
    limit = config.data_loader.tokenization.examples_max_length
    ids = query_ids(QUERIES[:3], tokenizer, limit).ids
    batches = list(query_batches(encoder, backbone, ids, tokenizer.pad_token_id))
    assert len(batches) == 1
    rows, features = batches[0]
    texts = [QUERIES[i] for i in rows]
    tokens = tokenize_queries(texts, tokenizer, config.data_loader.tokenization)
    expected = encoder.channel_features(tokens)
    for channel in CHANNELS:
        torch.testing.assert_close(features[channel], expected[channel], **TOLERANCE)
    padded_rows = tokens.texts["title"].input_ids.numel()
    assert rows_read == [padded_rows * (1 if moved is None else 2)]
    if moved is None:
        assert torch.equal(features["title"], features["examples"])
    else:
        assert (features["title"] - features["examples"]).abs().max() > 0.01


def test_nearest_item_similarity_is_each_codes_nearest_item_floored_at_zero(monkeypatch):
    vectors = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0.6, 0.8, 0], [-1, 0, 0]])
    # Code 0 has two items, code 1 none, code 2 one, and code 3's one item opposes every query.
    items = IndexItems(vectors, torch.tensor([0, 0, 2, 3]))
    queries = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0.8, 0.6, 0]])
    expected = torch.tensor([[1.0, 0, 0.6, 0], [1, 0, 0.8, 0], [0.8, 0, 0.96, 0]])
    torch.testing.assert_close(items.nearest_similarity(queries, 4), expected)
    monkeypatch.setattr(retrieval, "QUERY_BLOCK", 2)  # blocks of queries change nothing
    torch.testing.assert_close(items.nearest_similarity(queries, 4), expected)


def test_search_adds_the_nearest_item_to_national_industries_only(trained_adapters, taxonomy):
    module, *_ = trained_adapters
    national = np.flatnonzero(taxonomy.levels == MAX_LEVEL)
    owners: dict[str, list[int]] = {}
    for row in national:
        for item in taxonomy.examples[row]:
            owners.setdefault(item, []).append(int(row))
    item, (row,) = next((text, rows) for text, rows in owners.items() if len(rows) == 1)
    alone = search_settings()
    engine = SearchEngine.build(module, taxonomy, alone)
    assert set(engine.items.rows.tolist()) == {r for r in national if taxonomy.examples[r]}
    assert len(engine.items.rows) == sum(len(taxonomy.examples[r]) for r in national)

    texts = [item, "retail bakery"]
    queries = engine.encode_queries(texts)
    by_embedding = {}
    for level in (MAX_LEVEL, MAX_LEVEL - 1):
        distances = engine.distances(queries.embeddings, engine.candidates(level))
        by_embedding[level] = engine.scores(texts, queries, distances, level)
    engine.settings = search_settings(item_weight=3.0)
    nearest = engine.items.nearest_similarity(queries.examples, taxonomy.size)
    for level, alone_scores in by_embedding.items():
        rows = engine.candidates(level)
        distances = engine.distances(queries.embeddings, rows)
        added = engine.scores(texts, queries, distances, level) - alone_scores
        expected = 3.0 * nearest[:, rows] if level == MAX_LEVEL else torch.zeros_like(added)
        torch.testing.assert_close(added, expected)
    assert nearest[0, row] == pytest.approx(1.0, abs=1e-5)  # the query is the code's own item
    best = (by_embedding[MAX_LEVEL] + 3.0 * nearest[:, engine.candidates(MAX_LEVEL)]).max(dim=1)
    found = engine.search(texts, top_k=1)
    assert [matches[0].score for matches in found] == pytest.approx(best.values.tolist())


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("441120", "441120"),
        (" 4411\n", "4411"),
        ("11", "11"),
        ("32", "31"),  # a range sector by any of its prefixes
        ("31-33", "31"),
        ("44-45", "44"),
        ("31-32", None),
        ("4411201", None),
        ("441120 car dealer", None),
        ("7", None),
        # Written after words that say it is a code, as a statistician might type it.
        ("NAICS 441120", "441120"),
        ("naics code: 4411", "4411"),
        ("NAICS 2022 code 722511", "722511"),
        ("Code #31-33", "31"),
        ("code 7", None),
        ("NAICS codes for bakeries", None),
        ("barcode 441120", None),
    ],
)
def test_a_code_is_read_as_people_write_it(text, code):
    assert code_written_as(text) == code


def test_a_query_that_is_a_code_is_answered_by_the_code_and_its_nearest_codes(
    trained_adapters, taxonomy, caplog, monkeypatch
):
    module, *_ = trained_adapters
    settings = search_settings(lexical_weight=32.0, item_weight=10.0)
    engine = SearchEngine.build(module, taxonomy, settings)
    texts = ["441120", "retail bakery", "4411", "31-33"]
    encoded = []

    def recorded_query_ids(texts, *arguments):
        encoded.extend(texts)
        return query_ids(texts, *arguments)

    lexically_scored = []
    lexical_scores = engine.lexical.scores

    def recorded_lexical_scores(texts):
        lexically_scored.extend(texts)
        return lexical_scores(texts)

    monkeypatch.setattr(retrieval, "query_ids", recorded_query_ids)
    monkeypatch.setattr(engine.lexical, "scores", recorded_lexical_scores)
    with caplog.at_level(logging.WARNING, logger=retrieval.__name__):
        national, any_level = (engine.search(texts, top_k=4, level=level) for level in (6, None))
    assert not caplog.records
    # A code needs no pass through the backbone, and is not ranked as a text would be.
    assert set(encoded) == {"retail bakery"}
    assert lexically_scored == ["retail bakery"]
    used_cars = national[0]
    assert (used_cars[0].code, used_cars[0].distance, used_cars[0].score) == ("441120", 0, 0)
    assert used_cars[0].margin == pytest.approx(-used_cars[1].score)
    # The rest by the model's logit alone: the lexical and item signals read words.
    rows = engine.candidates(MAX_LEVEL)
    position = taxonomy.positions["441120"]
    distances = engine.distances(engine.code_embeddings[position : position + 1], rows)[0]
    distances[rows == position] = 0
    nearest = distances.sort(stable=True)
    temperature = module.config.loss.temperature
    expected = [
        (engine.codes[rows[j]], d)
        for j, d in zip(nearest.indices[:4].tolist(), nearest.values[:4].tolist(), strict=True)
    ]
    assert [m.code for m in used_cars] == [code for code, _ in expected]
    assert [m.distance for m in used_cars] == pytest.approx([d for _, d in expected], abs=1e-5)
    assert [m.score for m in used_cars] == pytest.approx([-d / temperature for _, d in expected])
    assert engine.search(texts[:1], top_k=4) == [used_cars]  # codes alone: no text to encode
    # A code of another level answers its lineage first, itself first where the level searched
    # holds it: 4411's two national industries, manufacturing's for 31-33, and at every level
    # 441120's four ancestors after it. The description between them ranks as it does alone.
    assert [m.code for m in any_level[2][:1] + any_level[3][:1]] == ["4411", "31-33"]
    assert {m.code for m in national[2][:2]} == {"441110", "441120"}
    assert national[2][0].score >= national[2][1].score
    assert all(m.code[:2] in ("31", "32", "33") for m in national[3])
    assert any_level[0][0].code == "441120"
    assert {m.code for m in any_level[0][1:]} < {"44112", "4411", "441", "44-45"}
    (alone,) = engine.search(["retail bakery"], top_k=4)
    assert [m.code for m in national[1]] == [m.code for m in alone]
    # The served model's embedding of such a text is the code's, as search reads it.
    embedded = engine.encode_queries(texts).embeddings
    assert torch.equal(embedded[0], engine.code_embeddings[position])
    (bakery,) = engine.encode_queries(texts[1:2]).embeddings
    torch.testing.assert_close(embedded[1], bakery, **TOLERANCE)


def test_a_number_that_is_not_a_code_is_searched_as_text_with_one_warning(
    trained_adapters, taxonomy, caplog
):
    module, *_ = trained_adapters
    engine = SearchEngine.build(module, taxonomy, search_settings(lexical_weight=32.0))
    # 441110 is a 2022 code too; 454110 was 2017's Electronic Shopping and Mail-Order Houses.
    texts = ["441110", "454110", "1990", "retail bakery"]
    with caplog.at_level(logging.WARNING, logger=retrieval.__name__):
        found = engine.search(texts, top_k=3)
    assert [r.getMessage() for r in caplog.records] == [
        "2 of 4 queries are numbers that are not NAICS 2022 codes ('454110' first); they are "
        "read as business descriptions"
    ]
    assert found[0][0].code == "441110"
    queries = engine.read_queries(texts[1:2])
    scores, _ = engine.ranking(queries, 1, MAX_LEVEL)
    best = scores[0].sort(descending=True, stable=True).indices[:3]
    rows = engine.candidates(MAX_LEVEL)
    assert [m.code for m in found[1]] == [engine.codes[rows[j]] for j in best]


def test_search_ranks_many_texts_in_blocks_as_it_ranks_them_at_once(
    trained_adapters, taxonomy, monkeypatch
):
    module, *_ = trained_adapters
    settings = search_settings(lexical_weight=32.0, item_weight=10.0)
    engine = SearchEngine.build(module, taxonomy, settings)
    # Codes and texts of several sentences in the same blocks, at different places.
    texts = [*QUERIES, "441120", "We milk cows. Dairy farm.", "4411", "dairy farm"]
    at_once = engine.search(texts, top_k=4)
    monkeypatch.setattr(retrieval, "QUERY_BLOCK", 3)  # blocks of 3, the last one short
    in_blocks = engine.search(texts, top_k=4)
    assert len(in_blocks) == len(texts)
    for blocked, whole in zip(in_blocks, at_once, strict=True):
        assert [m.code for m in blocked] == [m.code for m in whole]
        assert [m.score for m in blocked] == pytest.approx([m.score for m in whole], abs=1e-4)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "Soybean farming, field and seed production",
            ["Soybean farming, field and seed production"],
        ),
        (
            "ACME Corp. is a U.S. firm, est. 1990. We bake bread; we also deliver it!  Since 2001 "
            "we sell cakes? Yes.",
            [
                "ACME Corp. is a U.S. firm, est. 1990.",
                "We bake bread;",
                "we also deliver it!",
                "Since 2001 we sell cakes?",
                "Yes.",
            ],
        ),
        (" One sentence.  ", ["One sentence."]),
        (
            "Postal stations operated by U.S. Postal Service. Smith Bros. Farms of St. Louis. "
            "Dr. No.",
            [
                "Postal stations operated by U.S. Postal Service.",
                "Smith Bros. Farms of St. Louis.",
                "Dr. No.",
            ],
        ),
    ],
    ids=["an index item", "a description", "spaces around", "initials and abbreviations"],
)
def test_a_query_is_cut_at_its_sentence_breaks(text, expected):
    assert retrieval.sentences(text) == expected


def test_a_query_of_several_sentences_gives_each_code_its_best_sentences_score(
    trained_adapters, taxonomy, monkeypatch
):
    module, *_ = trained_adapters
    settings = search_settings(lexical_weight=32.0, item_weight=10.0)
    engine = SearchEngine.build(module, taxonomy, settings)
    firm, activity = "Our firm was founded in 1990 and has 40 staff.", "We grow soybeans."
    rows = engine.candidates(MAX_LEVEL)
    # Each sentence ranked as a query of its own; each code keeps the better of the two.
    scores, distances = engine.ranking(engine.read_queries([firm, activity]), 2, MAX_LEVEL)
    best, sentence = scores.max(dim=0)
    order = best.sort(descending=True, stable=True).indices[:5]
    expected = [
        (engine.codes[rows[j]], best[j].item(), distances[sentence[j], j].item()) for j in order
    ]

    texts = ["retail bakery", f"{firm} {activity}", "dairy farm"]
    ranked = engine.search(texts, top_k=5)
    assert [m.code for m in ranked[1]] == [code for code, _, _ in expected]
    assert [m.score for m in ranked[1]] == pytest.approx([s for _, s, _ in expected], abs=1e-4)
    # The distance shown is that of the sentence that gave the score.
    assert [m.distance for m in ranked[1]] == pytest.approx([d for *_, d in expected], abs=1e-4)
    # The queries around it rank as they do alone, in blocks of queries too.
    for text, matches in zip(texts[::2], ranked[::2], strict=True):
        (on_its_own,) = engine.search([text], top_k=5)
        assert [m.code for m in matches] == [m.code for m in on_its_own]
    monkeypatch.setattr(retrieval, "QUERY_BLOCK", 1)
    assert [[m.code for m in matches] for matches in engine.search(texts, top_k=5)] == [
        [m.code for m in matches] for matches in ranked
    ]
    # evaluate ranks it as search does.
    first, second = ranked[1][0].code, ranked[1][1].code
    report = evaluate(
        engine,
        taxonomy,
        [QuerySet("long", [texts[1], texts[1]], [first, second], Path("long.csv"))],
        False,
    )
    assert report.retrieval["long"]["model"]["top1"] == pytest.approx(0.5)
    assert report.retrieval["long"]["model"]["mrr"] == pytest.approx(0.75)


def test_a_misspelt_query_is_read_as_written_and_as_corrected(trained_adapters, taxonomy):
    module, *_ = trained_adapters
    engine = SearchEngine.build(module, taxonomy, search_settings(lexical_weight=32.0))
    misspelt, corrected = "grow soybeens", "grow soybean"
    read = engine.read_queries(["dairy farm", misspelt])
    assert read.texts == ["dairy farm", misspelt, corrected]
    assert read.owners.tolist() == [0, 1, 1]
    # Each code takes the better of the two readings' scores.
    as_misspelt, _ = engine.ranking(engine.read_queries([misspelt]), 1, MAX_LEVEL)
    as_corrected, _ = engine.ranking(engine.read_queries([corrected]), 1, MAX_LEVEL)
    assert (as_misspelt >= as_corrected - 1e-4).all()


def test_a_query_sentence_is_read_to_search_query_max_length_tokens(
    trained_adapters, taxonomy, caplog, capfd, monkeypatch
):
    module, *_ = trained_adapters
    engines = {
        limit: SearchEngine.build(
            module,
            taxonomy,
            search_settings(query_max_length=limit),
        )
        for limit in (32, 64)
    }
    tokenizer = engines[32].tokenizer
    sentence = "family business and support activities for farming " * 5 + "soybeans"
    short = "soybean farming"
    # As MiniLM's tokenizer says (the tiny backbone's sets no limit): the backbone's positions.
    monkeypatch.setattr(tokenizer, "model_max_length", 512)
    endless = " ".join(["soybean farming"] * 300)  # 600 words, past them
    assert 32 < len(tokenizer(sentence)["input_ids"]) <= 64
    tokenized = []
    tokenize = type(tokenizer).__call__

    def recorded_tokenize(self, texts, **options):
        tokenized.append(list(texts))
        return tokenize(self, texts, **options)

    monkeypatch.setattr(type(tokenizer), "__call__", recorded_tokenize)
    texts = [sentence, short, endless]
    with caplog.at_level(logging.WARNING, logger=retrieval.__name__):
        read = {limit: engine.read_queries(texts) for limit, engine in engines.items()}
    # One tokenizer pass a reading both cuts the pieces and tells which were cut.
    assert tokenized == [texts, texts]
    # Each reading says in one line how many it cut: the 32-token one the sentence as well.
    assert [r.getMessage() for r in caplog.records] == [
        f"{cut} of 3 queries have a sentence longer than the model reads ({limit} tokens, "
        "search.query_max_length); its beginning is used"
        for cut, limit in ((2, 32), (1, 64))
    ]
    # The tokenizer adds no line of its own about a text longer than the backbone reads.
    assert "sequence length is longer" not in capfd.readouterr().err
    cut, whole = read[32].encoded.embeddings, read[64].encoded.embeddings
    assert not torch.allclose(cut[0], whole[0], atol=1e-4)
    torch.testing.assert_close(cut[1], whole[1], **TOLERANCE)


def test_a_matchs_margin_is_its_score_above_the_next_codes(trained_adapters, taxonomy):
    module, *_ = trained_adapters
    settings = search_settings(lexical_weight=32.0, item_weight=10.0)
    engine = SearchEngine.build(module, taxonomy, settings)
    for shown, longer in zip(
        engine.search(QUERIES, top_k=3), engine.search(QUERIES, top_k=4), strict=True
    ):
        scores = [match.score for match in longer]
        expected = [above - below for above, below in itertools.pairwise(scores)]
        assert [match.margin for match in shown] == pytest.approx(expected)
    (sectors,) = engine.search(QUERIES[:1], top_k=20, level=2)  # all 20: none below the last
    assert all(match.margin >= 0 for match in sectors[:-1]) and math.isnan(sectors[-1].margin)


def test_bfloat16_backbone_reads_like_float32_and_leaves_training_weights_alone(
    trained_adapters,
):
    module, tokenizer, tokens = trained_adapters
    encoder = module.encoder
    rows = torch.tensor([0, 1, 17, 300, 1024, 2124])
    queries = tokenize_queries(QUERIES, tokenizer, module.config.data_loader.tokenization)
    exact = encoder.code_features(tokens).of_codes(rows)
    halved = encoder.code_features(tokens, dtype=torch.bfloat16).of_codes(rows)
    # Queries run their two channels as two groups of one batch.
    exact_queries = encoder.query_features(encoder.merged_backbone(), queries.texts["title"])
    halved_queries = encoder.query_features(
        encoder.merged_backbone(torch.bfloat16), queries.texts["title"]
    )
    for channel in CHANNELS:
        torch.testing.assert_close(
            halved_queries[channel], exact_queries[channel], atol=0.02, rtol=0
        )
        assert halved[channel].dtype == torch.float32
        present = exact[channel].norm(dim=-1) > 0
        cosine = torch.nn.functional.cosine_similarity(
            halved[channel][present], exact[channel][present], dim=-1
        )
        assert cosine.min() > 0.999
        assert (halved[channel] - exact[channel]).abs().max() > 0  # it did run in bfloat16
    merged = module.encoder.merged_backbone(torch.bfloat16)
    assert {t.dtype for t in merged.buffers()} == {torch.bfloat16}
    assert {p.dtype for p in module.encoder.backbone.parameters()} == {torch.float32}


def _save_checkpoint(module: NaicsEmbedder, path: Path) -> Path:
    """``module``'s weights as a stage saves them (``on_save_checkpoint``)."""
    checkpoint = {"hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize("targets", ["default", "every_linear"])
def test_a_checkpoint_read_without_the_training_stack_encodes_as_the_training_model(
    tiny_overrides, taxonomy, tmp_path, targets
):
    """``load_embedder`` builds the encoder from the checkpoint's tensors and the backbone's own
    files; it reads codes and queries exactly as the training model it was saved from (the same
    weights in the same products), and finds the same cached features. With every linear layer
    adapted, the pooler's adapter is in the checkpoint too."""
    overrides = list(tiny_overrides)
    if targets == "every_linear":
        overrides.append("model.lora.target_modules=[query, key, value, dense]")
    module, tokenizer, tokens = _with_trained_adapters(overrides, taxonomy)
    trained = load_embedder(_save_checkpoint(module, tmp_path / "adapted.ckpt"), CPU).encoder
    assert not trained.training
    expected = module.encoder.code_features(tokens)
    features = trained.code_features(tokens)
    for channel in TEXT_CHANNELS:
        assert torch.equal(features.channels[channel], expected.channels[channel])
    rows = np.arange(taxonomy.size)
    assert torch.equal(
        trained.embed_codes(features, rows), module.encoder.embed_codes(expected, rows)
    )
    queries = tokenize_queries(QUERIES, tokenizer, module.config.data_loader.tokenization)
    read = trained.query_features(trained.merged_backbone(), queries.texts["title"])
    for channel, values in module.encoder.query_features(
        module.encoder.merged_backbone(), queries.texts["title"]
    ).items():
        assert torch.equal(read[channel], values)
    assert trained.features_key(tokens, torch.float32) == module.encoder.features_key(
        tokens, torch.float32
    )


def test_codes_with_equal_scores_come_in_taxonomy_order(trained_adapters, taxonomy, tmp_path):
    """Codes embedded alike score alike; their order must not depend on the device's topk."""
    module, _, _ = trained_adapters
    path = _save_checkpoint(module, tmp_path / "adapted.ckpt")
    engine = SearchEngine.build(load_embedder(path, CPU), taxonomy, search_settings())
    (found,) = engine.search(["soybean farming"], top_k=1, level=5)
    rows = engine.candidates(5)
    best = taxonomy.codes.index(found[0].code)
    # Three other industries, spread over taxonomy order, embedded as it is. Whichever code the
    # tiny model finds (Soybean Farming itself, the first, in one CI run), three others.
    others = rows[rows != best]
    alike = [others[0], others[len(others) // 2], others[-1]]
    engine.code_embeddings[alike] = engine.code_embeddings[best].clone()
    (matches,) = engine.search(["soybean farming"], top_k=5, level=5)
    assert [match.margin for match in matches[:3]] == [0.0, 0.0, 0.0]
    assert [match.code for match in matches[:4]] == sorted(
        taxonomy.codes[r] for r in [best, *alike]
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_checkpoint_read_onto_a_gpu_searches_as_on_the_cpu(trained_adapters, taxonomy, tmp_path):
    """``search.device: cuda``: every weight on the GPU, and the same embeddings and rankings
    as the CPU's to float32 rounding (``benchmarks/gpu_step.sh`` runs this on its GPU)."""
    module, _, _ = trained_adapters
    path = _save_checkpoint(module, tmp_path / "adapted.ckpt")
    settings = search_settings(item_weight=3.0, device="cuda")
    engines = {
        device.type: SearchEngine.build(load_embedder(path, device), taxonomy, settings)
        for device in (CPU, torch.device("cuda"))
    }
    on_gpu = engines["cuda"]
    tensors = [*on_gpu.backbone.buffers(), *on_gpu.embedder.encoder.parameters()]
    assert {t.device.type for t in [*tensors, on_gpu.code_embeddings]} == {"cuda"}
    torch.testing.assert_close(
        on_gpu.code_embeddings.cpu(), engines["cpu"].code_embeddings, atol=1e-4, rtol=1e-4
    )
    queries = {device: engine.encode_queries(QUERIES) for device, engine in engines.items()}
    torch.testing.assert_close(
        queries["cuda"].embeddings.cpu(), queries["cpu"].embeddings, atol=1e-4, rtol=1e-4
    )
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        ranked = {device: engine.search(QUERIES[:3], top_k=3) for device, engine in engines.items()}
    # cuDNN's attention builds a graph per shape (naics_mlflow.model.attention).
    assert not [event.name for event in profile.events() if "cudnn_attention" in event.name]
    for on_gpu_matches, on_cpu_matches in zip(ranked["cuda"], ranked["cpu"], strict=True):
        # Scores are distances over loss.temperature (0.1): the embeddings' rounding, times 10.
        assert [m.score for m in on_gpu_matches] == pytest.approx(
            [m.score for m in on_cpu_matches], abs=1e-3
        )
        # The tiny model gives some codes equal scores, which rounding may order either way.
        for rank, (on_gpu, on_cpu) in enumerate(zip(on_gpu_matches, on_cpu_matches, strict=True)):
            above = on_cpu_matches[rank - 1].margin if rank else math.inf
            assert on_gpu.code == on_cpu.code or min(above, on_cpu.margin) < 1e-3
    query_set = QuerySet(
        "queries", QUERIES[:3], ["111110", "311811", "513210"], Path("queries.csv")
    )
    reports = {
        device: evaluate(engine, taxonomy, [query_set]).metrics()
        for device, engine in engines.items()
    }
    assert reports["cuda"].keys() == reports["cpu"].keys()
    for name, value in reports["cpu"].items():
        assert reports["cuda"][name] == pytest.approx(value, abs=1e-3), name


def test_a_checkpoint_that_does_not_fit_its_configuration_is_named(trained_adapters, tmp_path):
    module, _, _ = trained_adapters
    path = _save_checkpoint(module, tmp_path / "adapted.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    name = next(name for name in checkpoint["state_dict"] if "lora_A.examples" in name)
    del checkpoint["state_dict"][name]
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=rf"does not fit this model at '{name[8:]}'"):
        load_embedder(path, CPU)


def test_a_backbone_named_by_its_hub_id_is_read_from_the_hugging_face_cache(
    tiny_backbone, monkeypatch, tmp_path
):
    """What ``from_pretrained`` reads offline, search reads too: the cached snapshot."""
    snapshot = tmp_path / "models--someone--tiny-bert" / "snapshots" / "0123abcd"
    snapshot.parent.mkdir(parents=True)
    shutil.copytree(tiny_backbone, snapshot)
    (tmp_path / "models--someone--tiny-bert" / "refs").mkdir()
    (tmp_path / "models--someone--tiny-bert" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    weights = merged.BertWeights.read("someone/tiny-bert")
    local = merged.BertWeights.read(str(tiny_backbone))
    assert weights.config == local.config
    assert all(torch.equal(weights.tensors[name], t) for name, t in local.tensors.items())
    with pytest.raises(BackboneError, match=r"not a folder and not in the Hugging Face cache"):
        merged.BertWeights.read("someone/another-bert")


def test_using_a_trained_model_imports_no_training_stack():
    """Search, embed, evaluate and the served model start without importing Lightning,
    transformers' model classes or scikit-learn, which cost seconds at every command."""
    heavy = ["lightning", "sklearn", "transformers.modeling_utils", "geoopt"]
    script = (
        "import sys; import naics_mlflow.model.trained, naics_mlflow.evaluation.retrieval; "
        f"print([name for name in {heavy!r} if name in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_training_imports_scikit_learn_and_geoopt_only_where_a_stage_uses_them():
    """k-means for false negatives and the Riemannian optimiser are options; importing their
    libraries cost every training command 0.4 s."""
    script = (
        "import sys; import naics_mlflow.training.chain; "
        "print([name for name in ['sklearn', 'geoopt'] if name in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_tiny_backbone_reads_naics_words_as_words(tiny_backbone):
    """Every test model reads its texts with this tokenizer: it must tell words apart, not read
    each one as [UNK]."""
    tokens = load_tokenizer(str(tiny_backbone)).tokenize("Soybean farming subsector")
    assert tokens == ["soybean", "farming", "subsector"]


def test_a_backbone_saved_with_a_task_head_is_read_as_its_encoder(tiny_backbone, tmp_path):
    """A BERT saved with a masked-LM head names its encoder's weights ``bert.*``, as
    ``AutoModel`` reads them; the weights search reads are the same."""
    from transformers import BertForMaskedLM

    encoder_only = merged.BertWeights.read(str(tiny_backbone))
    with_head = BertForMaskedLM.from_pretrained(tiny_backbone)
    with_head.save_pretrained(tmp_path)
    weights = merged.BertWeights.read(str(tmp_path))
    assert all(torch.equal(weights.tensors[name], t) for name, t in encoder_only.tensors.items())
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(BackboneError, match=r"cannot load backbone .*config\.json"):
        merged.BertWeights.read(str(tmp_path))


def test_a_backbone_whose_activation_search_cannot_run_is_refused_before_training(
    tiny_backbone, tmp_path, tiny_overrides
):
    shutil.copytree(tiny_backbone, tmp_path, dirs_exist_ok=True)
    config_file = tmp_path / "config.json"
    config_file.write_text(config_file.read_text().replace('"gelu"', '"gelu_new"'))
    config = load_config(CONFIG, [*tiny_overrides, f"model.base_model_name={tmp_path}"])
    with pytest.raises(BackboneError, match=r"uses the activation gelu_new; search and embedding"):
        NaicsEmbedder(config.to_dict())


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_a_backbone_with_an_unreadable_weights_file_is_one_line(
    tiny_backbone, tmp_path, weights_file
):
    shutil.copytree(tiny_backbone, tmp_path, dirs_exist_ok=True)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / weights_file).write_bytes(b"not weights")
    with pytest.raises(BackboneError, match=rf"{weights_file} is not readable"):
        merged.BertWeights.read(str(tmp_path))
    (tmp_path / weights_file).unlink()
    with pytest.raises(BackboneError, match=r"has neither model\.safetensors nor"):
        merged.BertWeights.read(str(tmp_path))
