"""Lorentz (hyperboloid) model of hyperbolic space, as small pure torch functions.

Curvature convention: every ``curvature`` argument is the config value ``loss.curvature``,
``c > 0``, meaning constant sectional curvature ``-c``. Points are ``(time, space...)`` vectors
of size ``D + 1`` with ``<x, x>_L = -1/c`` and ``x_0 > 0``; the origin is ``(1/sqrt(c), 0, ...)``.

geoopt parameterises the same manifold the other way round: ``geoopt.manifolds.Lorentz(k)`` has
``<x, x>_L = -k``, so our ``c`` is geoopt's ``k = 1/c``. Its ``PoincareBall(c)`` uses our
convention, and ``to_poincare`` below lands in that ball. The functions here are written out
instead of calling geoopt so that the time coordinate, clamps and precision are under our
control; the tests check them against geoopt.

Precision: float32 holds the constraint only to a few ulps of ``x_0 ** 2``, so distances between
nearby points far from the origin are noisy: the self-distance of random 384-d points, truly 0,
comes out up to 0.01 at radius 3, 0.08 at 5, 0.5 at 7 and 6.6 at 11 (``c = 1``). Keep these
computations in float32 or better, never fp16/bf16.
"""

import math

import torch
from torch import Tensor, nn

# sinh(asinh(2**15)) = 2**15: every coordinate stays below fp16's maximum (65504), and the
# product of two coordinates in a Minkowski inner product stays far below float32 overflow.
_MAX_SINH_ARG = math.asinh(2.0**15)
# Guards divisions by a tangent norm; sinh(z)/z and asinh(z)/z are 1 to float precision there.
_MIN_NORM = 1e-8
# A few float32 ulps above 1, so the clamped acosh argument is representable as > 1.
_ACOSH_MARGIN = 1e-6


def lorentz_inner(x: Tensor, y: Tensor) -> Tensor:
    """Minkowski inner product ``-x_0 y_0 + <x_space, y_space>``.

    Args:
        x, y: ``(..., D + 1)``, broadcastable.

    Returns:
        ``(...)``.
    """
    return -x[..., 0] * y[..., 0] + (x[..., 1:] * y[..., 1:]).sum(dim=-1)


def expmap0(tangent: Tensor, curvature: float) -> Tensor:
    """Exponential map at the origin.

    The origin's tangent space is ``{(0, v)}``, so a tangent vector is given by its space part.
    The geodesic through ``v`` reaches ``space = sinh(sqrt(c) |v|) / (sqrt(c) |v|) * v`` and the
    time coordinate is then computed as ``sqrt(1/c + |space|^2)`` rather than
    ``cosh(sqrt(c) |v|) / sqrt(c)``: the two agree mathematically, but the former ties the time
    coordinate to the space coordinates actually stored, so the constraint error is only the
    rounding of ``x_0`` instead of the independent errors of ``cosh`` and ``sinh``.

    ``sqrt(c) |v|`` is clamped to ``asinh(2**15)``, because ``sinh`` overflows beyond about 89 in
    float32 and 11 in fp16, and ``|space|^2`` beyond about 44 in float32. Larger tangent vectors
    land at radius ``asinh(2**15) / sqrt(c)`` (about 11.1 for ``c = 1``) in their own direction.

    Args:
        tangent: ``(..., D)`` space part of a tangent vector at the origin.
        curvature: ``c > 0``, sectional curvature ``-c``.

    Returns:
        ``(..., D + 1)`` points on the hyperboloid.
    """
    sqrt_c = math.sqrt(curvature)
    scaled_norm = sqrt_c * torch.linalg.vector_norm(tangent, dim=-1, keepdim=True)
    sinh_arg = scaled_norm.clamp(min=_MIN_NORM, max=_MAX_SINH_ARG)
    space = torch.sinh(sinh_arg) / scaled_norm.clamp_min(_MIN_NORM) * tangent
    time = torch.sqrt(1.0 / curvature + space.square().sum(dim=-1, keepdim=True))
    return torch.cat([time, space], dim=-1)


def logmap0(x: Tensor, curvature: float) -> Tensor:
    """Logarithmic map at the origin, the inverse of ``expmap0``.

    Uses ``asinh`` of the space norm rather than ``acosh(sqrt(c) x_0)``: ``acosh`` is
    ill-conditioned near 1, i.e. for points near the origin.

    Args:
        x: ``(..., D + 1)`` points on the hyperboloid.
        curvature: ``c > 0``.

    Returns:
        ``(..., D)`` space part of the tangent vector at the origin.
    """
    space = x[..., 1:]
    sqrt_c = math.sqrt(curvature)
    scaled_norm = (sqrt_c * torch.linalg.vector_norm(space, dim=-1, keepdim=True)).clamp_min(
        _MIN_NORM
    )
    return torch.asinh(scaled_norm) / scaled_norm * space


def _acosh_distance(neg_inner: Tensor, curvature: float) -> Tensor:
    """``acosh(-c <x, y>_L) / sqrt(c)`` from ``-<x, y>_L``.

    Mathematically ``-c <x, y>_L >= 1``, but rounding puts it below 1 for (nearly) equal points,
    where ``acosh`` is NaN, and at exactly 1 the gradient of ``acosh`` is infinite; hence the
    clamp to ``1 + _ACOSH_MARGIN``.
    """
    argument = (curvature * neg_inner).clamp_min(1.0 + _ACOSH_MARGIN)
    return torch.acosh(argument) / math.sqrt(curvature)


def distance(x: Tensor, y: Tensor, curvature: float) -> Tensor:
    """Elementwise geodesic distance.

    Args:
        x, y: ``(..., D + 1)`` points, broadcastable.
        curvature: ``c > 0``.

    Returns:
        ``(...)``.
    """
    return _acosh_distance(-lorentz_inner(x, y), curvature)


def pairwise_distance(x: Tensor, y: Tensor, curvature: float) -> Tensor:
    """Geodesic distance between every row of ``x`` and every row of ``y``.

    Autocast is disabled: it would run the matmul in fp16/bf16, whose three significant digits
    are cancelled away when the time term is subtracted.

    Args:
        x: ``(N, D + 1)`` points.
        y: ``(M, D + 1)`` points.
        curvature: ``c > 0``.

    Returns:
        ``(N, M)``.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        neg_inner = torch.outer(x[:, 0], y[:, 0]) - x[:, 1:] @ y[:, 1:].T
    return _acosh_distance(neg_inner, curvature)


def distance_to_origin(x: Tensor, curvature: float) -> Tensor:
    """Hyperbolic radius ``asinh(sqrt(c) |x_space|) / sqrt(c)``.

    Equal to ``acosh(sqrt(c) x_0) / sqrt(c)``, but well-conditioned near the origin.

    Args:
        x: ``(..., D + 1)`` points.
        curvature: ``c > 0``.

    Returns:
        ``(...)``.
    """
    sqrt_c = math.sqrt(curvature)
    return torch.asinh(sqrt_c * torch.linalg.vector_norm(x[..., 1:], dim=-1)) / sqrt_c


def manifold_violation(x: Tensor, curvature: float) -> Tensor:
    """``|<x, x>_L + 1/c|``, how far ``x`` is off the hyperboloid.

    In float32 this is only meaningful relative to ``x_0 ** 2`` (see the module docstring).

    Args:
        x: ``(..., D + 1)``.
        curvature: ``c > 0``.

    Returns:
        ``(...)``.
    """
    return (lorentz_inner(x, x) + 1.0 / curvature).abs()


def to_poincare(x: Tensor, curvature: float) -> Tensor:
    """Stereographic projection onto the Poincaré ball of curvature ``-c``.

    The ball has radius ``1/sqrt(c)`` (geoopt's ``PoincareBall(c)``) and the map is an isometry;
    multiply by ``sqrt(c)`` to draw it in the unit disk.

    Args:
        x: ``(..., D + 1)`` points.
        curvature: ``c > 0``.

    Returns:
        ``(..., D)``.
    """
    return x[..., 1:] / (1.0 + math.sqrt(curvature) * x[..., :1])


class LorentzProjection(nn.Module):
    """Linear map to the tangent space at the origin, then ``expmap0`` onto the hyperboloid.

    Runs in float32 even under autocast: in fp16/bf16 the constraint ``<x, x>_L = -1/c`` is lost
    to rounding and ``sinh`` overflows (fp16) at the radii the embeddings reach.
    """

    def __init__(self, in_dim: int, embedding_dim: int, curvature: float) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, embedding_dim)
        self.curvature = curvature

    def forward(self, features: Tensor) -> Tensor:
        """Map ``(B, in_dim)`` features to ``(B, embedding_dim + 1)`` float32 points."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            return expmap0(self.linear(features.float()), self.curvature)

    def extra_repr(self) -> str:
        return f"curvature={self.curvature}"
