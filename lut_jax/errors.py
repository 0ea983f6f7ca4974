"""The errors a user can fix, and how every command-line tool reports them.

A :class:`UserError` is bad input (a config value, a data set, a work directory, a
checkpoint): the tools print it as one line, ``lut_jax: error: <what>; hint: <how to fix>``,
and exit with status 2; anything else is a bug and keeps its traceback (user errors' too
with ``--debug`` or ``LUT_JAX_DEBUG=1``). :func:`run_app` starts every command-line tool.

This module imports only the standard library, so config files, the data modules (which
never import JAX) and the core can all raise these.
"""

from __future__ import annotations

import ast
import contextlib
import errno
import importlib.util
import logging
import os
import re
import sys
import traceback
import types
from typing import Callable, NoReturn, Optional, TypeVar

EXIT_USER_ERROR = 2
DEBUG_ENV = "LUT_JAX_DEBUG"


class UserError(Exception):
  """Input the user must fix. ``hint`` (optional) says how."""

  def __init__(self, message: str, hint: str = ""):
    super().__init__(message)
    self.hint = hint


class ConfigError(UserError, ValueError):
  """A configuration value is invalid; the message names the field."""


class DataError(UserError, ValueError):
  """A data set cannot be read as configured (missing, empty, a file gone bad)."""


class DataNotFoundError(DataError, FileNotFoundError):
  """A data set is not on this machine; also a FileNotFoundError for callers that catch
  missing files."""


class WorkdirError(UserError):
  """The work directory cannot be used (locked by another run, not writable, full, a
  checkpoint that does not match the config)."""


class NonFiniteError(UserError, FloatingPointError):
  """Training produced a NaN or infinite value; the state that holds it is never saved."""


def require(module: str, *, purpose: str, extra: str) -> None:
  """Raises a ``ConfigError`` naming the extra to install when ``module`` is missing (the
  core install has no TensorFlow, matplotlib or torch)."""
  if importlib.util.find_spec(module) is None:
    raise ConfigError(f"{purpose} needs {module}, which is not installed",
                      hint=f"pip install 'lut_jax[{extra}]'")


def describe_os_error(e: OSError, action: str = "") -> str:
  """One line for an OS error: what failed, on which path, and why in plain words."""
  where = f" {e.filename}" if e.filename else ""
  doing = f"{action}: " if action else ""
  if e.errno == errno.ENOSPC:
    return f"{doing}no space left on device{where}"
  if e.errno == errno.EDQUOT:
    return f"{doing}disk quota exceeded{where}"
  if e.errno in (errno.EACCES, errno.EPERM):
    return f"{doing}permission denied:{where}"
  if e.errno == errno.EROFS:
    return f"{doing}read-only file system:{where}"
  if isinstance(e, NotADirectoryError) or e.errno == errno.ENOTDIR:
    return f"{doing}not a directory (a file is in the way):{where}"
  if isinstance(e, FileNotFoundError):
    return f"{doing}{e.strerror or 'not found'}:{where}" if e.strerror else f"{doing}{e}"
  return f"{doing}{e.strerror or e}{where}"


def os_error_in(e: Optional[BaseException]) -> Optional[OSError]:
  """The OS error that caused ``e``, if any: an ``OSError`` in its chain of causes (Orbax
  wraps its background errors), or one TensorStore reports in its own error's message (a
  ``ValueError``: ``RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']``,
  how a full disk reaches an Orbax save)."""
  seen = set()
  while e is not None and id(e) not in seen:
    if isinstance(e, OSError) and e.errno is not None:
      return e
    code = re.search(r"\[os_error_code='?(\d+)", str(e))
    if code:
      return OSError(int(code.group(1)), os.strerror(int(code.group(1))))
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return None


def as_user_error(e: BaseException) -> Optional[UserError]:
  """``e`` as a :class:`UserError` when it is one the user can fix, else None (a bug)."""
  if isinstance(e, UserError):
    return e
  if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES,
                                            errno.EPERM, errno.EROFS, errno.ENOTDIR,
                                            errno.EISDIR, errno.ENOENT, errno.EEXIST):
    return UserError(describe_os_error(e))
  if isinstance(e, FileNotFoundError):  # raised with a message only (no errno)
    return UserError(str(e))
  return None


def debug_requested(argv: Optional[list[str]] = None) -> bool:
  argv = sys.argv if argv is None else argv
  return (os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in argv
          or "--debug=true" in argv or "--verbose" in argv)


def exit_with(e: BaseException, prog: str = "lut_jax", *, debug: bool = False) -> NoReturn:
  """Prints ``e`` as one line ``prog: error: ...[; hint: ...]`` on stderr and exits with
  status 2 (1 for a bug, after its traceback)."""
  user = as_user_error(e)
  if user is None or debug:
    traceback.print_exception(e)
  message = " ".join(str(user if user is not None else e).split()) or type(e).__name__
  hint = " ".join(getattr(user, "hint", "").split())
  print(f"{prog}: error: {message}" + (f"; hint: {hint}" if hint else ""), file=sys.stderr,
        flush=True)
  sys.exit(EXIT_USER_ERROR if user is not None else 1)


T = TypeVar("T")


def reporting_user_errors(fn: Callable[[], T], prog: str = "lut_jax",
                          argv: Optional[list[str]] = None) -> T:
  """Runs ``fn()``; a user error becomes one line and exit status 2 (see module doc)."""
  try:
    return fn()
  except Exception as e:  # noqa: BLE001 - classified in exit_with
    if as_user_error(e) is None:
      raise
    exit_with(e, prog, debug=debug_requested(argv))


def run_app(main: Callable[[list[str]], None], prog: str = "lut_jax", *,
            uses_tensorflow: bool = False) -> None:
  """``absl.app.run(main)`` where bad flags, bad config files and user errors raised by
  ``main`` all end as one line and exit status 2, under the name ``prog``. Adds a
  ``--debug`` flag; ``--help`` lists the flags of ``main``'s module; Orbax's INFO lines are
  kept out of the log; ``uses_tensorflow`` (tf.data) hides the GPUs from TensorFlow.
  """
  from absl import app, flags, logging as absl_logging  # local: the rest needs the stdlib

  if "debug" not in flags.FLAGS:
    flags.DEFINE_bool("debug", False, "Show the traceback of user errors too.")
  _show_flags_in_help(sys.modules[main.__module__])
  _report_config_file_errors()
  absl_logging.get_absl_handler().addFilter(_quiet_orbax)
  sys.unraisablehook = _quiet_closed_loop(sys.unraisablehook)

  def parse_flags(argv: list[str]) -> list[str]:
    fail = lambda e: exit_with(e, prog, debug=debug_requested(argv))  # noqa: E731
    try:
      rest = flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - flags, config files: all the user's to fix
      # A config file's own errors arrive as UserErrors (_report_config_file_errors);
      # config_flags raises its override errors (a misspelt key is an AttributeError).
      cause = e.__cause__ if isinstance(e, flags.Error) and e.__cause__ else e
      if not isinstance(cause, (UserError, flags.Error, ValueError, KeyError, AttributeError,
                                TypeError, OSError)):
        raise
      fail(as_user_error(cause) or ConfigError(_flag_message(cause)))
    return rest

  def run_main(argv: list[str]) -> None:
    if uses_tensorflow and importlib.util.find_spec("tensorflow") is not None:
      # tf.data runs on the host, but TensorFlow reserves most of every GPU's memory when it
      # first runs: hide the GPUs from it (JAX needs them) before anything runs.
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      with contextlib.suppress(RuntimeError):  # its devices are already set up: too late
        tf.config.set_visible_devices([], "GPU")
    reporting_user_errors(lambda: main(argv), prog, sys.argv)

  app.run(run_main, flags_parser=parse_flags)


def _show_flags_in_help(module: types.ModuleType) -> None:
  """Makes absl's ``--help`` list ``module``'s flags and ``--debug``: it lists those of the
  module named by ``sys.argv[0]``, which for a console script is the generated wrapper
  (no flags, no docstring: the tool's docstring is shown instead)."""
  from absl import flags  # local: the rest of this module needs only the stdlib

  for flag in flags.FLAGS.get_key_flags_for_module(module) + [flags.FLAGS["debug"]]:
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  wrapper = sys.modules["__main__"]
  if not wrapper.__doc__:
    wrapper.__doc__ = module.__doc__


def _report_config_file_errors() -> None:
  """Makes every config-file flag (``--config``) report whatever its file raises, while it
  loads or in ``get_config`` (a NameError, a SyntaxError, a missing file...), as one
  :class:`UserError`: ``--config FILE: <ErrorType>: <message>``, the original as its cause
  (``--debug`` shows its traceback)."""
  from absl import flags  # local: the rest of this module needs only the stdlib

  def reporting(name: str, parse: Callable[[str], object]) -> Callable[[str], object]:
    def load(argument: str) -> object:
      path = str(argument).split(":", 1)[0]
      try:
        config = parse(argument)
        # An OSError (the file missing or unreadable) is only raised when the config is
        # first used: raise it now.
        error = vars(config).get("_error") if type(config).__name__ == "_ErrorConfig" else None
      except Exception as e:  # noqa: BLE001 - the config file is the user's code
        error = e
        # It re-raises a TypeError or ValueError as a new one whose message is the
        # traceback: report the original.
        if isinstance(e, (TypeError, ValueError)) and type(e.__context__) is type(e):
          error = e.__context__
      if error is None:
        return config
      if not os.path.exists(path):  # instead of its list of every path it tried
        error = FileNotFoundError("no such file")
      # Not a ValueError: absl would recast it as a flag error with the cause dropped.
      raise UserError(f"--{name} {path}: {type(error).__name__}: "
                      f"{' '.join(str(error).split())}",
                      hint=getattr(error, "hint", "")) from error
    return load

  for name in flags.FLAGS:
    parser = flags.FLAGS[name].parser
    # By name, as _ErrorConfig: ml_collections does not export its class. Once (an
    # instance's own parse is the wrapper), should run_app run twice in a process.
    if type(parser).__name__ == "ConfigFileFlagParser" and "parse" not in vars(parser):
      parser.parse = reporting(name, parser.parse)


def _quiet_orbax(record: logging.LogRecord) -> bool:
  """Drops Orbax's INFO chatter (dozens of lines per checkpoint save or restore) so progress
  stays readable, and the tracebacks of a save that failed for the disk (full,
  read-only...), which the checkpointer reports in one line: Orbax logs one from each of its
  threads, asyncio one for each of its writes that failed after the first. Other warnings
  and errors still show."""
  if record.levelno < logging.WARNING:
    return "/orbax/" not in record.pathname
  error = record.exc_info[1] if record.exc_info else None
  # asyncio's "Future exception was never retrieved" of a TensorStore write carries no
  # Orbax frame (the write failed in TensorStore's threads): its logger names it instead.
  return not (os_error_in(error) and (record.name == "asyncio" or any(
      "/orbax/" in frame.filename for frame in traceback.extract_tb(error.__traceback__))))


def _quiet_closed_loop(hook: Callable[..., None]) -> Callable[..., None]:
  """``hook`` (``sys.unraisablehook``) without the "Event loop is closed" errors of a failed
  Orbax save: Orbax closes the event loop of a save at its first failed write, and each
  TensorStore write still in flight then reports its completion to that loop (dozens of
  tracebacks on a full disk); nothing waits for them any more."""
  def quiet(unraisable) -> None:
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"):
      hook(unraisable)
  return quiet


def _flag_message(e: BaseException) -> str:
  """The informative part of a flag error, on one line (a misspelt key's message is the
  repr of a string)."""
  text = str(e).strip()
  if isinstance(e, AttributeError):  # ConfigDict: "'\\'bse_lr\\'\\nDid you mean ...?'"
    try:
      text = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      pass
    text = f"unknown config field {text}"
  elif isinstance(e, KeyError) or not text:
    text = f"{type(e).__name__}: {text}"
  return " ".join(text.split())
