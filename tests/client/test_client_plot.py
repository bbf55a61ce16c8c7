"""Plots from hand-made histories: the population band, the center reward, retention and alerts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from swarmtune.client.history import IterationPoint, figure_names, figure_series
from swarmtune.client.plot import DPI, HEIGHT_IN, WIDTH_IN, PlotSpec, render, save_png


def point(t: int, figures: tuple[tuple[str, float], ...] = (), alerts: tuple[str, ...] = ()) -> IterationPoint:
    return IterationPoint(t, t, 1000 * t, 8, tuple(0.1 * t + 0.05 * k for k in range(8)), figures, alerts)


HISTORY = (
    point(1, (("demo", 0.30), ("reversal", 0.97))),
    point(2),
    point(3, (("demo", 0.42), ("reversal", 0.93)), ("reversal fell 0.04 below its first value",)),
    point(4),
)


def legend_labels(spec: PlotSpec) -> list[list[str]]:
    figure = render(spec)
    return [[text.get_text() for text in axes.get_legend().get_texts()] for axes in figure.axes]


def test_rewards_band_center_retention_and_alerts_are_labelled() -> None:
    top, bottom = legend_labels(PlotSpec("demo-job", HISTORY, ("demo",), 10))
    assert top == ["population min–max", "population mean", "center model, held out (demo)", "alert (retention or dispute)"]
    assert bottom == ["retention: reversal", "alert (retention or dispute)"]


def test_figures_by_name_in_order() -> None:
    assert figure_names(HISTORY) == ("demo", "reversal")
    assert figure_series(HISTORY, "reversal") == ((1, 0.97), (3, 0.93))
    assert HISTORY[0].reward_mean is not None and abs(HISTORY[0].reward_mean - 0.275) < 1e-12


def test_a_job_without_retention_still_renders_a_readable_png(tmp_path: Path) -> None:
    spec = PlotSpec("plain", tuple(point(t) for t in range(1, 4)), (), 3)
    out = save_png(spec, tmp_path / "plain.png")
    with Image.open(out) as image:
        assert image.size == (int(WIDTH_IN * DPI), int(HEIGHT_IN * DPI))
        assert np.asarray(image.convert("L"), dtype=np.float64).std() > 10
    assert "no retention figures recorded" in [t.get_text() for t in render(spec).axes[1].texts]


def test_an_empty_history_renders(tmp_path: Path) -> None:
    assert save_png(PlotSpec("new", (), (), 5), tmp_path / "empty.png").stat().st_size > 0
