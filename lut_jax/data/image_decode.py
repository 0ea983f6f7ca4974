"""Decoding an image file to uint8 pixels: the one rule of both input paths.

Both input paths decode folder images with this (the tf.data one through
``tf.numpy_function``, also when it checks a folder's files), so a file gives the same
pixels, and is skipped or kept alike, whichever path reads it:

* the EXIF orientation is applied (cameras store portraits sideways);
* 16-bit greys (``I;16``, and ``I``, which holds them in 32 bits) are scaled to 0..255,
  ``round(v / 257)``; PIL's ``convert`` would clip every value above 255 to white;
* alpha is dropped, not composited: a transparent pixel keeps its stored colour (what the
  tf.data path's TensorFlow decoders did with PNGs); palette images take their palette's
  colours, transparent or not (TensorFlow made a GIF's transparent pixels black);
* CMYK becomes RGB with PIL's conversion, ``(255 - c) * (255 - k) / 255``;
* grey images (1-bit, ``L``, ``LA``, 16-bit) stay one channel; everything else is RGB.

Only the first frame of an animation is read. No TensorFlow here: the device path uses it.
"""

from __future__ import annotations

import io
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

_GREY_MODES = ("1", "L", "LA", "La")
_EXIF_ORIENTATION = 0x0112
# What a file that is not a decodable image raises (PIL reports some damage as SyntaxError).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def open_image(source: str | bytes | BinaryIO) -> Image.Image:
  """A path, the file's bytes, or an open file -> a loaded PIL image, mode ``L`` or ``RGB``;
  ``DECODE_ERRORS`` for what PIL cannot decode (unknown format, truncated, too large)."""
  if isinstance(source, bytes):
    source = io.BytesIO(source)
  with Image.open(source) as im:
    if im.getexif().get(_EXIF_ORIENTATION, 1) != 1:
      im = ImageOps.exif_transpose(im)
    if im.mode == "I" or im.mode.startswith("I;16"):
      grey = np.rint(np.asarray(im, np.float64) / 257)  # 65535 -> 255
      return Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8))
    if im.mode in ("L", "RGB"):  # most files: as decoded, without convert's copy
      im.load()
      return im
    # Alpha is dropped: the palette's colours stand (and pillow need not warn about it).
    im.info.pop("transparency", None)
    return im.convert("L" if im.mode in _GREY_MODES else "RGB")


def decode_rgb(data: bytes) -> np.ndarray:
  """An encoded image -> uint8 ``(H, W, 3)`` by :func:`open_image` (grey repeated): the
  tf.data path's fixed channel count."""
  image = np.asarray(open_image(data))
  return np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image
