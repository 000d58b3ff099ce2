"""The one CLI layer of every entry point (`main`, `predict`, `export`, `bench`).

- ``fail(message)``: the one way a command reports bad input: one ``error: <message>`` line on
  stderr (whitespace folded to one line) and exit status 2.
- ``exit_status(exc)``: what an exception means at the top of a command: a ``UserError`` and an
  I/O failure (``OSError``, or a library error that names one: disk full, read-only, permission
  denied; ``ioerrors.describe`` gives the path and errno) are an ``error:`` line and 2; a
  ``preemption.Preempted`` is its own status (143 on SIGTERM, 130 on SIGINT; the loop saved and
  logged); Ctrl-C elsewhere is ``interrupted`` and 130. Anything else is a bug: None (re-raise).
- ``guarded(fn)``: a command's main function with that mapping and the log filter applied.
- ``quiet_libraries()``: keeps orbax / grain / jax INFO chatter out of the log, and drops the
  libraries' own records of a failed write (the command ends with one ``error:`` line instead).
- ``enable_compilation_cache()``: XLA's persistent compilation cache (``SLAMAGS_JAX_CACHE``).
- ``run(main, flags_parser)``: an absl program: huge pages first (``hugepages``), then ``app.run``.
- ``run_argparse(main)``: the same for an argparse program; ``ArgumentParser``: argparse with
  ``fail`` for its errors (``export``, ``bench``).
"""

from __future__ import annotations

import argparse
import functools
import logging as pylogging
import os
import sys
from typing import Any, Callable, NoReturn

from slamags_jax.runtime import ioerrors
from slamags_jax.runtime.errors import UserError

_NOISY = (f"{os.sep}orbax{os.sep}", f"{os.sep}grain{os.sep}", f"{os.sep}jax{os.sep}", f"{os.sep}jaxlib{os.sep}")


def error_line(message: Any) -> str:
  return f"error: {' '.join(str(message).split())}\n"


def fail(message: Any) -> NoReturn:
  """Writes one ``error:`` line to stderr and exits with status 2."""
  sys.stderr.write(error_line(message))
  sys.stderr.flush()
  sys.exit(2)


def exit_status(exc: BaseException) -> int | None:
  """Reports ``exc`` on stderr the command-line way and returns the exit status; None for a bug."""
  from slamags_jax.runtime import preemption  # numpy, not jax
  if isinstance(exc, preemption.Preempted):  # the loop saved its progress and logged so
    return exc.exit_code
  if isinstance(exc, KeyboardInterrupt):  # Ctrl-C outside a training loop: outputs are written atomically
    sys.stderr.write("interrupted\n")
    return 130
  if isinstance(exc, UserError):
    message = str(exc)
  elif isinstance(exc, Exception):
    message = ioerrors.describe(exc)  # disk full, read-only, permission denied: not a bug
    if message is None:
      return None
  else:
    return None
  sys.stderr.write(error_line(message))
  sys.stderr.flush()
  return 2


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``fn`` with the log filter installed and its failures mapped by ``exit_status`` (then ``sys.exit``)."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    quiet_libraries()
    try:
      return fn(*args, **kwargs)
    except (Exception, KeyboardInterrupt) as e:
      code = exit_status(e)
      if code is None:
        raise
      sys.exit(code)

  return wrapper


class QuietLibraries(pylogging.Filter):
  """Keeps checkpointing and runtime libraries' INFO chatter out of the run's log."""
  NOISY = _NOISY

  def filter(self, record: pylogging.LogRecord) -> bool:
    if record.levelno >= pylogging.ERROR and library_io_failure(record):
      return False  # the run ends with one `error:` line naming the path and errno
    return record.levelno >= pylogging.WARNING or not any(s in record.pathname for s in self.NOISY)


def library_io_failure(record: pylogging.LogRecord) -> bool:
  """An orbax / asyncio record about a failed write (tensorstore's OS error code in it or its exception)."""
  if not any(s in record.pathname for s in _NOISY + (f"{os.sep}asyncio{os.sep}",)):
    return False
  text = record.getMessage() + (f" {record.exc_info[1]}" if record.exc_info and record.exc_info[1] else "")
  return ioerrors.mentions_os_error(text)


def quiet_libraries() -> None:
  """Installs ``QuietLibraries`` on absl's log handler (once)."""
  from absl import logging
  handler = logging.get_absl_handler()
  if not any(isinstance(f, QuietLibraries) for f in handler.filters):
    handler.addFilter(QuietLibraries())


def enable_compilation_cache() -> None:
  """XLA's persistent cache: repeated runs with the same shapes skip compilation (``SLAMAGS_JAX_CACHE=off``: none)."""
  import jax
  cache = os.environ.get("SLAMAGS_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "slamags-jax", "xla"))
  if cache and cache.lower() != "off":
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def parse_absl_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with a bad flag as one ``error:`` line and status 2."""
  from absl import flags
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(e)


def run(main: Callable[[list[str]], Any], flags_parser: Callable[[list[str]], list[str]] | None = None) -> None:
  """Runs an absl program: re-executes once for huge pages when useful, then ``absl.app.run``."""
  from absl import app

  from slamags_jax.runtime import hugepages
  hugepages.reexec_if_useful()  # once, before any work: huge pages for XLA's buffers
  app.run(main, flags_parser=_help_exits_zero(flags_parser or parse_absl_flags))


_HELP = ("--help", "-help", "-h", "--helpshort", "--helpfull", "--helpxml", "-?")


def _help_exits_zero(parser: Callable[[list[str]], list[str]]) -> Callable[[list[str]], list[str]]:
  """absl prints ``--help`` and exits 1; asking for help is not a failure, so it exits 0 (as argparse)."""
  def parse(argv: list[str]) -> list[str]:
    try:
      return parser(argv)
    except SystemExit as e:
      if e.code == 1 and any(a in _HELP for a in argv[1:]):
        sys.exit(0)
      raise
  return parse


def run_argparse(main: Callable[[], int | None]) -> NoReturn:
  """Runs an argparse program: huge pages as ``run``, then ``sys.exit(main())``."""
  from slamags_jax.runtime import hugepages
  hugepages.reexec_if_useful()
  sys.exit(main())


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose errors are one ``error:`` line and status 2, as every other command's."""

  def error(self, message: str) -> NoReturn:
    fail(message)
