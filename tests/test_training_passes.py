"""A training step's passes of the backbone: texts padded into batches, every channel's texts in
one pass, each through its own channel's LoRA adapter, and the split of a step's texts into the
passes that pad least."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from naics_mlflow.data.tokenization import pad, padding_groups
from naics_mlflow.model.lora import ChannelLoRALinear, RowChannels

CHANNELS = ("first", "second", "third")
SCALING = 1.5


def _adapted_layer(dropout: float = 0.0) -> ChannelLoRALinear:
    torch.manual_seed(0)
    layer = ChannelLoRALinear(nn.Linear(6, 5), 2, dropout, RowChannels(len(CHANNELS), 2, SCALING))
    for channel in CHANNELS:
        layer.add_channel(channel)
        nn.init.normal_(layer.lora_B[channel].weight)
    return layer


def _by_hand(layer: ChannelLoRALinear, x: torch.Tensor, channel_of_row: list[int]):
    """``W x + b + scaling * B_c A_c x`` row by row, each row's channel ``c`` on its own."""
    rows = []
    for row, index in zip(x, channel_of_row, strict=True):
        a, b = layer.lora_A[CHANNELS[index]].weight, layer.lora_B[CHANNELS[index]].weight
        rows.append(layer.base_layer(row) + SCALING * row @ a.T @ b.T)
    return torch.stack(rows)


def _gradients(layer: ChannelLoRALinear, output: torch.Tensor) -> list[torch.Tensor]:
    weights = [m.weight for m in (*layer.lora_A.values(), *layer.lora_B.values())]
    return torch.autograd.grad(output.square().sum(), weights, materialize_grads=True)


def test_each_row_takes_its_own_channels_adapter_forward_and_backward():
    layer = _adapted_layer()
    x = torch.randn(4, 7, 6)
    channel_of_row = [2, 0, 2, 0]  # the second channel has no row in this pass
    layer.rows.set(torch.tensor(channel_of_row))
    mixed = layer(x)
    expected = _by_hand(layer, x, channel_of_row)
    torch.testing.assert_close(mixed, expected)
    for got, want in zip(_gradients(layer, mixed), _gradients(layer, expected), strict=True):
        torch.testing.assert_close(got, want)
    second_a = _gradients(layer, layer(x))[1]
    assert torch.count_nonzero(second_a) == 0


def test_rows_of_single_vectors_take_their_own_adapter_too():
    """BERT's pooler adapts one vector per text, ``(N, in)``, not ``(N, L, in)``."""
    layer = _adapted_layer()
    x = torch.randn(3, 6)
    layer.rows.set(torch.tensor([1, 2, 0]))
    torch.testing.assert_close(layer(x), _by_hand(layer, x, [1, 2, 0]))


def test_under_autocast_the_adapters_run_in_its_dtype():
    layer = _adapted_layer()
    x = torch.randn(3, 4, 6)
    layer.rows.set(torch.tensor([1, 0, 2]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = layer(x)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), layer(x), atol=0.1, rtol=0.05)


def test_dropout_acts_in_training_only():
    layer = _adapted_layer(dropout=0.5)
    x = torch.randn(2, 3, 6)
    layer.rows.set(torch.tensor([0, 1]))
    layer.eval()
    torch.testing.assert_close(layer(x), _by_hand(layer, x, [0, 1]))
    layer.train()
    assert not torch.allclose(layer(x), _by_hand(layer, x, [0, 1]))


def _padded_tokens(groups: list[tuple[np.ndarray, int]]) -> int:
    return sum(len(rows) * longest for rows, longest in groups)


def _fewest_padded_tokens(lengths: np.ndarray, count: int) -> int:
    """Every split of the sorted lengths into at most ``count`` runs, tried."""
    ordered = np.sort(lengths)
    best = ordered.size * int(ordered[-1])
    for groups in range(2, count + 1):
        for cuts in itertools.combinations(range(1, ordered.size), groups - 1):
            bounds = (0, *cuts, ordered.size)
            padded = sum(
                (end - start) * int(ordered[end - 1]) for start, end in itertools.pairwise(bounds)
            )
            best = min(best, padded)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_a_steps_texts_split_where_they_pad_least(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 14, size=int(rng.integers(1, 10)))
    count = int(rng.integers(1, 5))
    groups = padding_groups(lengths, count)
    assert len(groups) <= count
    assert sorted(np.concatenate([rows for rows, _ in groups]).tolist()) == list(
        range(lengths.size)
    )
    assert all(longest == lengths[rows].max() for rows, longest in groups)
    assert _padded_tokens(groups) == _fewest_padded_tokens(lengths, count)


def test_no_texts_make_no_passes():
    assert padding_groups(np.array([], dtype=np.int64), 4) == []


def test_a_typical_step_pads_half_as_much_as_equal_splits():
    """Many short index items and titles, a tail of long descriptions: equal counts would put
    short texts with the longest ones."""
    lengths = np.array([6] * 80 + [9] * 30 + [60] * 10 + [120] * 5)
    groups = padding_groups(lengths, 3)
    assert [longest for _, longest in groups] == [9, 60, 120]
    equal_counts = sum(len(part) * part.max() for part in np.array_split(np.sort(lengths), 3))
    assert _padded_tokens(groups) * 2 < equal_counts


@pytest.mark.parametrize("lengths", [[3, 1, 4, 1, 5], [2], [0, 2, 0], []], ids=str)
def test_texts_are_padded_to_the_longest_with_their_tokens_first(lengths):
    sequences = [np.arange(10, 10 + n, dtype=np.int32) * (i + 1) for i, n in enumerate(lengths)]
    owners = list(range(len(lengths), 0, -1))
    batch = pad(sequences, owners, pad_token_id=7)
    longest = max(lengths, default=0)
    assert batch.input_ids.shape == batch.attention_mask.shape == (len(lengths), longest)
    assert batch.input_ids.dtype == batch.attention_mask.dtype == torch.long
    for row, sequence in enumerate(sequences):
        assert batch.input_ids[row].tolist() == [
            *sequence.tolist(),
            *[7] * (longest - len(sequence)),
        ]
        assert batch.attention_mask[row].tolist() == [1] * len(sequence) + [0] * (
            longest - len(sequence)
        )
    assert batch.owner.tolist() == owners
