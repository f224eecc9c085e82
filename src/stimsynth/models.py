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

import difflib
import functools
import hashlib
import importlib
import inspect
import logging
import math
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .errors import InputError

logger = logging.getLogger(__name__)

SHAPE_ARGUMENTS = ("image_shape", "im_shape")


class ModelError(InputError):
    """A model or metric cannot be built, or fails its checks.

    Parameters
    ----------
    message
        What is wrong and what would work.
    key
        The setting of the model or metric entry at fault (``target``,
        ``n_scales``...), when it is one; the config check names it.
    """

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


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
    if (
        not module_name
        or not attribute
        or not all(
            part.isidentifier()
            for part in (*module_name.split("."), *attribute.split("."))
        )
    ):
        raise ModelError(
            f"target {target!r} is not an import path; write package.module.Name "
            "or module:attribute",
            key="target",
        )
    # A study's own modules sit in its folder, the working directory of Snakemake
    # and of every job: the config check and the jobs must find the same code.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelError(
            f"target {target!r}: module {module_name!r} does not import ({error}); "
            "check its spelling, or install the package that provides it",
            key="target",
        ) from error
    except Exception as error:  # importing runs a module's code, which can raise
        raise ModelError(
            f"target {target!r}: importing module {module_name!r} fails with "
            f"{_one_line(error)}; fix the module",
            key="target",
        ) from error
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except Exception as error:  # lazy modules import on attribute access
            public = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, public, n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ModelError(
                f"target {target!r}: {module_name!r} has no attribute "
                f"{attribute!r}{hint}",
                key="target",
            ) from error
    if not callable(obj):
        raise ModelError(
            f"target {target!r} is a {type(obj).__name__}, not a class or function",
            key="target",
        )
    return obj


def _one_line(error: BaseException) -> str:
    """An exception as one short line: its type and the first line of its text."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def check_arguments(spec: dict[str, Any], kind: str = "model") -> Callable:
    """Check that a model or metric entry's target imports and takes its settings.

    Cheap (an import and a signature), so the config check runs it on every entry
    before any job: a misspelt argument is then reported against its entry
    instead of failing a job.

    Parameters
    ----------
    spec
        The entry: ``target`` and keyword arguments (and, for a metric,
        ``as_distance``).
    kind
        ``model`` (a constructor; its image shape argument is filled in later) or
        ``metric`` (a function ``d(x, y, **settings)`` or a class built with the
        settings).

    Returns
    -------
    target
        The imported callable.

    Raises
    ------
    ModelError
        With ``key`` set to the setting at fault.
    """
    target = resolve_target(spec["target"])
    # A model gets every other setting as a keyword argument, as build_model does.
    own = ("target", "as_distance") if kind == "metric" else ("target",)
    kwargs = {k: v for k, v in spec.items() if k not in own}
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # some builtins have none to read
        return target
    parameters = signature.parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    positional = () if kind == "model" or inspect.isclass(target) else (None, None)
    known = [
        arg
        for arg, p in parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ][len(positional) :]
    name = spec["target"].replace(":", ".").rsplit(".", 1)[-1]
    if not takes_any:
        for key in kwargs:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                raise ModelError(
                    f"{name} takes no argument {key!r}; {hint}it takes "
                    f"{', '.join(known) or 'none'}",
                    key=key,
                )
    if kind == "model":
        for shape_name in SHAPE_ARGUMENTS:
            if shape_name in parameters:
                kwargs.setdefault(shape_name, (1, 1))
    missing = [
        arg
        for arg, p in list(parameters.items())[len(positional) :]
        if p.default is p.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and arg not in kwargs
    ]
    if missing:
        raise ModelError(
            f"{name} needs {', '.join(missing)}; add "
            f"{'it' if len(missing) == 1 else 'them'} to the entry"
        )
    try:
        signature.bind(*positional, **kwargs)
    except TypeError as error:
        raise ModelError(
            f"{name} cannot be called with these settings ({error}); add the "
            "arguments it needs to the entry"
        ) from error
    return target


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


#: plenoptic's front-end models: one input channel, and a convolution kernel
#: whose reflect padding must stay within the image.
FRONT_ENDS = (
    "CenterSurround",
    "Gaussian",
    "Linear",
    "LinearNonlinear",
    "LuminanceContrastGainControl",
    "LuminanceGainControl",
    "OnOff",
)


def image_problems(
    spec: dict[str, Any],
    image_shape: tuple[int, int],
    channels: int,
    image_name: str = "",
) -> tuple[str, str]:
    """Whether a model can take images of a shape, told from its settings alone.

    Known constraints of plenoptic's models are checked here, cheaply, so that a
    study that cannot run stops before any job; any other model is run on each of
    its images by the check jobs.

    Parameters
    ----------
    spec
        The model entry.
    image_shape
        (y, x) of the images.
    channels
        1 (gray) or 3 (colour).
    image_name
        The image's entry, named in what would work.

    Returns
    -------
    error, warning
        Why the model cannot take these images and what would work ('' when it
        can), and a note on something that works imperfectly ('' when none).

    Raises
    ------
    ModelError
        With ``key`` set, for a setting these constraints depend on that has the
        wrong type.
    """
    target = resolve_target(spec["target"])
    height, width = image_shape
    plenoptic_name = _plenoptic_model_name(target)
    if plenoptic_name == "PortillaSimoncelli":
        n_scales = _whole(spec, "n_scales", _default(target, "n_scales", 4))
        corr = _whole(
            spec, "spatial_corr_width", _default(target, "spatial_corr_width", 7)
        )
        problem = portilla_simoncelli_problem(image_shape, n_scales, corr)
        return problem, ""
    if plenoptic_name in FRONT_ENDS:
        if channels != 1:
            setting = f"images.{image_name}.color" if image_name else "color"
            return (
                f"{plenoptic_name} takes gray images only; set {setting}: false, "
                "or use a model that takes colour",
                "",
            )
        pad_mode = spec.get("pad_mode", _default(target, "pad_mode", "reflect"))
        kernel = spec.get("kernel_size", _default(target, "kernel_size", None))
        sizes = tuple(kernel) if isinstance(kernel, list | tuple) else (kernel,)
        sizes = sizes * 2 if len(sizes) == 1 else sizes
        # Other kernel sizes are the constructor's to refuse, when it is built.
        if (
            pad_mode == "reflect"
            and len(sizes) == 2
            and all(isinstance(k, int) and not isinstance(k, bool) for k in sizes)
            and min(sizes) > 0
        ):
            need = [k // 2 + 1 for k in sizes]
            if height < need[0] or width < need[1]:
                return (
                    f"{plenoptic_name} with kernel_size {kernel} pads the image by "
                    "reflection, which needs images of at least "
                    f"{need[0]}x{need[-1]}; use a larger size or a smaller "
                    "kernel_size",
                    "",
                )
        return "", ""
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return "", ""
    if any(n in parameters for n in SHAPE_ARGUMENTS) and (height % 2 or width % 2):
        return "", (
            f"the model is built for {height}x{width} images, an odd size: a model "
            "built on a steerable pyramid (as plenoptic's are) reconstructs "
            "odd-sized images imperfectly; use even sides, e.g. "
            f"[{height + height % 2}, {width + width % 2}]"
        )
    return "", ""


def portilla_simoncelli_problem(
    image_shape: tuple[int, int], n_scales: int, spatial_corr_width: int
) -> str:
    """Why plenoptic's PortillaSimoncelli cannot take an image shape, or ''.

    Its steerable pyramid halves the image ``n_scales`` times, so both sides must be
    divisible by ``2 ** n_scales``, and the pyramid can be at most
    ``log2(shortest side) - 2`` scales high; the autocorrelations it measures are
    ``spatial_corr_width`` wide, so the coarsest scale must be at least that wide
    (its width one more when odd, as a real FFT drops a column).
    """

    def fits(height: int, width: int, scales: int) -> bool:
        step = 2**scales
        if height % step or width % step:
            return False
        if scales > math.floor(math.log2(min(height, width))) - 2:
            return False
        coarse_h, coarse_w = height // step, width // step
        return coarse_h >= spatial_corr_width and (
            coarse_w - coarse_w % 2 >= spatial_corr_width
        )

    height, width = image_shape
    if fits(height, width, n_scales):
        return ""
    step = 2**n_scales
    smallest = step * (spatial_corr_width + spatial_corr_width % 2)

    def grow(side: int) -> int:
        return max(smallest, -(-side // step) * step)

    fixes = [f"a size such as [{grow(height)}, {grow(width)}]"]
    fewer = [n for n in range(n_scales - 1, 0, -1) if fits(height, width, n)]
    if fewer:
        fixes.append(f"n_scales: {fewer[0]}")
    if height % step or width % step:
        reason = f"needs height and width divisible by 2^{n_scales} = {step}"
    else:
        reason = (
            f"needs its coarsest scale (the image divided by {step}) to be at "
            f"least spatial_corr_width = {spatial_corr_width} pixels wide"
        )
    return f"PortillaSimoncelli with n_scales={n_scales} {reason}; use " + " or ".join(
        fixes
    )


def _plenoptic_model_name(target: Any) -> str:
    """The name under which ``plenoptic.models`` exports ``target``, or ''."""
    name = getattr(target, "__name__", "")
    if not getattr(target, "__module__", "").startswith("plenoptic"):
        return ""
    import plenoptic

    return name if getattr(plenoptic.models, name, None) is target else ""


def _default(target: Callable, name: str, fallback: Any) -> Any:
    """A constructor argument's default, read from its signature."""
    try:
        parameter = inspect.signature(target).parameters.get(name)
    except (TypeError, ValueError):
        return fallback
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return fallback
    return parameter.default


def _whole(spec: dict[str, Any], key: str, default: Any) -> int:
    value = spec.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelError(
            f"{key} must be a whole number of at least 1, got {value!r}", key=key
        )
    return value


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
            f"{spec['target']}({_format_kwargs(kwargs)}) failed: {_one_line(error)}"
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
        try:
            metric = target(**kwargs)
        except Exception as error:  # a user's constructor can raise anything
            raise ModelError(
                f"{spec['target']}({_format_kwargs(kwargs)}) failed: {_one_line(error)}"
            ) from error
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

    A model must give a tensor with one entry per image of a batch, finite, the
    same twice, for an image in a batch the output it gives that image alone, and
    a finite, non-zero gradient.

    Parameters
    ----------
    model
        The model.
    images
        Named images (1, channel, y, x).

    Returns
    -------
    report
        Output shape, the checks passed and any warnings the model gave, per image.

    Raises
    ------
    ModelError
        Naming the image, the check that failed and what would work.
    """
    report = {}
    for name, image in images.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            shape = _check_model_on(model, name, image)
        report[name] = {
            "output_shape": shape,
            "checks": "passed",
            "warnings": _messages(caught),
        }
    return report


def _check_model_on(model: torch.nn.Module, name: str, image: Tensor) -> list[int]:
    with torch.no_grad():
        output = _model_output(model, name, image)
        if not torch.isfinite(output).all():
            raise ModelError(
                f"the model's output on image {name!r} is not finite (NaN or "
                f"infinite){_constant_hint(name, image)}"
            )
        if not torch.equal(output, _model_output(model, name, image)):
            raise ModelError(
                f"the model is not deterministic on image {name!r}: two calls give "
                "different outputs; synthesis needs a model without randomness "
                "(call model.eval() to turn off dropout, fix its noise)"
            )
        pair = torch.cat([image, torch.rand_like(image)])
        together = _model_output(model, name, pair)
        if not torch.allclose(output[0], together[0], rtol=1e-4, atol=1e-6):
            raise ModelError(
                f"the model's output for image {name!r} changes when another "
                "image shares its batch; synthesis needs images treated "
                "independently (no normalisation across the batch)"
            )
    probe = torch.rand_like(image).requires_grad_(True)
    not_differentiable = (
        f"the model's output on image {name!r} cannot be differentiated with "
        "respect to the image{}; synthesis needs gradients, so compute the output "
        "with torch operations (no numpy, .detach() or torch.no_grad())"
    )
    with torch.enable_grad():
        try:
            value = _model_output(model, name, probe)
            value.pow(2).sum().backward()
        except ModelError:
            raise
        except RuntimeError as error:
            raise ModelError(
                not_differentiable.format(f" ({_one_line(error)})")
            ) from error
    gradient = probe.grad
    if gradient is None:
        raise ModelError(not_differentiable.format(""))
    if not torch.isfinite(gradient).all():
        raise ModelError(f"the model's gradient on image {name!r} is not finite")
    if not bool(gradient.abs().sum() > 0):
        raise ModelError(
            f"the model's gradient on image {name!r} is zero: its output does not "
            "change with the image (a step, rounding or a constant), so synthesis "
            "cannot move; use a model whose output varies smoothly with the image"
        )
    return list(output.shape)


def _model_output(model: torch.nn.Module, name: str, batch: Tensor) -> Tensor:
    """The model on a batch, refusing what synthesis cannot use."""
    try:
        output = model(batch)
    except Exception as error:  # a user's model can raise anything
        raise ModelError(
            f"the model fails on image {name!r} of shape {tuple(batch.shape[1:])}: "
            f"{_one_line(error)}{_shape_hint(name, batch, error)}"
        ) from error
    if not isinstance(output, Tensor):
        raise ModelError(
            f"the model returns a {type(output).__name__} on image {name!r}, not a "
            "tensor; synthesis needs one tensor (batch, ...) per call"
        )
    if output.ndim == 0 or output.shape[0] != batch.shape[0]:
        raise ModelError(
            f"the model's output on a batch of {batch.shape[0]} image(s) like "
            f"{name!r} has shape {tuple(output.shape)}; synthesis needs one "
            "output per image, along the first dimension"
        )
    if output.is_complex():
        raise ModelError(
            f"the model's output on image {name!r} is complex; return real values "
            "(e.g. the magnitude or stacked real and imaginary parts)"
        )
    return output


def _shape_hint(name: str, batch: Tensor, error: BaseException) -> str:
    """What to change about an image that a model fails on, if it is likely its
    channels or size."""
    text = str(error).lower()
    if "channel" in text and batch.shape[1] == 3:
        return f"; if the model takes gray images, set images.{name}.color: false"
    if "channel" in text and batch.shape[1] == 1:
        return f"; if the model takes colour images, set images.{name}.color: true"
    if any(word in text for word in ("padding", "size", "shape", "kernel")):
        return (
            f"; the image may be too small or the wrong shape for the model: try "
            f"another images.{name}.size"
        )
    return ""


def _constant_hint(name: str, image: Tensor) -> str:
    """What may make a model's or metric's value on an image non-finite."""
    if float(image.std()) > 0:
        return (
            "; look for a logarithm, square root or division that meets zero or "
            "negative values, or use another image"
        )
    return (
        f"; image {name!r} is constant (every pixel {float(image.flatten()[0]):.3g}),"
        " and statistics such as texture correlations divide by its zero variance;"
        " use an image with contrast"
    )


def _messages(caught: list[warnings.WarningMessage]) -> list[str]:
    """Distinct warning texts, in order."""
    return list(dict.fromkeys(str(w.message).strip() for w in caught))


def check_metric(metric: Callable, images: dict[str, Tensor]) -> dict[str, Any]:
    """Check a metric: a finite tensor, differentiable, and zero between equal images.

    Parameters
    ----------
    metric
        ``d(x, y)``.
    images
        Named images (1, channel, y, x).

    Returns
    -------
    report
        Distance of each image to itself, the checks passed and any warnings.

    Raises
    ------
    ModelError
        Naming the image, the check that failed and what would work.
    """
    report = {}
    for name, image in images.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self_distance = _check_metric_on(metric, name, image)
        report[name] = {
            "distance_to_self": self_distance,
            "checks": "passed",
            "warnings": _messages(caught),
        }
    return report


def _check_metric_on(metric: Callable, name: str, image: Tensor) -> float:
    other = torch.rand_like(image).requires_grad_(True)
    with torch.enable_grad():
        value = _metric_value(metric, name, image, other)
        if not torch.isfinite(value).all():
            raise ModelError(
                f"the metric's value on image {name!r} is not finite"
                f"{_constant_hint(name, image)}"
            )
        try:
            value.sum().backward()
        except RuntimeError as error:
            raise ModelError(
                f"the metric cannot be differentiated on image {name!r} "
                f"({_one_line(error)}); MAD competition needs gradients, so "
                "compute it with torch operations"
            ) from error
    if other.grad is None:
        raise ModelError(
            f"the metric cannot be differentiated on image {name!r}: its value "
            "does not depend on the image through torch operations"
        )
    if not torch.isfinite(other.grad).all():
        raise ModelError(f"the metric's gradient on image {name!r} is not finite")
    with torch.no_grad():
        self_distance = float(_metric_value(metric, name, image, image).abs().max())
    if self_distance > 1e-4:
        raise ModelError(
            f"its value between image {name!r} and itself is {self_distance:.3g}, "
            "not 0, so it is not a distance; if it is a similarity, set "
            "as_distance: true to use 1 - similarity"
        )
    return self_distance


def _metric_value(metric: Callable, name: str, x: Tensor, y: Tensor) -> Tensor:
    try:
        value = metric(x, y)
    except Exception as error:  # a user's metric can raise anything
        raise ModelError(
            f"the metric fails on image {name!r} of shape {tuple(x.shape[1:])}: "
            f"{_one_line(error)}{_shape_hint(name, x, error)}"
        ) from error
    if not isinstance(value, Tensor):
        raise ModelError(
            f"the metric returns a {type(value).__name__} on image {name!r}, not a "
            "tensor; return a torch tensor computed with torch operations"
        )
    return value


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

    Warnings the model gives while it is built (such as a steerable pyramid's on an
    odd image size) are passed on to the user, naming the entry.

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
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = build_model(spec, tuple(image_shape))
        # Pinned before the model first runs: some models cache derived buffers on
        # their first forward pass, which a freshly built model would not expect.
        digest = pin_model(model, full_spec, pin_path)
    except ModelError as error:
        raise in_entry("models", name, error) from error
    size = "x".join(str(n) for n in image_shape)
    for message in _messages(caught):
        tell_user(f"models.{name}: built for {size} images, it warns: {message}")
    logger.info("Model %s built and pinned (sha256 %s)", name, digest[:12])
    return {**full_spec, "sha256": digest, "warnings": _messages(caught)}


def in_entry(section: str, name: str, error: ModelError) -> ModelError:
    """The same error, naming the config entry (and its setting) at fault."""
    where = f"{section}.{name}" + (f".{error.key}" if error.key else "")
    return ModelError(f"{where}: {error}", key=error.key)


def tell_user(message: str) -> None:
    """Log a warning, and show it on the terminal of a job whose standard error
    goes to its log file."""
    logger.warning("%s", message)
    if sys.__stderr__ is not None and sys.stderr is not sys.__stderr__:
        print(f"stimsynth: warning: {message}", file=sys.__stderr__)


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
        raise in_entry("models", spec["name"], error) from error
    for message in report[name]["warnings"]:
        tell_user(f"models.{spec['name']} on image {name!r} warns: {message}")
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
        raise in_entry("metrics", name, error) from error
    for message in report[image_name]["warnings"]:
        tell_user(f"metrics.{name} on image {image_name!r} warns: {message}")
    logger.info("Metric %s passed its checks on image %s", name, image_name)
    return {"metric": name, "image": image_name, **report[image_name]}
