"""The config loader, fuzzed: whatever a config holds, checking it either succeeds
or raises stimsynth's InputError (usually ConfigError) with a message, and never
another exception from deep inside.

The examples are drawn deterministically (``derandomize=True``), so the suite is the
same on every run and in CI; their number is bounded to keep it to seconds. To
search further, set ``STIMSYNTH_FUZZ_EXAMPLES`` (e.g. 5000): the examples are then
drawn at random, and more of them.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stimsynth.config import ConfigError, load_config, plan_study, validate_config
from stimsynth.errors import InputError

SEARCH = int(os.environ.get("STIMSYNTH_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    derandomize=not SEARCH,
    max_examples=SEARCH or 300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

#: A valid study that uses every section, so that a mutation reaches every check.
VALID = {
    "results": "results",
    "device": "cpu",
    "images": {
        "einstein": {"source": "plenoptic:einstein", "size": [32, 32]},
        "curie": {"source": "plenoptic:curie", "size": [32, 32], "fit": "crop"},
        "parrot": {"source": "plenoptic:parrot", "size": [32, 32], "color": True},
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
        "front": {
            "model": "onoff",
            "images": ["einstein"],
            "seeds": [0, 1],
            "max_iter": 200,
            "optimizer": {"name": "adam", "lr": 0.01},
            "stop": {"window": 20},
        },
        "texture": {
            "model": "texture",
            "images": ["curie", "parrot"],
            "loss": "portilla_simoncelli",
            "initial": "gray",
        },
    },
    "mad": {
        "pair": {
            "metrics": ["mse", "ssim"],
            "images": ["curie"],
            "hold": "penalty",
            "tradeoff": {"mse": 1.0, "ssim": 10.0},
        }
    },
    "eigendistortion": {
        "front": {"model": "onoff", "images": ["einstein"], "method": "exact", "k": 2}
    },
    "geodesic": {
        "shift": {
            "model": "onoff",
            "start": "einstein",
            "end": {"image": "einstein", "translate": [0, 2]},
            "n_steps": 4,
        }
    },
    "audit": {"metamer": {"max_relative_loss": 0.05}},
}

NAMES = ["einstein", "curie", "parrot", "onoff", "texture", "mse", "ssim", "front"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.sampled_from([0, 1, 2, 8, 32, 33, 64, 1000]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.5, 32.0, 1e-3, -1.0]),
    st.text(max_size=12),
    st.sampled_from(NAMES),
    st.sampled_from(
        ["plenoptic:einstein", "plenoptic.models.OnOff", "exact", "penalty", "1e-3"]
    ),
    # What YAML can make besides JSON's types: dates and bytes (!!binary).
    st.dates(),
    st.binary(max_size=4),
)
keys = st.one_of(st.text(max_size=8), st.sampled_from(NAMES), st.integers(0, 3))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=3)
    ),
    max_leaves=10,
)


def outcome(config):
    """Check a config; return the study, or the InputError it raised.

    Any other exception fails the test that called it.
    """
    try:
        study = plan_study(validate_config(config))
    except InputError as error:
        assert str(error).strip(), "an error without a message"
        return error
    # What Snakemake does with a planned study: run specs as JSON params.
    json.dumps(study.runs, sort_keys=True, allow_nan=False)
    study.config_hash  # noqa: B018 - hashing the config must work
    return study


def _paths(node, prefix=()):
    """Every path to a value in a config, as tuples of keys and indices."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*prefix, index))


PATHS = [path for path in _paths(VALID) if path]


def test_the_fuzzed_study_is_valid():
    study = outcome(VALID)
    assert not isinstance(study, InputError), study
    assert len(study.runs) == 7


@FUZZ
@given(values)
def test_any_structure_is_refused_or_planned(config):
    outcome(config)


@FUZZ
@given(st.dictionaries(st.sampled_from([*VALID, "extra"]), values, max_size=6))
def test_random_values_for_every_section_are_refused_or_planned(config):
    outcome(config)


@st.composite
def mutations(draw):
    """A valid config with a few of its values replaced, removed or added to."""
    config = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(PATHS))
        parent = config
        try:
            for key in path[:-1]:
                parent = parent[key]
            action = draw(st.sampled_from(["replace", "remove", "add", "rename"]))
            last = path[-1]
            if action == "replace":
                parent[last] = draw(values)
            elif action == "remove":
                del parent[last]
            elif action == "add" and isinstance(parent, dict):
                parent[draw(keys)] = draw(values)
            elif action == "add" and isinstance(parent, list):
                parent.append(draw(values))
            elif action == "rename" and isinstance(parent, dict):
                parent[draw(keys)] = parent.pop(last)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation removed or retyped part of the path
    return config


@FUZZ
@given(mutations())
def test_mutations_of_a_valid_config_are_refused_or_planned(config):
    outcome(config)


@FUZZ
@given(
    st.sampled_from(PATHS),
    st.one_of(
        st.sampled_from([32.0, 1.5, math.nan, math.inf, -math.inf, 0, -1, True]),
        st.sampled_from([datetime.date(2024, 1, 1), b"\x00", "", "32"]),
    ),
)
def test_awkward_numbers_and_types_at_every_key_are_refused_or_planned(path, value):
    config = copy.deepcopy(VALID)
    parent = config
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    result = outcome(config)
    if isinstance(value, float) and not math.isfinite(value):
        # Nothing in a study is meaningful as NaN or infinity.
        assert isinstance(result, ConfigError), path


@FUZZ
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_any_config_file_is_refused_or_planned(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "study.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    try:
        config = load_config(path)
    except ConfigError as error:
        assert str(error).strip()
        return
    outcome(config)


@pytest.mark.parametrize(
    "text",
    [
        "images: {a: {source: 'plenoptic:einstein', size: [32, 32]}}\n"
        "models: {m: {target: plenoptic.models.OnOff, kernel_size: 7, 2024-01-01: 1}}",
        "images: !!set {a, b}",
        "images: {a: {source: !!binary AAAA, size: [32, 32]}}",
        "\tmetamer: {}",
        "images: &a [*a]",
        "\udcff".encode("utf-8", "surrogatepass").decode("utf-8", "replace"),
    ],
)
def test_awkward_yaml_is_refused_with_a_message(tmp_path, text):
    path = tmp_path / "study.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        plan_study(load_config(path))
    assert str(caught.value).strip()


def test_a_config_that_is_not_utf8_is_refused(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_bytes(b"images: {caf\xe9: 1}\n")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(path)


small_values = st.one_of(
    st.integers(-2, 80),
    st.sampled_from([None, True, "reflect", "circular", "7", 2.5]),
    st.lists(st.integers(-1, 40), max_size=3),
)
sizes = st.one_of(
    st.lists(st.integers(8, 80), min_size=2, max_size=2),
    st.lists(st.sampled_from([8, 16, 30, 32, 33, 48, 64, 128]), min_size=2, max_size=2),
)
MODEL_SETTINGS = {
    "plenoptic.models.OnOff": ["kernel_size", "pad_mode", "pretrained", "cache_filt"],
    "plenoptic.models.Gaussian": ["kernel_size", "std", "out_channels"],
    "plenoptic.models.PortillaSimoncelli": [
        "n_scales",
        "spatial_corr_width",
        "n_orientations",
    ],
    "tests.helpers.bad_models:Pyramid": ["height"],
}


@st.composite
def studies(draw):
    """Studies put together from the parts users combine, mostly consistent and
    sometimes not: images of any size and colour, plenoptic's models and metrics
    with any settings, groups that refer to their names (now and then to none)."""
    size = draw(sizes)
    images = {
        name: {
            "source": draw(st.sampled_from(["plenoptic:einstein", "plenoptic:parrot"])),
            "size": draw(st.one_of(st.just(size), sizes)) if name == "c" else size,
            "color": draw(st.booleans()),
            "fit": draw(st.sampled_from(["resize"] * 4 + ["crop", "pad"])),
        }
        for name in draw(st.lists(st.sampled_from("abc"), min_size=1, unique=True))
    }
    models = {}
    for name in draw(st.lists(st.sampled_from("mn"), min_size=1, unique=True)):
        target = draw(st.sampled_from(sorted(MODEL_SETTINGS)))
        settings_ = draw(
            st.dictionaries(st.sampled_from(MODEL_SETTINGS[target]), small_values)
        )
        required = {"kernel_size": 7} if "kernel_size" in MODEL_SETTINGS[target] else {}
        models[name] = {"target": target, **required, **settings_}
    metrics = {
        "d": {"target": draw(st.sampled_from(["plenoptic.metric.mse"] * 4 + ["m:x"]))},
        "e": {
            "target": "plenoptic.metric.ssim",
            "as_distance": draw(st.booleans()),
            **draw(st.dictionaries(st.sampled_from(["pad", "weighted"]), small_values)),
        },
    }

    def refer(names):
        # Mostly a defined name, now and then one that is not.
        return st.sampled_from([*names] * 9 + ["missing"])

    image, model = refer(images), refer(models)
    config = {"images": images, "models": models, "metrics": metrics}
    groups = draw(
        st.sets(st.sampled_from(["metamer", "mad", "eigendistortion", "geodesic"]))
    ) or {"metamer"}
    if "metamer" in groups:
        initial = draw(
            st.one_of(st.sampled_from(["uniform", "gray"]), st.builds(dict))
        ) or {"image": draw(image)}
        config["metamer"] = {
            "g": {
                "model": draw(model),
                "images": draw(st.lists(image, min_size=1, max_size=2, unique=True)),
                "initial": initial,
                "loss": draw(st.sampled_from(["mse", "portilla_simoncelli"])),
            }
        }
    if "mad" in groups:
        config["mad"] = {
            "g": {
                "metrics": draw(
                    st.one_of(
                        st.permutations(["d", "e"]),
                        st.lists(refer(metrics), min_size=2, max_size=2),
                    )
                ),
                "images": draw(st.lists(image, min_size=1, max_size=2, unique=True)),
                "hold": draw(st.sampled_from(["projection", "penalty"])),
                "tradeoff": draw(st.sampled_from([None, 1.0, {"d": 1.0}])),
            }
        }
    if "eigendistortion" in groups:
        config["eigendistortion"] = {
            "g": {
                "model": draw(model),
                "images": draw(st.lists(image, min_size=1, max_size=2, unique=True)),
                "method": draw(st.sampled_from(["power", "exact"])),
                "k": draw(st.integers(1, 3000)),
            }
        }
    if "geodesic" in groups:
        config["geodesic"] = {
            "g": {
                "model": draw(model),
                "start": draw(image),
                "end": {
                    "image": draw(image),
                    "translate": draw(
                        st.lists(st.integers(-40, 40), min_size=2, max_size=2)
                    ),
                },
            }
        }
    return config


@FUZZ
@given(studies())
def test_generated_studies_are_refused_or_planned(config):
    outcome(config)


def test_generated_studies_are_often_planned():
    """The generator makes studies that pass too, so that it reaches the checks
    that only planned studies meet."""
    planned = []

    @FUZZ
    @given(studies())
    def count(config):
        planned.append(not isinstance(outcome(config), InputError))

    count()
    assert sum(planned) >= len(planned) // 10


paths = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["", ".", "/", "a\x00b", "x" * 300, "~/x.png", "a/../b.npy"]),
    st.builds(
        lambda name, suffix: name + suffix,
        st.text(max_size=8),
        st.sampled_from([".png", ".npy", ".tif", ".zarr", "/"]),
    ),
)


@FUZZ
@given(paths, paths, st.text(max_size=120))
def test_awkward_paths_and_names_are_refused_or_planned(results, source, name):
    config = copy.deepcopy(VALID)
    config["results"] = results
    config["images"]["curie"]["source"] = source
    config["metamer"][name] = config["metamer"].pop("front")
    outcome(config)


def _with(path, value):
    config = copy.deepcopy(VALID)
    *parents, last = path
    node = config
    for key in parents:
        node = node[key]
    node[last] = value
    return config


# What the fuzzer found, each once a crash or a config that passed and would have
# failed a job: now refused, naming the entry.
FOUND = [
    (  # jsonschema could not sort errors under keys of mixed types
        ("mad", "pair", "tradeoff"),
        {"mse": None, 0: None},
        "mad.pair.tradeoff: the key 0 is not text",
    ),
    (("models", "onoff", 3), 4, "models.onoff: the key 3 is not text"),
    (  # JSON Schema counts 32.0 as an integer: a size of floats reached the code
        ("images", "einstein", "size"),
        [32, 32.0],
        "images.einstein.size[1]: 32.0 is not of type 'integer'",
    ),
    (("metamer", "front", "seeds"), [0.0], "metamer.front.seeds[0]: 0.0 is not of"),
    (  # run specs are JSON: a date among a model's settings broke them
        ("models", "onoff", "kernel_size"),
        datetime.date(2024, 1, 1),
        "models.onoff.kernel_size: datetime.date(2024, 1, 1) is a date",
    ),
    (
        ("audit", "metamer", "max_relative_loss"),
        math.inf,
        "audit.metamer.max_relative_loss: inf is not a finite number",
    ),
    (("metamer", "front", "penalty_lambda"), math.nan, "nan is not a finite number"),
    (  # torch's generators take seeds below 2^64
        ("geodesic", "shift", "seeds"),
        [2**64],
        "geodesic.shift.seeds[0]: 18446744073709551616 is greater than the maximum",
    ),
    (("results",), "out\x00put", "results: 'out\\x00put' is not a folder path"),
    (
        ("images", "curie", "source"),
        "x" * 300 + ".png",
        "images.curie.source: image file 'xxxxxxxx",
    ),
    (
        ("models", "onoff", "kernel_size"),
        [],
        None,  # the constructor refuses it when it is built; no crash before
    ),
]


@pytest.mark.parametrize(("path", "value", "message"), FOUND)
def test_what_the_fuzzer_found_is_refused_naming_the_entry(path, value, message):
    result = outcome(_with(path, value))
    if message is None:
        return
    assert isinstance(result, ConfigError), result
    assert message in str(result)


def test_a_name_too_long_for_a_file_name_is_refused():
    config = copy.deepcopy(VALID)
    config["metamer"]["g" * 101] = config["metamer"].pop("front")
    result = outcome(config)
    assert isinstance(result, ConfigError)
    assert "is too long" in str(result)
