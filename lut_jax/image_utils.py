"""Image normalisation constants and helpers shared by the data pipeline and summaries."""

from __future__ import annotations

import numpy as np

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
