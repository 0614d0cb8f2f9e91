import math

import geoopt
import pytest
import torch

from naics_mlflow.model.lorentz import (
    LorentzProjection,
    distance,
    distance_to_origin,
    expmap0,
    logmap0,
    lorentz_inner,
    manifold_violation,
    pairwise_distance,
    to_poincare,
)

CURVATURES = [0.5, 1.0, 2.0]


def _tangents(norms: list[float], dim: int = 16, seed: int = 0) -> torch.Tensor:
    """Random directions with the given Euclidean norms, shape ``(len(norms), dim)``."""
    directions = torch.randn(len(norms), dim, generator=torch.Generator().manual_seed(seed))
    directions = directions / directions.norm(dim=1, keepdim=True)
    return directions * torch.tensor(norms).unsqueeze(1)


def _points(
    n: int, curvature: float, dtype: torch.dtype = torch.float32, seed: int = 0
) -> torch.Tensor:
    return expmap0(_tangents(torch.linspace(0.1, 3.0, n).tolist(), seed=seed).to(dtype), curvature)


def test_lorentz_inner_is_minkowski():
    x = torch.tensor([2.0, 1.0, 3.0])
    y = torch.tensor([5.0, -1.0, 4.0])
    assert lorentz_inner(x, y).item() == -10.0 - 1.0 + 12.0


@pytest.mark.parametrize("curvature", CURVATURES)
def test_expmap0_stays_on_manifold_in_float32(curvature):
    norms = [1e-6, 1e-3, 0.1, 1.0, 3.0, 8.0, 20.0, 50.0]
    x = expmap0(_tangents(norms), curvature)
    assert x.dtype == torch.float32
    assert torch.isfinite(x).all()
    assert (x[:, 0] > 0).all()
    # float32 stores x_0 ** 2 only to ~1e-7 relative, so the constraint can hold only to that
    # scale; near the origin (x_0 ** 2 ~ 1/c) this is an absolute 1e-4.
    tolerance = 1e-4 * curvature * x[:, 0].double().square()
    assert (manifold_violation(x.double(), curvature) <= tolerance).all()


@pytest.mark.parametrize("curvature", CURVATURES)
def test_expmap0_radius_is_clamped_not_overflowed(curvature):
    x = expmap0(_tangents([1e3, 1e6]), curvature)
    radius = math.asinh(2.0**15) / math.sqrt(curvature)
    torch.testing.assert_close(distance_to_origin(x, curvature), torch.full((2,), radius))
    assert torch.isfinite(x.half()).all()


@pytest.mark.parametrize("curvature", CURVATURES)
def test_logmap0_inverts_expmap0(curvature):
    v = _tangents([1e-4, 0.01, 0.5, 1.0, 2.0, 4.0])
    torch.testing.assert_close(logmap0(expmap0(v, curvature), curvature), v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("curvature", CURVATURES)
def test_distance_matches_geoopt_with_k_inverse_curvature(curvature):
    x = _points(6, curvature, torch.float64, seed=1)
    y = _points(6, curvature, torch.float64, seed=2)
    manifold = geoopt.manifolds.Lorentz(k=1.0 / curvature).double()
    manifold.assert_check_point_on_manifold(x)
    torch.testing.assert_close(distance(x, y, curvature), manifold.dist(x, y))


@pytest.mark.parametrize("curvature", CURVATURES)
def test_pairwise_distance_is_a_symmetric_matrix_of_elementwise_distances(curvature):
    x = _points(7, curvature)
    d = pairwise_distance(x, x, curvature)
    torch.testing.assert_close(d, d.T)
    assert (d.diagonal() < 5e-3).all()
    y = _points(5, curvature, seed=3)
    expected = distance(x.unsqueeze(1), y.unsqueeze(0), curvature)
    torch.testing.assert_close(pairwise_distance(x, y, curvature), expected)


def test_pairwise_distance_ignores_autocast():
    x = _points(6, 1.0, seed=4)
    y = _points(6, 1.0, seed=5)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        d = pairwise_distance(x, y, 1.0)
    assert d.dtype == torch.float32
    torch.testing.assert_close(d, pairwise_distance(x, y, 1.0))


@pytest.mark.parametrize("curvature", CURVATURES)
def test_distances_along_a_geodesic_ray_equal_tangent_norms(curvature):
    norms = torch.tensor([1e-3, 0.2, 1.0, 2.5, 6.0], dtype=torch.float64)
    direction = torch.nn.functional.normalize(torch.randn(8, dtype=torch.float64), dim=0)
    x = expmap0(norms.unsqueeze(1) * direction, curvature)
    torch.testing.assert_close(distance_to_origin(x, curvature), norms)
    expected = (norms.unsqueeze(1) - norms.unsqueeze(0)).abs()
    off_diagonal = ~torch.eye(len(norms), dtype=torch.bool)
    torch.testing.assert_close(
        pairwise_distance(x, x, curvature)[off_diagonal], expected[off_diagonal]
    )


def test_distance_gradient_is_finite_for_identical_points():
    tangent = torch.cat([torch.zeros(1, 16), _tangents([1e-3, 0.5, 2.0, 5.0])])
    tangent.requires_grad_(True)
    x = expmap0(tangent, 1.0)
    loss = distance(x, x, 1.0).sum() + pairwise_distance(x, x, 1.0).sum()
    loss.backward()
    assert torch.isfinite(tangent.grad).all()


@pytest.mark.parametrize("curvature", CURVATURES)
def test_to_poincare_is_an_isometry_onto_the_ball(curvature):
    x = _points(6, curvature, torch.float64, seed=6)
    y = _points(6, curvature, torch.float64, seed=7)
    p, q = to_poincare(x, curvature), to_poincare(y, curvature)
    assert (p.norm(dim=-1) < 1 / math.sqrt(curvature)).all()
    ball = geoopt.manifolds.PoincareBall(c=curvature).double()
    torch.testing.assert_close(ball.dist(p, q), distance(x, y, curvature))


def test_projection_stays_on_manifold_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    projection = LorentzProjection(in_dim=32, embedding_dim=8, curvature=1.0)
    features = 3 * torch.randn(16, 32)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        x = projection(features)
    assert x.shape == (16, 9)
    assert x.dtype == torch.float32
    tolerance = 1e-4 * x[:, 0].double().square()
    assert (manifold_violation(x.double(), 1.0) <= tolerance).all()
    torch.testing.assert_close(x, expmap0(projection.linear(features), 1.0))


@pytest.mark.parametrize("curvature", CURVATURES)
def test_distance_to_origin_is_accurate_near_the_origin_in_float32(curvature):
    norms = [1e-4, 1e-3, 1e-2]
    x = expmap0(_tangents(norms), curvature)
    torch.testing.assert_close(
        distance_to_origin(x, curvature), torch.tensor(norms), rtol=1e-4, atol=0
    )
