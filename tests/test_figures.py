"""Figures drawn from real run stores: what each panel shows, and that PNGs come out.

The stores are short (60-iteration) runs of each method, made once per session by
the ``sample_runs`` fixture and copied so that nothing a test does can touch them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from matplotlib.image import imread

from stimsynth.figures import (
    EIGENDISTORTION_PIXEL_CHANGE,
    eigendistortion_scale,
    mad_thumbnail,
    plot_run,
    plot_study,
    save_run_figure,
    save_study_figure,
)
from stimsynth.store import open_run

RUNS = {
    "metamer": "metamer/frontend/einstein/seed0",
    "mad": "mad/mse-vs-ssim/curie/seed0",
    "eigendistortion": "eigendistortion/frontend/einstein/seed0",
    "geodesic": "geodesic/shift/einstein_small/seed0",
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sample_runs) -> Path:
    """A copy of every sample run store, under its run id."""
    root = tmp_path_factory.mktemp("runs") / "runs"
    shutil.copytree(sample_runs, root)
    return root


@pytest.fixture
def dataset(runs, request):
    data = open_run(runs / f"{RUNS[request.param]}.zarr")
    yield data
    data.close()


def image_axes(figure):
    """Axes that show an image, in the order they were made."""
    return [ax for ax in figure.axes if ax.images]


def shown(ax) -> np.ndarray:
    return np.asarray(ax.images[0].get_array())


def assert_image_panel(ax, expected: np.ndarray) -> None:
    """The panel shows exactly ``expected`` in gray between 0 and 1, without ticks."""
    np.testing.assert_array_equal(shown(ax), expected)
    assert ax.images[0].get_clim() == (0, 1)
    assert ax.images[0].get_cmap().name == "gray"
    assert ax.get_title()
    assert not ax.get_xticks().size and not ax.get_yticks().size


@pytest.mark.parametrize("method", RUNS)
def test_run_figure_is_a_png(runs, tmp_path, method):
    png = save_run_figure(runs / f"{RUNS[method]}.zarr", tmp_path / "fig" / "run.png")

    pixels = imread(png)
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    assert pixels.shape[0] >= 400 and pixels.shape[1] >= 600
    # Something was drawn: a blank or single-colour canvas has no spread.
    assert pixels[..., :3].std() > 0.05


@pytest.mark.parametrize("dataset", ["metamer"], indirect=True)
def test_metamer_figure(dataset):
    figure = plot_run(dataset)

    axes = image_axes(figure)
    assert len(axes) == 3
    assert_image_panel(axes[0], dataset["target_image"].values[0])
    assert_image_panel(axes[1], dataset["initial_image"].values[0, 0])
    assert_image_panel(axes[2], dataset["metamer"].values[0, 0])
    assert "metamer" in axes[2].get_title()

    loss_ax = next(ax for ax in figure.axes if ax.get_ylabel() == "loss, objective")
    assert loss_ax.get_yscale() == "log"
    np.testing.assert_array_equal(
        loss_ax.lines[0].get_ydata(), dataset["loss"].values[:, 0]
    )
    assert dataset.attrs["run_id"] in figure.get_suptitle()
    assert dataset.attrs["status"] in figure.get_suptitle()


def test_metamer_figure_of_two_samples(runs):
    """A batch of seeds gets a row of initial image and metamer per seed."""
    seeds = [open_run(runs / f"metamer/frontend/einstein/seed{s}.zarr") for s in (0, 1)]
    dataset = xr.concat(
        seeds,
        dim="sample",
        data_vars="minimal",
        coords="minimal",
        compat="override",
        join="override",
    )

    axes = image_axes(plot_run(dataset))

    assert len(axes) == 1 + 2 * 2
    assert_image_panel(axes[0], dataset["target_image"].values[0])
    for s in (0, 1):
        assert_image_panel(axes[1 + 2 * s], dataset["initial_image"].values[s, 0])
        assert_image_panel(axes[2 + 2 * s], dataset["metamer"].values[s, 0])
        assert f"seed {s}" in axes[2 + 2 * s].get_title()


@pytest.mark.parametrize("dataset", ["mad"], indirect=True)
def test_mad_figure(dataset):
    figure = plot_run(dataset)

    axes = image_axes(figure)
    assert len(axes) == 6
    assert_image_panel(axes[0], dataset["reference_image"].values[0])
    mad_axes = axes[1:3] + axes[4:6]  # made row by row, after the reference image
    assert_image_panel(axes[3], dataset["initial_image"].values[0])
    for i, ax in enumerate(mad_axes):
        assert_image_panel(ax, dataset["mad_image"].values[i, 0])
        direction = str(dataset["direction"].values[i])
        final = dataset["final_reference_metric"].values[i]
        assert direction in ax.get_title()
        assert f"{final:.3g}" in ax.get_title()

    drift_ax = next(
        ax for ax in figure.axes if ax.get_ylabel() == "reference metric change"
    )
    start = dataset["reference_metric_start"].values
    for i, line in enumerate(drift_ax.lines[: len(start)]):
        expected = dataset["reference_metric"].values[:, i] / start[i] - 1
        np.testing.assert_allclose(line.get_ydata(), expected, rtol=1e-5, atol=1e-6)
        assert line.get_ydata()[0] == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("dataset", ["eigendistortion"], indirect=True)
def test_eigendistortion_figure(dataset):
    figure = plot_run(dataset)

    axes = image_axes(figure)
    n = dataset.sizes["eigenindex"]
    assert len(axes) == 1 + 3 * n
    image = dataset["image"].values
    assert_image_panel(axes[0], image[0])
    for row in range(n):
        distortion = dataset["eigendistortion"].values[row]
        shown_distortion, plus, minus = axes[1 + 3 * row : 4 + 3 * row]

        np.testing.assert_array_equal(shown(shown_distortion), distortion[0])
        low, high = shown_distortion.images[0].get_clim()
        assert low == -high == pytest.approx(-np.abs(distortion).max())

        alpha = eigendistortion_scale(distortion)
        assert np.abs(alpha * distortion).max() == pytest.approx(
            EIGENDISTORTION_PIXEL_CHANGE
        )
        assert_image_panel(plus, np.clip(image + alpha * distortion, 0, 1)[0])
        assert_image_panel(minus, np.clip(image - alpha * distortion, 0, 1)[0])
        assert f"{alpha:.3g}" in plus.get_title()

    trace_ax = next(
        ax for ax in figure.axes if ax.get_ylabel() == "eigenvalue estimate"
    )
    assert trace_ax.get_yscale() == "log"
    assert len(trace_ax.lines[0].get_ydata()) > 1


@pytest.mark.parametrize("dataset", ["geodesic"], indirect=True)
def test_geodesic_figure(dataset):
    figure = plot_run(dataset)

    axes = image_axes(figure)
    frames = dataset.sizes["step"]
    assert len(axes) == 2 * frames
    path_axes, initial_axes = axes[:frames], axes[frames:]
    for i in range(frames):
        assert_image_panel(path_axes[i], dataset["path"].values[i, 0])
        assert path_axes[i].get_title() == f"frame {i}"
        np.testing.assert_array_equal(
            shown(initial_axes[i]), dataset["initial_path"].values[i, 0]
        )
        assert initial_axes[i].images[0].get_clim() == (0, 1)
    assert initial_axes[0].get_ylabel() == "pixel fade"

    energy_ax = next(ax for ax in figure.axes if ax.get_ylabel() == "path energy")
    np.testing.assert_array_equal(
        energy_ax.lines[0].get_ydata(), dataset["path_energy"].values
    )
    fade = float(dataset["fade_path_energy"].values)
    np.testing.assert_array_equal(energy_ax.lines[1].get_ydata(), [fade, fade])


def test_unknown_method_is_refused(runs):
    dataset = open_run(runs / f"{RUNS['metamer']}.zarr")
    dataset.attrs["method"] = "texture-swap"
    with pytest.raises(ValueError, match="texture-swap"):
        plot_run(dataset)


def audit_table(runs: Path) -> pd.DataFrame:
    rows = []
    for store in sorted(runs.rglob("*.zarr")):
        run_id = str(store.relative_to(runs).with_suffix(""))
        verdict = "fail" if run_id.startswith("mad") else "pass"
        rows.append(
            {
                "run_id": run_id,
                "method": run_id.split("/")[0],
                "verdict": verdict,
                "store": str(store),
            }
        )
    return pd.DataFrame(rows)


def test_study_figure_has_one_panel_per_run(runs):
    table = audit_table(runs)
    mad_id = RUNS["mad"]
    mad = open_run(runs / f"{mad_id}.zarr")

    figure = plot_study(table, {mad_id: mad})

    titled = [ax for ax in figure.axes if ax.get_title()]
    assert len(titled) == len(image_axes(figure)) == len(table)
    for ax, run in zip(titled, table.itertuples(), strict=True):
        assert ax.get_title().replace("\n", "").startswith(run.run_id)
        color = ax.title.get_color()
        assert (color == "#cf222e") == (run.verdict == "fail")

    mad_ax = titled[list(table.run_id).index(mad_id)]
    np.testing.assert_array_equal(
        shown(mad_ax), mad_thumbnail(mad["mad_image"].values)[0]
    )
    assert mad_ax.images[0].get_clim() == (0, 1)


def test_study_figure_survives_a_missing_store(runs, tmp_path):
    table = audit_table(runs)
    table.loc[0, "store"] = str(tmp_path / "never-written.zarr")

    figure = plot_study(table)

    assert len([ax for ax in figure.axes if ax.get_title()]) == len(table)
    assert len(image_axes(figure)) == len(table) - 1


def test_study_figure_from_csv(runs, tmp_path):
    csv = tmp_path / "audit.csv"
    audit_table(runs).to_csv(csv, index=False)

    png = save_study_figure(csv, tmp_path / "study.png")

    pixels = imread(png)
    assert pixels.shape[0] >= 300 and pixels.shape[1] >= 600
    assert pixels[..., :3].std() > 0.05


def test_study_table_needs_its_columns():
    with pytest.raises(ValueError, match="verdict"):
        plot_study(pd.DataFrame({"run_id": ["a"], "method": ["mad"], "store": ["x"]}))
