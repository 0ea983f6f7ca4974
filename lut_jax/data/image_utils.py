"""Image normalisation constants and helpers shared by the data pipeline and summaries."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from lut_jax import errors

# The views' reflect padding (4 px) and widest blur kernel (radius 8, mirrored edges; both
# input paths) need images at least this large.
MIN_IMAGE_SIZE = 16


def check_image_size(image_size: int) -> None:
  """Raises ``ConfigError`` unless ``image_size`` is an int the augmentation can produce."""
  if isinstance(image_size, bool) or not isinstance(image_size, int):
    raise errors.ConfigError(f"input.image_size must be an int, got {image_size!r}")
  if image_size < MIN_IMAGE_SIZE:
    raise errors.ConfigError(f"input.image_size must be >= {MIN_IMAGE_SIZE} (reflect padding "
                             f"and the blur kernel need it), got {image_size}")


# View 2's strong ops: one per image, drawn uniformly from those ``input.view2_ops`` names
# (comma-separated). The method uses the first three; "none" keeps the jittered view as it
# is, for ablations. Indices are what both input paths store and switch on.
STRONG_OPS = ("grayscale", "solarize", "blur", "none")
METHOD_VIEW2_OPS = "grayscale,solarize,blur"


def view2_op_choices(spec: str) -> tuple[int, ...]:
  """``input.view2_ops`` (e.g. ``"grayscale,solarize,blur"``, ``"blur"``, ``"none"``) -> the
  ``STRONG_OPS`` indices view 2 draws from; ``ConfigError`` for an empty list, an unknown
  name or a repeat (which would silently weight one op twice)."""
  names = [name.strip() for name in str(spec).split(",")]
  if not all(names) or len(set(names)) != len(names) or not set(names) <= set(STRONG_OPS):
    raise errors.ConfigError(
        f"input.view2_ops must list distinct names from {', '.join(STRONG_OPS)} separated "
        f"by commas, got {spec!r}", hint=f"the method's: {METHOD_VIEW2_OPS}")
  return tuple(STRONG_OPS.index(name) for name in names)


METHOD_OP_CHOICES = view2_op_choices(METHOD_VIEW2_OPS)


class ViewRecipe(NamedTuple):
  """What the pre-training views do where ``config.input`` may change it; the defaults are
  the method's. Both input paths take one, so they cannot drift apart."""
  op_choices: tuple[int, ...] = METHOD_OP_CHOICES  # view 2's strong op is one of these
  flip: bool = True  # each view flipped horizontally with p 0.5, its own draw


def view_recipe(input_config: Any) -> ViewRecipe:
  """``input.view2_ops`` and ``input.random_flip`` (a bool: the config types it) as a
  ``ViewRecipe``; ``ConfigError`` for a bad op list."""
  return ViewRecipe(view2_op_choices(input_config.view2_ops), bool(input_config.random_flip))


def eval_crop_pct(image_size: int, crop_pct: float | None = None) -> float:
  """The eval view's centre crop: ``crop_pct`` when it is given (> 0), else the reference's
  rule by size: 224/256 up to 224 px (shorter side to 256, centre 224), the whole image
  above (e.g. 384 px fine-tuning). ``ConfigError`` above 1."""
  if crop_pct is not None and crop_pct > 1.0:
    raise errors.ConfigError(f"input.crop_pct must be in (0, 1] or -1, got {crop_pct}")
  if crop_pct is not None and crop_pct > 0:
    return float(crop_pct)
  return 224 / 256 if image_size <= 224 else 1.0


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalization_constants(channels: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std: ImageNet's for RGB; their averages for one grey channel."""
  if channels == 3:
    return IMAGENET_MEAN, IMAGENET_STD
  if channels == 1:
    return IMAGENET_MEAN.mean(keepdims=True), IMAGENET_STD.mean(keepdims=True)
  raise ValueError(f"input.channels must be 1 or 3, got {channels}")


def denormalize(images, channels: int):
  """Normalised NHWC images back to [0, 1] (clipped), for display."""
  mean, std = normalization_constants(channels)
  return np.clip(np.asarray(images, np.float32) * std + mean, 0.0, 1.0)
