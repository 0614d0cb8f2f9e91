"""Figures of a run: the code embeddings in the Poincaré disk and the training curves.

Figures are built as ``matplotlib.figure.Figure`` objects with an Agg canvas attached directly,
never through ``pyplot``: pyplot keeps global state (current figure, backend choice, open-figure
registry) that leaks between runs and needs a display for some backends, whereas a bare
``Figure`` is an ordinary object that is garbage-collected when dropped and renders anywhere.

Disk projection (``poincare_disk_coordinates``): embeddings live in ``D``-dimensional hyperbolic
space, so any 2-D picture distorts something. We keep the part that carries the hierarchy exact
and approximate the rest:

- radius: each point's true hyperbolic distance ``r`` to the origin, drawn at its exact
  Poincaré-ball radius ``tanh(sqrt(c) r / 2) / sqrt(c)``. Level-by-level depth (sectors near
  the centre, 6-digit industries near the rim) is therefore shown without distortion, and the
  disk radius is a strictly increasing function of ``r``.
- angle: the direction of the point's tangent vector at the origin (``logmap0``) projected on
  the first two principal axes of all tangent vectors. PCA is uncentred, i.e. about the
  hyperbolic origin, the same centre the radius is measured from; centring on the mean would
  give every point near the origin the same angle, opposite the mean. Tangent vectors (length
  ``r``) rather than space coordinates (length ``sinh(sqrt(c) r) / sqrt(c)``) are used so that
  the deepest codes do not outweigh the rest exponentially.

For 2-D embeddings (``D = 2``) this is exactly the Poincaré disk up to a rotation or reflection.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Circle
from matplotlib.ticker import LogFormatter

from naics_mlflow.data.taxonomy import MAX_LEVEL, MIN_LEVEL, display_code, sector_of
from naics_mlflow.model.lorentz import distance_to_origin, logmap0

PNG_DPI = 150
# 14 x 10.5 in at 150 dpi is 2100 x 1575 px: the disk is 9 in across and the 2.5 in either side
# hold the sector labels, so neither the points nor the labels have to share space.
DISK_FIGSIZE = (14.0, 10.5)
DISK_AXES_RECT = (2.5 / 14.0, 0.6 / 10.5, 9.0 / 14.0, 9.0 / 10.5)
CURVES_FIGSIZE = (16.0, 5.5)
# Marker areas in pt^2: sectors must stand out among ~2,000 points, 6-digit codes (about half of
# all codes) must stay small enough not to hide each other.
LEVEL_MARKER_SIZE = {2: 170.0, 3: 45.0, 4: 18.0, 5: 9.0, 6: 5.0}
RING_LABEL_STEP_DEGREES = 10.0
SECTOR_TITLE_CHARS = 26
LABEL_FONT_SIZE = 9.0
# Vertical distance between neighbouring sector labels, in axes fraction (~0.36 in).
LABEL_GAP = 0.04
# Words that read badly at the end of a truncated title ("Fishing and…"), as do unclosed
# parentheses ("Other Services (except…").
_DANGLING_WORDS = {"and", "or", "of", "the", "for", "to", "in"}

LOSS_METRICS = ("train/total_loss", "train/contrastive_loss", "val_loss")
HIERARCHY_METRICS = ("val/spearman", "val/ndcg_at_10")


@dataclass(frozen=True)
class CurvePanel:
    """One axes of ``training_curves_figure``: which metrics it draws, and how."""

    title: str
    ylabel: str
    series: tuple[tuple[str, str], ...]  # (metric name, legend label)
    colors: tuple[tuple[float, ...], ...] | None = None  # None: the default colour cycle
    log_scale_if_positive: bool = False


def _as_points(embeddings: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``(N, D + 1)`` float64 CPU tensor. float64 keeps the disk radius strictly increasing in
    ``r``: near the rim ``tanh`` changes by about one float32 ulp per 0.001 of radius."""
    return torch.as_tensor(embeddings).detach().to(device="cpu", dtype=torch.float64)


def _principal_axes(vectors: torch.Tensor) -> torch.Tensor:
    """``(D, 2)`` first two uncentred principal axes of ``(N, D)`` vectors.

    Each axis is signed so that its largest-magnitude loading is positive, which makes the
    picture the same whatever sign the SVD routine returns. Missing axes (``N`` or ``D`` below 2)
    are zero, which puts the points on a line instead of failing.
    """
    _, _, vh = torch.linalg.svd(vectors, full_matrices=False)
    axes = torch.zeros(vectors.shape[1], 2, dtype=vectors.dtype)
    kept = vh[:2].T
    largest = kept.gather(0, kept.abs().argmax(dim=0, keepdim=True))
    axes[:, : kept.shape[1]] = kept * torch.where(largest < 0, -1.0, 1.0)
    return axes


def poincare_disk_coordinates(
    embeddings: torch.Tensor | np.ndarray, curvature: float
) -> np.ndarray:
    """2-D Poincaré-disk positions of Lorentz points (see the module docstring for the choice).

    Args:
        embeddings: ``(N, D + 1)`` points on the hyperboloid ``<x, x>_L = -1/c``.
        curvature: ``c > 0``.

    Returns:
        ``(N, 2)`` float64 inside the disk of radius ``1/sqrt(c)``; a point's distance from the
        centre is exactly its Poincaré-ball radius ``tanh(sqrt(c) r / 2) / sqrt(c)``.
    """
    points = _as_points(embeddings)
    tangent = logmap0(points, curvature)
    planar = tangent @ _principal_axes(tangent)
    angle = torch.atan2(planar[:, 1], planar[:, 0])
    sqrt_c = math.sqrt(curvature)
    disk_radius = torch.tanh(sqrt_c * distance_to_origin(points, curvature) / 2.0) / sqrt_c
    return torch.stack([disk_radius * angle.cos(), disk_radius * angle.sin()], dim=-1).numpy()


def short_title(title: str, max_chars: int = SECTOR_TITLE_CHARS) -> str:
    """``title`` cut at a word boundary to at most ``max_chars`` characters plus an ellipsis.

    ``"Professional, Scientific, and Technical Services"`` -> ``"Professional, Scientific…"``.
    """
    if len(title) <= max_chars:
        return title
    words = title[: max_chars + 1].split()
    if not title[max_chars].isspace():
        # The last word runs past the limit (or is the one-character start of the next word).
        words = words[:-1] or [title[:max_chars]]
    while len(words) > 1 and (
        words[-1].lower() in _DANGLING_WORDS or words[-1].count("(") > words[-1].count(")")
    ):
        words.pop()
    return " ".join(words).rstrip(",;:") + "…"


def sector_label(sector: str, sector_titles: Mapping[str, str]) -> str:
    """``"54 Professional, Scientific…"``; range sectors as the Census writes them (``31-33``)."""
    title = short_title(sector_titles.get(sector, ""))
    return f"{display_code(sector)} {title}".strip()


def sector_colors(sectors: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """A colour for each distinct sector, in code order.

    ``tab20`` comes as ten dark/light pairs of one hue; taking the dark shades first and the
    light ones after keeps neighbouring sectors (often related, and drawn close together) in
    different hues. Beyond 20 sectors the colours repeat.
    """
    palette = matplotlib.colormaps["tab20"].colors
    reordered = palette[0::2] + palette[1::2]
    return {
        sector: tuple(reordered[i % len(reordered)])
        for i, sector in enumerate(sorted(set(sectors)))
    }


def _text_color(background: Sequence[float]) -> str:
    """Black or white, whichever reads better on ``background`` (sRGB relative luminance)."""
    red, green, blue = background[:3]
    return "black" if 0.2126 * red + 0.7152 * green + 0.0722 * blue > 0.45 else "white"


def spread_positions(targets: np.ndarray, gap: float, low: float, high: float) -> np.ndarray:
    """Move 1-D label positions as little as simple passes allow so that they are ``gap`` apart
    and inside ``[low, high]``; order is kept. The gap shrinks if the labels cannot all fit.

    Args:
        targets: ``(K,)`` preferred positions.

    Returns:
        ``(K,)`` positions, in the order of ``targets``.
    """
    order = np.argsort(targets, kind="stable")
    positions = np.clip(targets[order].astype(np.float64), low, high)
    if len(positions) > 1:
        gap = min(gap, (high - low) / (len(positions) - 1))
    for i in range(1, len(positions)):
        positions[i] = max(positions[i], positions[i - 1] + gap)
    if len(positions):
        positions[-1] = min(positions[-1], high)
    for i in range(len(positions) - 2, -1, -1):
        positions[i] = min(positions[i], positions[i + 1] - gap)
    spread = np.empty_like(positions)
    spread[order] = positions
    return spread


def _draw_points(ax: Axes, coordinates: np.ndarray, levels: np.ndarray, colors: np.ndarray) -> None:
    """One scatter per level, deepest first so that shallower codes are drawn on top."""
    for level in sorted(np.unique(levels), reverse=True):
        mask = levels == level
        is_sector = level == MIN_LEVEL
        ax.scatter(
            coordinates[mask, 0],
            coordinates[mask, 1],
            s=LEVEL_MARKER_SIZE[int(level)],
            c=colors[mask],
            edgecolors="black" if is_sector else "none",
            linewidths=0.9 if is_sector else 0.0,
            alpha=1.0 if is_sector else 0.8,
            zorder=3 + MAX_LEVEL - int(level),
        )


def _draw_level_rings(ax: Axes, coordinates: np.ndarray, levels: np.ndarray) -> None:
    """A dashed circle at each level's median disk radius, so that depth can be read off.

    The deep levels' rings crowd together near the rim (``tanh`` saturates), so their labels are
    put at angles that step clockwise from the top instead of on one line.
    """
    disk_radius = np.linalg.norm(coordinates, axis=1)
    for i, level in enumerate(np.unique(levels)):
        ring = float(np.median(disk_radius[levels == level]))
        ax.add_patch(Circle((0.0, 0.0), ring, fill=False, ls="--", lw=0.7, ec="0.6", zorder=1))
        angle = math.radians(90.0 - RING_LABEL_STEP_DEGREES * i)
        ax.text(
            ring * math.cos(angle),
            ring * math.sin(angle),
            f"L{level}",
            ha="center",
            va="center",
            fontsize=8.5,
            color="0.3",
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85},
            zorder=9,  # above the points: near the rim they would hide it
        )


def _draw_sector_labels(
    ax: Axes,
    sector_points: dict[str, np.ndarray],
    sector_titles: Mapping[str, str],
    colors: dict[str, tuple[float, ...]],
    half_width: float,
) -> None:
    """Label each sector beside the disk, with a leader line to the sector's own point.

    Sectors sit near the centre, where 20 labels written at their points would cover each other
    and the points; beside the disk, on the side and at the height of their point, they have
    room and stay easy to match. Each label's box has its sector's colour, so it doubles as the
    colour key.
    """
    for side in (1.0, -1.0):
        sectors = [s for s, p in sector_points.items() if (p[0] >= 0.0) == (side > 0)]
        if not sectors:
            continue
        heights = np.array([0.5 + 0.5 * sector_points[s][1] / half_width for s in sectors])
        for sector, height in zip(
            sectors, spread_positions(heights, LABEL_GAP, 0.02, 0.98), strict=True
        ):
            ax.annotate(
                sector_label(sector, sector_titles),
                xy=tuple(sector_points[sector]),
                xytext=(0.5 + side * 0.52, height),
                textcoords="axes fraction",
                ha="left" if side > 0 else "right",
                va="center",
                fontsize=LABEL_FONT_SIZE,
                color=_text_color(colors[sector]),
                bbox={"boxstyle": "round,pad=0.25", "fc": colors[sector], "ec": "0.3", "lw": 0.5},
                arrowprops={
                    "arrowstyle": "-",
                    "color": "0.3",
                    "lw": 0.5,
                    "alpha": 0.6,
                    "shrinkA": 0.0,
                    "shrinkB": 4.0,
                },
                zorder=10,
            )


def poincare_disk_figure(
    embeddings: torch.Tensor | np.ndarray,
    codes: list[str],
    levels: np.ndarray,
    sector_titles: dict[str, str],
    curvature: float,
) -> Figure:
    """The code embeddings in the Poincaré disk, coloured by sector, marker size by level.

    Args:
        embeddings: ``(N, D + 1)`` Lorentz points, row ``i`` for ``codes[i]``.
        codes: ``N`` stored codes (range sectors as ``31``, ``44``, ``48``).
        levels: ``(N,)`` code levels, 2 (sector) to 6.
        sector_titles: title by stored sector code; a missing title leaves the code alone.
        curvature: ``c > 0``.

    Returns:
        A figure of 2100 x 1575 px at ``PNG_DPI``; the disk has radius ``1/sqrt(c)``.
    """
    levels = np.asarray(levels)
    coordinates = poincare_disk_coordinates(embeddings, curvature)
    sectors = [sector_of(code[:2]) for code in codes]
    colors = sector_colors(sectors)
    ball_radius = 1.0 / math.sqrt(curvature)
    half_width = 1.03 * ball_radius

    figure = Figure(figsize=DISK_FIGSIZE)
    FigureCanvasAgg(figure)
    ax = figure.add_axes(DISK_AXES_RECT)
    ax.set_xlim(-half_width, half_width)
    ax.set_ylim(-half_width, half_width)
    ax.set_aspect("equal")
    ax.set_axis_off()
    ax.add_patch(Circle((0.0, 0.0), ball_radius, fill=False, lw=1.3, ec="black", zorder=2))
    _draw_level_rings(ax, coordinates, levels)
    _draw_points(ax, coordinates, levels, np.array([colors[s] for s in sectors]))
    sector_points = {code: coordinates[i] for i, code in enumerate(codes) if levels[i] == MIN_LEVEL}
    _draw_sector_labels(ax, sector_points, sector_titles, colors, half_width)

    ax.legend(
        handles=[
            Line2D(
                [],
                [],
                ls="",
                marker="o",
                markersize=math.sqrt(LEVEL_MARKER_SIZE[level]),
                mfc="0.5",
                mec="black" if level == MIN_LEVEL else "none",
                label=f"level {level}" + (" (sector)" if level == MIN_LEVEL else ""),
            )
            for level in sorted(LEVEL_MARKER_SIZE)
            if level in levels
        ],
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=len(LEVEL_MARKER_SIZE),
        frameon=False,
        fontsize=10,
    )
    figure.suptitle(
        f"NAICS code embeddings in the Poincaré disk ({len(codes):,} codes, c = {curvature:g})",
        fontsize=15,
        y=0.975,
    )
    figure.text(
        0.5,
        0.935,
        "radius: exact hyperbolic distance to the origin, drawn at tanh(√c·r/2)/√c;  "
        "angle: first two principal axes of the tangent vectors at the origin;  "
        "dashed: median radius per level",
        ha="center",
        fontsize=9.5,
        color="0.3",
    )
    return figure


class PlainLogFormatter(LogFormatter):
    """Log-axis tick labels as plain numbers ("0.3", not "3 x 10^-1"); ``LogFormatter`` still
    decides which ticks get a label, e.g. no minor labels when the axis spans many decades."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:g}" if super().__call__(x, pos) else ""


def _sorted_series(points: Sequence[tuple[int, float]]) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` ordered by step: runs resumed from a checkpoint log out of order."""
    steps = np.array([step for step, _ in points], dtype=np.float64)
    values = np.array([value for _, value in points], dtype=np.float64)
    order = np.argsort(steps, kind="stable")
    return steps[order], values[order]


def _draw_panel(
    ax: Axes, history: Mapping[str, Sequence[tuple[int, float]]], panel: CurvePanel
) -> None:
    """Draw a panel's metrics that ``history`` has; a panel with none gets a "no data" note."""
    ax.set_title(panel.title)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel)
    ax.grid(True, alpha=0.3)
    drawn: list[np.ndarray] = []
    for i, (metric, label) in enumerate(panel.series):
        if not history.get(metric):
            continue
        steps, values = _sorted_series(history[metric])
        # Per-epoch validation has few points: markers show where they are.
        marker = "o" if len(steps) <= 50 else None
        color = panel.colors[i] if panel.colors is not None else None
        ax.plot(steps, values, label=label, marker=marker, markersize=3.5, lw=1.6, color=color)
        drawn.append(values)
    if not drawn:
        ax.text(
            0.5,
            0.5,
            "no data",
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=13,
            color="0.5",
        )
        # An empty axes' default 0-1 ticks would read as data.
        ax.set_xticks([])
        ax.set_yticks([])
        return
    finite = np.concatenate(drawn)
    finite = finite[np.isfinite(finite)]
    # Losses fall by orders of magnitude early on; a log axis keeps the later epochs readable.
    if panel.log_scale_if_positive and finite.size and (finite > 0).all():
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(PlainLogFormatter())
        ax.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))
    ax.legend(fontsize=9)


def curve_panels() -> tuple[CurvePanel, ...]:
    """The three panels: losses, hierarchy quality, mean radius per level."""
    levels = range(MIN_LEVEL, MAX_LEVEL + 1)
    # viridis stops short of its pale yellow end, which is hard to see on white.
    level_colors = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.85, len(levels)))
    return (
        CurvePanel(
            "Losses", "loss", tuple((m, m) for m in LOSS_METRICS), log_scale_if_positive=True
        ),
        CurvePanel("Hierarchy", "score", tuple((m, m) for m in HIERARCHY_METRICS)),
        CurvePanel(
            "Mean hyperbolic radius by level",
            "radius",
            tuple((f"val/radius_level_{level}", f"level {level}") for level in levels),
            tuple(tuple(color) for color in level_colors),
        ),
    )


def training_curves_figure(history: dict[str, list[tuple[int, float]]]) -> Figure:
    """Losses, hierarchy metrics and radius per level against step, one panel each.

    Args:
        history: metric name -> ``(step, value)`` pairs, as MLflow logs them. Metrics the panels
            do not use are ignored; missing ones are left out, and an empty panel says so.

    Returns:
        A figure of 2400 x 825 px at ``PNG_DPI``.
    """
    figure = Figure(figsize=CURVES_FIGSIZE, layout="constrained")
    FigureCanvasAgg(figure)
    for ax, panel in zip(figure.subplots(1, 3), curve_panels(), strict=True):
        _draw_panel(ax, history, panel)
    figure.suptitle("Training curves", fontsize=14)
    return figure


def save_png(figure: Figure, path: str | Path, dpi: int = PNG_DPI) -> Path:
    """Render ``figure`` to a PNG at ``path`` (parent folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure).print_figure(path, dpi=dpi, format="png")
    return path
