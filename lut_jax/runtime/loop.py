"""What the loops of pre-training and the supervised protocols (:func:`train_evaluate_save`)
share: stopping for preemption, and the guard that keeps NaN and infinity out of every
checkpoint (each step reports its :func:`first_nonfinite_step`; an :class:`Interval` merges
and checks it when read, before every save). TensorFlow-free (CLU's metrics only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from absl import logging
from clu import metrics as clu_metrics
import flax
import jax
import jax.numpy as jnp

from lut_jax import errors

if TYPE_CHECKING:  # a type only: the step modules import this one without Orbax
  from lut_jax.runtime import checkpointing

# ``first_nonfinite_step`` of a step whose new state is finite (merged by minimum).
ALL_FINITE = jnp.iinfo(jnp.int32).max


def all_finite(tree: Any) -> jax.Array:
  """Whether every floating-point leaf of ``tree`` is free of NaN and infinity."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def first_nonfinite_step(step: jax.Array, *trees: Any) -> jax.Array:
  """A step's ``first_nonfinite_step`` metric: ``step`` (the step just taken, counted from
  one) if any leaf of ``trees`` is NaN or infinite, else :data:`ALL_FINITE`."""
  return jnp.where(all_finite(trees), ALL_FINITE, step)


@flax.struct.dataclass
class FirstNonFiniteStep(clu_metrics.Metric):
  """The first step of an interval whose new state holds a NaN or an infinity (merged by
  minimum; :data:`ALL_FINITE` when there is none)."""

  step: jax.Array

  @classmethod
  def from_model_output(cls, first_nonfinite_step: jax.Array, **_) -> FirstNonFiniteStep:
    return cls(step=first_nonfinite_step)

  def merge(self, other: FirstNonFiniteStep) -> FirstNonFiniteStep:
    return type(self)(step=jnp.minimum(self.step, other.step))

  def compute(self) -> jax.Array:
    return self.step


class Interval:
  """The metrics of the steps since the last read, merged on device: a
  ``clu.metrics.Collection`` with ``loss``, ``grad_norm`` and ``first_nonfinite_step``
  (:class:`FirstNonFiniteStep`). Reading is the loop's host synchronisation."""

  def __init__(self, metrics: type[clu_metrics.Collection], *, start_step: int,
               batch_size: int, checkpointer: Optional[checkpointing.Checkpointer],
               config_prefix: str, clips: bool = True):
    self._metrics, self._batch_size, self._ckpt = metrics, batch_size, checkpointer
    # The error's hint names ``<config_prefix>.base_lr`` (and ``.grad_clip_norm`` if
    # ``clips``: the recipe has one).
    self._config_prefix, self._clips = config_prefix, clips
    self._acc: Optional[clu_metrics.Collection] = None
    self._start, self._start_time = start_step, time.time()
    self._timed: dict[str, float] = {}  # host seconds per named wait, this interval

  @contextlib.contextmanager
  def timed(self, name: str) -> Iterator[None]:
    """Counts the host time spent inside as ``name`` (waiting for input, a checkpoint...);
    :meth:`read` reports its share of the interval as ``time_share/<name>``: with steps
    dispatched asynchronously, time the host could not spend feeding the device."""
    start = time.time()
    try:
      yield
    finally:
      self._timed[name] = self._timed.get(name, 0.0) + time.time() - start

  def add(self, step_metrics: dict[str, jax.Array]) -> None:
    update = self._metrics.single_from_model_output(**step_metrics)
    self._acc = update if self._acc is None else self._acc.merge(update)

  def restart_clock(self, done: int) -> None:
    """Rates from here on count from step ``done`` (e.g. not the first step's compilation);
    the metrics merged so far stay."""
    self._start, self._start_time = done, time.time()
    self._timed = {}

  def read(self, done: int) -> dict[str, float]:
    """The interval's scalars (and ``images_per_sec``) up to step ``done``; starts the next.
    A NonFiniteError when a step of it produced a NaN or an infinity, a WorkdirError when a
    background save failed."""
    scalars = {k: float(v) for k, v in self._acc.compute().items()}
    first_bad = int(scalars.pop("first_nonfinite_step"))
    if first_bad != ALL_FINITE:
      p = self._config_prefix
      last_good, hint = "Nothing is saved (no checkpoint directory)", ""
      if self._ckpt is not None:
        self._ckpt.wait()  # so that the error names the last good checkpoint
        last_good = (f"Last good checkpoint: step {self._ckpt.latest_step()} in "
                     f"{self._ckpt.directory}")
        hint = "; a rerun resumes from the last good checkpoint"
      raise errors.NonFiniteError(
          f"training produced NaN or infinite values at step {first_bad} (loss "
          f"{scalars['loss']}, grad_norm {scalars['grad_norm']} between steps "
          f"{self._start + 1} and {done}); that state was not saved. {last_good}",
          hint=f"lower {p}.base_lr, {f'set {p}.grad_clip_norm, ' if self._clips else ''}"
               f"or check the data{hint}")
    if self._ckpt is not None:
      self._ckpt.check_for_errors()  # a background save that failed stops the run here
    elapsed = max(time.time() - self._start_time, 1e-9)
    if done > self._start:  # none when the clock restarted at this step
      scalars["images_per_sec"] = (done - self._start) * self._batch_size / elapsed
      scalars.update({f"time_share/{k}": v / elapsed for k, v in self._timed.items()})
    self._acc, self._start, self._start_time = None, done, time.time()
    self._timed = {}
    return scalars


class PreemptionGuard:
  """Says when to save and stop for a preemption: after SIGTERM, or at the step Orbax's
  ``reached_preemption`` names on every process once any got a notice (multi-host). The SIGTERM
  handler is for single-process runs only: with several processes every host must stop at the
  same step (a save is a collective), which JAX's preemption service decides; a local handler
  would also replace that service's own. Without a checkpointer nothing could be saved: SIGTERM
  keeps its own handler (it ends the process)."""

  def __init__(self, checkpointer: Optional[checkpointing.Checkpointer]):
    self._ckpt = checkpointer
    self.requested = False
    self._previous = None  # the handler to put back on exit

  def __enter__(self) -> PreemptionGuard:
    if jax.process_count() > 1 or self._ckpt is None:
      return self
    def handler(signum, frame):  # noqa: ARG001
      logging.warning("SIGTERM received: saving a checkpoint and stopping.")
      self.requested = True
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
      self._previous = None
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def stop(self, step: int) -> bool:
    """Whether to save and stop after ``step``; once true, it stays true."""
    self.requested = self.requested or (self._ckpt is not None
                                        and self._ckpt.reached_preemption(step))
    return self.requested


@dataclasses.dataclass
class SupervisedRun:
  """What :func:`train_evaluate_save` returns: the final state, the last evaluation, the
  last step done, and whether a preemption stopped the run there."""

  state: Any
  last: dict[str, float]
  done: int
  stopped: bool


def train_evaluate_save(*, name: str, state: Any, train_step: Callable, train_iter: Any,
                        step_key: jax.Array, start_step: int, total_steps: int,
                        eval_every: int, log_every: int, interval: Interval, writer: Any,
                        checkpointer: Optional[checkpointing.Checkpointer],
                        evaluate: Callable[[Any], dict[str, float]], best_metric: str,
                        report: Optional[Callable[[int], Any]] = None) -> SupervisedRun:
  """The loop of the supervised protocols (linear probe, fine-tuning, segmentation): steps
  ``train_step(state, next(train_iter), fold_in(step_key, step))``; metrics read (so the
  non-finite guard runs) every ``log_every`` steps and before every save; every
  ``eval_every`` steps, at the end and on preemption an evaluation (``evaluate(state)``),
  logged and saved with the checkpoint ranked by ``best_metric`` (none saved without a
  ``checkpointer``). A run resumed after its end evaluates the restored state."""
  last, done, stopped = {}, start_step, False
  with PreemptionGuard(checkpointer) as preemption:
    for step in range(start_step, total_steps):
      state, metrics = train_step(state, next(train_iter), jax.random.fold_in(step_key, step))
      interval.add(metrics)
      done = step + 1
      if report is not None:
        report(done)
      stopped = preemption.stop(done)
      save = done % eval_every == 0 or done == total_steps or stopped
      if done % log_every == 0 or save:  # every save is guarded
        writer.write_scalars(done, {f"train/{k}": v for k, v in interval.read(done).items()})
      if save:
        last = evaluate(state)
        writer.write_scalars(done, {f"eval/{k}": v for k, v in last.items()})
        logging.info("%s step %d/%d: %s", name, done, total_steps, last)
        if checkpointer is not None:
          checkpointer.save(done, state, force=True,
                            metrics={best_metric: last[best_metric]})
      if stopped:
        logging.warning("%s stopped for preemption at step %d; rerun to resume", name, done)
        break
  if not last:  # resumed after the end: evaluate the restored state
    last = evaluate(state)
  return SupervisedRun(state, last, done, stopped)
