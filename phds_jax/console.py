"""What the command-line entry points print: no backend-probe noise, and user errors as one line, not a traceback.

jax probes every installed backend plugin at start-up and logs, at INFO, each one that is absent ("Unable to
initialize backend 'tpu': ... libtpu.so"). On a CPU or GPU host that line is noise that reads like a failure;
`quiet_backend_probe` drops it (an explicitly requested platform that fails still raises, as jax does).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

_PROBE_PREFIX = "Unable to initialize backend"


class _DropBackendProbe(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno < logging.WARNING and str(record.msg).startswith(_PROBE_PREFIX))


def quiet_backend_probe() -> None:
  """Hides jax's INFO lines about optional backends that are not installed (idempotent)."""
  logger = logging.getLogger("jax._src.xla_bridge")
  if not any(isinstance(f, _DropBackendProbe) for f in logger.filters):
    logger.addFilter(_DropBackendProbe())


@contextlib.contextmanager
def user_errors(*types: type[BaseException]) -> Iterator[None]:
  """Turns the listed exception types (bad input: missing files, bad data, refused overwrites) into
  `error: message` on stderr and exit status 2; anything else keeps its traceback (a bug to report)."""
  try:
    yield
  except types as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
