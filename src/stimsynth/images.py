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


def _read_file(path: Path, color: bool) -> tuple[np.ndarray, list[str]]:
    if not path.is_file():
        where = "" if path.is_absolute() else f" (looked for {path.resolve()})"
        raise ImageError(
            f"image file {str(path)!r} does not exist{where}; relative paths are "
            "read from the directory Snakemake runs in"
        )
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise ImageError(
            f"image file {str(path)!r} has an unsupported type; use one of "
            + ", ".join(FILE_SUFFIXES)
        )
    try:
        if path.suffix.lower() == ".npy":
            raw = np.load(path, allow_pickle=False)
        else:
            import imageio.v3 as iio

            raw = iio.imread(path)
    except Exception as error:  # imageio raises many kinds for a corrupt file
        raise ImageError(
            f"image file {str(path)!r} could not be read: {error}"
        ) from error
    operations = [f"read {path.name}"]
    image, scaling = _to_unit_range(raw, path)
    operations += scaling
    image, channels = _to_channels(image, color, path)
    return image, operations + channels


def _to_unit_range(raw: np.ndarray, path: Path) -> tuple[np.ndarray, list[str]]:
    """Integers are divided by their type's maximum; floats must lie in [0, 1]."""
    if np.issubdtype(raw.dtype, np.integer):
        top = np.iinfo(raw.dtype).max
        return raw.astype(np.float32) / top, [f"divided {raw.dtype} values by {top}"]
    if np.issubdtype(raw.dtype, np.bool_):
        return raw.astype(np.float32), ["converted booleans to 0 and 1"]
    image = raw.astype(np.float32)
    if not np.isfinite(image).all():
        raise ImageError(f"image file {str(path)!r} holds NaN or infinite values")
    low, high = float(image.min()), float(image.max())
    if low < 0 or high > 1:
        raise ImageError(
            f"image file {str(path)!r} holds floats in [{low:g}, {high:g}], outside "
            "[0, 1]; save it as an integer image or rescale it to [0, 1]"
        )
    return image, []


def _to_channels(image: np.ndarray, color: bool, path: Path) -> tuple[np.ndarray, list]:
    """Bring an (y, x), (y, x, c) or (c, y, x) array to (channel, y, x)."""
    if image.ndim == 2:
        image = image[None]
    elif image.ndim == 3 and image.shape[-1] in (3, 4) and image.shape[0] not in (1, 3):
        image = np.moveaxis(image, -1, 0)
    elif image.ndim != 3 or image.shape[0] not in (1, 3, 4):
        raise ImageError(
            f"image file {str(path)!r} has shape {image.shape}; expected (y, x), "
            "(y, x, channel) or (channel, y, x) with 1, 3 or 4 channels"
        )
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
    if fit == "crop":
        if want_h > height or want_w > width:
            raise ImageError(
                f"cannot crop a {height}x{width} image to {want_h}x{want_w}; "
                "use fit: resize or fit: pad, or a smaller size"
            )
        top, left = (height - want_h) // 2, (width - want_w) // 2
        out = image[:, top : top + want_h, left : left + want_w]
        return out, [
            f"cropped {height}x{width} to {want_h}x{want_w} at ({top}, {left})"
        ]
    if fit == "pad":
        pad_h, pad_w = want_h - height, want_w - width
        if pad_h < 0 or pad_w < 0 or pad_h >= height or pad_w >= width:
            raise ImageError(
                f"cannot reflect-pad a {height}x{width} image to {want_h}x{want_w}; "
                "use fit: resize or fit: crop"
            )
        pads = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
        tensor = torch.from_numpy(image)[None]
        out = F.pad(tensor, pads, mode="reflect")[0].numpy()
        return out, [f"reflect-padded {height}x{width} to {want_h}x{want_w}"]
    raise ImageError(f"fit {fit!r} is not known; use one of {', '.join(FITS)}")


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
        image, fitted = fit_to_size(
            image, tuple(entry["size"]), entry.get("fit", "resize")
        )
    except ImageError as error:
        raise ImageError(f"images.{name}: {error}") from error
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
    """Write a prepared image as a Zarr store."""
    image.to_dataset().to_zarr(path, mode="w", consolidated=True)


def open_image(path: str | os.PathLike) -> xr.DataArray:
    """Read a prepared image back, loaded into memory."""
    with xr.open_zarr(path) as dataset:
        return dataset["image"].load()


def translate(image: torch.Tensor, shift: tuple[int, int]) -> torch.Tensor:
    """Shift an image (..., y, x) by whole pixels, wrapping around the edges."""
    return torch.roll(image, shifts=tuple(int(s) for s in shift), dims=(-2, -1))
