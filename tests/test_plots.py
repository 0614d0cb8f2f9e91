"""The disk projection keeps radii exact, and both figures render to real PNGs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.axes import Axes
from matplotlib.collections import PathCollection

from naics_mlflow.data.taxonomy import parent_of
from naics_mlflow.evaluation.plots import (
    poincare_disk_coordinates,
    poincare_disk_figure,
    save_png,
    short_title,
    spread_positions,
    training_curves_figure,
)
from naics_mlflow.model.lorentz import distance_to_origin, expmap0, to_poincare

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CURVATURE = 0.5
# A hand-made tree: the range sector 31 (displayed 31-33) with children under prefix 32, and
# sector 54. Each code's tangent direction is its parent's plus a nudge, its radius grows by level.
TREE = ["31", "321", "3211", "32111", "321111", "332", "3321", "54", "541", "5411", "54111"]
SECTOR_TITLES = {"31": "Manufacturing", "54": "Professional, Scientific, and Technical Services"}


def _tree_embeddings(dim: int = 6) -> tuple[torch.Tensor, np.ndarray]:
    generator = torch.Generator().manual_seed(0)
    directions: dict[str, torch.Tensor] = {}
    tangents = []
    for code in TREE:
        parent = parent_of(code)
        base = directions[parent] if parent else torch.randn(dim, generator=generator) * 3
        directions[code] = base + torch.randn(dim, generator=generator) * 0.3
        radius = 0.5 + 1.2 * (len(code) - 2)
        tangents.append(directions[code] / directions[code].norm() * radius)
    levels = np.array([len(code) for code in TREE])
    return expmap0(torch.stack(tangents), CURVATURE), levels


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 10_000


def test_disk_radius_is_the_exact_poincare_radius_and_monotone_in_hyperbolic_radius() -> None:
    generator = torch.Generator().manual_seed(1)
    directions = torch.randn(300, 16, generator=generator, dtype=torch.float64)
    # Up to the largest radius expmap0 produces for this curvature (~15.7).
    radii = torch.linspace(0.01, 15.0, 300, dtype=torch.float64)[torch.randperm(300)]
    points = expmap0(directions / directions.norm(dim=1, keepdim=True) * radii[:, None], CURVATURE)

    for embeddings in (points, points.float(), points.numpy()):
        disk_radius = np.linalg.norm(poincare_disk_coordinates(embeddings, CURVATURE), axis=1)
        hyperbolic = distance_to_origin(torch.as_tensor(embeddings).double(), CURVATURE).numpy()
        assert (disk_radius < 1.0 / math.sqrt(CURVATURE)).all()
        assert (np.diff(disk_radius[np.argsort(hyperbolic)]) > 0).all()
    exact = to_poincare(points, CURVATURE).norm(dim=1).numpy()
    disk_radius = np.linalg.norm(poincare_disk_coordinates(points, CURVATURE), axis=1)
    np.testing.assert_allclose(disk_radius, exact, rtol=1e-12)


def test_disk_coordinates_of_2d_embeddings_are_the_poincare_disk_up_to_rotation() -> None:
    generator = torch.Generator().manual_seed(2)
    points = expmap0(torch.randn(50, 2, generator=generator, dtype=torch.float64), CURVATURE)
    coordinates = poincare_disk_coordinates(points, CURVATURE)
    exact = to_poincare(points, CURVATURE).numpy()

    def pairwise(xy: np.ndarray) -> np.ndarray:
        return np.linalg.norm(xy[:, None] - xy[None, :], axis=-1)

    np.testing.assert_allclose(pairwise(coordinates), pairwise(exact), atol=1e-12)


def test_short_title_cuts_at_a_word_and_drops_dangling_words() -> None:
    assert short_title("Manufacturing") == "Manufacturing"
    assert short_title(SECTOR_TITLES["54"]) == "Professional, Scientific…"
    assert short_title("Agriculture, Forestry, Fishing and Hunting") == "Agriculture, Forestry…"
    assert short_title("Other Services (except Public Administration)") == "Other Services…"
    assert short_title("Administrative and Support and Waste") == "Administrative and Support…"


def test_spread_positions_keeps_order_gap_and_bounds() -> None:
    targets = np.array([0.5, 0.49, 0.51, 0.99, 0.0])
    spread = spread_positions(targets, gap=0.05, low=0.02, high=0.98)
    assert (np.argsort(spread) == np.argsort(targets, kind="stable")).all()
    assert (np.diff(np.sort(spread)) >= 0.05 - 1e-12).all()
    assert spread.min() >= 0.02 and spread.max() <= 0.98
    # Too many labels for the gap: they are squeezed, never pushed out of bounds.
    crowded = spread_positions(np.full(30, 0.5), gap=0.1, low=0.0, high=1.0)
    assert crowded.min() >= 0.0 and crowded.max() <= 1.0 + 1e-12
    assert (np.diff(np.sort(crowded)) > 0.03).all()


def test_disk_figure_draws_every_code_in_its_sector_colour_and_labels_sectors(
    tmp_path: Path,
) -> None:
    embeddings, levels = _tree_embeddings()
    figure = poincare_disk_figure(embeddings, TREE, levels, SECTOR_TITLES, CURVATURE)
    ax = figure.axes[0]

    texts = [text.get_text() for text in ax.texts]
    assert "31-33 Manufacturing" in texts
    assert "54 Professional, Scientific…" in texts
    assert not any(text.startswith(("31 ", "32", "33", "541")) for text in texts)

    coordinates = poincare_disk_coordinates(embeddings, CURVATURE)
    drawn = [
        (offset, color)
        for collection in ax.collections
        if isinstance(collection, PathCollection)
        for offset, color in zip(collection.get_offsets(), collection.get_facecolors(), strict=True)
    ]
    assert len(drawn) == len(TREE)

    def color_of(code: str) -> np.ndarray:
        xy = coordinates[TREE.index(code)]
        return next(color for offset, color in drawn if np.allclose(offset, xy))

    for code in ("321", "3211", "321111", "332", "3321"):
        np.testing.assert_array_equal(color_of(code)[:3], color_of("31")[:3])
    np.testing.assert_array_equal(color_of("54111")[:3], color_of("54")[:3])
    assert not np.array_equal(color_of("31")[:3], color_of("54")[:3])

    path = save_png(figure, tmp_path / "nested" / "disk.png")
    assert path == tmp_path / "nested" / "disk.png"
    _assert_png(path)


def _line_labels(ax: Axes) -> list[str]:
    return [line.get_label() for line in ax.get_lines()]


def _has_no_data_note(ax: Axes) -> bool:
    return any(text.get_text() == "no data" for text in ax.texts)


def test_training_curves_with_empty_history_render_no_data_panels(tmp_path: Path) -> None:
    figure = training_curves_figure({})
    assert len(figure.axes) == 3
    for ax in figure.axes:
        assert _has_no_data_note(ax) and not ax.get_lines() and not len(ax.get_yticks())
    _assert_png(save_png(figure, tmp_path / "empty.png"))


def test_training_curves_draw_the_metrics_present(tmp_path: Path) -> None:
    history = {
        "train/total_loss": [(20, 1.0), (0, 3.0), (10, 2.0)],
        "val/radius_level_2": [(1, 0.5), (2, 0.6)],
        "val/radius_level_4": [(1, 1.5), (2, 2.0)],
        "val/radius_level_6": [],
        "val/unplotted": [(1, 9.0)],
    }
    figure = training_curves_figure(history)
    losses, hierarchy, radius = figure.axes

    assert _line_labels(losses) == ["train/total_loss"]
    steps, values = losses.get_lines()[0].get_data()
    np.testing.assert_array_equal(steps, [0, 10, 20])
    np.testing.assert_array_equal(values, [3.0, 2.0, 1.0])
    assert losses.get_yscale() == "log"
    assert not _line_labels(hierarchy) and _has_no_data_note(hierarchy)
    assert _line_labels(radius) == ["level 2", "level 4"]
    assert not _has_no_data_note(losses) and not _has_no_data_note(radius)
    _assert_png(save_png(figure, tmp_path / "curves.png"))


@pytest.mark.parametrize("values", [[(0, -1.0), (1, 2.0)], [(0, float("nan"))]])
def test_losses_that_are_not_all_positive_stay_on_a_linear_axis(
    values: list[tuple[int, float]],
) -> None:
    figure = training_curves_figure({"val_loss": values})
    assert figure.axes[0].get_yscale() == "linear"
