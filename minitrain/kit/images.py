"""Reading image files one way for training (:mod:`minitrain.kit.folder`) and for
``minitrain predict``, so that a model sees at prediction what it saw in training.

An image is turned upright as its EXIF orientation says and converted to ``RGB`` or ``L`` from
any mode: transparency is laid on white, palettes are expanded, CMYK is converted, 16-bit and
float grey is scaled (not clipped) to 8 bits. A file that is not an image, is damaged or is too
large to decode safely (Pillow's decompression-bomb limit) is a :class:`MinitrainError` naming it.
PNG and JPEG files that need none of that are decoded by torchvision, about twice as fast as
through Pillow for small images.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from minitrain.engine.errors import MinitrainError

NOT_DECODED = {"MPEG"}
"""Formats Pillow identifies but does not decode, besides its stub plugins (BUFR, GRIB, HDF5, WMF)."""
FAST = {("PNG", "RGB"), ("PNG", "L"), ("JPEG", "RGB"), ("JPEG", "L")}
"""(format, mode) pairs that torchvision decodes to the same pixels as the Pillow path."""
ORIENTATION = 0x0112  # the EXIF tag


def image_suffixes() -> frozenset[str]:
    """The lower-case file name extensions of every format this Pillow decodes (``.png``,
    ``.jpg``, ``.jpeg``, ``.webp``, ``.bmp``, ``.gif``, ``.tif``, ``.ppm``, ``.ico``, ...): what
    ``Image.registered_extensions()`` holds, less the formats Pillow only identifies."""
    Image.init()
    return frozenset(
        suffix
        for suffix, name in Image.registered_extensions().items()
        if name in Image.OPEN and name not in NOT_DECODED and not _stub(Image.OPEN[name][0])
    )


def _stub(factory: object) -> bool:
    return isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)


@dataclass(frozen=True)
class Probe:
    """What a file's header says, read without decoding its pixels."""

    size: tuple[int, int]  # width, height
    fast: bool  # torchvision can decode it (see FAST), no EXIF rotation


def probe(path: str | Path) -> Probe:
    """The header of image ``path``; a :class:`MinitrainError` if it is not an image Pillow can
    open or it is over the decompression-bomb limit."""
    with _reading(path), Image.open(path) as image:
        _check_size(image)
        rotated = image.format == "JPEG" and image.getexif().get(ORIENTATION, 1) != 1
        return Probe(image.size, (image.format, image.mode) in FAST and not rotated)


def open_image(file: str | Path | IO[bytes], mode: str = "RGB", name: str = "") -> Image.Image:
    """Image ``file`` (a path, or a file object called ``name`` in errors) decoded, upright and
    in ``mode`` (``RGB`` or ``L``)."""
    with _reading(name or file), Image.open(file) as image:
        _check_size(image)
        return to_mode(ImageOps.exif_transpose(image), mode)


def decode(path: str | Path, fast: bool) -> torch.Tensor:
    """Image ``path`` as uint8 RGB pixels, 3×H×W: by torchvision where ``fast`` (a
    :class:`Probe` said so), else by :func:`open_image`."""
    if fast:
        from torchvision.io import ImageReadMode, decode_image

        with _reading(path), open(path, "rb") as file:
            data = torch.frombuffer(bytearray(file.read()), dtype=torch.uint8)
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points at TorchCodec
            return decode_image(data, mode=ImageReadMode.RGB)
    return torch.from_numpy(np.array(open_image(path, "RGB"))).permute(2, 0, 1)


def _check_size(image: Image.Image) -> None:
    """Pillow only warns between its limit and twice it, which :class:`_reading` makes an
    error; a warnings filter is not thread-safe (``minitrain serve`` reads in threads), so the
    limit is checked here too."""
    if Image.MAX_IMAGE_PIXELS is not None and image.width * image.height > Image.MAX_IMAGE_PIXELS:
        raise Image.DecompressionBombError(f"({image.width * image.height} pixels)")


class _reading:
    """Turns what reading image ``name`` can raise into one line naming it."""

    def __init__(self, name: object):
        self.name = name
        self.catcher = warnings.catch_warnings()

    def __enter__(self) -> None:
        self.catcher.__enter__()
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # over the limit: refused, not warned

    def __exit__(self, kind, exc, tb) -> None:
        self.catcher.__exit__(kind, exc, tb)
        name = self.name
        if isinstance(exc, FileNotFoundError):
            raise MinitrainError(f"image not found: {name}") from None
        if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
            found = re.search(r"\((\d+) pixels\)", str(exc))
            size = f"{int(found.group(1)):,} pixels, " if found else ""
            raise MinitrainError(
                f"cannot read image {name}: too large to decode safely ({size}over the limit of "
                f"{Image.MAX_IMAGE_PIXELS:,} that guards against decompression bombs)"
            ) from None
        if isinstance(exc, (UnidentifiedImageError, OSError, ValueError, RuntimeError, SyntaxError)):
            raise MinitrainError(f"cannot read image {name}: {' '.join(str(exc).split())}") from None


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """``image`` in ``mode`` (``L`` or ``RGB``), whatever mode it came in."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16-bit or float grey: scale, don't clip
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I") else max(values.max(initial=0), 1.0)  # float: 0..1 or 0..max
        image = Image.fromarray(np.clip(values / top * 255, 0, 255).round().astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):  # transparent pixels are laid on white
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert(mode)
