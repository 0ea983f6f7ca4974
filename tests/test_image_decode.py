"""One image decoding rule on both input paths: a table of image modes, each written as a
one-file folder data set and read by the device path and by the tf.data path, against
pixels computed here with numpy."""

import io

import ml_collections
import numpy as np
from PIL import Image
import pytest

from lut_jax.data import device_input

SIZE = 16  # the smallest image size: no resizing on the device path
_RNG = np.random.default_rng(0)
_GREY = _RNG.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
_ALPHA = _RNG.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
_RGB = _RNG.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
_WORDS = np.linspace(5, 65505, SIZE * SIZE).round().reshape(SIZE, SIZE)  # 16-bit greys
_PALETTE = np.array([[250, 10, 10], [10, 250, 10], [10, 10, 250], [200, 200, 30]], np.uint8)
_INDEX = _RNG.integers(0, 4, (SIZE, SIZE), dtype=np.uint8)
# Smooth and asymmetric (a gradient across, another down), so JPEG keeps it within a few
# levels and a quarter turn changes every pixel.
_Y, _X = np.mgrid[:SIZE, :SIZE]
_SMOOTH = np.stack([_X * 15, _Y * 15, 255 - _X * 8 - _Y * 7], -1).astype(np.uint8)
# CMYK in four flat 8 x 8 quadrants: whole JPEG blocks, kept to within a level or two.
_CMYK = np.zeros((SIZE, SIZE, 4), np.uint8)
for _i, _value in enumerate([(0, 0, 0, 0), (200, 30, 0, 0), (0, 90, 180, 60),
                             (40, 40, 40, 120)]):
  _CMYK[8 * (_i // 2):8 * (_i // 2 + 1), 8 * (_i % 2):8 * (_i % 2 + 1)] = _value


def _grey16_to_8(words):
  return np.rint(words / 257).astype(np.uint8)  # 65535 -> 255, to the closest level


def _cmyk_to_rgb(cmyk):
  c, k = cmyk[..., :3].astype(float), cmyk[..., 3:].astype(float)
  return np.rint((255 - c) * (255 - k) / 255).astype(np.uint8)


def _palette_image():
  image = Image.frombytes("P", (SIZE, SIZE), _INDEX.tobytes())
  image.putpalette(_PALETTE.flatten().tolist())
  return image


def _orientation(value):
  exif = Image.Exif()
  exif[0x0112] = value
  return exif


def _saved(image, fmt, **options):
  buffer = io.BytesIO()
  image.save(buffer, fmt, **options)
  return buffer.getvalue()


# name -> (file name, encoded file, expected RGB pixels, channels on the device path,
#          largest difference allowed from the expectation: 0 unless the format is lossy)
CASES = {
    "L": lambda: ("a.png", _saved(Image.fromarray(_GREY), "PNG"), _GREY, 1, 0),
    "I;16 (values 5..65505)": lambda: (
        "a.png", _saved(Image.fromarray(_WORDS.astype(np.uint16)), "PNG"),
        _grey16_to_8(_WORDS), 1, 0),
    # Pillow writes 32-bit greys as TIFF only; a folder lists files by name, and both paths
    # decode them by their content.
    "I (32-bit)": lambda: ("a.png", _saved(Image.fromarray(_WORDS.astype(np.int32)), "TIFF"),
                           _grey16_to_8(_WORDS), 1, 0),
    "1 (bits)": lambda: ("a.png", _saved(Image.fromarray(_GREY > 127), "PNG"),
                         np.where(_GREY > 127, 255, 0).astype(np.uint8), 1, 0),
    "P": lambda: ("a.png", _saved(_palette_image(), "PNG"), _PALETTE[_INDEX], 3, 0),
    # Alpha is dropped: transparent pixels keep their palette colour.
    "P, one transparent colour": lambda: (
        "a.png", _saved(_palette_image(), "PNG", transparency=0), _PALETTE[_INDEX], 3, 0),
    "P, alpha per colour": lambda: (
        "a.png", _saved(_palette_image(), "PNG", transparency=b"\x00\x80\xff\xff"),
        _PALETTE[_INDEX], 3, 0),
    "P, GIF with a transparent colour": lambda: (
        "a.gif", _saved(_palette_image(), "GIF", transparency=0), _PALETTE[_INDEX], 3, 0),
    "LA": lambda: ("a.png", _saved(Image.fromarray(np.stack([_GREY, _ALPHA], -1)), "PNG"),
                   _GREY, 1, 0),
    "RGB": lambda: ("a.png", _saved(Image.fromarray(_RGB), "PNG"), _RGB, 3, 0),
    "RGBA": lambda: ("a.png", _saved(Image.fromarray(np.dstack([_RGB, _ALPHA])), "PNG"),
                     _RGB, 3, 0),
    "CMYK (JPEG)": lambda: (
        "a.jpg", _saved(Image.frombytes("CMYK", (SIZE, SIZE), _CMYK.tobytes()), "JPEG",
                        quality=100),
        _cmyk_to_rgb(_CMYK), 3, 2),
    # EXIF orientation 6: the stored rows are the picture's right-hand column, top down; it
    # is shown turned a quarter clockwise.
    "EXIF-rotated PNG": lambda: (
        "a.png", _saved(Image.fromarray(_SMOOTH), "PNG", exif=_orientation(6)),
        np.rot90(_SMOOTH, -1), 3, 0),
    "EXIF-rotated JPEG": lambda: (
        "a.jpg", _saved(Image.fromarray(_SMOOTH), "JPEG", exif=_orientation(6), quality=95,
                        subsampling=0),
        np.rot90(_SMOOTH, -1), 3, 4),
}


def _as_rgb(image):
  """``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` -> ints ``(H, W, 3)``."""
  image = image[..., None] if image.ndim == 2 else image
  return np.broadcast_to(image, image.shape[:-1] + (3,)).astype(int)


def _folder(tmp_path, case):
  name, data, want, channels, tolerance = CASES[case]()
  (tmp_path / "data" / "c").mkdir(parents=True)
  (tmp_path / "data" / "c" / name).write_bytes(data)
  return f"folder:{tmp_path / 'data'}", _as_rgb(want), channels, tolerance


def _device_pixels(dataset):
  config = ml_collections.ConfigDict(dict(dataset=dataset, split="train", data_dir=None,
                                          image_size=SIZE, channels=3))
  return device_input.load_split(config).images[0]


@pytest.mark.parametrize("case", CASES)
def test_the_device_path_decodes_every_mode(tmp_path, case):
  dataset, want, channels, tolerance = _folder(tmp_path, case)
  image = _device_pixels(dataset)
  assert image.shape == (SIZE, SIZE, channels)  # grey files stay one channel
  assert np.abs(_as_rgb(image) - want).max() <= tolerance


@pytest.mark.parametrize("case", CASES)
def test_the_tfdata_path_decodes_every_mode_as_the_device_path(tmp_path, case):
  tf = pytest.importorskip("tensorflow")
  from lut_jax.data import augment, datasets  # pylint: disable=g-import-not-at-top
  dataset, want, _, tolerance = _folder(tmp_path, case)
  element = datasets.get_source(dataset, "train").share(0, 1).read(tf.constant(0, tf.int64))
  # What the pipeline's views start from: augment.decode's [0, 1] floats, as grey levels.
  image = np.rint(augment.decode(element["image"], 3).numpy() * 255).astype(int)
  assert np.abs(image - want).max() <= tolerance
  assert np.abs(image - _as_rgb(_device_pixels(dataset))).max() <= 1  # to 1/255
