"""Reading images: the one decoding function every image path of the suite uses, and the batching that keeps
images it cannot decode counted instead of crashing a loader worker or being scored.

:func:`decode_image` takes a path, bytes, a Hugging Face ``{"bytes", "path"}`` cell or a PIL image and
returns a fully decoded 8-bit RGB PIL image with its EXIF orientation applied. It decodes the pixels
(``Image.load``), so a truncated JPEG, which passes a header check such as ``Image.verify()``, fails here,
as :class:`ImageDecodeError`. An image larger than the decompression-bomb limit is not damaged: it raises
:class:`ImageTooLargeError`, which names the limit and how to raise it.

Modes are converted to what the pixels mean, not by Pillow's ``convert("RGB")`` alone, which clips 16-bit
data to 0..255 (a 16-bit grayscale PNG becomes all white). The value scale is decided by the mode and the bit
depth the file declares, never guessed from the pixel values:

=====================  ===========================================================================
mode                   8-bit RGB
=====================  ===========================================================================
``1``, ``L``, ``P``,   8-bit: as they are (gray, palette colours), Pillow's colour conversion for
``RGB``, ``CMYK``,     ``CMYK`` and ``YCbCr``
``YCbCr``
``LA``, ``PA``,        alpha-composited onto white (as an image viewer shows them), so the colour
``RGBA``, ``RGBa``     an encoder left under fully transparent pixels does not leak into features
``I;16*``              16-bit gray, 0..65535 scaled to 0..255 (value / 257, rounded)
``I``                  from a file declaring 16 bits per sample (TIFF ``BitsPerSample``, PNG): as
                       ``I;16``; otherwise (32-bit integers, or an image made in memory) Pillow's own
                       scale for ``I``, 0..255, values outside clipped (logged once)
``F``                  float gray on Pillow's own scale for ``F``, 0..255, rounded and clipped; NaN is 0.
                       Data in [0, 1] come out nearly black (logged once): save them scaled by 255
=====================  ===========================================================================

Transparency is treated the same in every mode: alpha is composited onto white, and a colour key (a PNG
``tRNS`` chunk: ``info["transparency"]``, in ``1``, ``L``, ``I;16``, ``I``, ``RGB``) makes the pixels that
equal it white. For 16-bit RGB PNG data, which Pillow reduces to 8 bits by keeping the high byte, the
16-bit key is compared with that high byte. PNG text metadata of any size (XMP, zTXt) does not make an image
undecodable (:func:`_text_chunks_any_size`).

In a ``DataLoader``, :func:`load_image` returns an :class:`Undecodable` in place of an image that cannot be
decoded (and a :class:`TooLarge` for one above the limit); :func:`collate_images` drops them and returns
their names with the batch, so the process that iterates the loader counts them (worker processes cannot
change the parent's counters) and :func:`unpack` raises there for a too-large image, as one clear error
rather than a worker's traceback. :class:`PaddedToRanks` pads an
evaluation set to a multiple of the number of DDP processes with placeholders that the same collate drops,
so ``DistributedSampler`` never repeats a real sample into a score.
"""
from __future__ import annotations

import io
import logging
import math
import os
import struct
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, default_collate

from transfer.errors import DataError

log = logging.getLogger(__name__)

# What Pillow and its codecs raise for damaged data (truncated streams, bad chunks, broken headers).
DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, EOFError, struct.error, IndexError,
                 TypeError)
WHITE = (255, 255, 255)
_PILLOW_LIMIT_LOCK = threading.RLock()  # guards Pillow's module-level limits while lifted
_WARNED: set[str] = set()
# Decompressed PNG text metadata accepted per chunk and in all (Pillow's own limits are 1 MiB and 64 MiB).
TEXT_LIMIT = 1 << 30
# Pillow warns for an image between its limit and twice it; decode_image applies its own limit to every image
# and raises ImageTooLargeError with the one limit in force, so Pillow's warning only repeats it.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageDecodeError(DataError):
    """An image that cannot be decoded (damaged, truncated, not an image); ``name`` says which."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"cannot decode image {name}: {reason}")
        self.name, self.reason = name, reason


class ImageTooLargeError(DataError):
    """A readable image above the decompression-bomb limit: not damaged, refused on purpose."""

    def __init__(self, name: str, size: tuple[int, int] | None, limit: int, detail: str = ""):
        dims = f"{size[0]} x {size[1]} = {size[0] * size[1]:,} pixels" if size else detail or "above the limit"
        whose = ("Pillow's decompression-bomb guard, PIL.Image.MAX_IMAGE_PIXELS" if limit == Image.MAX_IMAGE_PIXELS
                 else "the max_pixels / task.max_image_pixels setting")
        super().__init__(
            f"image {name} is too large to decode ({dims}); the limit is {limit:,} pixels ({whose}). The file "
            f"is not damaged: if you trust the data, raise the limit with task.max_image_pixels=N (N at least "
            f"the image's width x height).")
        self.name, self.size, self.limit = name, size, limit


def describe(source) -> str:
    """A short name for an image source, for messages: its path, or what kind of value it is."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, Mapping):
        return str(source.get("path") or "<image bytes>")
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} image bytes>"
    if isinstance(source, Image.Image):
        return str(getattr(source, "filename", "") or f"<{source.mode} image {source.size}>")
    return f"<{type(source).__name__}>"


def decode_image(source, *, max_pixels: int | None = None, name: str | None = None) -> Image.Image:
    """Decode ``source`` into an 8-bit RGB PIL image, EXIF orientation applied.

    ``source``: a file path, encoded bytes, a Hugging Face image cell ``{"bytes": ..., "path": ...}``
    (bytes preferred when present) or a PIL image. ``max_pixels``: the largest width x height accepted,
    default Pillow's ``PIL.Image.MAX_IMAGE_PIXELS``. ``name`` labels the image in errors (default: its path).

    Returns a new ``RGB`` image of the same size (after orientation). Raises :class:`ImageDecodeError` when
    the data cannot be decoded and :class:`ImageTooLargeError` above ``max_pixels``.
    """
    name = name or describe(source)
    limit = _limit(max_pixels)

    def decode() -> Image.Image:
        opened = _open(source, limit, name)
        try:
            _check_size(opened, limit, name)
            opened.load()  # decodes every pixel: a truncated stream fails here, not in a loader worker
            bits = declared_bits(opened)  # before exif_transpose, whose new image has no TIFF tags
            oriented = ImageOps.exif_transpose(opened)  # always a new image, so closing ``opened`` is safe
        finally:
            if opened is not source:
                opened.close()
        return to_rgb(oriented, bits=bits)

    try:
        return _text_chunks_any_size(decode)
    except (ImageDecodeError, ImageTooLargeError):
        raise
    except DECODE_ERRORS as e:
        raise ImageDecodeError(name, f"{type(e).__name__}: {e}") from None


# EXIF orientations that turn the image by 90 degrees (5: transpose, 6: 270, 7: transverse, 8: 90).
_SWAPS_SIDES = (5, 6, 7, 8)


def oriented_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of the image :func:`decode_image` returns, from the header alone (EXIF orientation
    5..8 swaps the sides). Raises Pillow's errors (``OSError``, ``ValueError``) for a damaged header."""
    with Image.open(path) as im:
        width, height = im.size
        turned = im.getexif().get(0x0112) in _SWAPS_SIDES
    return (height, width) if turned else (width, height)


def check_header(source, *, max_pixels: int | None = None, name: str | None = None) -> None:
    """Parse the header only (``Image.verify``: cheap, no pixel decode) and check the size.

    Raises :class:`ImageDecodeError` when the header is damaged and :class:`ImageTooLargeError` above the
    limit. A file that passes may still fail :func:`decode_image` (a truncated JPEG does).
    """
    name = name or describe(source)
    limit = _limit(max_pixels)

    def verify() -> None:
        im = _open(source, limit, name)
        try:
            _check_size(im, limit, name)
            im.verify()
        finally:
            if im is not source:
                im.close()

    try:
        _text_chunks_any_size(verify)
    except (ImageDecodeError, ImageTooLargeError):
        raise
    except DECODE_ERRORS as e:
        raise ImageDecodeError(name, f"{type(e).__name__}: {e}") from None


def _text_chunks_any_size(read):
    """``read()``, once more with Pillow's PNG text limits lifted when only they stopped it.

    Pillow refuses a PNG whose text metadata (tEXt/zTXt/iTXt, e.g. XMP) decompresses to more than
    ``PngImagePlugin.MAX_TEXT_CHUNK`` (1 MiB) or ``MAX_TEXT_MEMORY`` (64 MiB in all), as ``ValueError``: the
    pixels are fine, so metadata size must not make the image undecodable. The retry lifts both to
    :data:`TEXT_LIMIT` (a zip bomb hidden in text is still bounded), under the lock that guards Pillow's limits.
    """
    try:
        return read()
    except ValueError as e:
        if "MAX_TEXT" not in str(e):
            raise
    from PIL import PngImagePlugin

    with _PILLOW_LIMIT_LOCK:
        saved = PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY
        PngImagePlugin.MAX_TEXT_CHUNK = max(saved[0], TEXT_LIMIT)
        PngImagePlugin.MAX_TEXT_MEMORY = max(saved[1], TEXT_LIMIT)
        try:
            return read()
        finally:
            PngImagePlugin.MAX_TEXT_CHUNK, PngImagePlugin.MAX_TEXT_MEMORY = saved


def to_rgb(im: Image.Image, *, bits: int | None = None) -> Image.Image:
    """8-bit RGB with the meaning of every Pillow mode kept (table in the module docstring).

    The value scale comes from the mode and the bit depth the file declares, never from the pixel values.
    ``bits``: the bits per sample the file declared (:func:`declared_bits`; read from ``im`` when None); it
    matters only for mode ``I``. A colour-key transparency (``info["transparency"]``) makes the matching
    pixels white in every mode, as alpha does.
    """
    mode = im.mode
    if bits is None:
        bits = declared_bits(im)
    key = im.info.get("transparency")
    if mode in ("P", "PA", "LA", "La", "RGBa") or (key is not None and mode in ("1", "L")):
        im, mode = im.convert("RGBA"), "RGBA"  # palette transparency or a gray colour key becomes alpha
    if mode == "RGBA":
        background = Image.new("RGBA", im.size, (*WHITE, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    if mode == "RGB":
        return _keyed_white(im, key, np.asarray(im), im) if key is not None else im
    if mode.startswith("I;16") or (mode == "I" and bits == 16):
        raw = np.asarray(im).astype(np.float64)
        return _keyed_white(_gray(np.rint(np.clip(raw, 0, 65535) / 257.0)), key, raw)
    if mode == "I":  # 32-bit integers: Pillow's own scale (its I -> L conversion), 0..255, clipped
        raw = np.asarray(im).astype(np.float64)
        if raw.size and (raw.max() > 255 or raw.min() < 0):
            _warn_once("I", "a 32-bit integer image has values outside 0..255; it is read on the 0..255 scale "
                       "(as Pillow converts mode I), so they are clipped. Save such data as 8- or 16-bit images "
                       "(docs/classification.md, Image decoding).")
        return _keyed_white(_gray(np.rint(np.clip(raw, 0, 255))), key, raw)
    if mode == "F":  # floats: Pillow's own scale (its F -> L conversion), 0..255, clipped; NaN as 0
        raw = np.nan_to_num(np.asarray(im).astype(np.float64), nan=0.0)
        if raw.size and 0 < raw.max() <= 1 and raw.min() >= 0:
            _warn_once("F", "a float image has all its values in [0, 1]; float images are read on the 0..255 "
                       "scale (as Pillow converts mode F), so it comes out nearly black. If the data are in "
                       "[0, 1], multiply by 255 or save them as 8-bit images (docs/classification.md, Image "
                       "decoding).")
        return _keyed_white(_gray(np.rint(np.clip(raw, 0, 255))), key, raw)
    try:
        return im.convert("RGB")
    except ValueError as e:  # a mode Pillow cannot convert (LAB without a colour profile, …)
        raise ImageDecodeError(describe(im), f"mode {mode!r} has no conversion to RGB ({e})") from None


def declared_bits(im: Image.Image) -> int | None:
    """Bits per sample the file declares (TIFF ``BitsPerSample``; 16 for a PNG opened as ``I``), else None."""
    tags = getattr(im, "tag_v2", None)
    if tags is not None and 258 in tags:
        value = tags[258]
        return int(value[0] if isinstance(value, tuple) else value)
    if im.mode == "I" and getattr(im, "format", None) == "PNG":
        return 16  # PNG samples have at most 16 bits
    return None


def _keyed_white(rgb: Image.Image, key, raw: np.ndarray, source: Image.Image | None = None) -> Image.Image:
    """``rgb`` with the pixels whose raw value equals the colour key ``key`` made white (None: unchanged).

    ``raw`` (H, W) or (H, W, C) holds the values the key is given in. An 8-bit ``RGB`` image that Pillow reduced
    from 16-bit PNG data keeps the 16-bit key: it is compared with the high byte, which is what Pillow keeps.
    """
    if key is None:
        return rgb
    if isinstance(key, (bytes, bytearray)):  # a PNG tRNS Pillow could not interpret for this mode
        return rgb
    key = np.asarray(key, dtype=np.float64)
    if source is not None and source.mode == "RGB" and key.size and key.max() > 255:
        key = np.floor(key / 256.0)
    mask = raw == key if raw.ndim == 2 else (raw == key.reshape(1, 1, -1)).all(-1)
    if not mask.any():
        return rgb
    out = np.array(rgb.convert("RGB"))
    out[mask] = WHITE
    return Image.fromarray(out)


def _warn_once(what: str, message: str) -> None:
    """Log ``message`` once per process (a data set of such images would repeat it for every image)."""
    if what not in _WARNED:
        _WARNED.add(what)
        log.warning(message)


def _gray(values: np.ndarray) -> Image.Image:
    return Image.fromarray(values.astype(np.uint8)).convert("RGB")  # (H, W) uint8 -> L


def _limit(max_pixels: int | None) -> int | None:
    return Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels


def _open(source, limit: int | None, name: str) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, Mapping):
        data, path = source.get("bytes"), source.get("path")
        if data is None and not path:
            raise ImageDecodeError(name, "the cell holds neither bytes nor a path")
        source = data if data is not None else path
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    pillow_limit = Image.MAX_IMAGE_PIXELS
    try:
        if limit is None or pillow_limit is None or limit <= 2 * pillow_limit:
            return Image.open(fp)  # Pillow refuses only above twice its limit; _check_size applies ours
        # Asked for more than Pillow will ever open: lift its guard for this one open, under a lock so
        # concurrent decodes in this process do not restore it early; _check_size then applies ``limit``.
        with _PILLOW_LIMIT_LOCK:
            Image.MAX_IMAGE_PIXELS = None
            try:
                return Image.open(fp)
            finally:
                Image.MAX_IMAGE_PIXELS = pillow_limit
    except Image.DecompressionBombError as e:
        # Pillow refuses above twice its limit and names that number; the message names ours, with the size.
        raise ImageTooLargeError(name, _size_unguarded(fp), limit if limit is not None else 2 * pillow_limit,
                                 str(e)) from None
    except FileNotFoundError:
        raise ImageDecodeError(name, "no such file") from None


def _size_unguarded(fp) -> tuple[int, int] | None:
    """The size in an image header, read with Pillow's guard lifted (nothing is decoded); None if unreadable."""
    with _PILLOW_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            if hasattr(fp, "seek"):
                fp.seek(0)
            with Image.open(fp) as im:
                return im.size
        except DECODE_ERRORS:
            return None
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _check_size(im: Image.Image, limit: int | None, name: str) -> None:
    if limit is not None and im.size[0] * im.size[1] > limit:
        raise ImageTooLargeError(name, im.size, limit)


@dataclass(frozen=True)
class Undecodable:
    """Stands in a dataset item for an image that could not be decoded; ``name`` is its file or row."""

    name: str
    reason: str


@dataclass(frozen=True)
class TooLarge:
    """Stands in a dataset item for an image above the size limit; ``message`` is the error to raise."""

    message: str


# Items that stand in for an image: transforms pass them through, collate_images drops them.
MARKERS = (Undecodable, TooLarge)


def load_image(source, *, name: str | None = None, max_pixels: int | None = None,
               transform=None):
    """:func:`decode_image` (then ``transform``) for a dataset item: returns an :class:`Undecodable` or
    :class:`TooLarge` marker instead of raising, since an exception would kill a loader worker."""
    try:
        image = decode_image(source, max_pixels=max_pixels, name=name)
    except ImageDecodeError as e:
        log.warning("skipping undecodable image %s (%s)", e.name, e.reason)
        return Undecodable(e.name, e.reason)
    except ImageTooLargeError as e:
        return TooLarge(str(e))
    return transform(image) if transform is not None else image


@dataclass(frozen=True)
class Padding:
    """A placeholder item that only makes an evaluation set divide evenly over DDP processes."""


class ImageBatch(NamedTuple):
    """A collated batch: ``images`` (B, ...) and ``labels`` (B,) of the decodable samples; the names of the
    samples that could not be decoded and the errors of those too large (both dropped from the batch)."""

    images: torch.Tensor
    labels: torch.Tensor
    undecodable: list[str]
    too_large: list[str]


def collate_images(samples: list[tuple]) -> ImageBatch:
    """Collate ``(image, label)`` samples, dropping :class:`Undecodable`, :class:`TooLarge` and
    :class:`Padding` items. A batch with nothing decodable has ``images`` of length 0."""
    good = [s for s in samples if not isinstance(s[0], (Undecodable, TooLarge, Padding))]
    bad = [s[0].name for s in samples if isinstance(s[0], Undecodable)]
    large = [s[0].message for s in samples if isinstance(s[0], TooLarge)]
    if good:
        images, labels = default_collate(good)
    else:
        images, labels = torch.empty(0), torch.empty(0, dtype=torch.int64)
    return ImageBatch(images, torch.as_tensor(labels, dtype=torch.int64), bad, large)


def unpack(batch: ImageBatch) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(images, labels, undecodable names)`` of a batch; raises :class:`DataError` (in the process that
    iterates the loader) when a worker found an image above the size limit."""
    if batch.too_large:
        raise DataError(batch.too_large[0])
    return batch.images, batch.labels, batch.undecodable


class PaddedToRanks(Dataset):
    """``base`` followed by :class:`Padding` items up to a multiple of ``ranks``.

    Lightning's ``DistributedSampler`` makes every process take the same number of items by repeating
    real ones; a repeated test image would be scored twice. With the length already a multiple it repeats
    nothing, and :func:`collate_images` drops the placeholders.
    """

    def __init__(self, base: Dataset, ranks: int = 1):
        self.base = base
        self.length = math.ceil(len(base) / ranks) * ranks if len(base) else 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        return self.base[i] if i < len(self.base) else (Padding(), -1)


def gather_names(names: set[str]) -> set[str]:
    """The union of ``names`` over every DDP process (just ``names`` in a single process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return set(names)
    everyone: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, sorted(names))
    return {n for part in everyone for n in part}
