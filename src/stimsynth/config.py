"""Study configs: validate them, and turn them into a plan of runs.

A config is checked twice before any job exists: against the JSON schema
(``workflow/schemas/config.schema.yaml``, which also fills in defaults), then for
what a schema cannot say, such as a run group naming a model that is not defined.
Both raise :class:`ConfigError` naming the entry and what would work.

:func:`plan_study` turns a valid config into one spec per run. A run spec is
self-contained JSON: it holds the method's settings, the specs of the model or
metrics and images it uses, and the engine version, so that Snakemake reruns a run
exactly when something that can change its result changes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .errors import InputError
from .synthesis import ENGINE_VERSION

METHODS = ("metamer", "mad", "eigendistortion", "geodesic")


def _default_schema() -> Path:
    """The config schema: packaged with a wheel, or in the source tree."""
    packaged = Path(__file__).with_name("config.schema.yaml")
    if packaged.is_file():
        return packaged
    return Path(__file__).resolve().parents[2] / "workflow/schemas/config.schema.yaml"


DEFAULT_SCHEMA = _default_schema()


class ConfigError(InputError):
    """A study config cannot run; the message names the entry and the fix."""


@dataclass
class Study:
    """What a config asks for: its runs, and the image size of each model."""

    config: dict[str, Any]
    runs: dict[str, dict[str, Any]]
    model_shapes: dict[str, list[int]] = field(default_factory=dict)

    def runs_of(self, method: str) -> list[str]:
        """Run ids of one method, in config order."""
        return [rid for rid, spec in self.runs.items() if spec["method"] == method]

    @property
    def config_hash(self) -> str:
        """SHA-256 of the validated config."""
        return spec_hash(self.config)


def spec_hash(spec: dict[str, Any]) -> str:
    """SHA-256 of a JSON value, independent of key order."""
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def load_config(
    path: str | os.PathLike, schema: str | os.PathLike = DEFAULT_SCHEMA
) -> dict[str, Any]:
    """Read a YAML config and validate it, filling in defaults.

    Parameters
    ----------
    path
        The config file.
    schema
        The JSON schema (YAML) to validate against.

    Returns
    -------
    config
        The config with every default filled in.

    Raises
    ------
    ConfigError
        If the file cannot be read or the config does not fit the schema.
    """
    try:
        with open(path) as handle:
            config = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read config {path}: {error}") from error
    return validate_config(config, schema)


def validate_config(
    config: Any, schema: str | os.PathLike = DEFAULT_SCHEMA
) -> dict[str, Any]:
    """Validate a config against the schema and fill in its defaults.

    Returns
    -------
    config
        A validated copy with defaults filled in.

    Raises
    ------
    ConfigError
        Naming the first entry that does not fit and what the schema wants.
    """
    with open(schema) as handle:
        schema_doc = yaml.safe_load(handle)
    if not isinstance(config, dict):
        raise ConfigError(f"a config must be a mapping, got {type(config).__name__}")
    config = copy.deepcopy(config)
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema_doc)
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is not None:
        raise ConfigError(_describe(error))
    return config


def _with_defaults(validator_class):
    """A validator class that fills in ``default`` values as it validates."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def _describe(error: jsonschema.ValidationError) -> str:
    where = ".".join(str(p) for p in error.absolute_path) or "the config"
    hint = error.schema.get("description", "") if isinstance(error.schema, dict) else ""
    message = f"{where}: {error.message}"
    if error.validator == "type" and _reads_as_number(error.instance):
        # YAML 1.1 reads 1e-3 as text: it wants a dot in the mantissa.
        message += (
            f"; YAML reads {error.instance} as text: write the number with a dot, "
            "as in 1.0e-3"
        )
    return f"{message} ({hint})" if hint else message


def _reads_as_number(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True


def plan_study(config: dict[str, Any]) -> Study:
    """Check a validated config for consistency and list its runs.

    Parameters
    ----------
    config
        A config that passed :func:`validate_config` (defaults filled in).

    Returns
    -------
    study
        The runs by id, and the image size each model is built for.

    Raises
    ------
    ConfigError
        For a name that refers to nothing, a model used with images of different
        sizes, a MAD pair of one metric, or no runs at all.
    """
    images, models, metrics = config["images"], config["models"], config["metrics"]
    clash = set(models) & set(metrics)
    if clash:
        raise ConfigError(
            f"models and metrics share the name(s) {sorted(clash)}; rename one of each"
        )
    study = Study(config=config, runs={})

    for method in METHODS:
        for group, settings in config[method].items():
            where = f"{method}.{group}"
            for image_name, image_ids in _images_of(method, settings, where, images):
                if "model" in settings:
                    _use_model(
                        study, settings["model"], image_ids, where, models, images
                    )
                else:
                    _use_metrics(settings["metrics"], where, metrics)
                for seed in settings["seeds"]:
                    run_id = f"{method}/{group}/{image_name}/seed{seed}"
                    study.runs[run_id] = _run_spec(
                        config, method, group, image_name, seed, settings, image_ids
                    )
    _check_settings(config)
    _check_optimization(config)
    if not study.runs:
        raise ConfigError(
            "the config defines no runs; add a run group under metamer, mad, "
            "eigendistortion or geodesic"
        )
    return study


def _check_settings(config: dict[str, Any]) -> None:
    """Catch settings that fit the schema but cannot work, before any job runs."""
    from .images import BUILTIN_IMAGES, BUILTIN_PREFIX
    from .synthesis.eigendistortion import exact_memory_mb
    from .synthesis.metamer import LOSSES

    for name, entry in config["images"].items():
        source = entry["source"]
        builtin = source.removeprefix(BUILTIN_PREFIX)
        if source.startswith(BUILTIN_PREFIX) and builtin not in BUILTIN_IMAGES:
            raise ConfigError(
                f"images.{name}.source: {source!r} is not a built-in image; use one "
                f"of {', '.join(BUILTIN_PREFIX + n for n in BUILTIN_IMAGES)}"
            )
    for group, settings in config["metamer"].items():
        loss = settings["loss"]
        if loss not in LOSSES and "." not in loss and ":" not in loss:
            raise ConfigError(
                f"metamer.{group}.loss: {loss!r} is not a loss; use one of "
                f"{', '.join(LOSSES)}, or the import path of a function"
            )
        target = config["models"][settings["model"]]["target"]
        if loss == "portilla_simoncelli" and not target.endswith("PortillaSimoncelli"):
            raise ConfigError(
                f"metamer.{group}.loss: portilla_simoncelli is the loss for "
                f"PortillaSimoncelli models, and model {settings['model']!r} is "
                f"{target}; use loss: mse or l2"
            )
    for group, settings in config["eigendistortion"].items():
        for image in settings["images"]:
            channels = 3 if config["images"][image]["color"] else 1
            height, width = config["images"][image]["size"]
            n_pixels = channels * height * width
            where = f"eigendistortion.{group}"
            if settings["k"] > n_pixels // 2:
                raise ConfigError(
                    f"{where}.k: {settings['k']} eigendistortions at each end need an "
                    f"image of at least {2 * settings['k']} pixels; image {image!r} "
                    f"has {n_pixels}"
                )
            # The Fisher matrix alone; the Jacobian comes on top.
            need = exact_memory_mb(
                n_pixels, 0, 4 if config["dtype"] == "float32" else 8
            )
            if settings["method"] == "exact" and need > settings["memory_budget_mb"]:
                raise ConfigError(
                    f"{where}.method: the exact method on image {image!r} "
                    f"({n_pixels} pixels) needs at least {need:.0f} MB, over "
                    f"memory_budget_mb={settings['memory_budget_mb']:g}; use method: "
                    "power, a smaller image, or a larger budget"
                )
    for group, settings in config["mad"].items():
        tradeoff = settings["tradeoff"]
        if isinstance(tradeoff, dict):
            missing = [m for m in settings["metrics"] if m not in tradeoff]
            if missing:
                raise ConfigError(
                    f"mad.{group}.tradeoff: no weight for {', '.join(missing)}; give "
                    "one for each metric of the pair, or a single number"
                )


#: Optimiser settings each optimiser takes, besides name, lr and scheduler.
OPTIMIZER_OPTIONS = {
    "adam": ("amsgrad", "betas", "weight_decay"),
    "sgd": ("momentum", "nesterov", "weight_decay"),
    "lbfgs": ("history_size", "line_search"),
}


def _check_optimization(config: dict[str, Any]) -> None:
    """Catch optimisation settings that fit the schema but not each other."""
    for method in ("metamer", "mad", "geodesic"):
        for group, settings in config[method].items():
            where = f"{method}.{group}"
            optimizer = settings["optimizer"]
            name = optimizer["name"]
            foreign = [
                key
                for key in optimizer
                if key not in ("name", "lr", "scheduler")
                and key not in OPTIMIZER_OPTIONS[name]
            ]
            if foreign:
                raise ConfigError(
                    f"{where}.optimizer: {', '.join(foreign)} is not a setting of "
                    f"{name}, which takes {', '.join(OPTIMIZER_OPTIONS[name])}; "
                    "remove it or choose the optimiser it belongs to"
                )
            if method == "mad" and name == "lbfgs":
                raise ConfigError(
                    f"{where}.optimizer: lbfgs couples the four MAD images, which "
                    "are synthesised together; use adam or sgd"
                )
    for group, settings in config["metamer"].items():
        where = f"metamer.{group}"
        ctf = settings["coarse_to_fine"]
        if ctf is None:
            continue
        if settings["loss"] == "portilla_simoncelli":
            raise ConfigError(
                f"{where}.coarse_to_fine: the portilla_simoncelli loss weighs the "
                "whole representation and cannot follow one scale at a time; use "
                "loss: l2 or mse with coarse_to_fine"
            )
        target = config["models"][settings["model"]]["target"]
        if not _takes_scales(target):
            raise ConfigError(
                f"{where}.coarse_to_fine: model {settings['model']!r} ({target}) "
                "has no scales to go through (its forward takes no scales "
                "argument); use a model such as plenoptic.models.PortillaSimoncelli, "
                "or set coarse_to_fine: null"
            )


def _takes_scales(target: str) -> bool:
    """Whether a model class's forward takes a ``scales`` argument; True when the
    target cannot be inspected here (the model check finds out)."""
    import inspect

    from .models import resolve_target

    try:
        forward = getattr(resolve_target(target), "forward", None)
    except Exception:  # noqa: BLE001 - an unimportable target is reported elsewhere
        return True
    if forward is None:
        return True
    try:
        return "scales" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return True


def _images_of(method, settings, where, images):
    """(name in the run id, images the run reads) for each run of a group."""
    if method == "geodesic":
        end = settings["end"]
        end_name = end if isinstance(end, str) else end["image"]
        for key, name in (("start", settings["start"]), ("end", end_name)):
            _require(name, images, f"{where}.{key}", "images")
        return [(settings["start"], [settings["start"], end_name])]
    for name in settings["images"]:
        _require(name, images, f"{where}.images", "images")
    initial = settings.get("initial")
    if isinstance(initial, dict):
        # A metamer that starts from one of the study's images reads it too.
        start = initial["image"]
        _require(start, images, f"{where}.initial.image", "images")
        for name in settings["images"]:
            shape = [(images[n]["size"], images[n]["color"]) for n in (start, name)]
            if shape[0] != shape[1]:
                raise ConfigError(
                    f"{where}.initial.image: {start!r} does not have the size and "
                    f"colour of target image {name!r}; give the two images one size "
                    "and colour, or start from uniform"
                )
        return [
            (name, list(dict.fromkeys([name, initial["image"]])))
            for name in settings["images"]
        ]
    return [(name, [name]) for name in settings["images"]]


def _use_model(study, name, image_ids, where, models, images):
    _require(name, models, f"{where}.model", "models")
    sizes = {tuple(images[i]["size"]) for i in image_ids}
    sizes.add(tuple(study.model_shapes.get(name, next(iter(sizes)))))
    if len(sizes) > 1:
        raise ConfigError(
            f"{where}: model {name!r} is used with images of sizes "
            f"{sorted(sizes)}; a model is built for one image size, so give these "
            "images one size or define a second model entry"
        )
    study.model_shapes[name] = list(sizes.pop())


def _use_metrics(names, where, metrics):
    if names[0] == names[1]:
        raise ConfigError(
            f"{where}.metrics: MAD competition needs two different metrics, got "
            f"{names[0]!r} twice"
        )
    for name in names:
        _require(name, metrics, f"{where}.metrics", "metrics")


def _require(name, defined, where, section):
    if name not in defined:
        known = ", ".join(sorted(defined))
        hint = f"use one of {known}, or define it there" if known else "define it there"
        raise ConfigError(f"{where}: {name!r} is not defined under {section}; {hint}")


def _run_spec(config, method, group, image_name, seed, settings, image_ids):
    # The group's lists of seeds and images are not the run's: leaving them out
    # keeps a run's spec, and so the run, unchanged when the group grows.
    settings = {k: v for k, v in settings.items() if k not in ("seeds", "images")}
    spec = {
        "run_id": f"{method}/{group}/{image_name}/seed{seed}",
        "method": method,
        "group": group,
        "image": image_name,
        "seed": seed,
        "settings": settings,
        "images": {name: config["images"][name] for name in image_ids},
        "device": config["device"],
        "dtype": config["dtype"],
        "engine_version": ENGINE_VERSION,
    }
    if "model" in settings:
        spec["model"] = config["models"][settings["model"]]
    else:
        spec["metrics"] = {
            name: config["metrics"][name] for name in settings["metrics"]
        }
    return spec
