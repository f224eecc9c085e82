"""Figures from run stores: what each run made and how it got there.

Every figure is drawn from run stores alone; nothing is synthesised again, so
changing a plot costs seconds. :func:`plot_run` draws one run, its images next to
the trajectory that produced them; :func:`plot_study` draws one thumbnail per run
of a study, titled with the audit's verdict.

Figures are :class:`matplotlib.figure.Figure` objects drawn on an Agg canvas, never
through pyplot: they need no display, leave matplotlib's global state alone, and
can be made by many jobs at once.

Images are drawn in gray with fixed limits 0 and 1. A pixel outside that range
saturates instead of rescaling the image, and the panel's label then gives the
image's range, so a range problem shows instead of hiding.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from .store import StoreError, open_run, run_spec

logger = logging.getLogger(__name__)

#: Largest pixel change of the images that show an eigendistortion added to and
#: subtracted from the image; its scale ``alpha`` is chosen to give this change.
EIGENDISTORTION_PIXEL_CHANGE = 0.1

#: Columns :func:`plot_study` needs in the audit table.
STUDY_COLUMNS = ("run_id", "method", "verdict", "store")

# A pixel further than this outside [0, 1] puts the image's range in its label;
# smaller excursions are rounding of the optimiser's last step.
_RANGE_TOLERANCE = 1e-3
_PANEL = 2.3  # inches of one image panel in a run figure
_LABEL = 0.45  # inches above a panel for two lines of label
_THUMBNAIL = 2.0  # inches of one panel in a study figure
_THUMBNAIL_PIXELS = 200  # about the width of a thumbnail at 100 dpi
_CURVES = 2.6  # inches of the row of curves under a run's images
_DIVERGING = "RdBu_r"
_MINUS = "\u2212"  # the minus sign, which a hyphen only resembles
_PASS_COLOR = "#1a7f37"
_FAIL_COLOR = "#cf222e"


def plot_run(dataset: xr.Dataset) -> Figure:
    """Draw one run: the images it made and how the synthesis got there.

    The figure's title names the run, its status, the iterations it took and why
    it stopped. What follows depends on the method (``dataset.attrs["method"]``):

    - metamer: target image, initial image and metamer of each sample; loss and
      objective per iteration (log scale) and the pixel change norm of each step;
    - mad: reference image, initial image and the four MAD images, each labelled
      with both final metric values; the optimized metric per iteration, and the
      reference metric's drift relative to its start, which should stay near zero;
    - eigendistortion: the image, each eigendistortion (diverging colormap centred
      at zero), the image plus and minus the eigendistortion scaled to change a
      pixel by at most :data:`EIGENDISTORTION_PIXEL_CHANGE`; eigenvalue estimates
      and residuals per iteration;
    - geodesic: the frames of the path above those of the initial path; step
      energy of path and pixel fade per segment, path energy per iteration against
      the fade's, and each frame's deviation from the straight line between the
      endpoints in representation space.

    Parameters
    ----------
    dataset
        A run store, as opened by :func:`stimsynth.store.open_run`.

    Returns
    -------
    figure
        The figure, drawn on an Agg canvas (not registered with pyplot).

    Raises
    ------
    ValueError
        If the store's method has no figure.
    """
    method = dataset.attrs.get("method")
    if method not in _RUN_PLOTTERS:
        raise ValueError(
            f"run store {dataset.attrs.get('run_id', '?')!r} has method {method!r}; "
            f"figures exist for {', '.join(_RUN_PLOTTERS)}"
        )
    figure = _RUN_PLOTTERS[method](dataset)
    # About 12 characters of 10-point text fit in an inch.
    length = int(figure.get_figwidth() * 12)
    figure.suptitle(_run_title(dataset.attrs, length), fontsize=10)
    return figure


def save_run_figure(
    store_path: str | os.PathLike, png_path: str | os.PathLike, dpi: int = 100
) -> Path:
    """Draw a run store's figure and save it as PNG.

    Parameters
    ----------
    store_path
        The run store.
    png_path
        Where the PNG goes; missing folders are made.
    dpi
        Resolution of the PNG.

    Returns
    -------
    path
        The PNG written.

    Raises
    ------
    stimsynth.store.StoreError
        If the path holds no finished run store.
    """
    png_path = Path(png_path)
    dataset = open_run(store_path)
    try:
        figure = plot_run(dataset)
    finally:
        dataset.close()
    _save(figure, png_path, dpi)
    return png_path


def plot_study(
    table: pd.DataFrame, stores: dict[str, xr.Dataset] | None = None
) -> Figure:
    """Draw a study overview: one thumbnail of each run's result with its verdict.

    A panel shows the metamer (the first sample's), the four MAD images in a 2x2
    grid, the top eigendistortion, or the middle frame of a geodesic path. Its
    title is the run id and the audit verdict, in green for ``pass`` and in red for
    anything else (``fail``, or a verdict left empty).

    Parameters
    ----------
    table
        The audit table, one row per run, with columns ``run_id``, ``method``,
        ``verdict`` and ``store`` (the path of the run store).
    stores
        Run stores already open, by run id. A run not in it is opened from its
        ``store`` path and closed again.

    Returns
    -------
    figure
        The figure, drawn on an Agg canvas (not registered with pyplot).

    Raises
    ------
    ValueError
        If the table lacks a column or has no rows.

    Notes
    -----
    A run whose store is missing or cannot be opened gets a panel that says so,
    with a warning in the log, so that one lost store does not hide the others.
    """
    missing = [column for column in STUDY_COLUMNS if column not in table.columns]
    if missing:
        raise ValueError(
            f"the audit table lacks column(s) {', '.join(missing)}; it needs "
            f"{', '.join(STUDY_COLUMNS)}"
        )
    if table.empty:
        raise ValueError("the audit table has no runs to draw")

    n_runs = len(table)
    columns = min(n_runs, max(4, math.ceil(math.sqrt(n_runs))))
    rows = math.ceil(n_runs / columns)
    figure = _new_figure(columns * _THUMBNAIL, rows * (_THUMBNAIL + 0.45) + 0.4)
    axes = figure.subplots(rows, columns, squeeze=False)

    n_pass = 0
    for ax, run in zip(axes.flat, table.itertuples(index=False), strict=False):
        passed = _passes(run.verdict)
        n_pass += passed
        dataset = (stores or {}).get(run.run_id)
        if dataset is not None:
            _draw_thumbnail(ax, dataset)
        else:
            _draw_thumbnail_from_path(ax, run.store)
        _mark_verdict(ax, run.run_id, run.verdict, passed)
    for ax in axes.flat[n_runs:]:
        ax.set_axis_off()

    figure.suptitle(
        f"study: {n_runs} runs, {n_pass} pass, {n_runs - n_pass} fail", fontsize=10
    )
    return figure


def save_study_figure(
    audit_csv: str | os.PathLike, png_path: str | os.PathLike, dpi: int = 100
) -> Path:
    """Draw the study overview of an audit table and save it as PNG.

    Parameters
    ----------
    audit_csv
        The audit table as CSV, with the columns :func:`plot_study` needs.
    png_path
        Where the PNG goes; missing folders are made.
    dpi
        Resolution of the PNG.

    Returns
    -------
    path
        The PNG written.

    Notes
    -----
    Relative store paths in the table are taken relative to the current
    directory, where Snakemake runs its jobs, not to the CSV's folder.
    """
    png_path = Path(png_path)
    figure = plot_study(pd.read_csv(audit_csv))
    _save(figure, png_path, dpi)
    return png_path


# Run figures, one per method.


def _plot_metamer(dataset: xr.Dataset) -> Figure:
    target = dataset["target_image"].values
    initial = dataset["initial_image"].values
    metamer = dataset["metamer"].values
    final_loss = dataset["final_loss"].values
    n_samples = metamer.shape[0]
    seeds = _sample_names(dataset, "sample", "seed")

    row = _PANEL + _LABEL
    figure = _new_figure(3 * _PANEL + 0.6, n_samples * row + _CURVES + 0.5)
    images, curves = figure.subfigures(2, 1, height_ratios=[n_samples * row, _CURVES])
    axes = images.subplots(n_samples, 3, squeeze=False)
    _show_image(axes[0, 0], target, "target image")
    for ax in axes[1:, 0]:
        ax.set_axis_off()
    for s, seed in enumerate(seeds):
        _show_image(axes[s, 1], initial[s], f"initial image ({seed})")
        _show_image(
            axes[s, 2], metamer[s], f"metamer ({seed})\nloss {final_loss[s]:.3g}"
        )

    loss_ax, change_ax = curves.subplots(1, 2, width_ratios=[3, 2])
    iteration = dataset["iteration"].values
    loss = _per_sample(dataset["loss"])
    objective = _per_sample(dataset["objective"])
    change = _per_sample(dataset["pixel_change_norm"])
    stops = dataset["stop_iteration"].values if "stop_iteration" in dataset else None
    for s, seed in enumerate(seeds):
        color = f"C{s}"
        loss_ax.plot(iteration, loss[:, s], color=color, label=f"loss ({seed})")
        loss_ax.plot(
            iteration,
            objective[:, s],
            color=color,
            ls="--",
            label=f"objective ({seed})",
        )
        change_ax.plot(iteration, change[:, s], color=color)
        if stops is not None and stops[s] < len(iteration):
            loss_ax.axvline(stops[s], color=color, lw=0.8, ls=":")
    loss_ax.set(yscale="log", xlabel="iteration", ylabel="loss, objective")
    loss_ax.legend(fontsize=7, ncols=min(2, 2 * n_samples))
    change_ax.set(yscale="log", xlabel="iteration", ylabel="pixel change norm")
    change_ax.set_title("size of each step", fontsize=9)
    return figure


def _plot_mad(dataset: xr.Dataset) -> Figure:
    directions = [str(d) for d in dataset["direction"].values]
    optimized = [str(name) for name in dataset["optimized_name"].values]
    reference = [str(name) for name in dataset["reference_name"].values]
    final_optimized = dataset["final_optimized_metric"].values
    final_reference = dataset["final_reference_metric"].values
    start = dataset["reference_metric_start"].values
    mad_image = dataset["mad_image"].values
    rows = math.ceil(len(directions) / 2)
    row = _PANEL + 2 * _LABEL  # room for four lines of label

    figure = _new_figure(3 * _PANEL + 0.6, rows * row + _CURVES + 0.5)
    images, curves = figure.subfigures(2, 1, height_ratios=[rows * row, _CURVES])
    axes = images.subplots(rows, 3, squeeze=False)
    _show_image(axes[0, 0], dataset["reference_image"].values, "reference image")
    _show_image(axes[1, 0], dataset["initial_image"].values, "initial image")
    for ax in axes[2:, 0]:
        ax.set_axis_off()
    # The store's directions come in pairs (min, max) per optimized metric: one row
    # per optimized metric, as in the study thumbnail.
    for i, direction in enumerate(directions):
        label = (
            f"MAD image: {direction}\n"
            f"{optimized[i]} {final_optimized[i]:.3g}\n"
            f"{reference[i]} {final_reference[i]:.3g} (start {start[i]:.3g})"
        )
        _show_image(axes[i // 2, 1 + i % 2], mad_image[i], label)
    if len(directions) % 2:
        axes[-1, 2].set_axis_off()

    optimized_ax, drift_ax = curves.subplots(1, 2)
    iteration = dataset["iteration"].values
    optimized_metric = dataset["optimized_metric"].values
    drift = _relative_change(dataset["reference_metric"].values, start)
    for i, direction in enumerate(directions):
        optimized_ax.plot(iteration, optimized_metric[:, i], label=direction)
        drift_ax.plot(iteration, drift[:, i], label=f"{direction} ({reference[i]})")
    optimized_ax.set(yscale="log", xlabel="iteration", ylabel="optimized metric")
    optimized_ax.legend(fontsize=7)
    drift_ax.axhline(0, color="black", lw=0.8)
    drift_ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    drift_ax.set(xlabel="iteration", ylabel="reference metric change")
    drift_ax.set_title("reference metric relative to its start", fontsize=9)
    drift_ax.legend(fontsize=7)
    return figure


def _plot_eigendistortion(dataset: xr.Dataset) -> Figure:
    image = dataset["image"].values
    distortions = dataset["eigendistortion"].values
    eigenvalues = dataset["eigenvalue"].values
    indices = dataset["eigenindex"].values
    n_rows = len(indices)

    row = _PANEL + _LABEL
    figure = _new_figure(4 * _PANEL + 1.0, n_rows * row + _CURVES + 0.5)
    images, curves = figure.subfigures(2, 1, height_ratios=[n_rows * row, _CURVES])
    axes = images.subplots(n_rows, 4, squeeze=False)
    _show_image(axes[0, 0], image, "image")
    for ax in axes[1:, 0]:
        ax.set_axis_off()
    for row, index in enumerate(indices):
        name = _eigendistortion_name(int(index), image.size)
        distortion = distortions[row]
        _show_distortion(
            axes[row, 1], distortion, f"{name}\neigenvalue {eigenvalues[row]:.3g}"
        )
        alpha = eigendistortion_scale(distortion)
        signs = ((axes[row, 2], 1, "+"), (axes[row, 3], -1, _MINUS))
        for ax, sign, symbol in signs:
            changed = np.clip(image + sign * alpha * distortion, 0, 1)
            _show_image(ax, changed, f"image {symbol} α × {name}\nα = {alpha:.3g}")

    value_ax, residual_ax = curves.subplots(1, 2)
    iteration = dataset["iteration"].values
    values = dataset["eigenvalue_trace"].values
    residuals = dataset["residual_trace"].values / np.nanmax(eigenvalues)
    for row, index in enumerate(indices):
        name = _eigendistortion_name(int(index), image.size)
        # Each eigenpair is estimated in its own stretch of iterations; the rows of
        # the others are NaN there.
        found = np.isfinite(values[:, row])
        color = f"C{row}"
        value_ax.plot(iteration[found], values[found, row], color=color, label=name)
        value_ax.axhline(eigenvalues[row], color=color, lw=0.8, ls=":")
        found = np.isfinite(residuals[:, row])
        residual_ax.plot(iteration[found], residuals[found, row], color=color)
    value_ax.set(yscale="log", xlabel="iteration", ylabel="eigenvalue estimate")
    value_ax.set_title("estimates (dotted: final eigenvalue)", fontsize=9)
    value_ax.legend(fontsize=7)
    residual_ax.set(
        yscale="log", xlabel="iteration", ylabel="residual / top eigenvalue"
    )
    residual_ax.set_title(f"|Fv {_MINUS} λv| / λ_max", fontsize=9)
    return figure


def _plot_geodesic(dataset: xr.Dataset) -> Figure:
    path = dataset["path"].values
    initial_path = dataset["initial_path"].values
    n_frames = path.shape[0]
    initial = run_spec(dataset).get("settings", {}).get("initial", "straight")
    initial_name = (
        "pixel fade" if initial == "straight" else f"initial path ({initial})"
    )
    frame = min(1.0, 11.0 / n_frames)

    figure = _new_figure(max(9.0, n_frames * frame + 0.6), 2 * frame + _CURVES + 1.2)
    frames, curves = figure.subfigures(2, 1, height_ratios=[2 * frame + 0.5, _CURVES])
    axes = frames.subplots(2, n_frames, squeeze=False)
    for i in range(n_frames):
        _show_image(axes[0, i], path[i], f"frame {i}", fontsize=7)
        _show_image(axes[1, i], initial_path[i], "", fontsize=7)
    axes[0, 0].set_ylabel("geodesic path", fontsize=8)
    axes[1, 0].set_ylabel(initial_name, fontsize=8)

    step_ax, energy_ax, deviation_ax = curves.subplots(1, 3)
    segment = np.arange(1, n_frames)
    step_ax.plot(segment, dataset["step_energy"].values, "o-", ms=3, label="path")
    step_ax.plot(
        segment, dataset["fade_step_energy"].values, "s--", ms=3, label="pixel fade"
    )
    step_ax.set(xlabel="step", ylabel="step energy")
    step_ax.legend(fontsize=7)

    fade_energy = float(dataset["fade_path_energy"].values)
    energy_ax.plot(dataset["iteration"].values, dataset["path_energy"].values)
    energy_ax.axhline(fade_energy, color="C1", ls="--", label="pixel fade")
    energy_ax.set(xlabel="iteration", ylabel="path energy")
    energy_ax.set_title(
        f"final {float(dataset['final_path_energy'].values):.4g}, "
        f"fade {fade_energy:.4g}",
        fontsize=9,
    )
    energy_ax.legend(fontsize=7)

    steps = np.arange(n_frames)
    deviation_ax.plot(steps, dataset["deviation"].values, "o-", ms=3, label="path")
    deviation_ax.plot(
        steps, dataset["fade_deviation"].values, "s--", ms=3, label="pixel fade"
    )
    deviation_ax.set(xlabel="frame", ylabel="deviation from straight line")
    deviation_ax.set_title("in representation space", fontsize=9)
    deviation_ax.legend(fontsize=7)
    return figure


_RUN_PLOTTERS: dict[str, Callable[[xr.Dataset], Figure]] = {
    "metamer": _plot_metamer,
    "mad": _plot_mad,
    "eigendistortion": _plot_eigendistortion,
    "geodesic": _plot_geodesic,
}


def eigendistortion_scale(distortion: np.ndarray) -> float:
    """The scale ``alpha`` at which an eigendistortion changes a pixel by at most
    :data:`EIGENDISTORTION_PIXEL_CHANGE`.

    Parameters
    ----------
    distortion
        One eigendistortion (channel, y, x).

    Returns
    -------
    alpha
        ``EIGENDISTORTION_PIXEL_CHANGE / max |distortion|``, or 0 for a distortion
        that is zero everywhere.
    """
    largest = float(np.abs(distortion).max())
    return EIGENDISTORTION_PIXEL_CHANGE / largest if largest > 0 else 0.0


def mad_thumbnail(mad_image: np.ndarray, gap: int = 2) -> np.ndarray:
    """The four MAD images as one image, in a 2x2 grid with white gaps.

    Parameters
    ----------
    mad_image
        MAD images (direction, channel, y, x), in the store's direction order; the
        first and second fill the top row.
    gap
        Width of the white gaps between the images, in pixels.

    Returns
    -------
    image
        One image (channel, 2 * y + gap, 2 * x + gap).
    """
    n, channels, height, width = mad_image.shape
    grid = np.ones((channels, 2 * height + gap, 2 * width + gap), mad_image.dtype)
    for i in range(min(n, 4)):
        top = (i // 2) * (height + gap)
        left = (i % 2) * (width + gap)
        grid[:, top : top + height, left : left + width] = mad_image[i]
    return grid


# Study panels.


def _draw_thumbnail(ax: Axes, dataset: xr.Dataset) -> None:
    method = dataset.attrs.get("method")
    if method == "metamer":
        image = dataset["metamer"].values[0]
    elif method == "mad":
        image = mad_thumbnail(dataset["mad_image"].values)
    elif method == "eigendistortion":
        _show_distortion(ax, dataset["eigendistortion"].values[0], "", colorbar=False)
        return
    elif method == "geodesic":
        path = dataset["path"].values
        image = path[len(path) // 2]
    else:
        _show_message(ax, f"no thumbnail for method {method!r}")
        return
    # Shrinking a large image pixel by pixel aliases noise-like images into false
    # patterns; small ones are enlarged, where sharp pixels are what is there.
    large = image.shape[-1] > _THUMBNAIL_PIXELS
    _show_image(ax, image, "", interpolation="antialiased" if large else "nearest")


def _draw_thumbnail_from_path(ax: Axes, store) -> None:
    if not isinstance(store, str | os.PathLike) or not str(store):
        _show_message(ax, "no store")
        return
    try:
        dataset = open_run(store)
    except StoreError as error:
        logger.warning("Study figure: %s", error)
        _show_message(ax, "store missing\nor unfinished")
        return
    try:
        _draw_thumbnail(ax, dataset)
    finally:
        dataset.close()


def _mark_verdict(ax: Axes, run_id: str, verdict, passed: bool) -> None:
    color = _PASS_COLOR if passed else _FAIL_COLOR
    ax.set_title(f"{_wrap_run_id(run_id)}\n{verdict}", fontsize=7, color=color)
    for spine in ax.spines.values():
        spine.set(edgecolor=color, linewidth=2, visible=True)


def _passes(verdict) -> bool:
    return str(verdict).strip().lower() == "pass"


# Panels and text.


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    # Attaching the canvas draws with Agg whatever backend pyplot was given.
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, png_path: Path, dpi: int) -> None:
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path, dpi=dpi)
    logger.info("Wrote figure %s", png_path)


def _show_image(
    ax: Axes,
    image: np.ndarray,
    label: str,
    fontsize: float = 8,
    interpolation: str = "nearest",
) -> None:
    """Draw one image (channel, y, x) between 0 and 1: gray, or colour for three
    channels, with its range added to the label when it leaves [0, 1]."""
    low, high = float(np.nanmin(image)), float(np.nanmax(image))
    if low < -_RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
        label = f"{label}\nrange [{low:.3f}, {high:.3f}]".lstrip("\n")
    if image.shape[0] == 3:
        # Colour cannot be drawn outside [0, 1]; the label keeps the true range.
        ax.imshow(np.clip(image.transpose(1, 2, 0), 0, 1), interpolation=interpolation)
    else:
        plane, note = _one_plane(image)
        label = f"{label}\n{note}".strip("\n") if note else label
        ax.imshow(plane, cmap="gray", vmin=0, vmax=1, interpolation=interpolation)
    _label(ax, label, fontsize)


def _show_distortion(
    ax: Axes, distortion: np.ndarray, label: str, colorbar: bool = True
) -> None:
    """Draw a signed image in a diverging colormap centred at zero."""
    plane, note = _one_plane(distortion)
    limit = float(np.abs(plane).max()) or 1.0
    shown = ax.imshow(
        plane, cmap=_DIVERGING, vmin=-limit, vmax=limit, interpolation="nearest"
    )
    _label(ax, f"{label}\n{note}".strip("\n") if note else label, 8)
    if colorbar:
        ax.figure.colorbar(shown, ax=ax, shrink=0.8, pad=0.02)


def _show_message(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=8, color="0.4")
    _label(ax, "", 8)


def _label(ax: Axes, label: str, fontsize: float) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if label:
        ax.set_title(label, fontsize=fontsize)


def _one_plane(image: np.ndarray) -> tuple[np.ndarray, str]:
    """A single-channel image as a plane; other channel counts are averaged."""
    if image.shape[0] == 1:
        return image[0], ""
    return image.mean(0), f"mean of {image.shape[0]} channels"


def _run_title(attrs: dict, length: int) -> str:
    """Run id, status and iterations; below, the stop reason cut to ``length``."""
    reason = _merge_reasons(str(attrs.get("stop_reason", "")))
    if len(reason) > length:
        reason = reason[: length - 1].rstrip() + "\u2026"
    return (
        f"{attrs.get('run_id', '?')}: {attrs.get('status', '?')} after "
        f"{attrs.get('iterations', '?')} iterations\n{reason}"
    )


def _merge_reasons(reason: str) -> str:
    """One reason for samples that all stopped for the same one.

    Runs with several samples (MAD directions) join per-sample reasons as
    ``label: reason; label: reason``, which is long and repetitive when they agree.
    """
    parts = [part.partition(": ") for part in reason.split("; ")]
    if len(parts) > 1 and all(sep for _, sep, _ in parts):
        distinct = {text for _, _, text in parts}
        if len(distinct) == 1:
            return f"all: {distinct.pop()}"
    return reason


def _wrap_run_id(run_id: str, width: int = 26) -> str:
    """A run id broken at its slashes into lines of about ``width`` characters."""
    lines = [""]
    for part in str(run_id).split("/"):
        piece = part if not lines[-1] else f"/{part}"
        if lines[-1] and len(lines[-1]) + len(piece) > width:
            lines.append(piece)
        else:
            lines[-1] += piece
    return "\n".join(lines)


def _eigendistortion_name(index: int, n_pixels: int) -> str:
    if index == 0:
        return "top eigendistortion"
    if index == n_pixels - 1:
        return "bottom eigendistortion"
    return f"eigendistortion {index}"


def _sample_names(dataset: xr.Dataset, dim: str, coord: str) -> list[str]:
    if coord in dataset.coords:
        return [f"{coord} {value}" for value in dataset[coord].values]
    return [f"{dim} {i}" for i in range(dataset.sizes[dim])]


def _per_sample(variable: xr.DataArray) -> np.ndarray:
    """Per-iteration values as (iteration, sample), also for a one-sample run."""
    values = variable.values
    return values[:, None] if values.ndim == 1 else values


def _relative_change(values: np.ndarray, start: np.ndarray) -> np.ndarray:
    """(values - start) / start per column; NaN where the start is zero."""
    start = np.asarray(start, dtype=np.float64)
    safe = np.where(start != 0, start, np.nan)
    return (values - start) / safe
