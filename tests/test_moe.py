import pytest
import torch
import torch.nn.functional as F

from naics_mlflow.model.moe import MixtureOfExperts, load_balancing_loss


def _moe(top_k: int = 2, num_experts: int = 4) -> MixtureOfExperts:
    torch.manual_seed(0)
    return MixtureOfExperts(
        input_dim=6, output_dim=5, num_experts=num_experts, top_k=top_k, hidden_dim=8
    )


def _fix_gate(moe: MixtureOfExperts, probabilities: list[float]) -> None:
    """Make every input get the same gate probabilities."""
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.bias.copy_(torch.tensor(probabilities).log())


def _balancing_loss(moe: MixtureOfExperts, x: torch.Tensor) -> torch.Tensor:
    routed = moe(x)
    return load_balancing_loss(routed.expert_utilisation, routed.mean_gate_probability)


def _expert(moe: MixtureOfExperts, e: int, x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x @ moe.w1[e] + moe.b1[e]) @ moe.w2[e] + moe.b2[e]


def test_output_shapes():
    out = _moe()(torch.randn(10, 6))
    assert out.output.shape == (10, 5)
    assert out.mean_gate_probability.shape == (4,)
    assert out.expert_utilisation.shape == (4,)


@pytest.mark.parametrize("batch", [1, 3, 64])
def test_routed_and_dense_mixtures_give_the_same_output_and_gradients(batch):
    moe = _moe(top_k=2, num_experts=4)
    x = torch.randn(batch, 6)
    probs = F.softmax(moe.gate(x), dim=-1)
    kept_probs, kept_experts = probs.topk(2, dim=-1)
    kept_weights = kept_probs / kept_probs.sum(dim=-1, keepdim=True)
    results = []
    for mix in (moe.routed_output, moe.dense_output):
        moe.zero_grad()
        output = mix(x, kept_experts, kept_weights)
        (output.square().sum() + output.sum()).backward(retain_graph=True)
        results.append((output.detach(), [p.grad.clone() for p in moe.parameters()]))
    (routed, routed_grads), (dense, dense_grads) = results
    torch.testing.assert_close(routed, dense)
    for routed_grad, dense_grad in zip(routed_grads, dense_grads, strict=True):
        torch.testing.assert_close(routed_grad, dense_grad)


def test_on_a_cpu_an_expert_no_row_chose_is_never_read_even_in_training():
    moe = _moe(top_k=2, num_experts=4)
    x = torch.randn(1, 6)
    with torch.no_grad():
        unchosen = moe(x).expert_utilisation == 0
        moe.w1[unchosen] = float("nan")
        assert moe(x).output.isfinite().all()
    trained = moe(x)
    trained.output.sum().backward()
    assert trained.output.isfinite().all() and moe.w1.grad[~unchosen].abs().sum() > 0
    kept_experts = moe.gate(x).topk(2, dim=-1).indices
    assert moe.dense_output(x, kept_experts, torch.full((1, 2), 0.5)).isnan().all()


def test_top_k_above_num_experts_is_rejected():
    with pytest.raises(ValueError, match=r"top_k=5.*num_experts=4"):
        MixtureOfExperts(input_dim=6, output_dim=5, num_experts=4, top_k=5, hidden_dim=8)


def test_output_is_renormalised_mix_of_the_top_k_experts():
    moe = _moe(top_k=2)
    _fix_gate(moe, [0.1, 0.4, 0.2, 0.3])
    x = torch.randn(3, 6)
    expected = (0.4 * _expert(moe, 1, x) + 0.3 * _expert(moe, 3, x)) / 0.7
    torch.testing.assert_close(moe(x).output, expected)


def test_utilisation_counts_routing_slots():
    moe = _moe(top_k=2)
    _fix_gate(moe, [0.1, 0.4, 0.2, 0.3])
    out = moe(torch.randn(7, 6))
    torch.testing.assert_close(out.expert_utilisation, torch.tensor([0.0, 0.5, 0.0, 0.5]))
    out = _moe(top_k=3)(torch.randn(9, 6))
    torch.testing.assert_close(out.expert_utilisation.sum(), torch.tensor(1.0))


def test_load_balancing_loss_formula():
    moe = _moe(top_k=2)
    _fix_gate(moe, [0.1, 0.4, 0.2, 0.3])
    # Experts 1 and 3 each take half of the slots: 4 * (0.5 * 0.4 + 0.5 * 0.3).
    loss = _balancing_loss(moe, torch.randn(7, 6))
    torch.testing.assert_close(loss, torch.tensor(1.4))


def _gate_reads_input(moe: MixtureOfExperts, probabilities: list[list[float]]) -> torch.Tensor:
    """Inputs whose gate probabilities are the given rows: the gate's logits become the first
    ``E`` input features, which hold the log-probabilities."""
    with torch.no_grad():
        moe.gate.weight.copy_(torch.eye(moe.num_experts, 6))
        moe.gate.bias.zero_()
    log_probabilities = torch.tensor(probabilities).log()
    return F.pad(log_probabilities, (0, 6 - moe.num_experts))


def test_load_balancing_loss_follows_input_dependent_routing():
    moe = _moe(top_k=2)
    x = _gate_reads_input(
        moe,
        [
            [0.5, 0.3, 0.1, 0.1],  # experts 0, 1
            [0.6, 0.1, 0.25, 0.05],  # 0, 2
            [0.1, 0.2, 0.3, 0.4],  # 3, 2
            [0.7, 0.2, 0.05, 0.05],  # 0, 1
        ],
    )
    routed = moe(x)
    # Of the 8 slots expert 0 takes 3, experts 1 and 2 two each, expert 3 one.
    torch.testing.assert_close(routed.expert_utilisation, torch.tensor([3, 2, 2, 1]) / 8)
    torch.testing.assert_close(routed.mean_gate_probability, torch.tensor([1.9, 0.8, 0.7, 0.6]) / 4)
    # 4 * (3/8 * 0.475 + 2/8 * 0.2 + 2/8 * 0.175 + 1/8 * 0.15) = 4 * 0.290625.
    torch.testing.assert_close(_balancing_loss(moe, x), torch.tensor(1.1625))


def test_load_balancing_loss_is_one_when_the_slots_are_shared_equally():
    """Uniform routing reads 1 whatever the gate probabilities: sum_e P_e = 1."""
    moe = _moe(top_k=2)
    x = _gate_reads_input(moe, [[0.4, 0.3, 0.2, 0.1], [0.2, 0.1, 0.3, 0.4]])
    routed = moe(x)
    torch.testing.assert_close(routed.expert_utilisation, torch.full((4,), 0.25))
    torch.testing.assert_close(routed.mean_gate_probability, torch.tensor([0.3, 0.2, 0.25, 0.25]))
    torch.testing.assert_close(_balancing_loss(moe, x), torch.tensor(1.0))


def test_gradients_reach_the_gate_through_output_and_balancing_loss():
    moe = _moe(top_k=2)
    moe(torch.randn(8, 6)).output.square().sum().backward()
    assert moe.gate.weight.grad.abs().sum() > 0

    moe.zero_grad()
    _balancing_loss(moe, torch.randn(8, 6)).backward()
    assert moe.gate.weight.grad.abs().sum() > 0
    assert moe.w1.grad is None or moe.w1.grad.abs().sum() == 0


def test_every_expert_learns_when_routed():
    moe = _moe(top_k=4)
    moe(torch.randn(8, 6)).output.square().sum().backward()
    assert all(moe.w1.grad[e].abs().sum() > 0 for e in range(4))
