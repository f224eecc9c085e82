"""Models and metrics: build them from a spec, check them, pin them to a file.

A model spec names a callable and its keyword arguments::

    texture: {target: plenoptic.models.PortillaSimoncelli, n_scales: 4}
    onoff:   {target: plenoptic.models.OnOff, kernel_size: 31, pretrained: true}
    mine:    {target: "mypackage.models:build_model", width: 8}

``target`` is a dotted path (``package.module.Name``) or ``module:attribute``. A
model whose constructor takes ``image_shape`` gets the shape of the images it is
used with. A metric spec is the same, for a function ``metric(x, y)``; with
``as_distance: true`` a similarity ``s`` becomes the distance ``1 - s``.

Every job of a study must use the same model, so the models stage builds each one
once, checks it on the images it will see, and pins its parameters and buffers to a
file with their SHA-256; synthesis jobs rebuild the model from the pinned spec and
refuse weights whose hash differs.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .errors import InputError

logger = logging.getLogger(__name__)

SHAPE_ARGUMENTS = ("image_shape", "im_shape")


class ModelError(InputError):
    """A model or metric cannot be built, or fails its checks."""


def resolve_target(target: str) -> Callable:
    """Import the callable that ``target`` names.

    Parameters
    ----------
    target
        ``package.module.Name`` or ``module:attribute.path``.

    Returns
    -------
    obj
        The imported object.

    Raises
    ------
    ModelError
        If the module does not import or has no such attribute.
    """
    if ":" in target:
        module_name, _, attribute = target.partition(":")
    else:
        module_name, _, attribute = target.rpartition(".")
    if not module_name or not attribute:
        raise ModelError(
            f"target {target!r} is not an import path; write package.module.Name "
            "or module:attribute"
        )
    try:
        obj = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelError(
            f"target {target!r}: module {module_name!r} does not import ({error})"
        ) from error
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as error:
            raise ModelError(
                f"target {target!r}: {module_name!r} has no attribute {attribute!r}"
            ) from error
    if not callable(obj):
        raise ModelError(f"target {target!r} is not callable")
    return obj


def model_kwargs(spec: dict[str, Any], image_shape: tuple[int, int] | None) -> dict:
    """Keyword arguments for a model's constructor, completed from what it takes.

    ``image_shape`` is filled in for constructors that take it, and plenoptic's
    pretrained front-end models, which refuse ``pretrained=True`` without
    ``cache_filt=True``, get ``cache_filt=True`` unless the spec says otherwise.
    """
    factory = resolve_target(spec["target"])
    kwargs = {k: v for k, v in spec.items() if k != "target"}
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return kwargs
    for name in SHAPE_ARGUMENTS:
        if name in parameters and name not in kwargs and image_shape is not None:
            kwargs[name] = list(image_shape)
    if kwargs.get("pretrained") and "cache_filt" in parameters:
        kwargs.setdefault("cache_filt", True)
    return kwargs


def build_model(spec: dict[str, Any], image_shape: tuple[int, int] | None = None):
    """Build a model from its spec, in evaluation mode with gradients off.

    Parameters
    ----------
    spec
        ``target`` and keyword arguments.
    image_shape
        (y, x) of the images the model will see.

    Returns
    -------
    model
        A ``torch.nn.Module`` (or a callable wrapped in one).

    Raises
    ------
    ModelError
        If the target cannot be imported or called with these arguments.
    """
    factory = resolve_target(spec["target"])
    kwargs = model_kwargs(spec, image_shape)
    if "image_shape" in kwargs:
        kwargs["image_shape"] = tuple(kwargs["image_shape"])
    try:
        model = factory(**kwargs)
    except Exception as error:  # a user's constructor can raise anything
        raise ModelError(
            f"{spec['target']}({_format_kwargs(kwargs)}) failed: {error}"
        ) from error
    if not isinstance(model, torch.nn.Module):
        if not callable(model):
            raise ModelError(
                f"{spec['target']} returned {type(model).__name__}, "
                "which is not a model"
            )
        model = _FunctionModel(model)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def build_metric(spec: dict[str, Any]) -> Callable[[Tensor, Tensor], Tensor]:
    """Build a metric ``d(x, y)`` from its spec.

    Parameters
    ----------
    spec
        ``target``, optional ``as_distance`` and keyword arguments of the metric.

    Returns
    -------
    metric
        A callable returning one value per image (and channel).
    """
    target = resolve_target(spec["target"])
    kwargs = {k: v for k, v in spec.items() if k not in ("target", "as_distance")}
    if inspect.isclass(target):
        metric = target(**kwargs)
    else:
        metric = functools.partial(target, **kwargs) if kwargs else target
    if spec.get("as_distance", False):
        return functools.partial(_one_minus, metric)
    return metric


def _one_minus(metric: Callable, x: Tensor, y: Tensor) -> Tensor:
    return 1 - metric(x, y)


class _FunctionModel(torch.nn.Module):
    """Wraps a plain function so that it can be used and pinned like a model."""

    def __init__(self, function: Callable[[Tensor], Tensor]):
        super().__init__()
        self.function = function

    def forward(self, x: Tensor) -> Tensor:
        return self.function(x)


def state_hash(model: torch.nn.Module) -> str:
    """SHA-256 of a model's parameters and buffers, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_model(model: torch.nn.Module, images: dict[str, Tensor]) -> dict[str, Any]:
    """Check that a model can be synthesised from, on the images it will see.

    A model must give a finite output, the same output twice, a finite and non-zero
    gradient, and, for an image in a batch, the output it gives that image alone.

    Parameters
    ----------
    model
        The model.
    images
        Named images (1, channel, y, x).

    Returns
    -------
    report
        Output shape and the checks passed, per image.

    Raises
    ------
    ModelError
        Naming the image and the check that failed.
    """
    report = {}
    for name, image in images.items():
        with torch.no_grad():
            try:
                output = model(image)
            except Exception as error:
                hint = (
                    "; if the model takes gray images, set color: false on the image"
                    if image.shape[1] == 3
                    else ""
                )
                raise ModelError(
                    f"the model fails on image {name!r} of shape "
                    f"{tuple(image.shape)}: {error}{hint}"
                ) from error
            if not torch.isfinite(output).all():
                raise ModelError(f"the model's output on image {name!r} is not finite")
            if not torch.equal(output, model(image)):
                raise ModelError(f"the model is not deterministic on image {name!r}")
            pair = torch.cat([image, torch.rand_like(image)])
            alone = output[0]
            together = model(pair)[0]
            if not torch.allclose(alone, together, rtol=1e-4, atol=1e-6):
                raise ModelError(
                    f"the model's output for image {name!r} changes when another "
                    "image shares its batch; synthesis needs images treated "
                    "independently"
                )
        probe = torch.rand_like(image).requires_grad_(True)
        model(probe).pow(2).sum().backward()
        gradient = probe.grad
        if gradient is None or not torch.isfinite(gradient).all():
            raise ModelError(f"the model's gradient on image {name!r} is not finite")
        if not bool(gradient.abs().sum() > 0):
            raise ModelError(f"the model's gradient on image {name!r} is zero")
        report[name] = {"output_shape": list(output.shape), "checks": "passed"}
    return report


def check_metric(metric: Callable, images: dict[str, Tensor]) -> dict[str, Any]:
    """Check a metric: finite, differentiable, and near zero between equal images."""
    report = {}
    for name, image in images.items():
        other = torch.rand_like(image).requires_grad_(True)
        try:
            value = metric(image, other)
        except Exception as error:
            raise ModelError(f"the metric fails on image {name!r}: {error}") from error
        if not torch.isfinite(value).all():
            raise ModelError(f"the metric's value on image {name!r} is not finite")
        value.sum().backward()
        if other.grad is None or not torch.isfinite(other.grad).all():
            raise ModelError(f"the metric's gradient on image {name!r} is not finite")
        with torch.no_grad():
            self_distance = float(metric(image, image).abs().max())
        if self_distance > 1e-4:
            raise ModelError(
                f"its value between image {name!r} and itself is {self_distance:.3g}, "
                "not 0, so it is not a distance; if it is a similarity, set "
                "as_distance: true to use 1 - similarity"
            )
        report[name] = {"distance_to_self": self_distance, "checks": "passed"}
    return report


def pin_model(
    model: torch.nn.Module, spec: dict[str, Any], path: str | os.PathLike
) -> str:
    """Save a model's parameters and buffers with the spec that builds it.

    Returns
    -------
    sha256
        The hash of the pinned state.
    """
    digest = state_hash(model)
    torch.save({"spec": spec, "sha256": digest, "state": model.state_dict()}, path)
    return digest


def load_pinned_model(path: str | os.PathLike) -> tuple[torch.nn.Module, dict]:
    """Rebuild a pinned model and load its pinned state, checking the hash.

    Returns
    -------
    model, spec
        The model (evaluation mode, gradients off) and its full spec.

    Raises
    ------
    ModelError
        If the pinned state's hash does not match the one recorded with it.
    """
    pinned = torch.load(path, map_location="cpu", weights_only=True)
    spec = pinned["spec"]
    image_shape = spec.get("image_shape")
    model = build_model(spec["model"], tuple(image_shape) if image_shape else None)
    model.load_state_dict(pinned["state"])
    if state_hash(model) != pinned["sha256"]:
        raise ModelError(f"{path}: the model's state does not match its pinned hash")
    return model, spec


def _format_kwargs(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def prepare_model(
    name: str,
    spec: dict[str, Any],
    image_shape: list[int],
    pin_path: str | os.PathLike,
) -> dict[str, Any]:
    """Build and pin one model of a study (the models stage).

    The model is also run once on noise of the image shape, so that a model that
    cannot take that shape fails here, before any image is checked.

    Parameters
    ----------
    name
        The model's name in the study.
    spec
        Its spec.
    image_shape
        (y, x) of the images it will see.
    pin_path
        Where the pinned model goes.

    Returns
    -------
    report
        The full spec and the hash of the pinned state.

    Raises
    ------
    ModelError
        Naming the model entry, if it cannot be built or run.
    """
    full_spec = {"name": name, "model": spec, "image_shape": list(image_shape)}
    try:
        model = build_model(spec, tuple(image_shape))
        # Pinned before the model first runs: some models cache derived buffers on
        # their first forward pass, which a freshly built model would not expect.
        digest = pin_model(model, full_spec, pin_path)
    except ModelError as error:
        raise ModelError(f"models.{name}: {error}") from error
    logger.info("Model %s built and pinned (sha256 %s)", name, digest[:12])
    return {**full_spec, "sha256": digest}


def check_pinned_model(
    pin_path: str | os.PathLike, image_path: str | os.PathLike
) -> dict[str, Any]:
    """Check a pinned model on one prepared image (the models stage).

    Raises
    ------
    ModelError
        Naming the model entry and the image, if a check fails.
    """
    from .images import open_image

    model, spec = load_pinned_model(pin_path)
    image = open_image(image_path)
    name = image.attrs.get("name", str(image_path))
    try:
        report = check_model(model, {name: torch.from_numpy(image.values)[None]})
    except ModelError as error:
        raise ModelError(f"models.{spec['name']}: {error}") from error
    logger.info("Model %s passed its checks on image %s", spec["name"], name)
    return {"model": spec["name"], "image": name, **report[name]}


def check_metric_entry(
    name: str, spec: dict[str, Any], image_path: str | os.PathLike
) -> dict[str, Any]:
    """Build one metric of a study and check it on one prepared image.

    Raises
    ------
    ModelError
        Naming the metric entry and the image, if it cannot be built or fails a
        check.
    """
    from .images import open_image

    image = open_image(image_path)
    image_name = image.attrs.get("name", str(image_path))
    try:
        metric = build_metric(spec)
        report = check_metric(
            metric, {image_name: torch.from_numpy(image.values)[None]}
        )
    except ModelError as error:
        raise ModelError(f"metrics.{name}: {error}") from error
    logger.info("Metric %s passed its checks on image %s", name, image_name)
    return {"metric": name, "image": image_name, **report[image_name]}
