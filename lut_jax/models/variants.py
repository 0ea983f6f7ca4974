"""Named ViT sizes ("B/16", "S/16", "Ti/4", ...) and their parsing, and the typed
architecture of an encoder (:class:`EncoderConfig`).

A variant string is ``<size>/<patch>``: the size names the encoder's width, depth and
number of heads; the number after the slash is the patch size in pixels.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# size -> (width, depth, num_heads). The standard ViT sizes plus two small ones:
# "mu" for unit tests and "nano" for the CPU default (Fashion-MNIST, 28 px).
ENCODER_SIZES: dict[str, tuple[int, int, int]] = {
    "mu": (32, 2, 2),
    "nano": (96, 6, 3),
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "M": (512, 12, 8),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "H": (1280, 32, 16),
}


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
  """Width, depth, heads and patch size of a ViT encoder."""

  width: int
  depth: int
  num_heads: int
  patch_size: int


def parse_variant(variant: str) -> EncoderSpec:
  """Parses ``"B/16"`` into an :class:`EncoderSpec`; raises ``ValueError`` on bad names."""
  size, sep, patch = str(variant).partition("/")
  if not sep or size not in ENCODER_SIZES or not patch.isdigit() or int(patch) <= 0:
    known = ", ".join(f"{s}/<patch>" for s in ENCODER_SIZES)
    raise ValueError(
        f"Unknown model variant {variant!r}: expected '<size>/<patch>' with size one of "
        f"{known} (e.g. 'B/16', 'H/14', 'nano/4').")
  width, depth, num_heads = ENCODER_SIZES[size]
  return EncoderSpec(width=width, depth=depth, num_heads=num_heads, patch_size=int(patch))


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """The architecture of a pre-trained encoder: what rebuilds it anywhere.
  :class:`lut_jax.models.vit.Encoder` and the fine-tuning and segmentation models around it
  take these fields (:meth:`kwargs`); :meth:`to_json` is what an export's
  ``encoder_config.json`` and the evaluation keys hold, and ``EncoderConfig(**json)`` reads it
  back."""

  image_size: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  gelu_approximate: bool = False

  @classmethod
  def of(cls, module: Any) -> EncoderConfig:
    """The encoder architecture of a module with these fields (``Encoder``, ``LUTModel``)."""
    return cls(**{field.name: getattr(module, field.name) for field in dataclasses.fields(cls)})

  def kwargs(self, **changes: Any) -> dict[str, Any]:
    """The fields as keyword arguments, ``changes`` replacing some (e.g. ``image_size``)."""
    return dataclasses.asdict(dataclasses.replace(self, **changes))

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    if not self.gelu_approximate:  # only when on: exact-GELU encoders keep their old keys
      del out["gelu_approximate"]
    return out
