"""Top-k gated mixture of two-layer MLP experts with a Switch Transformer load-balancing loss."""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MoEOutput(NamedTuple):
    """Result of ``MixtureOfExperts.forward``.

    Attributes:
        output: ``(B, output_dim)`` gate-weighted sum of the selected experts' outputs.
        expert_utilisation: ``(E,)`` fraction of the ``B * top_k`` routing slots taken by each
            expert; sums to 1.
        mean_gate_probability: ``(E,)`` each expert's gate probability averaged over the batch.
    """

    output: Tensor
    expert_utilisation: Tensor
    mean_gate_probability: Tensor


def load_balancing_loss(expert_utilisation: Tensor, mean_gate_probability: Tensor) -> Tensor:
    """The Switch Transformer loss ``E * sum_e f_e * P_e``: 1.0 at uniform routing.

    ``f_e`` (``expert_utilisation``) is expert ``e``'s share of the routing slots and carries no
    gradient; ``P_e`` (``mean_gate_probability``) is its mean gate probability, through which
    the gate learns. Under data parallelism pass ``f`` averaged over every rank: each rank's
    gradient then follows the global routing.
    """
    return expert_utilisation.numel() * (expert_utilisation * mean_gate_probability).sum()


def _uniform_(tensor: Tensor, fan_in: int) -> Tensor:
    """``nn.Linear``'s default initialisation, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.init.uniform_(tensor, -bound, bound)


class MixtureOfExperts(nn.Module):
    """Top-k mixture of ``Linear -> GELU -> Linear`` experts.

    The experts' weights are stacked into ``(E, ...)`` parameters, and each row runs through its
    selected experts only (:meth:`routed_output`), except when training on a GPU
    (:meth:`dense_output`): there every expert runs on the whole batch with one ``einsum`` per
    layer and the unselected outputs get weight zero. That costs ``E / top_k`` times the strictly
    necessary compute, but a GPU step is bound by the host, and sparse dispatch adds a gather, a
    scatter and a host synchronisation per expert. On a CPU compute is what costs: routing took
    a fifth off the loss's forward and backward pass in a head-only step with every code in the
    batch (docs/results.md), and a single query reads ``top_k`` experts' weights instead of all
    of them. The two give the same output and gradients to float rounding (``tests/test_moe.py``).

    The kept gate probabilities are renormalised to sum to 1. With ``top_k = 1`` that makes every
    weight 1, so the gate then learns only from the load-balancing loss.
    """

    def __init__(
        self, input_dim: int, output_dim: int, num_experts: int, top_k: int, hidden_dim: int
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(
                f"top_k must be between 1 and num_experts, got top_k={top_k} "
                f"and num_experts={num_experts}"
            )
        self.num_experts = num_experts
        self.top_k = top_k
        self.gate = nn.Linear(input_dim, num_experts)
        self.w1 = nn.Parameter(
            _uniform_(torch.empty(num_experts, input_dim, hidden_dim), input_dim)
        )
        self.b1 = nn.Parameter(_uniform_(torch.empty(num_experts, hidden_dim), input_dim))
        self.w2 = nn.Parameter(
            _uniform_(torch.empty(num_experts, hidden_dim, output_dim), hidden_dim)
        )
        self.b2 = nn.Parameter(_uniform_(torch.empty(num_experts, output_dim), hidden_dim))

    def forward(self, x: Tensor) -> MoEOutput:
        """Route ``(B, input_dim)`` inputs to their ``top_k`` experts; see
        :func:`load_balancing_loss`."""
        probs = F.softmax(self.gate(x), dim=-1)
        kept_probs, kept_experts = probs.topk(self.top_k, dim=-1)
        kept_weights = kept_probs / kept_probs.sum(dim=-1, keepdim=True)
        mix = self.dense_output if x.is_cuda and torch.is_grad_enabled() else self.routed_output
        output = mix(x, kept_experts, kept_weights)
        # A comparison, not F.one_hot, which reads its input back to check its range: on a GPU
        # a wait for everything queued before.
        experts = torch.arange(self.num_experts, device=x.device)
        utilisation = (kept_experts[..., None] == experts).flatten(0, 1).float().mean(dim=0)
        return MoEOutput(output, utilisation, probs.mean(dim=0))

    def dense_output(self, x: Tensor, kept_experts: Tensor, kept_weights: Tensor) -> Tensor:
        """``(B, output_dim)``: every expert on every row, the outputs mixed by ``kept_weights``
        at ``kept_experts`` (both ``(B, top_k)``) and by zero elsewhere."""
        weights = kept_weights.new_zeros((len(x), self.num_experts))
        weights = weights.scatter(1, kept_experts, kept_weights)
        hidden = F.gelu(torch.einsum("bi,eih->beh", x, self.w1) + self.b1)
        expert_outputs = torch.einsum("beh,eho->beo", hidden, self.w2) + self.b2
        return torch.einsum("be,beo->bo", weights, expert_outputs)

    def routed_output(self, x: Tensor, kept_experts: Tensor, kept_weights: Tensor) -> Tensor:
        """``(B, output_dim)``: each row through its ``top_k`` experts (``kept_experts``, both
        ``(B, top_k)``) only, their outputs mixed by ``kept_weights``."""
        output = x.new_zeros((len(x), self.w2.shape[-1]))
        for expert in kept_experts.unique().tolist():
            rows, slots = (kept_experts == expert).nonzero(as_tuple=True)
            hidden = F.gelu(torch.addmm(self.b1[expert], x[rows], self.w1[expert]))
            expert_output = torch.addmm(self.b2[expert], hidden, self.w2[expert])
            weighted = expert_output * kept_weights[rows, slots, None]
            # Under autocast the experts compute in half precision; the mix keeps the input's.
            output.index_add_(0, rows, weighted.to(output.dtype))
        return output
