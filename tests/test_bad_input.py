"""Every mistake a user can make in a study's config or data is caught before any
synthesis job runs, with a message that names the entry and says what would work.

Most are caught when the config is checked (as Snakemake parses the workflow); what
needs a model built or an image read in full is caught by the cheap per-image jobs
that run before synthesis (preparing images, checking models and metrics on them).
"""

from __future__ import annotations

import copy
import errno
import logging
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import xarray as xr
import yaml

from helpers.workflow import run_snakemake
from stimsynth.config import ConfigError, plan_study, validate_config
from stimsynth.images import ImageError, prepare_image, save_image
from stimsynth.logs import job_logging
from stimsynth.models import (
    ModelError,
    check_metric_entry,
    check_pinned_model,
    prepare_model,
)
from stimsynth.store import RunWriter, StoreWriteError, cut_store, publish

REPO = Path(__file__).resolve().parents[1]
HELPERS = "tests.helpers.bad_models"

BASE = {
    "images": {
        "einstein": {"source": "plenoptic:einstein", "size": [32, 32]},
        "curie": {"source": "plenoptic:curie", "size": [32, 32]},
    },
    "models": {
        "onoff": {"target": "plenoptic.models.OnOff", "kernel_size": 7},
        "texture": {"target": "plenoptic.models.PortillaSimoncelli", "n_scales": 2},
    },
    "metrics": {
        "mse": {"target": "plenoptic.metric.mse"},
        "ssim": {"target": "plenoptic.metric.ssim", "as_distance": True},
    },
    "metamer": {
        "front": {"model": "onoff", "images": ["einstein"]},
        "texture": {"model": "texture", "images": ["curie"]},
    },
    "mad": {"pair": {"metrics": ["mse", "ssim"], "images": ["curie"]}},
    "eigendistortion": {"front": {"model": "onoff", "images": ["einstein"]}},
    "geodesic": {
        "shift": {
            "model": "onoff",
            "start": "einstein",
            "end": {"image": "einstein", "translate": [0, 2]},
        }
    },
}


@pytest.fixture(autouse=True)
def study_dir(tmp_path, monkeypatch):
    """Run each test in its own folder, holding image files good and bad, with the
    repository importable (for the models in tests/helpers)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO))
    ramp = np.linspace(0, 255, 40 * 40).reshape(40, 40).astype(np.uint8)
    iio.imwrite(tmp_path / "gray.png", ramp)
    iio.imwrite(tmp_path / "rgb.png", np.stack([ramp, ramp[::-1], ramp.T], axis=-1))
    iio.imwrite(tmp_path / "small.png", ramp[:20, :20])
    np.save(tmp_path / "batch.npy", np.zeros((1, 1, 32, 32), dtype=np.float32))
    np.save(tmp_path / "complex.npy", np.zeros((32, 32), dtype=np.complex64))
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image")
    (tmp_path / "photo.gif").write_bytes(b"GIF89a")
    (tmp_path / "folder.png").mkdir()
    return tmp_path


def check(config):
    return plan_study(validate_config(config))


def refused(config, *fragments):
    """Check that a config is refused with a message holding every fragment."""
    with pytest.raises(ConfigError) as caught:
        check(config)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_the_base_config_is_valid():
    study = check(BASE)
    assert len(study.runs) == 5
    assert study.warnings == []


def _image(name, source, size=(32, 32), **entry):
    def change(config):
        config["images"][name] = {"source": source, "size": list(size), **entry}

    return change


def _model(name, target, **kwargs):
    def change(config):
        config["models"][name] = {"target": target, **kwargs}

    return change


def _set(path, value):
    def change(config):
        *parents, last = path.split(".")
        node = config
        for key in parents:
            node = node[key]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value

    return change


DELETE = object()


def _texture_on(size, **settings):
    """The texture group on an image of ``size``, with model settings."""
    return [
        _image("target", "plenoptic:reptile_skin", size),
        _model("texture", "plenoptic.models.PortillaSimoncelli", **settings),
        _set("metamer.texture.images", ["target"]),
    ]


#: (id, changes to BASE, fragments the message must hold: the entry, the
#: problem, and what would work).
BAD_CONFIGS = [
    # Image sizes a model cannot take.
    (
        "portilla-simoncelli-side-not-divisible",
        _texture_on((30, 30), n_scales=2),
        [
            "metamer.texture.images[0]: model 'texture' cannot take image 'target'",
            "divisible by 2^2 = 4",
            "use a size such as [32, 32] or n_scales: 1",
        ],
    ),
    (
        "portilla-simoncelli-coarsest-scale-too-small",
        _texture_on((64, 64), n_scales=4),
        [
            "metamer.texture.images[0]",
            "coarsest scale (the image divided by 16)",
            "spatial_corr_width = 7",
            "[128, 128] or n_scales: 3",
        ],
    ),
    (
        "portilla-simoncelli-correlations-wider-than-coarsest-scale",
        _texture_on((32, 32), n_scales=2, spatial_corr_width=9),
        ["metamer.texture.images[0]", "spatial_corr_width = 9", "[40, 40]"],
    ),
    (
        "portilla-simoncelli-n-scales-not-a-number",
        _texture_on((32, 32), n_scales="2"),
        ["models.texture.n_scales: n_scales must be a whole number", "'2'"],
    ),
    (
        "image-smaller-than-the-kernel",
        [
            _image("tiny", "plenoptic:einstein", (8, 8)),
            _set("eigendistortion.front.images", ["tiny"]),
            _model("onoff", "plenoptic.models.OnOff", kernel_size=31),
            _set("metamer.front.model", "onoff2"),
            _model("onoff2", "plenoptic.models.OnOff", kernel_size=31),
            _set("geodesic.shift.model", "onoff2"),
        ],
        [
            "eigendistortion.front.images[0]: model 'onoff' cannot take image 'tiny'",
            "at least 16x16",
            "use a larger size or a smaller kernel_size",
        ],
    ),
    # Colour and gray.
    (
        "colour-image-to-a-gray-model",
        [_image("parrot", "plenoptic:parrot", color=True)]
        + [_set("metamer.front.images", ["einstein", "parrot"])],
        [
            "metamer.front.images[1]: model 'onoff' cannot take image 'parrot' "
            "(32x32 colour)",
            "OnOff takes gray images only; set images.parrot.color: false",
        ],
    ),
    (
        "colour-asked-of-a-gray-file",
        [_image("mine", "gray.png", color=True)],
        ["images.mine.color: 'gray.png' is a gray image", "set color: false"],
    ),
    # Wrong numbers of dimensions and types.
    (
        "four-dimensional-array",
        [_image("mine", "batch.npy")],
        [
            "images.mine.source: image file 'batch.npy' holds an array of 4 dim",
            "drop the leading dimensions of length 1",
        ],
    ),
    (
        "complex-array",
        [_image("mine", "complex.npy")],
        ["images.mine.source", "complex64 values", "save real numbers in [0, 1]"],
    ),
    # Names that refer to nothing.
    (
        "unknown-model-name",
        [_set("eigendistortion.front.model", "onof")],
        ["eigendistortion.front.model: 'onof' is not defined under models"],
    ),
    (
        "unknown-metric-name",
        [_set("mad.pair.metrics", ["mse", "ssmi"])],
        ["mad.pair.metrics: 'ssmi' is not defined under metrics", "use one of"],
    ),
    (
        "unknown-image-name",
        [_set("geodesic.shift.start", "einstien")],
        ["geodesic.shift.start: 'einstien' is not defined under images"],
    ),
    (
        "unknown-built-in-image",
        [_image("einstein", "plenoptic:einstien")],
        ["images.einstein.source: 'plenoptic:einstien' is not a built-in image"],
    ),
    # Import paths.
    (
        "module-that-does-not-import",
        [_model("onoff", "plenoptik.models.OnOff", kernel_size=7)],
        [
            "models.onoff.target: target 'plenoptik.models.OnOff': module "
            "'plenoptik.models' does not import",
            "check its spelling, or install the package",
        ],
    ),
    (
        "misspelt-attribute",
        [_model("onoff", "plenoptic.models.OnOf", kernel_size=7)],
        ["models.onoff.target", "has no attribute 'OnOf'; did you mean OnOff?"],
    ),
    (
        "target-that-is-not-callable",
        [_model("onoff", "math:pi")],
        ["models.onoff.target: target 'math:pi' is a float, not a class or function"],
    ),
    (
        "target-that-is-not-an-import-path",
        [_model("onoff", "On Off")],
        ["models.onoff.target", "write package.module.Name or module:attribute"],
    ),
    (
        "metric-that-does-not-import",
        [_set("metrics.ssim", {"target": "plenoptic.metric.ssmi"})],
        ["metrics.ssim.target", "did you mean ssim?"],
    ),
    (
        "loss-that-does-not-import",
        [_set("metamer.front.loss", "mylosses:l1")],
        ["metamer.front.loss: target 'mylosses:l1': module 'mylosses' does not"],
    ),
    (
        "penalty-that-does-not-import",
        [_set("metamer.front.penalty", "mypenalties.total_variation")],
        ["metamer.front.penalty", "module 'mypenalties' does not import"],
    ),
    # Settings of models and metrics.
    (
        "misspelt-model-argument",
        [_model("onoff", "plenoptic.models.OnOff", kernal_size=7)],
        [
            "models.onoff.kernal_size: OnOff takes no argument 'kernal_size'",
            "did you mean kernel_size?",
        ],
    ),
    (
        "missing-model-argument",
        [_model("onoff", "plenoptic.models.OnOff")],
        ["models.onoff: OnOff needs kernel_size; add it to the entry"],
    ),
    (
        "misspelt-metric-argument",
        [_set("metrics.ssim", {"target": "plenoptic.metric.ssim", "padd": 1})],
        ["metrics.ssim.padd: ssim takes no argument 'padd'", "did you mean pad?"],
    ),
    (
        "misspelt-custom-model-argument",
        [_model("onoff", f"{HELPERS}:Pyramid", heigth=2)],
        ["models.onoff.heigth: Pyramid takes no argument", "did you mean height?"],
    ),
    # Image files.
    (
        "missing-image-file",
        [_image("mine", "photos/missing.png")],
        [
            "images.mine.source: image file 'photos/missing.png' does not exist",
            "relative paths are read from the directory Snakemake runs in",
        ],
    ),
    (
        "image-path-that-is-a-folder",
        [_image("mine", "folder.png")],
        ["images.mine.source: image file 'folder.png' is a folder, not a file"],
    ),
    (
        "corrupt-image-file",
        [_image("mine", "corrupt.png")],
        [
            "images.mine.source: image file 'corrupt.png' could not be read",
            "export it again",
        ],
    ),
    (
        "unsupported-image-type",
        [_image("mine", "photo.gif")],
        ["images.mine.source", "unsupported type; use one of .png"],
    ),
    (
        "crop-larger-than-the-image",
        [_image("mine", "small.png", fit="crop")],
        [
            "images.mine.fit: 'small.png': cannot crop a 20x20 image to 32x32",
            "use fit: resize or fit: pad",
        ],
    ),
    (
        "pad-further-than-a-reflection-reaches",
        [_image("mine", "small.png", (48, 48), fit="pad")],
        ["images.mine.fit", "use fit: resize, or a size of at most 39x39"],
    ),
    # Method settings that cannot work.
    (
        "exact-eigendistortion-over-its-memory-budget",
        [
            _set("eigendistortion.front.method", "exact"),
            _set("eigendistortion.front.memory_budget_mb", 1),
        ],
        [
            "eigendistortion.front.method: the exact method on image 'einstein'",
            "needs at least 8 MB, over memory_budget_mb=1",
            "a smaller image, or a larger budget",
        ],
    ),
    (
        "more-eigendistortions-than-pixels",
        [_set("eigendistortion.front.k", 600)],
        ["eigendistortion.front.k: 600 eigendistortions at each end"],
    ),
    (
        "geodesic-endpoints-of-different-sizes",
        [
            _image("large", "plenoptic:curie", (64, 64)),
            _set("geodesic.shift.end", {"image": "large"}),
        ],
        [
            "geodesic.shift.end.image: image 'large' is 64x64 gray and the start "
            "image 'einstein' is 32x32 gray",
            "give both images the same size and color",
        ],
    ),
    (
        "geodesic-endpoints-gray-and-colour",
        [
            _image("parrot", "plenoptic:parrot", color=True),
            _set("geodesic.shift.end", "parrot"),
        ],
        ["geodesic.shift.end: image 'parrot' is 32x32 colour", "32x32 gray"],
    ),
    (
        "geodesic-that-ends-where-it-starts",
        [_set("geodesic.shift.end", "einstein")],
        [
            "geodesic.shift.end: the path ends where it starts",
            "translate: [0, 4]",
        ],
    ),
    (
        "geodesic-shifted-by-a-whole-period",
        [_set("geodesic.shift.end", {"image": "einstein", "translate": [32, 0]})],
        ["geodesic.shift.end", "translate [32, 0] wraps around to no shift"],
    ),
    (
        "zero-iterations",
        [_set("eigendistortion.front.max_iter", 0)],
        ["eigendistortion.front.max_iter: 0 is less than the minimum of 1"],
    ),
    (
        "negative-iterations",
        [_set("geodesic.shift.max_iter", -5)],
        ["geodesic.shift.max_iter: -5 is less than the minimum of 1"],
    ),
    (
        "zero-convergence-window",
        [_set("metamer.front.stop", {"window": 0})],
        ["metamer.front.stop.window: 0 is less than the minimum of 1"],
    ),
    (
        "duplicate-seeds",
        [_set("mad.pair.seeds", [3, 3])],
        ["mad.pair.seeds: [3, 3] has non-unique elements"],
    ),
    (
        "mad-pair-of-one-metric",
        [_set("mad.pair.metrics", ["ssim", "ssim"])],
        ["mad.pair.metrics: MAD competition needs two different metrics"],
    ),
    (
        "mad-pair-of-one-metric-under-two-names",
        [
            _set("metrics.mse2", {"target": "plenoptic.metric.mse"}),
            _set("mad.pair.metrics", ["mse", "mse2"]),
        ],
        [
            "mad.pair.metrics: 'mse' and 'mse2' are one metric",
            "pair one of them with another metric",
        ],
    ),
    # Schema-valid values that make no sense together.
    (
        "mad-tradeoff-that-nothing-uses",
        [_set("mad.pair.tradeoff", 10.0)],
        ["mad.pair.tradeoff: only hold: penalty", "set hold: penalty, or remove"],
    ),
    (
        "nesterov-without-momentum",
        [_set("metamer.front.optimizer", {"name": "sgd", "nesterov": True})],
        [
            "metamer.front.optimizer.nesterov",
            "set momentum (e.g. 0.9), or remove nesterov",
        ],
    ),
    (
        "setting-of-another-optimiser",
        [_set("metamer.front.optimizer", {"name": "adam", "momentum": 0.9})],
        ["metamer.front.optimizer: momentum is not a setting of adam"],
    ),
    (
        "metamer-that-starts-at-its-target",
        [_set("metamer.front.initial", {"image": "einstein"})],
        [
            "metamer.front.initial.image: 'einstein' is also a target",
            "start from uniform, gray or another image",
        ],
    ),
    (
        "texture-loss-for-another-model",
        [_set("metamer.front.loss", "portilla_simoncelli")],
        ["metamer.front.loss", "use loss: mse or l2"],
    ),
    (
        "model-used-with-two-sizes",
        [
            _image("large", "plenoptic:curie", (64, 64)),
            _set("eigendistortion.front.images", ["large"]),
        ],
        ["model 'onoff' is used with images of sizes", "define a second model"],
    ),
    (
        "results-folder-that-is-empty",
        [_set("results", "")],
        ["results: '' would put the study's files at the root", "name a folder"],
    ),
    (
        "results-folder-that-is-a-file",
        [_set("results", "gray.png")],
        ["results: 'gray.png' is a file"],
    ),
]


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        pytest.param(changes, fragments, id=name)
        for name, changes, fragments in BAD_CONFIGS
    ],
)
def test_a_bad_config_is_refused_naming_the_entry_and_the_fix(changes, fragments):
    config = copy.deepcopy(BASE)
    for change in changes:
        change(config)
    refused(config, *fragments)


def test_a_module_that_fails_on_import_is_refused_with_its_error(study_dir):
    (study_dir / "broken_models.py").write_text("raise RuntimeError('half done')\n")
    sys.path.insert(0, str(study_dir))
    try:
        config = copy.deepcopy(BASE)
        config["models"]["onoff"] = {"target": "broken_models:Model"}
        refused(
            config,
            "models.onoff.target: target 'broken_models:Model': importing module "
            "'broken_models' fails with RuntimeError: half done; fix the module",
        )
    finally:
        sys.path.remove(str(study_dir))
        sys.modules.pop("broken_models", None)


def test_an_unreadable_image_file_is_refused(monkeypatch):
    # Tests may run as root, whom file permissions do not stop: pretend instead.
    real_access = os.access
    monkeypatch.setattr(
        os,
        "access",
        lambda path, mode: "gray" not in str(path) and real_access(path, mode),
    )
    config = copy.deepcopy(BASE)
    _image("mine", "gray.png")(config)
    refused(
        config,
        "images.mine.source: image file 'gray.png' cannot be read",
        "make it readable",
    )


def test_an_odd_size_for_a_pyramid_model_is_reported_naming_the_entry():
    config = copy.deepcopy(BASE)
    _image("odd", "plenoptic:einstein", (33, 33))(config)
    config["models"]["pyramid"] = {"target": f"{HELPERS}:Pyramid"}
    config["eigendistortion"]["pyramid"] = {"model": "pyramid", "images": ["odd"]}
    (warning,) = check(config).warnings
    assert warning.startswith("eigendistortion.pyramid.images[0]: model 'pyramid'")
    assert (
        "reconstructs odd-sized images imperfectly; use even sides, e.g. [34, 34]"
        in warning
    )


def test_a_convergence_window_longer_than_the_run_is_reported():
    config = copy.deepcopy(BASE)
    config["metamer"]["front"]["max_iter"] = 60
    (warning,) = check(config).warnings
    assert warning.startswith("metamer.front.stop.window: the convergence test")
    assert "lower window or raise max_iter" in warning


# What needs a model built or an image read in full is checked by the per-image
# jobs that run before any synthesis: these are their functions.


def _prepared(study_dir, name, entry):
    path = study_dir / "images" / f"{name}.zarr"
    save_image(prepare_image(name, entry), path)
    return path


@pytest.fixture
def prepared(study_dir):
    """Prepared images: gray, colour and constant, 32x32."""
    np.save(study_dir / "flat.npy", np.full((32, 32), 0.5, dtype=np.float32))
    return {
        "einstein": _prepared(
            study_dir, "einstein", {"source": "plenoptic:einstein", "size": [32, 32]}
        ),
        "parrot": _prepared(
            study_dir,
            "parrot",
            {"source": "plenoptic:parrot", "size": [32, 32], "color": True},
        ),
        "flat": _prepared(study_dir, "flat", {"source": "flat.npy", "size": [32, 32]}),
    }


def _checked(study_dir, prepared, spec, image, shape=(32, 32)):
    """Pin a model as its job does, then check it on one image as its job does."""
    pin = study_dir / "models" / "model.pt"
    pin.parent.mkdir(exist_ok=True)
    prepare_model("model", spec, list(shape), pin)
    return check_pinned_model(pin, prepared[image])


BAD_MODELS = [
    (
        "non-finite",
        {"target": f"{HELPERS}:NonFinite"},
        "einstein",
        ["models.model: the model's output on image 'einstein' is not finite"],
    ),
    (
        "texture-statistics-of-a-constant-image",
        {"target": "plenoptic.models.PortillaSimoncelli", "n_scales": 2},
        "flat",
        [
            "models.model: the model's output on image 'flat' is not finite",
            "image 'flat' is constant",
            "use an image with contrast",
        ],
    ),
    (
        "non-deterministic",
        {"target": f"{HELPERS}:NonDeterministic"},
        "einstein",
        ["models.model: the model is not deterministic on image 'einstein'"],
    ),
    (
        "not-differentiable",
        {"target": f"{HELPERS}:ThroughNumpy"},
        "einstein",
        [
            "models.model: the model's output on image 'einstein' cannot be "
            "differentiated",
            "compute the output with torch operations",
        ],
    ),
    (
        "zero-gradient",
        {"target": f"{HELPERS}:Rounding"},
        "einstein",
        ["the model's gradient on image 'einstein' is zero", "varies smoothly"],
    ),
    (
        "batch-dependent",
        {"target": f"{HELPERS}:BatchCoupled"},
        "einstein",
        ["changes when another image shares its batch", "treated independently"],
    ),
    (
        "returns-a-dict",
        {"target": f"{HELPERS}:ReturnsDict"},
        "einstein",
        ["the model returns a dict on image 'einstein', not a tensor"],
    ),
    (
        "one-output-for-the-whole-batch",
        {"target": f"{HELPERS}:WholeBatch"},
        "einstein",
        ["synthesis needs one output per image, along the first dimension"],
    ),
    (
        "gray-model-on-a-colour-image",
        {"target": f"{HELPERS}:GrayOnly"},
        "parrot",
        [
            "models.model: the model fails on image 'parrot' of shape (3, 32, 32)",
            "if the model takes gray images, set images.parrot.color: false",
        ],
    ),
    (
        "colour-model-on-a-gray-image",
        {"target": f"{HELPERS}:ColourOnly"},
        "einstein",
        ["if the model takes colour images, set images.einstein.color: true"],
    ),
    (
        "constructor-that-fails",
        {"target": f"{HELPERS}:broken_factory"},
        "einstein",
        [
            "models.model: tests.helpers.bad_models:broken_factory(width=4) failed",
            "ValueError: width 4 is not supported",
        ],
    ),
]


@pytest.mark.parametrize(
    ("spec", "image", "fragments"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_MODELS],
)
def test_a_model_that_cannot_be_synthesised_from_fails_its_check(
    study_dir, prepared, spec, image, fragments
):
    if spec["target"].endswith("broken_factory"):
        spec = {**spec, "width": 4}
    with pytest.raises(ModelError) as caught:
        _checked(study_dir, prepared, spec, image)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message
    assert "Traceback" not in message


def test_a_good_model_passes_its_check(study_dir, prepared):
    report = _checked(study_dir, prepared, {"target": f"{HELPERS}:Good"}, "parrot")
    assert report["checks"] == "passed" and report["output_shape"] == [1, 3, 32, 32]


def test_warnings_of_a_pyramid_built_for_an_odd_size_name_the_model(study_dir, caplog):
    pin = study_dir / "pyramid.pt"
    with caplog.at_level(logging.WARNING, logger="stimsynth"):
        report = prepare_model("pyr", {"target": f"{HELPERS}:Pyramid"}, [33, 33], pin)
    assert any("odd-sized" in w for w in report["warnings"])
    assert "models.pyr: built for 33x33 images, it warns: Reconstruction" in caplog.text


BAD_METRICS = [
    (
        "returns-a-float",
        {"target": f"{HELPERS}:float_metric"},
        ["metrics.bad: the metric returns a float on image 'einstein'"],
    ),
    (
        "not-differentiable",
        {"target": f"{HELPERS}:numpy_metric"},
        ["metrics.bad: the metric cannot be differentiated on image 'einstein'"],
    ),
    (
        "non-finite",
        {"target": f"{HELPERS}:nan_metric"},
        ["metrics.bad: the metric's value on image 'einstein' is not finite"],
    ),
    (
        "similarity-used-as-a-distance",
        {"target": "plenoptic.metric.ssim"},
        ["metrics.bad: its value between image 'einstein' and itself is 1"],
    ),
    (
        "constructor-that-fails",
        {"target": f"{HELPERS}:ScaledMSE", "scale": -1},
        ["metrics.bad: tests.helpers.bad_models:ScaledMSE(scale=-1) failed"],
    ),
    (
        "image-too-small-for-the-metric",
        {"target": "plenoptic.metric.nlpd"},
        [
            "metrics.bad: the metric fails on image 'einstein' of shape (1, 32, 32)",
            "try another images.einstein.size",
        ],
    ),
]


@pytest.mark.parametrize(
    ("spec", "fragments"), [pytest.param(*case[1:], id=case[0]) for case in BAD_METRICS]
)
def test_a_metric_that_cannot_be_used_fails_its_check(prepared, spec, fragments):
    with pytest.raises(ModelError) as caught:
        check_metric_entry("bad", spec, prepared["einstein"])
    for fragment in fragments:
        assert fragment in str(caught.value), str(caught.value)


def test_a_similarity_used_as_a_distance_passes_its_check(prepared):
    spec = {"target": "plenoptic.metric.ssim", "as_distance": True}
    report = check_metric_entry("ssim", spec, prepared["parrot"])
    assert report["checks"] == "passed"
    # plenoptic warns that SSIM is meant for gray images; the report keeps it.
    assert any("grayscale" in w for w in report["warnings"])


# Pixel values: integers are brought to [0, 1] and the scaling recorded; what
# cannot be brought there unambiguously is refused.


def test_an_integer_array_of_8_bit_values_is_scaled_and_the_scaling_recorded(
    study_dir,
):
    values = np.arange(32 * 32).reshape(32, 32) % 256  # int64, as numpy saves it
    np.save(study_dir / "counts.npy", values)
    image = prepare_image("counts", {"source": "counts.npy", "size": [32, 32]})
    np.testing.assert_allclose(image.values[0], values / 255, rtol=1e-6)
    assert "read int64 values in [0, 255] as 8-bit" in image.attrs["operations"][1]


def test_an_array_of_shape_y_x_1_is_read_as_gray(study_dir):
    np.save(study_dir / "column.npy", np.full((32, 32, 1), 0.25, dtype=np.float32))
    image = prepare_image("column", {"source": "column.npy", "size": [32, 32]})
    assert image.shape == (1, 32, 32)


def _noise_png(path, size=64):
    rng = np.random.default_rng(0)
    iio.imwrite(path, rng.integers(0, 256, (size, size), dtype=np.uint8))
    return path


BAD_PIXELS = [
    (
        "floats-on-a-0-255-scale",
        lambda d: np.save(d / "x.npy", np.full((32, 32), 200.0, dtype=np.float32)),
        [
            "images.x.source: image file 'x.npy' holds floats in [200, 200]",
            "divide it by 255",
        ],
    ),
    (
        "8-bit-values-in-a-16-bit-file",
        lambda d: iio.imwrite(d / "x.png", np.full((32, 32), 200, dtype=np.uint16)),
        [
            "images.x.source: image file 'x.png' is a 16-bit image",
            "save it as an 8-bit",
        ],
    ),
    (
        "negative-integers",
        lambda d: np.save(d / "x.npy", -np.ones((32, 32), dtype=np.int16)),
        ["images.x.source: image file 'x.npy' holds negative integers (-1)"],
    ),
    (
        "integers-beyond-16-bit",
        lambda d: np.save(d / "x.npy", np.full((32, 32), 70000, dtype=np.int32)),
        ["holds integers up to 70000, beyond 16-bit"],
    ),
    (
        "not-a-number",
        lambda d: np.save(d / "x.npy", np.full((32, 32), np.nan, dtype=np.float32)),
        ["images.x.source: image file 'x.npy' holds NaN or infinite values"],
    ),
    (
        "truncated-file",
        lambda d: (d / "x.png").write_bytes(
            _noise_png(d / "full.png").read_bytes()[:2000]
        ),
        ["images.x.source: image file 'x.png' could not be read", "export it again"],
    ),
]


@pytest.mark.parametrize(
    ("make", "fragments"), [pytest.param(*case[1:], id=case[0]) for case in BAD_PIXELS]
)
def test_pixel_values_that_cannot_be_brought_to_0_1_are_refused(
    study_dir, make, fragments
):
    make(study_dir)
    source = next(p.name for p in study_dir.glob("x.*"))
    with pytest.raises(ImageError) as caught:
        prepare_image("x", {"source": source, "size": [32, 32]})
    for fragment in fragments:
        assert fragment in str(caught.value), str(caught.value)


# Write errors during a run: the job fails saying where and why, and the partial
# store stays as its last checkpoint describes it.


def _rows(writer, start, count):
    for i in range(start, start + count):
        writer.record(i, {"objective": np.array([float(i)])})


def test_a_partial_store_under_a_file_fails_saying_where_and_why(study_dir):
    (study_dir / "blocked").write_text("a file where a folder should be")
    with pytest.raises(StoreWriteError) as caught:
        RunWriter(study_dir / "blocked" / "run.zarr", sample_dim=None)
    message = str(caught.value)
    assert f"cannot write the partial run store {study_dir}/blocked/run.zarr" in message
    assert "free space or fix permissions there" in message


def test_a_full_disk_mid_run_fails_the_write_and_keeps_the_store_consistent(
    study_dir, monkeypatch
):
    path = study_dir / "partial.zarr"
    writer = RunWriter(path, sample_dim=None, flush_every=4)
    _rows(writer, 0, 4)  # the first append succeeds
    lengths = writer.lengths()

    original = xr.Dataset.to_zarr

    def disk_full(self, *args, **kwargs):
        original(self[list(self.data_vars)[:1]], *args, **kwargs)  # half an append
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(xr.Dataset, "to_zarr", disk_full)
    with pytest.raises(StoreWriteError, match="No space left on device"):
        _rows(writer, 4, 4)
    assert writer.lengths() == lengths
    monkeypatch.undo()
    # A rerun cuts the store back to what its last checkpoint counted.
    cut_store(path, lengths)
    with xr.open_zarr(path, consolidated=False) as store:
        assert store.sizes["iteration"] == 4


def test_publishing_where_nothing_can_be_written_fails_saying_where(study_dir):
    writer = RunWriter(study_dir / "partial.zarr", sample_dim=None, flush_every=2)
    _rows(writer, 0, 2)
    writer.finish(xr.Dataset({"result": ("x", np.zeros(3))}), {"status": "max_iter"})
    (study_dir / "runs").write_text("not a folder")
    with pytest.raises(StoreWriteError, match="cannot write the run store"):
        publish(study_dir / "partial.zarr", study_dir / "runs" / "run.zarr")
    assert (study_dir / "partial.zarr" / "zarr.json").is_file()


def test_a_job_reports_a_write_error_without_a_traceback(study_dir, capfd):
    with pytest.raises(SystemExit) as caught:
        with job_logging(study_dir / "job.log"):
            (study_dir / "blocked").write_text("")
            RunWriter(study_dir / "blocked" / "run.zarr", sample_dim=None)
    assert caught.value.code == 1
    err = capfd.readouterr().err
    assert "stimsynth: cannot write the partial run store" in err
    assert "Traceback" not in err


# Through Snakemake: the message reaches the user, and no traceback does.

TINY = {
    "images": {"einstein": {"source": "plenoptic:einstein", "size": [32, 32]}},
    "models": {"onoff": {"target": "plenoptic.models.OnOff", "kernel_size": 7}},
    "metamer": {"front": {"model": "onoff", "images": ["einstein"], "max_iter": 5}},
}


def snakemake(workdir: Path, config: dict) -> subprocess.CompletedProcess:
    (workdir / "study.yaml").write_text(yaml.safe_dump(config))
    return run_snakemake(workdir)


def _texture_too_small(config):
    config["images"]["skin"] = {"source": "plenoptic:reptile_skin", "size": [64, 64]}
    config["models"]["texture"] = {
        "target": "plenoptic.models.PortillaSimoncelli",
        "n_scales": 4,
    }
    config["metamer"]["texture"] = {"model": "texture", "images": ["skin"]}


def _non_finite_model(config):
    config["models"]["onoff"] = {"target": f"{HELPERS}:NonFinite"}


def _truncated_image(config):
    _noise_png(Path("full.png"))
    Path("photo.png").write_bytes(Path("full.png").read_bytes()[:2000])
    config["images"]["einstein"]["source"] = str(Path("photo.png").resolve())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param(
            _texture_too_small,
            "metamer.texture.images[0]: model 'texture' cannot take image 'skin'",
            id="config-checked-at-parse-time",
        ),
        pytest.param(
            _non_finite_model,
            "models.onoff: the model's output on image 'einstein' is not finite",
            id="model-checked-by-its-job",
        ),
        pytest.param(
            _truncated_image,
            "images.einstein.source: image file",
            id="image-checked-by-its-job",
        ),
    ],
)
def test_snakemake_stops_with_the_message_and_no_traceback(study_dir, change, message):
    config = copy.deepcopy(TINY)
    change(config)
    result = snakemake(study_dir, config)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert message in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert not (study_dir / "results" / "runs").exists()
