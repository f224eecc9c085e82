"""Configs that cannot run are refused before any job, naming the entry and the fix."""

import copy

import pytest
import yaml

from stimsynth.config import ConfigError, load_config, plan_study, validate_config

BASE = {
    "images": {
        "einstein": {"source": "plenoptic:einstein", "size": [32, 32]},
        "curie": {"source": "plenoptic:curie", "size": [32, 32]},
        "small": {"source": "plenoptic:curie", "size": [16, 16]},
    },
    "models": {"onoff": {"target": "plenoptic.models.OnOff", "kernel_size": 31}},
    "metrics": {
        "mse": {"target": "plenoptic.metric.mse"},
        "ssim": {"target": "plenoptic.metric.ssim", "as_distance": True},
    },
    "metamer": {"front": {"model": "onoff", "images": ["einstein"]}},
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


def check(config):
    return plan_study(validate_config(config))


def test_the_base_config_plans_one_run_per_group():
    study = check(BASE)
    assert sorted(study.runs) == [
        "eigendistortion/front/einstein/seed0",
        "geodesic/shift/einstein/seed0",
        "mad/pair/curie/seed0",
        "metamer/front/einstein/seed0",
    ]
    spec = study.runs["metamer/front/einstein/seed0"]
    assert spec["settings"]["max_iter"] == 1000  # a schema default, filled in
    assert spec["model"] == BASE["models"]["onoff"]
    assert "images" not in spec["settings"] and "seeds" not in spec["settings"]


def test_the_default_study_is_valid():
    study = plan_study(load_config("config/config.yaml"))
    assert len(study.runs) == 7


def _set(path, value):
    def change(config):
        *parents, last = path.split(".")
        node = config
        for key in parents:
            node = node[key]
        node[last] = value

    return change


BAD = [
    ("metamer.front.model", "missing", "metamer.front.model: 'missing' is not defined"),
    ("metamer.front.images", ["nobody"], "metamer.front.images[0]: 'nobody' is not"),
    ("mad.pair.metrics", ["mse", "mse"], "two different metrics"),
    ("mad.pair.metrics", ["mse", "lpips"], "mad.pair.metrics: 'lpips' is not defined"),
    ("metamer.front.max_iter", 0, "metamer.front.max_iter: 0 is less than"),
    ("metamer.front.seeds", [1, 1], "metamer.front.seeds: [1, 1] has non-unique"),
    ("metamer.front.optimizer", {"learning_rate": 0.1}, "'learning_rate' was unexp"),
    ("metamer.front.optimizer", {"lr": "1e-3"}, "write the number with a dot"),
    ("metamer.front.loss", "portilla_simoncelli", "model 'onoff' is plenoptic.models"),
    ("metamer.front.loss", "msee", "metamer.front.loss: 'msee' is not a loss"),
    ("metamer.front.max_itr", 10, "'max_itr' was unexpected"),
    ("images.einstein.source", "plenoptic:einstien", "not a built-in image"),
    ("images.einstein.size", [32], "images.einstein.size"),
    ("geodesic.shift.end", {"image": "small"}, "endpoints of one size and colour"),
    ("eigendistortion.front.images", ["small"], "used with images of sizes"),
    ("eigendistortion.front.max_iter", 0, "eigendistortion.front.max_iter: 0 is less"),
    ("metamer.front.snapshot_every", -1, "metamer.front.snapshot_every: -1 is less"),
    ("mad.pair.tradeoff", 1.0, "mad.pair.tradeoff: only hold: penalty"),
    ("geodesic.shift.end", "einstein", "geodesic.shift.end: the path ends where"),
    ("results", "", "results: '' would put the study's files at the root"),
    ("geodesic.shift.n_steps", 1, "geodesic.shift.n_steps: 1 is less than"),
    ("eigendistortion.front.k", 600, "eigendistortion.front.k: 600 eigendistortions"),
    ("eigendistortion.front.method", "exact", None),  # 32x32 fits the budget
    ("mad.pair.hold", "penalty", None),
    ("mad.pair.tradeoff", {"mse": 1.0}, "mad.pair.tradeoff: no weight for ssim"),
    ("device", "tpu", "device: 'tpu' is not one of"),
]


@pytest.mark.parametrize(("path", "value", "message"), BAD)
def test_a_bad_setting_is_refused_naming_its_entry(path, value, message):
    config = copy.deepcopy(BASE)
    _set(path, value)(config)
    if message is None:
        check(config)
        return
    with pytest.raises(ConfigError) as caught:
        check(config)
    assert message in str(caught.value)


def test_exact_eigendistortion_over_budget_is_refused_with_its_estimate():
    config = copy.deepcopy(BASE)
    config["images"]["big"] = {"source": "plenoptic:einstein", "size": [256, 256]}
    config["eigendistortion"]["front"].update(images=["big"], method="exact")
    config["models"]["big"] = config["models"]["onoff"]
    config["eigendistortion"]["front"]["model"] = "big"
    with pytest.raises(ConfigError, match=r"needs at least 32768 MB"):
        check(config)


def test_names_shared_by_a_model_and_a_metric_are_refused():
    config = copy.deepcopy(BASE)
    config["metrics"]["onoff"] = {"target": "plenoptic.metric.mse"}
    with pytest.raises(ConfigError, match="share the name"):
        check(config)


@pytest.mark.parametrize("text", ["- a list\n", "just text\n", ""])
def test_a_config_that_is_not_a_mapping_is_refused(tmp_path, text):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(path)


def test_unreadable_yaml_is_refused_with_the_file_name(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("images: {einstein: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(path)


def test_a_study_without_runs_is_refused():
    config = {"images": BASE["images"]}
    with pytest.raises(ConfigError, match="defines no runs"):
        check(config)


def test_yaml_round_trip_of_the_base_config_plans_the_same_runs(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(BASE))
    assert plan_study(load_config(path)).runs == check(BASE).runs
