"""Named ViT sizes ("B/16", "S/16", "Ti/4", ...) and their parsing.

A variant string is ``<size>/<patch>``: the size names the encoder's width, depth and
number of heads; the number after the slash is the patch size in pixels.
"""

from __future__ import annotations

import dataclasses

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
