"""What a split string selects, on both input paths: tfds's slice syntax
(``"train[:90%]"``), the example selectors of the device path (``"train{per_class=:400}"``),
and how many whole batches one pass over the examples holds. No TensorFlow.
"""

from __future__ import annotations

import re

import numpy as np

from lut_jax import errors

_SLICE = re.compile(r"^(?P<base>[\w-]+)(\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$")


def slice_split(split: str, sizes: dict[str, int]) -> tuple[str, int, int]:
  """``"train[:90%]"`` -> ``("train", 0, 0.9 * n)``: tfds's slice syntax (absolute or
  percent bounds, negative from the end, percents rounded to the closest example)."""
  match = _SLICE.match(split.replace(" ", ""))
  if match is None or match["base"] not in sizes:
    raise errors.DataError(f"bad split {split!r}; available: {sorted(sizes)}",
                           hint="tfds slice syntax, e.g. 'train[:90%]'")
  n = sizes[match["base"]]

  def bound(text: str | None, default: int) -> int:
    if text is None:
      return default
    value = (round(n * int(text[:-1]) / 100) if text.endswith("%")  # tfds: "closest"
             else int(text))
    return min(n, max(0, value + n if value < 0 else value))

  return match["base"], bound(match["start"], 0), bound(match["stop"], n)


_SELECTOR = re.compile(r"^(?P<split>[^{]+)\{(?P<body>[^}]*)\}$")


def select_examples(split: str, labels: np.ndarray) -> tuple[str, np.ndarray | None]:
  """Splits ``"train{classes=0-4,per_class=:400}"`` into the split to read (``"train"``) and
  the indices of the selected examples, in file order (``None``: no selector). ``classes=A-B``
  (or ``A,B`` with ``;``: ``classes=0;3;7``) keeps those labels; ``per_class=START:STOP``
  keeps, of each class, its examples ``START..STOP-1`` counted in file order. So
  ``train{per_class=:400}`` is a fixed, class-balanced subset and ``train{per_class=400:500}``
  a disjoint held-out one. ``labels`` may be ``None`` to only parse."""
  match = _SELECTOR.match(split.replace(" ", ""))
  if match is None:
    return split, None
  keep = None if labels is None else np.ones(len(labels), bool)
  for item in filter(None, match["body"].split(",")):
    key, _, value = item.partition("=")
    try:
      if key == "classes":
        wanted = set()
        for part in value.split(";"):
          low, _, high = part.partition("-")
          wanted.update(range(int(low), int(high or low) + 1))
        if labels is not None:
          keep &= np.isin(labels, sorted(wanted))
      elif key == "per_class":
        start, _, stop = value.partition(":")
        start, stop = int(start or 0), (int(stop) if stop else None)
        if labels is not None:
          rank = np.zeros(len(labels), np.int64)  # index of each example within its class
          for c in np.unique(labels):
            rank[labels == c] = np.arange(np.sum(labels == c))
          keep &= (rank >= start) & (rank < (np.inf if stop is None else stop))
      else:
        raise ValueError(key)
    except ValueError:
      raise errors.DataError(
          f"bad example selector {item!r} in split {split!r}",
          hint="e.g. 'train{per_class=:400}' or 'train{classes=0-4,per_class=:400}'"
      ) from None
  return match["split"], None if keep is None else np.flatnonzero(keep)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Whole global batches in one pass over ``num_examples``; the remainder is left out (each
  epoch's permutation changes which examples). Split over ``P`` processes with local
  batches of ``batch_size / P``, ``(num_examples // P) // (batch_size / P)`` is the same
  number."""
  return num_examples // batch_size
