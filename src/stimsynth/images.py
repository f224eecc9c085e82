"""Images: load built-in or user images and prepare them for synthesis.

An image entry of a study names a source and how to prepare it::

    einstein: {source: "plenoptic:einstein", size: [128, 128], fit: resize}
    mine:     {source: "data/photo.png", size: [64, 64], color: false}

Sources are ``plenoptic:NAME`` for the images that ship inside plenoptic, or a file
(png, jpg, pgm, tif, npy). Preparation converts to gray (or keeps three colour
channels), brings pixel values to [0, 1], and fits the image to ``size`` by
resizing, centre-cropping or padding. The prepared image is stored as a small Zarr
array that records where it came from and every operation applied to it.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr

from .errors import InputError

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "plenoptic:"
BUILTIN_IMAGES = ("einstein", "curie", "parrot", "reptile_skin", "color_wheel")
#: The files of plenoptic's built-in images, inside the package ``plenoptic.data``.
BUILTIN_FILES = {
    "einstein": "einstein.pgm",
    "curie": "curie.pgm",
    "parrot": "parrot.png",
    "reptile_skin": "reptile_skin.pgm",
    "color_wheel": "color_wheel.jpg",
}
FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pgm", ".tif", ".tiff", ".npy")
FITS = ("resize", "crop", "pad")


class ImageError(InputError):
    """An image entry cannot be loaded or prepared."""


def load_source(source: str, color: bool = False) -> tuple[np.ndarray, list[str]]:
    """Read an image source as a float array (channel, y, x) in [0, 1].

    Parameters
    ----------
    source
        ``plenoptic:NAME`` or a path to an image file.
    color
        Keep three colour channels instead of converting to gray.

    Returns
    -------
    image, operations
        The image, and what was done to bring it to [0, 1] and to its channels.

    Raises
    ------
    ImageError
        For an unknown built-in name, a missing or unreadable file, or values that
        cannot be brought to [0, 1].
    """
    if source.startswith(BUILTIN_PREFIX):
        name = source.removeprefix(BUILTIN_PREFIX)
        if name not in BUILTIN_IMAGES:
            raise ImageError(
                f"unknown built-in image {source!r}; built-in images are "
                + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_IMAGES)
            )
        import plenoptic as po

        image = getattr(po.data, name)(as_gray=not color)[0].numpy()
        return image.astype(np.float32), [f"loaded {source} from plenoptic"]
    return _read_file(Path(source), color)


@dataclass(frozen=True)
class SourceInfo:
    """What an image source holds, read from its header alone.

    Attributes
    ----------
    height, width
        Size in pixels before preparation.
    channels
        1 for gray, 3 for colour (an alpha channel is not counted).
    """

    height: int
    width: int
    channels: int


def probe_source(source: str) -> SourceInfo:
    """Size and channels of an image source, without reading its pixels.

    Cheap enough to run on every image of a study when the config is checked, so
    that a missing, unreadable or wrongly shaped file stops the study before any
    job runs. Pixel values (and damage past the header) are checked when the
    image is prepared.

    Parameters
    ----------
    source
        ``plenoptic:NAME`` or a path to an image file.

    Returns
    -------
    info
        Height, width and channels.

    Raises
    ------
    ImageError
        For an unknown built-in name, a missing file, an unsupported type, a file
        whose header cannot be read, or an array of the wrong number of dimensions.
    """
    if source.startswith(BUILTIN_PREFIX):
        name = source.removeprefix(BUILTIN_PREFIX)
        if name not in BUILTIN_IMAGES:
            raise ImageError(
                f"{source!r} is not a built-in image; use one of "
                + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_IMAGES)
            )
        from importlib import resources

        path = Path(str(resources.files("plenoptic.data") / BUILTIN_FILES[name]))
    else:
        path = Path(source)
        _check_file(path)
    try:
        if path.suffix.lower() == ".npy":
            # A memory map reads the header only.
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            shape, dtype = array.shape, array.dtype
        else:
            import imageio.v3 as iio

            properties = iio.improps(path)
            shape, dtype = properties.shape, properties.dtype
    except Exception as error:  # readers raise many kinds for a damaged file
        raise ImageError(
            f"image file {str(path)!r} could not be read ({_reason(error)}); "
            "check that it is a whole, valid image, or export it again"
        ) from error
    _check_dtype(np.dtype(dtype), path)
    channels, height, width = _layout(tuple(shape), path)
    return SourceInfo(height=height, width=width, channels=min(channels, 3))


def _check_file(path: Path) -> None:
    try:
        is_file, is_dir = path.is_file(), path.is_dir()
        where = "" if path.is_absolute() else f" (looked for {path.resolve()})"
    except (OSError, ValueError) as error:  # a NUL character, a name too long
        raise ImageError(
            f"image file {str(path)!r} is not a path this system can use "
            f"({_reason(error)}); check the source"
        ) from error
    if not is_file:
        what = "is a folder, not a file" if is_dir else "does not exist"
        raise ImageError(
            f"image file {str(path)!r} {what}{where}; relative paths are "
            "read from the directory Snakemake runs in"
        )
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise ImageError(
            f"image file {str(path)!r} has an unsupported type; use one of "
            + ", ".join(FILE_SUFFIXES)
        )
    if not os.access(path, os.R_OK):
        raise ImageError(
            f"image file {str(path)!r} cannot be read (permission denied); make it "
            "readable by the user who runs the study"
        )


def _reason(error: BaseException) -> str:
    """An exception as one short line."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _check_dtype(dtype: np.dtype, path: Path) -> None:
    if not (
        np.issubdtype(dtype, np.integer)
        or np.issubdtype(dtype, np.floating)
        or np.issubdtype(dtype, np.bool_)
    ):
        raise ImageError(
            f"image file {str(path)!r} holds {dtype} values, not pixel intensities; "
            "save real numbers in [0, 1] or integers"
        )


def _layout(shape: tuple[int, ...], path: Path) -> tuple[int, int, int]:
    """(channels, y, x) of an array of shape (y, x), (y, x, c) or (c, y, x)."""
    if 0 in shape:
        raise ImageError(f"image file {str(path)!r} holds no pixels (shape {shape})")
    if len(shape) == 2:
        return 1, shape[0], shape[1]
    if len(shape) == 3:
        if shape[-1] in (1, 3, 4) and shape[0] not in (1, 3, 4):
            return shape[2], shape[0], shape[1]
        if shape[0] in (1, 3, 4):
            return shape
    hint = ""
    if len(shape) > 3 and all(n == 1 for n in shape[:-3]):
        hint = "; drop the leading dimensions of length 1 (e.g. save array[0])"
    raise ImageError(
        f"image file {str(path)!r} holds an array of {len(shape)} dimensions, "
        f"shape {shape}; expected (y, x), (y, x, channel) or (channel, y, x) with "
        f"1, 3 or 4 channels{hint}"
    )


def _read_file(path: Path, color: bool) -> tuple[np.ndarray, list[str]]:
    _check_file(path)
    try:
        if path.suffix.lower() == ".npy":
            raw = np.load(path, allow_pickle=False)
        else:
            import imageio.v3 as iio

            raw = iio.imread(path)
    except Exception as error:  # imageio raises many kinds for a corrupt file
        raise ImageError(
            f"image file {str(path)!r} could not be read ({_reason(error)}); check "
            "that it is a whole, valid image, or export it again"
        ) from error
    operations = [f"read {path.name}"]
    _check_dtype(raw.dtype, path)
    _layout(raw.shape, path)
    image, scaling = _to_unit_range(raw, path)
    operations += scaling
    image, channels = _to_channels(image, color, path)
    return image, operations + channels


def _to_unit_range(raw: np.ndarray, path: Path) -> tuple[np.ndarray, list[str]]:
    """Bring pixel values to [0, 1], saying how; refuse values that cannot be.

    8- and 16-bit images are divided by their type's maximum. Other integer arrays
    (as ``numpy.save`` writes them) carry no bit depth, so theirs is read from
    their values: 0-255 as 8-bit, 0-65535 as 16-bit. Floats must lie in [0, 1]
    already: rescaling them would hide a mistake such as a 0-255 array saved as
    floats.
    """
    name = str(path)
    if np.issubdtype(raw.dtype, np.bool_):
        return raw.astype(np.float32), ["converted booleans to 0 and 1"]
    if np.issubdtype(raw.dtype, np.integer):
        low, high = (int(raw.min()), int(raw.max())) if raw.size else (0, 0)
        if low < 0:
            raise ImageError(
                f"image file {name!r} holds negative integers ({low}); pixel "
                "values must be 0-255, 0-65535 or floats in [0, 1]"
            )
        if raw.dtype in (np.uint8, np.uint16):
            top = np.iinfo(raw.dtype).max
            if raw.dtype == np.uint16 and 0 < high <= 255:
                raise ImageError(
                    f"image file {name!r} is a 16-bit image whose values are all "
                    f"at most {high}, as 8-bit data saved as 16-bit would be, and "
                    "would be nearly black once divided by 65535; save it as an "
                    "8-bit image"
                )
            note = f"divided {raw.dtype} values by {top}"
        elif high <= 255:
            top, note = 255, f"read {raw.dtype} values in [0, 255] as 8-bit"
        elif high <= 65535:
            top, note = 65535, f"read {raw.dtype} values in [0, 65535] as 16-bit"
        else:
            raise ImageError(
                f"image file {name!r} holds integers up to {high}, beyond 16-bit; "
                "save pixel values as 0-255, 0-65535 or floats in [0, 1]"
            )
        return raw.astype(np.float32) / top, [f"{note} to bring them to [0, 1]"]
    image = raw.astype(np.float32)
    if not np.isfinite(image).all():
        raise ImageError(f"image file {name!r} holds NaN or infinite values")
    low, high = float(image.min()), float(image.max())
    if low < 0 or high > 1:
        hint = "save it as an integer image or rescale it to [0, 1]"
        if low >= 0 and high <= 255:
            hint = (
                "it looks like 0-255 values saved as floats: divide it by 255 or "
                "save it as an 8-bit (uint8) image"
            )
        raise ImageError(
            f"image file {name!r} holds floats in [{low:g}, {high:g}], outside "
            f"[0, 1]; {hint}"
        )
    return image, []


def _to_channels(image: np.ndarray, color: bool, path: Path) -> tuple[np.ndarray, list]:
    """Bring an (y, x), (y, x, c) or (c, y, x) array to (channel, y, x)."""
    channels, height, width = _layout(image.shape, path)
    if image.ndim == 2:
        image = image[None]
    elif image.shape != (channels, height, width):
        image = np.moveaxis(image, -1, 0)
    operations = []
    if image.shape[0] == 4:
        image = image[:3]
        operations.append("dropped the alpha channel")
    if color and image.shape[0] == 1:
        raise ImageError(
            f"image file {str(path)!r} is gray but color: true was asked; "
            "set color: false"
        )
    if not color and image.shape[0] == 3:
        # The luminance weights of ITU-R BT.709, as plenoptic's loader uses.
        weights = np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)
        image = np.tensordot(weights, image, axes=1)[None]
        operations.append("converted RGB to gray (BT.709 luminance)")
    return image.astype(np.float32), operations


def fit_to_size(
    image: np.ndarray, size: tuple[int, int], fit: str = "resize"
) -> tuple[np.ndarray, list[str]]:
    """Bring an image (channel, y, x) to ``size`` (y, x).

    Parameters
    ----------
    image
        The image.
    size
        Height and width wanted.
    fit
        ``resize`` (antialiased bilinear; the aspect ratio follows ``size``),
        ``crop`` (centre crop; the image must be at least as large) or ``pad``
        (reflect padding around the centre; the image must be at most as large and
        more than half as large).

    Returns
    -------
    image, operations
        The fitted image, and what was done.

    Raises
    ------
    ImageError
        If ``fit`` cannot produce ``size`` from this image.
    """
    height, width = image.shape[-2:]
    want_h, want_w = size
    if (height, width) == (want_h, want_w):
        return image, []
    if fit == "resize":
        tensor = torch.from_numpy(image)[None]
        out = F.interpolate(
            tensor,
            size=(want_h, want_w),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )[0]
        out = out.clamp(0, 1).numpy()
        return out, [f"resized {height}x{width} to {want_h}x{want_w}"]
    problem = fit_problem((height, width), size, fit)
    if problem:
        raise ImageError(problem)
    if fit == "crop":
        top, left = (height - want_h) // 2, (width - want_w) // 2
        out = image[:, top : top + want_h, left : left + want_w]
        return out, [
            f"cropped {height}x{width} to {want_h}x{want_w} at ({top}, {left})"
        ]
    if fit == "pad":
        pad_h, pad_w = want_h - height, want_w - width
        pads = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
        tensor = torch.from_numpy(image)[None]
        out = F.pad(tensor, pads, mode="reflect")[0].numpy()
        return out, [f"reflect-padded {height}x{width} to {want_h}x{want_w}"]
    raise ImageError(f"fit {fit!r} is not known; use one of {', '.join(FITS)}")


def fit_problem(shape: tuple[int, int], size: tuple[int, int], fit: str) -> str:
    """Why ``fit`` cannot bring an image of ``shape`` (y, x) to ``size``, or ''.

    Crop needs an image at least as large as ``size``; reflect padding needs one at
    most as large and more than half as large (a reflection cannot reach further
    than the image).
    """
    (height, width), (want_h, want_w) = shape, size
    if fit == "crop" and (want_h > height or want_w > width):
        return (
            f"cannot crop a {height}x{width} image to {want_h}x{want_w}; "
            "use fit: resize or fit: pad, or a smaller size"
        )
    if fit == "pad":
        if want_h < height or want_w < width:
            return (
                f"cannot pad a {height}x{width} image to the smaller "
                f"{want_h}x{want_w}; use fit: crop or fit: resize"
            )
        if want_h >= 2 * height or want_w >= 2 * width:
            return (
                f"cannot reflect-pad a {height}x{width} image to {want_h}x{want_w}: "
                "a reflection adds less than the image's own size; use fit: resize, "
                f"or a size of at most {2 * height - 1}x{2 * width - 1}"
            )
    return ""


def prepare_image(name: str, entry: dict[str, Any]) -> xr.DataArray:
    """Load and prepare one image entry of a study.

    Parameters
    ----------
    name
        The entry's name in the study.
    entry
        ``source``, ``size`` and optionally ``color`` and ``fit``.

    Returns
    -------
    image
        DataArray (channel, y, x) in [0, 1], with ``source`` and ``operations``
        attributes.
    """
    try:
        image, operations = load_source(entry["source"], entry.get("color", False))
    except ImageError as error:
        raise ImageError(f"images.{name}.source: {error}") from error
    try:
        image, fitted = fit_to_size(
            image, tuple(entry["size"]), entry.get("fit", "resize")
        )
    except ImageError as error:
        raise ImageError(f"images.{name}.fit: {error}") from error
    return xr.DataArray(
        image.astype(np.float32),
        dims=("channel", "y", "x"),
        name="image",
        attrs={
            "name": name,
            "source": entry["source"],
            "operations": operations + fitted,
            "value_range": "[0, 1]",
        },
    )


def save_image(image: xr.DataArray, path: str | os.PathLike) -> None:
    """Write a prepared image as a Zarr store.

    Raises
    ------
    ImageError
        If it cannot be written (a full disk, no permission), saying where and why.
    """
    try:
        with warnings.catch_warnings():
            # Consolidated metadata is a zarr-python extension of Zarr 3 that
            # xarray reads; the store opens without it too, only more slowly.
            warnings.filterwarnings("ignore", "Consolidated metadata", UserWarning)
            image.to_dataset().to_zarr(path, mode="w", consolidated=True)
    except OSError as error:
        raise ImageError(
            f"cannot write the prepared image {path}: "
            f"{error.strerror or error}; free space or fix permissions there, or "
            "set results to a folder that can be written"
        ) from error


def open_image(path: str | os.PathLike) -> xr.DataArray:
    """Read a prepared image back, loaded into memory."""
    with xr.open_zarr(path) as dataset:
        return dataset["image"].load()


def translate(image: torch.Tensor, shift: tuple[int, int]) -> torch.Tensor:
    """Shift an image (..., y, x) by whole pixels, wrapping around the edges."""
    return torch.roll(image, shifts=tuple(int(s) for s in shift), dims=(-2, -1))
