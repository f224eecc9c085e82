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
import datetime
import functools
import hashlib
import json
import math
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
    """What a config asks for: its runs, the image size of each model, and
    warnings about settings that work, but imperfectly."""

    config: dict[str, Any]
    runs: dict[str, dict[str, Any]]
    model_shapes: dict[str, list[int]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

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
        with open(path, encoding="utf-8") as handle:
            config = yaml.safe_load(handle)
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"cannot read config {path}: it is not UTF-8 text ({error}); save it "
            "as UTF-8"
        ) from error
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
    schema_doc = _load_schema(str(schema), os.stat(schema).st_mtime_ns)
    if not isinstance(config, dict):
        raise ConfigError(f"a config must be a mapping, got {type(config).__name__}")
    try:
        _check_plain(config)
    except RecursionError:
        raise ConfigError("the config is nested too deeply to be a study") from None
    config = copy.deepcopy(config)
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema_doc)
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is not None:
        raise ConfigError(_describe(error))
    return config


@functools.lru_cache(maxsize=4)
def _load_schema(path: str, mtime_ns: int) -> dict[str, Any]:
    """The schema, parsed once per version of its file (parsing it takes longer
    than checking a config against it). Callers must not change it."""
    with open(path) as handle:
        return yaml.safe_load(handle)


def _with_defaults(validator_class):
    """A validator class that fills in ``default`` values as it validates."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    # JSON Schema counts 32.0 as an integer; a size, seed or count written so would
    # reach the code as a float (and a run id as seed0.0), so only int is one here.
    type_checker = validator_class.TYPE_CHECKER.redefine(
        "integer",
        lambda checker, value: isinstance(value, int) and not isinstance(value, bool),
    )
    return jsonschema.validators.extend(
        validator_class, {"properties": set_defaults}, type_checker=type_checker
    )


def _entry(path) -> str:
    """A config entry's name from its path: ``metamer.front.images[0]``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or "the config"


#: Types a config's values may have: those of JSON, which run specs are made of.
PLAIN_TYPES = (type(None), bool, int, float, str, list, dict)


def _check_plain(node: Any, path: tuple = (), within: frozenset = frozenset()) -> None:
    """Refuse what YAML can hold but a study cannot use: keys that are not text,
    values that are not JSON (dates, binary, sets) and numbers that are not finite.

    Raises
    ------
    ConfigError
        Naming the first such entry.
    """
    where = _entry(path)
    if not isinstance(node, PLAIN_TYPES):
        kinds = ((datetime.date, "a date"), (bytes, "binary data"), (set, "a set"))
        kind = next((k for t, k in kinds if isinstance(node, t)), None)
        kind = kind or f"a {type(node).__name__}"
        raise ConfigError(
            f"{where}: {node!r} is {kind}, which a study cannot use; write text in "
            "quotes, a number, true or false, a list or a mapping"
        )
    if isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{where}: {node} is not a finite number; write a finite one")
    if isinstance(node, dict | list):
        if id(node) in within:
            raise ConfigError(
                f"{where}: the entry contains itself (a YAML alias inside its own "
                "anchor); write it out"
            )
        within = within | {id(node)}
    if isinstance(node, dict):
        for key, value in node.items():
            if not isinstance(key, str):
                raise ConfigError(
                    f"{where}: the key {key!r} is not text; names and settings are "
                    f"text, so write it in quotes ('{key}')"
                )
            _check_plain(value, (*path, key), within)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            _check_plain(value, (*path, index), within)


def _describe(error: jsonschema.ValidationError) -> str:
    where = _entry(error.absolute_path)
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
        The runs by id, the image size each model is built for, and warnings
        about settings that work, but imperfectly.

    Raises
    ------
    ConfigError
        For a name that refers to nothing, a model used with images of different
        sizes, a MAD pair of one metric, no runs at all; an image file that is
        missing, unreadable or of the wrong shape; a model or metric that does not
        import or take its settings, or cannot take its images; and settings that
        fit the schema but not each other.
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
    study.warnings = _check_inputs(config)
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
            krylov = settings["krylov_size"]
            if settings["method"] in ("lanczos", "randomized") and krylov < min(
                3 * settings["k"] + 4, n_pixels
            ):
                raise ConfigError(
                    f"{where}.krylov_size: {krylov} is too small for k="
                    f"{settings['k']}; use at least {3 * settings['k'] + 4}"
                )
            if settings["method"] == "exact" and need > settings["memory_budget_mb"]:
                raise ConfigError(
                    f"{where}.method: the exact method on image {image!r} "
                    f"({n_pixels} pixels) needs at least {need:.0f} MB, over "
                    f"memory_budget_mb={settings['memory_budget_mb']:g}; use method: "
                    "lanczos, a smaller image, or a larger budget"
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
        _check_endpoints(settings, where, images)
        return [(settings["start"], [settings["start"], end_name])]
    for index, name in enumerate(settings["images"]):
        _require(name, images, f"{where}.images[{index}]", "images")
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


# What a config refers to is checked too: image files (their headers only), the
# import paths of models, metrics, losses and penalties with their settings, and
# whether each model can take the images it is used with, where that can be told
# without building it. All of it is cheap enough to run whenever the workflow is
# parsed, and it turns mistakes that would fail a job (or pass unnoticed) into a
# message naming the entry.


def _check_endpoints(settings: dict[str, Any], where: str, images: dict) -> None:
    """A geodesic's endpoints must have one shape, and must differ."""
    start, end = settings["start"], settings["end"]
    if isinstance(end, str):
        end_name, shift, key = end, [0, 0], "end"
    else:
        end_name, shift, key = end["image"], end.get("translate", [0, 0]), "end.image"
    if _shape_of(images[start]) != _shape_of(images[end_name]):
        raise ConfigError(
            f"{where}.{key}: image {end_name!r} is {_describe_image(images[end_name])}"
            f" and the start image {start!r} is {_describe_image(images[start])}; a "
            "path needs endpoints of one size and colour, so give both images the "
            "same size and color"
        )
    size = images[start]["size"]
    unshifted = all(s % n == 0 for s, n in zip(shift, size, strict=True))
    if images[start] == images[end_name] and unshifted:
        same = "" if end_name == start else f" ({end_name!r} is the same image)"
        if any(shift):
            same += f"; translate {shift} wraps around to no shift at all"
        raise ConfigError(
            f"{where}.end: the path ends where it starts{same}, so it has no length; "
            f"shift the end, e.g. end: {{image: {end_name}, translate: [0, 4]}}, or "
            "end at another image"
        )


def _shape_of(entry: dict[str, Any]) -> tuple:
    return tuple(entry["size"]), bool(entry["color"])


def _describe_image(entry: dict[str, Any]) -> str:
    height, width = entry["size"]
    return f"{height}x{width} {'colour' if entry['color'] else 'gray'}"


def _check_inputs(config: dict[str, Any]) -> list[str]:
    """Check what a planned study refers to; return warnings worth showing.

    Raises
    ------
    ConfigError
        Naming the entry (and its setting) and what would work.
    """
    warnings: list[str] = []
    _check_results(config["results"])
    _check_images(config["images"])
    _check_components(config)
    warnings += _check_model_images(config)
    _check_methods(config)
    warnings += _check_stopping(config)
    return warnings


def _check_results(results: str) -> None:
    try:
        root = not results.strip() or Path(results).resolve() == Path("/").resolve()
        is_file = Path(results).exists() and not Path(results).is_dir()
    except (OSError, ValueError) as error:  # a NUL character, a name too long
        raise ConfigError(
            f"results: {results!r} is not a folder path this system can use "
            f"({error}); name another folder"
        ) from error
    if root:
        raise ConfigError(
            f"results: {results!r} would put the study's files at the root of the "
            "file system; name a folder, such as results"
        )
    if is_file:
        raise ConfigError(
            f"results: {results!r} is a file, and results must be a folder; name "
            "another path"
        )


def _check_images(images: dict[str, Any]) -> None:
    """Every image source exists, is readable, and fits its entry's settings."""
    from .images import BUILTIN_PREFIX, ImageError, fit_problem, probe_source

    for name, entry in images.items():
        source = entry["source"]
        try:
            info = probe_source(source)
        except ImageError as error:
            raise ConfigError(f"images.{name}.source: {error}") from error
        # plenoptic makes three equal channels of a gray built-in image; a file is
        # taken as it is.
        if (
            entry["color"]
            and info.channels == 1
            and not source.startswith(BUILTIN_PREFIX)
        ):
            raise ConfigError(
                f"images.{name}.color: {source!r} is a gray image, so there is no "
                "colour to keep; set color: false"
            )
        problem = fit_problem((info.height, info.width), entry["size"], entry["fit"])
        if problem:
            raise ConfigError(f"images.{name}.fit: {source!r}: {problem}")


def _check_components(config: dict[str, Any]) -> None:
    """Every model, metric, loss and penalty imports and takes its settings."""
    from .models import ModelError, check_arguments, in_entry, resolve_target
    from .synthesis.metamer import LOSSES

    for section, kind in (("models", "model"), ("metrics", "metric")):
        for name, entry in config[section].items():
            try:
                check_arguments(entry, kind)
            except ModelError as error:
                raise ConfigError(str(in_entry(section, name, error))) from error
    for group, settings in config["metamer"].items():
        for key, builtin in (("loss", LOSSES), ("penalty", ("range",))):
            value = settings.get(key)
            if isinstance(value, str) and value not in builtin:
                try:
                    resolve_target(value)
                except ModelError as error:
                    raise ConfigError(f"metamer.{group}.{key}: {error}") from error


def _model_images(method: str, group: str, settings: dict[str, Any]):
    """(config entry, image name) of every image a group's model sees."""
    where = f"{method}.{group}"
    if method == "geodesic":
        end = settings["end"]
        yield f"{where}.start", settings["start"]
        if isinstance(end, str):
            yield f"{where}.end", end
        else:
            yield f"{where}.end.image", end["image"]
        return
    for index, name in enumerate(settings["images"]):
        yield f"{where}.images[{index}]", name
    initial = settings.get("initial")
    if isinstance(initial, dict):
        yield f"{where}.initial.image", initial["image"]


def _check_model_images(config: dict[str, Any]) -> list[str]:
    """Each model can take the images it is used with, where its settings tell."""
    from .models import ModelError, image_problems, in_entry

    warnings = []
    seen = set()
    for method in ("metamer", "eigendistortion", "geodesic"):
        for group, settings in config[method].items():
            model = settings["model"]
            for where, image in _model_images(method, group, settings):
                if (model, image) in seen:
                    continue
                seen.add((model, image))
                entry = config["images"][image]
                channels = 3 if entry["color"] else 1
                try:
                    error, warning = image_problems(
                        config["models"][model], tuple(entry["size"]), channels, image
                    )
                except ModelError as problem:
                    raise ConfigError(str(in_entry("models", model, problem))) from (
                        problem
                    )
                if error:
                    raise ConfigError(
                        f"{where}: model {model!r} cannot take image {image!r} "
                        f"({_describe_image(entry)}): {error}"
                    )
                if warning:
                    warnings.append(
                        f"{where}: model {model!r} on image {image!r}: {warning}"
                    )
    return warnings


def _check_methods(config: dict[str, Any]) -> None:
    """Method settings that fit the schema but not each other."""
    for group, settings in config["metamer"].items():
        initial = settings.get("initial")
        if isinstance(initial, dict) and initial.get("image") in settings["images"]:
            raise ConfigError(
                f"metamer.{group}.initial.image: {initial['image']!r} is also a "
                "target of this group, and a metamer that starts at its target has "
                "nothing to find; start from uniform, gray or another image"
            )
    for group, settings in config["mad"].items():
        first, second = settings["metrics"]
        if config["metrics"][first] == config["metrics"][second]:
            raise ConfigError(
                f"mad.{group}.metrics: {first!r} and {second!r} are one metric "
                f"({config['metrics'][first]['target']} with the same settings), "
                "and MAD competition needs two different ones; pair one of them "
                "with another metric"
            )
        if settings["hold"] == "projection" and settings["tradeoff"] is not None:
            raise ConfigError(
                f"mad.{group}.tradeoff: only hold: penalty weighs the reference "
                "metric with a tradeoff, and this group holds it by projection; set "
                "hold: penalty, or remove tradeoff"
            )
    for method in ("metamer", "mad", "geodesic"):
        for group, settings in config[method].items():
            optimizer = settings["optimizer"]
            if optimizer.get("nesterov") and not optimizer.get("momentum"):
                raise ConfigError(
                    f"{method}.{group}.optimizer.nesterov: Nesterov momentum needs a "
                    "momentum above 0; set momentum (e.g. 0.9), or remove nesterov"
                )


def _check_stopping(config: dict[str, Any]) -> list[str]:
    """Warn where the convergence test can never run."""
    warnings = []
    for method in ("metamer", "mad", "geodesic"):
        for group, settings in config[method].items():
            window, max_iter = settings["stop"]["window"], settings["max_iter"]
            if 2 * window > max_iter:
                warnings.append(
                    f"{method}.{group}.stop.window: the convergence test compares "
                    f"two windows of {window} iterations, more than max_iter = "
                    f"{max_iter}, so every run stops at max_iter; lower window or "
                    "raise max_iter"
                )
    return warnings
