"""Metric writers for the training loops, with or without TensorFlow.

With TensorFlow, CLU's TensorBoard writer beside log lines; without it (GPU images often
lack TensorFlow), a writer with the same methods over ``tensorboardX``; without that too,
log lines only, said once. The log gets scalars only: hyperparameters and images are for
TensorBoard (a run's config is in its ``config.json``).
"""

from __future__ import annotations

import importlib.util
from typing import Any, Mapping

from absl import logging
import numpy as np


class LoggingWriter:
  """Scalars as one log line per step; images and hparams are not logged (TensorBoard
  shows them)."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    logging.info("[%d] %s", step, ", ".join(f"{k}={float(v):.6g}" for k, v in scalars.items()))

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    del step, images

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    del hparams

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class TensorBoardXWriter(LoggingWriter):
  """Event files in ``logdir`` through ``tensorboardX``, and the log lines."""

  def __init__(self, logdir: str):
    from tensorboardX import SummaryWriter  # local: optional dependency

    self._writer = SummaryWriter(logdir)
    self._warned = False

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    super().write_scalars(step, scalars)
    for name, value in scalars.items():
      self._writer.add_scalar(name, float(value), step)

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    if importlib.util.find_spec("PIL") is None:  # tensorboardX encodes PNGs with pillow
      if not self._warned:
        logging.warning("pillow is not installed: no images in TensorBoard (pip install "
                        "pillow).")
        self._warned = True
      return
    for name, value in images.items():  # NHWC in [0, 1], like CLU's writers take them
      self._writer.add_images(name, np.asarray(value, np.float32), step, dataformats="NHWC")

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._writer.add_text("hparams", "\n".join(f"    {k}: {v}" for k, v in hparams.items()))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def create_writer(logdir: str, *, just_logging: bool = False) -> Any:
  """CLU's TensorBoard writer and :class:`LoggingWriter` when TensorFlow is installed, else
  :class:`TensorBoardXWriter` (or :class:`LoggingWriter` without tensorboardX).
  ``just_logging``: log lines only (the processes other than 0 of a multi-host run)."""
  if just_logging:
    return LoggingWriter()
  if importlib.util.find_spec("tensorflow") is not None:
    from clu import metric_writers  # local: imports TensorFlow

    # Not CLU's default writer: its logging half prints the hyperparameters as one long
    # line and every image's shape.
    return metric_writers.MultiWriter([metric_writers.SummaryWriter(logdir),
                                       LoggingWriter()])
  if importlib.util.find_spec("tensorboardX") is None:
    logging.warning("Neither TensorFlow nor tensorboardX is installed: metrics go to the log "
                    "only (pip install tensorboardX for TensorBoard files).")
    return LoggingWriter()
  return TensorBoardXWriter(logdir)
