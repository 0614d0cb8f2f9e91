"""Encoding without gradients: the backbone's BERT encoder run directly on its weights, with each
channel's LoRA adapter merged into its own copy of the weights it adapts.

What runs it: a head-only stage's features, ``embed``, ``search``, ``evaluate`` and the served
model. Training keeps the adapters apart from the weights, on the transformers module
(:mod:`naics_mlflow.model.lora`), and the two agree to float rounding in eval mode
(``tests/test_inference.py``).

Why not the transformers module: a query is a few short texts, and a pass over them is dozens of
small matrix products with the module's bookkeeping around each. Here query, key and value are
one product, every weight is stored ``(in, out)`` for ``addmm`` (MKL runs products of a few rows
up to 1.9x faster on that layout than through ``F.linear``'s transposed view) or packed once in
oneDNN's layout where that is faster (:func:`_onednn_packs`), and nothing else runs between the
products: a single query's pass takes about a fifth less time (docs/results.md). The price is
that only BERT encoders can be merged; :func:`check_mergeable` says so when a model is built,
before anything trains.

It is built from plain tensors: the backbone's weights (:class:`BertWeights`, from the training
model in memory or read from its files) and each channel's adapter as the weights it adds
(:func:`adapter_deltas`, from the LoRA tensors of the training model or of a checkpoint). So a
command that only uses a trained model never imports transformers' model classes.
"""

from __future__ import annotations

import functools
import json
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from naics_mlflow.data.features import mean_pool
from naics_mlflow.data.pretrained import BackboneError, resolve_backbone
from naics_mlflow.data.tokenization import length_batches, pad
from naics_mlflow.errors import first_line
from naics_mlflow.model.attention import shape_agnostic_attention

# Each channel's {linear layer's path in the backbone: (out, in) weight its adapter adds}.
AdapterDeltas = dict[str, dict[str, torch.Tensor]]

# The activations of BERT encoders, by their config's ``hidden_act``, as transformers computes
# them; its own table is not imported because importing it costs seconds.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}

# The linear layers of a BERT layer that :class:`MergedLayer` reads, by their path in the layer.
LAYER_LINEARS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
# How a LoRA tensor is named in the model it adapts: ``<layer path>.lora_A.<channel>.weight``.
LORA_TENSOR = re.compile(r"(?P<path>.+)\.lora_(?P<matrix>[AB])\.(?P<channel>[^.]+)\.weight")


def pass_tokens(device: torch.device) -> int:
    """Tokens, padding included, that one backbone pass without gradients takes on ``device``.

    On a CPU, passes of 2,048 tokens (12 MB of float32 activations at the feed-forward layer)
    embed all codes in a sixth less time in float32, and a fifth less in bfloat16, than passes of
    256 texts did (up to 32,768 tokens, 200 MB; docs/results.md). A GPU takes larger passes.
    """
    return 2048 if device.type == "cpu" else 32768


def check_mergeable(name: str, config: dict[str, Any]) -> None:
    """Raise :class:`BackboneError` unless the backbone ``name`` (its ``config.json`` as a dict)
    is a BERT encoder with absolute positions and an activation of ``ACTIVATIONS``, the
    architecture :class:`MergedBackbone` runs."""
    model_type = config.get("model_type")
    position = config.get("position_embedding_type", "absolute")
    if model_type != "bert" or position != "absolute" or config.get("is_decoder", False):
        raise BackboneError(
            f"backbone '{name}' is a {model_type} model; model.base_model_name must be a "
            "BERT encoder (MiniLM, BGE, E5, GTE and the like), the architecture that search and "
            "embedding run"
        )
    if config.get("hidden_act") not in ACTIVATIONS:
        raise BackboneError(
            f"backbone '{name}' uses the activation {config.get('hidden_act')}; search and "
            f"embedding run BERT encoders with {', '.join(ACTIVATIONS)}"
        )


def is_lora_target(path: str, target_modules: list[str]) -> bool:
    """Whether ``model.lora.target_modules`` names the layer at ``path``: the whole path, or its
    end after a dot (``query`` names ``encoder.layer.0.attention.self.query``), as peft matched."""
    return any(path == t or path.endswith(f".{t}") for t in target_modules)


def _is_layer_linear(path: str) -> bool:
    layer, _, linear = path.partition(".layer.")[2].partition(".")
    return path.startswith("encoder.layer.") and layer.isdigit() and linear in LAYER_LINEARS


def adapter_deltas(
    lora: dict[str, torch.Tensor], scaling: float, channels: tuple[str, ...]
) -> AdapterDeltas:
    """Each channel's adapter as the weights it adds, ``scaling * B @ A`` (LoRA), from the
    LoRA tensors named as in the backbone (``LORA_TENSOR``).

    Raises :class:`BackboneError` for an adapter on a layer :class:`MergedBackbone` would not
    merge, and so would silently drop: anything but the ``LAYER_LINEARS`` of the encoder's layers
    and the pooler (which mean pooling never reads, so its adapter is left out).
    """
    matrices: dict[tuple[str, str, str], torch.Tensor] = {}
    for name, tensor in lora.items():
        path = name.partition(".lora_")[0]
        if not _is_layer_linear(path) and not path.startswith("pooler."):
            raise BackboneError(
                f"model.lora.target_modules adapts {path}, which search and embedding cannot "
                "merge; name linear layers of the encoder's layers (query, key, value, dense)"
            )
        match = LORA_TENSOR.fullmatch(name)
        if match is None:
            raise BackboneError(f"cannot merge '{name}': search merges LoRA's A and B matrices")
        matrices[path, match["matrix"], match["channel"]] = tensor.detach()
    paths = [path for path, matrix, _ in matrices if matrix == "A" and _is_layer_linear(path)]
    return {
        channel: {
            path: (matrices[path, "B", channel] @ matrices[path, "A", channel]) * scaling
            for path in dict.fromkeys(paths)
        }
        for channel in channels
    }


def shared_readings(deltas: AdapterDeltas, channels: tuple[str, ...]) -> dict[str, str]:
    """Each channel -> the first of ``channels`` whose adapter is the same function as its own.

    Adapters are the same function when they add the same weight to every layer: always while
    LoRA's B matrices are still zero, as after head-only training, where all four channels are
    the backbone itself. Channels that read alike then share one copy of the weights, and a
    query's title and examples readings are one pass instead of two.
    """
    reading: dict[str, str] = {}
    for channel in channels:
        reading[channel] = next(
            (
                earlier
                for earlier in dict.fromkeys(reading.values())
                if all(
                    torch.equal(delta, deltas[earlier][path])
                    for path, delta in deltas[channel].items()
                )
            ),
            channel,
        )
    return reading


@dataclass(frozen=True)
class BertWeights:
    """A BERT encoder's own weights, named as in its state dict (``encoder.layer.0.output.dense
    .weight``), and its ``config.json``: what :class:`MergedBackbone` merges adapters into."""

    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]

    @classmethod
    def of_model(cls, model: nn.Module) -> BertWeights:
        """The weights of a transformers BERT model in memory, with or without its adapters
        (which name an adapted layer's own weight ``<path>.base_layer.weight``)."""
        tensors = {
            name.replace(".base_layer.", "."): tensor.detach()
            for name, tensor in model.state_dict().items()
            if ".lora_" not in name
        }
        return cls(tensors, model.config.to_dict())

    @classmethod
    def read(cls, name: str) -> BertWeights:
        """The weights of the backbone ``name`` read from its files (``config.json`` and
        ``model.safetensors`` or ``pytorch_model.bin``), as transformers would load them.

        Without transformers' model classes, whose import takes longer (about 3 s on 2 cores)
        than loading everything else a search needs.
        """
        folder = _backbone_folder(name)
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise BackboneError(f"cannot load backbone '{name}': {folder} has no config.json")
        try:
            config = json.loads(config_file.read_text())
        except ValueError as exc:
            raise BackboneError(f"cannot load backbone '{name}': {config_file}: {exc}") from exc
        check_mergeable(name, config)
        raw = _read_weights(name, folder)
        # A BERT saved with a task head (BertForMaskedLM and the like) prefixes its encoder's
        # weights with "bert."; transformers' AutoModel reads those too.
        tensors = {key.removeprefix("bert."): tensor for key, tensor in raw.items()}
        needed = _needed_tensors(config)
        missing = [key for key in needed if key not in tensors]
        if missing:
            raise BackboneError(
                f"cannot load backbone '{name}': its weights have no '{missing[0]}'"
            )
        return cls({key: tensors[key].float() for key in needed}, config)

    def to(self, device: torch.device) -> BertWeights:
        """The same weights on ``device``."""
        return BertWeights({k: t.to(device) for k, t in self.tensors.items()}, self.config)


def _read_weights(name: str, folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of the backbone's weights file in ``folder``, or one line saying why not."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for file_name in ("model.safetensors", "pytorch_model.bin"):
        path = folder / file_name
        if not path.is_file():
            continue
        try:
            if file_name == "model.safetensors":
                return load_file(path)
            return torch.load(path, map_location="cpu", weights_only=True)
        except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
            raise BackboneError(
                f"cannot load backbone '{name}': {path} is not readable ({first_line(exc)})"
            ) from exc
    raise BackboneError(
        f"cannot load backbone '{name}': {folder} has neither model.safetensors nor "
        "pytorch_model.bin"
    )


def _backbone_folder(name: str) -> Path:
    """The folder of the backbone ``name``: itself, the copy the project ships, or its copy in the
    Hugging Face cache (never downloaded)."""
    location = Path(resolve_backbone(name))
    if location.is_dir():
        return location
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except (HFValidationError, LocalEntryNotFoundError) as exc:
        raise BackboneError(
            f"cannot load backbone '{name}': not a folder and not in the Hugging Face cache; use "
            "a local model folder or 'sentence-transformers/all-MiniLM-L6-v2', which ships "
            "with the project"
        ) from exc


def _needed_tensors(config: dict[str, Any]) -> list[str]:
    """The names of the weights :class:`MergedBackbone` reads from a BERT encoder."""
    names = [
        "embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight",
        "embeddings.token_type_embeddings.weight",
        "embeddings.LayerNorm.weight",
        "embeddings.LayerNorm.bias",
    ]
    for layer in range(config["num_hidden_layers"]):
        prefix = f"encoder.layer.{layer}."
        for module in (*LAYER_LINEARS, "attention.output.LayerNorm", "output.LayerNorm"):
            names += [f"{prefix}{module}.weight", f"{prefix}{module}.bias"]
    return names


@dataclass(frozen=True)
class Cpu:
    """What decides how a CPU runs the backbone's products fastest: its maker and its flags."""

    amd: bool
    flags: frozenset[str]


@functools.cache
def this_cpu() -> Cpu:
    """This machine's CPU as Linux describes it (``/proc/cpuinfo``); no flags where it cannot
    tell, which keeps every choice at what runs everywhere."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.is_file() else ""
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return Cpu(amd="AuthenticAMD" in text, flags=frozenset(flags.partition(":")[2].split()))


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``, as ``search.backbone_dtype`` names it."""
    return str(dtype).removeprefix("torch.")


def inference_device(setting: str) -> torch.device:
    """Where a trained model encodes without gradients: ``search.device`` as set, ``auto`` being
    the first CUDA GPU when torch sees one, else the CPU.

    Raises :class:`BackboneError` for ``cuda`` where torch sees no GPU, rather than falling back
    to a CPU that could take a hundred times longer without saying so.
    """
    if setting == "cuda" and not torch.cuda.is_available():
        raise BackboneError(
            "search.device is cuda, but torch sees no CUDA GPU here (a CPU-only torch, or "
            "CUDA_VISIBLE_DEVICES empty); set search.device to auto or cpu"
        )
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def inference_dtype(setting: str, device: torch.device, cpu: Cpu | None = None) -> torch.dtype:
    """The backbone's dtype for encoding without gradients on ``device``: ``search.backbone_dtype``
    as set, or for ``auto`` bfloat16 where it was measured faster, else float32.

    bfloat16 left retrieval on dev where float32 has it (quick-start model as ``search`` ranks:
    top-1 0.7764 against 0.7745, the same top-1 code for 99.6% of the queries) and embeds all
    codes in about half the time where the CPU multiplies bfloat16 natively and oneDNN uses it:
    with AMX (Intel Xeons since 2023), and on AMD CPUs with AVX512-BF16 (Zen 4 and later). An
    Intel CPU with AVX512-BF16 but no AMX was slower in bfloat16 (63 s against 46 s), and a CPU
    without either converts every product. GPUs with bfloat16 use it. ``cpu`` defaults to
    :func:`this_cpu` (docs/results.md).
    """
    if setting != "auto":
        return getattr(torch, setting)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    cpu = this_cpu() if cpu is None else cpu
    native = "amx_bf16" in cpu.flags or (cpu.amd and "avx512_bf16" in cpu.flags)
    if device.type == "cpu" and native and torch.backends.mkldnn.is_available():
        return torch.bfloat16
    return torch.float32


def _onednn_packs(weight: torch.Tensor) -> bool:
    """Whether ``weight``'s products run from oneDNN's own blocked layout (the one
    ``torch.compile`` gives CPU linears) instead of ``addmm`` (MKL's GEMM on x86).

    bfloat16: where oneDNN runs it natively (AMX or AVX512-BF16); with AMX a query's products ran
    1.3-2x faster than ``addmm`` and a batch's 10%. float32: on AMD CPUs only, where MKL's GEMM
    is slower than oneDNN's (on an EPYC Zen 4, products of 20-2,048 rows 1.3-1.6x, embedding
    all codes 80 -> 53 s); on an Intel Xeon MKL was the faster, by a tenth (docs/results.md).
    """
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.float32:
        return this_cpu().amd
    return weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _channel_weights(
    weights: BertWeights, path: str, deltas: list[dict[str, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(K, out, in)`` weights and the ``(out,)`` bias of the linear layer at ``path``: one
    weight per reading (``W + delta``) when an adapter adds to it, else ``K = 1``."""
    weight, bias = weights.tensors[f"{path}.weight"], weights.tensors[f"{path}.bias"]
    if path not in deltas[0]:
        return weight.unsqueeze(0), bias
    return torch.stack([weight + delta[path] for delta in deltas]), bias


class ChannelLinear(nn.Module):
    """A linear layer whose weight may differ by channel: one per channel, or one shared by all
    (``count``). Each group of a batch's rows reads its channel's.

    Weights are stored ``(in, out)`` for ``addmm``, or packed by oneDNN (see
    :func:`_onednn_packs`).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype) -> None:
        """``weight`` ``(count, out, in)``, ``bias`` ``(out,)``."""
        super().__init__()
        weight = weight.detach().to(dtype)
        self.register_buffer("bias", bias.detach().to(dtype))
        self.count = len(weight)
        self.packed = None
        if _onednn_packs(weight):
            self.packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weight]
        else:
            self.register_buffer("weight", weight.transpose(1, 2).contiguous())

    @classmethod
    def of(
        cls,
        weights: BertWeights,
        paths: list[str],
        deltas: list[dict[str, torch.Tensor]],
        dtype: torch.dtype,
    ):
        """One layer computing the outputs of the backbone's linear layers at ``paths`` side by
        side (query, key and value in one product), each reading's adapter (``deltas``, one per
        reading) merged into their weights."""
        merged = [_channel_weights(weights, path, deltas) for path in paths]
        count = max(weight.shape[0] for weight, _ in merged)
        weight = torch.cat([weight.expand(count, -1, -1) for weight, _ in merged], dim=1)
        return cls(weight, torch.cat([bias for _, bias in merged]), dtype)

    def _product(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(
                x, self.packed[index], self.bias, "none", [], ""
            )
        return torch.addmm(self.bias, x, self.weight[index])

    def forward(self, x: torch.Tensor, groups: list[tuple[int, int]]) -> torch.Tensor:
        """``(N, in)`` -> ``(N, out)``; ``groups`` lists (channel index, row count) in row order."""
        if self.count == 1:
            return self._product(x, 0)
        if len(groups) == 1:
            return self._product(x, groups[0][0])
        parts = x.split([rows for _, rows in groups])
        return torch.cat(
            [self._product(part, channel) for (channel, _), part in zip(groups, parts, strict=True)]
        )


def attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attend: torch.Tensor | None
) -> torch.Tensor:
    """Scaled dot-product attention of ``(B, heads, L, d)`` queries, keys and values, ``attend``
    ``(B, 1, 1, L)`` True at real tokens (None: all real); ``(B, heads, L, d)``.

    On a CPU, passes of many short texts (8 or more, of 32 tokens or fewer: index items, titles,
    a batch of queries) run as two batched matrix products around a softmax. PyTorch's fused CPU
    kernel pays a fixed cost per text and head that dwarfs the arithmetic of a 10-token text: on
    2 cores a pass of 200 such texts took 12.9 ms fused and 5.8 ms as products in float32 (9.7
    and 3.2 in bfloat16), and the passes over all index items and titles took 9% less time in
    float32 and 19% less in bfloat16. Longer texts keep the fused kernel: in float32 it took half
    the products' time at 48-128 tokens, and in bfloat16 all descriptions took no less time as
    products (docs/results.md). Every text has a real token ([CLS]), so no row of scores is all
    masked.
    """
    texts, _, length, _ = query.shape
    if query.device.type != "cpu" or texts < 8 or length > 32:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attend)
    scores = torch.matmul(query, key.transpose(-1, -2)).mul_(query.shape[-1] ** -0.5)
    if attend is not None:
        scores.masked_fill_(~attend, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), value)


class LayerNorm(nn.Module):
    """A copy of a BERT LayerNorm's weights (at ``path``) in ``dtype``."""

    def __init__(self, weights: BertWeights, path: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("weight", weights.tensors[f"{path}.weight"].to(dtype))
        self.register_buffer("bias", weights.tensors[f"{path}.bias"].to(dtype))
        self.eps = weights.config["layer_norm_eps"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class MergedLayer(nn.Module):
    """One BERT layer: self-attention and the feed-forward block, each followed by a residual
    LayerNorm (post-norm), on ``(N, H)`` token rows."""

    def __init__(
        self,
        weights: BertWeights,
        prefix: str,
        deltas: list[dict[str, torch.Tensor]],
        dtype: torch.dtype,
    ) -> None:
        """The layer whose weights' names start with ``prefix`` (``encoder.layer.0``)."""
        super().__init__()
        query, key, value, attention_out, ffn_in, ffn_out = (
            f"{prefix}.{linear}" for linear in LAYER_LINEARS
        )
        self.qkv = ChannelLinear.of(weights, [query, key, value], deltas, dtype)
        self.heads = weights.config["num_attention_heads"]
        self.attention_out = ChannelLinear.of(weights, [attention_out], deltas, dtype)
        self.attention_norm = LayerNorm(weights, f"{prefix}.attention.output.LayerNorm", dtype)
        self.ffn_in = ChannelLinear.of(weights, [ffn_in], deltas, dtype)
        self.activation = ACTIVATIONS[weights.config["hidden_act"]]
        self.ffn_out = ChannelLinear.of(weights, [ffn_out], deltas, dtype)
        self.ffn_norm = LayerNorm(weights, f"{prefix}.output.LayerNorm", dtype)

    def forward(
        self,
        x: torch.Tensor,
        shape: tuple[int, int],
        attend: torch.Tensor | None,
        groups: list[tuple[int, int]],
    ) -> torch.Tensor:
        """``x`` ``(B * L, H)`` rows of ``shape`` ``(B, L)`` texts; ``attend`` ``(B, 1, 1, L)``
        True at real tokens, or None when no text is padded."""
        texts, length = shape
        qkv = self.qkv(x, groups).view(texts, length, 3, self.heads, -1)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)
        attended = attention(query, key, value, attend)
        attended = attended.transpose(1, 2).reshape(x.shape)
        x = self.attention_norm(self.attention_out(attended, groups) + x)
        hidden = self.activation(self.ffn_in(x, groups))
        return self.ffn_norm(self.ffn_out(hidden, groups) + x)


class MergedBackbone(nn.Module):
    """The backbone as it is now, every channel's adapter merged (:class:`ChannelLinear`), for
    encoding without gradients; see the module's docstring.

    A snapshot: it holds the merged weights as they were when it was built, so rebuild it after
    the adapters change. Channels whose adapters are the same function share one copy
    (:func:`shared_readings`, ``reading``). Its weights are its own copies in ``dtype`` (a float32
    one shares only the word embeddings with the training backbone). bfloat16 features are
    within a cosine of about 0.9999 of float32's; :func:`inference_dtype` says where they are
    faster. The training backbone stays float32.
    """

    def __init__(
        self,
        weights: BertWeights,
        deltas: AdapterDeltas,
        channels: tuple[str, ...],
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.reading = shared_readings(deltas, channels)
        self.readings = tuple(dict.fromkeys(self.reading.values()))
        by_reading = [deltas[reading] for reading in self.readings]
        tensors = weights.tensors
        with torch.no_grad():
            self.register_buffer("word", tensors["embeddings.word_embeddings.weight"].to(dtype))
            self.register_buffer(
                "position", tensors["embeddings.position_embeddings.weight"].to(dtype)
            )
            # Texts are one segment: every token has type 0.
            self.register_buffer(
                "token_type", tensors["embeddings.token_type_embeddings.weight"][0].to(dtype)
            )
            self.embedding_norm = LayerNorm(weights, "embeddings.LayerNorm", dtype)
            self.layers = nn.ModuleList(
                MergedLayer(weights, f"encoder.layer.{layer}", by_reading, dtype)
                for layer in range(weights.config["num_hidden_layers"])
            )
        self.hidden_size = weights.config["hidden_size"]

    @property
    def device(self) -> torch.device:
        return self.word.device

    @property
    def dtype(self) -> torch.dtype:
        return self.word.dtype

    @torch.no_grad()
    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, groups: list[tuple[str, int]]
    ) -> torch.Tensor:
        """Pooled states ``(B, H)`` of ``B`` texts ``(B, L)`` whose consecutive groups of rows are
        read by the channels ``groups`` names: ``[("title", Q), ("examples", Q)]`` for Q
        queries."""
        texts, length = input_ids.shape
        token_groups: list[tuple[int, int]] = []
        for channel, count in groups:
            index = self.readings.index(self.reading[channel])
            if token_groups and token_groups[-1][0] == index:
                # Neighbouring groups read alike: one product instead of two.
                token_groups[-1] = (index, token_groups[-1][1] + count * length)
            else:
                token_groups.append((index, count * length))
        x = self.word[input_ids] + self.position[:length] + self.token_type
        x = self.embedding_norm(x).view(texts * length, -1)
        attend = None if bool(attention_mask.all()) else attention_mask.bool()[:, None, None, :]
        # As in training's passes: a fused kernel that needs no set-up per shape.
        with shape_agnostic_attention():
            for layer in self.layers:
                x = layer(x, (texts, length), attend, token_groups)
        # Pooled in float32: a bfloat16 sum over a long text's tokens would lose digits.
        return mean_pool(x.view(texts, length, -1).float(), attention_mask)


def unit_features(
    backbone: MergedBackbone, channel: str, sequences: list[np.ndarray | None], pad_token_id: int
) -> torch.Tensor:
    """``(len(sequences), H)`` unit features of one channel's texts on the CPU, zeros for None.

    Each distinct text runs once (a third of the titles and descriptions repeat a parent's or a
    child's), in batches of similar length, so that padding stays small.
    """
    slot_of: dict[bytes, int] = {}
    distinct: list[np.ndarray] = []
    rows, slots = [], []
    for row, sequence in enumerate(sequences):
        if sequence is None:
            continue
        slot = slot_of.setdefault(sequence.tobytes(), len(distinct))
        if slot == len(distinct):
            distinct.append(sequence)
        rows.append(row)
        slots.append(slot)
    features = torch.zeros((len(sequences), backbone.hidden_size))
    features[rows] = _encode_distinct(backbone, channel, distinct, pad_token_id)[slots]
    return features


def _encode_distinct(
    backbone: MergedBackbone, channel: str, sequences: list[np.ndarray], pad_token_id: int
) -> torch.Tensor:
    """``(len(sequences), H)`` unit features, encoded shortest first in passes of
    :func:`pass_tokens`."""
    device = backbone.device
    features = torch.zeros((len(sequences), backbone.hidden_size))
    lengths = [len(sequence) for sequence in sequences]
    for batch in length_batches(lengths, pass_tokens(device)):
        texts = pad([sequences[i] for i in batch], list(range(len(batch))), pad_token_id)
        pooled = backbone(
            texts.input_ids.to(device), texts.attention_mask.to(device), [(channel, len(batch))]
        )
        features[batch] = F.normalize(pooled, dim=-1).cpu()
    return features
