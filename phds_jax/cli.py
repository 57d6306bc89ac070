"""Command-line error handling shared by phds_jax's entry points: a user error is one line and exit code 2.

    from phds_jax import cli
    if __name__ == "__main__":
      cli.run(main)          # instead of absl.app.run(main)

A `UserError` (or any error in `USER_ERRORS`) prints `error: <message>` and, when known, `fix: <hint>` on
stderr and exits with status 2, without a traceback; `--debug` re-raises it with the full traceback. Other
exceptions (bugs) keep their traceback. Bad `--config.FIELD=value` overrides, which ml_collections rejects
while absl parses flags (before `main` runs), get the same treatment with close-match hints for the field.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import threading
from typing import Any, Callable, Sequence

from absl import app, flags

from phds_jax.data.errors import DataError
from phds_jax.errors import UserError, close_matches, config_field_names
from phds_jax.hf import CheckpointError
from phds_jax.models.config import ConfigError

EXIT_USER_ERROR = 2


# Reported as user errors: ours, and the errors a bad data file, checkpoint or model config raises.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, DataError, CheckpointError, ConfigError,
                                                FileNotFoundError)


def format_user_error(err: BaseException) -> str:
  fix = getattr(err, "fix", None)
  text = f"error: {_first_line(str(err), 2000)}"
  return text + (f"\nfix: {fix}" if fix else "")


def _debug_requested(argv: Sequence[str]) -> bool:
  return any(a in ("--debug", "--debug=true", "--debug=True", "--debug=1") for a in argv)


def _config_file(argv: Sequence[str]) -> tuple[str, str | None] | None:
  for a in argv:
    if a.startswith("--config="):
      path, _, arg = a[len("--config="):].partition(":")
      return path, arg or None
  return None


def _load_config(path: str, arg: str | None) -> Any:
  spec = importlib.util.spec_from_file_location("_phds_cli_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


def explain_override_error(argv: Sequence[str], err: BaseException) -> UserError:
  """A readable UserError for a `--config.X=...` override that ml_collections refused."""
  overrides = [a for a in argv if a.startswith("--config.")]
  located = _config_file(argv)
  names: list[str] = []
  if located:
    try:
      names = config_field_names(_load_config(*located))
    except Exception:  # pylint: disable=broad-except
      names = []
  for a in overrides:
    field = a[len("--config."):].partition("=")[0]
    if names and field not in names:
      return UserError(f"unknown config field {field!r} in {a}{close_matches(field, names)}",
                       fix=f"remove or rename it; {located[0]} (and configs/base.py) define the fields")
  return UserError(f"bad config override ({type(err).__name__}: {err}) in {' '.join(overrides) or argv[1:]}",
                   fix="check the value's type against the config file's default")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config-override and flag errors turned into one-line user errors."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _exit_user_error(UserError(str(e), fix=f"{argv[0]} --help lists the flags"), argv, e)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    _exit_user_error(explain_override_error(argv, e), argv, e)
  return argv  # unreachable


def _exit_user_error(user_err: BaseException, argv: Sequence[str], cause: BaseException | None = None) -> None:
  if _debug_requested(argv):
    raise (cause or user_err)
  print(format_user_error(user_err), file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


class ConciseLibraryErrors(logging.Filter):
  """Library error logs keep their first line but lose their traceback (a failed save logs one per thread);
  phds_jax's own records, and everything under --debug, are untouched."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info and "phds_jax" not in record.pathname:
      record.msg, record.args = _first_line(record.getMessage()), None
      record.exc_info = record.exc_text = None
    return True


def _first_line(text: str, limit: int = 400) -> str:
  line = text.strip().splitlines()[0] if text.strip() else ""
  return line[:limit] + (" ..." if len(line) > limit else "")


def _concise_thread_error(args: threading.ExceptHookArgs) -> None:
  """A library's background thread that dies (e.g. Orbax's writer after a failed save) gets one line."""
  name = args.thread.name if args.thread is not None else "?"
  print(f"warning: background thread {name}: {args.exc_type.__name__}: {_first_line(str(args.exc_value))}",
        file=sys.stderr)


def run(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> None:
  """`absl.app.run(main)` with user errors reported as one line and exit code 2 (`--debug`: traceback)."""
  argv = list(sys.argv if argv is None else argv)

  def guarded(args):
    if not _debug_requested(argv):
      for handler in logging.getLogger().handlers:
        handler.addFilter(ConciseLibraryErrors())
      threading.excepthook = _concise_thread_error
    try:
      return main(args)
    except USER_ERRORS as e:
      _exit_user_error(e, argv)

  app.run(guarded, argv=argv, flags_parser=parse_flags)


if "debug" not in flags.FLAGS:  # one definition, whichever entry point imports this first
  flags.DEFINE_bool("debug", False, "Show the full traceback of user errors (bad config, bad files).")
