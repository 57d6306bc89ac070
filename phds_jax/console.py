"""Quiet command-line start-up: no backend-probe noise (user errors are `phds_jax.cli`'s).

jax probes every installed backend plugin at start-up and logs, at INFO, each one that is absent ("Unable to
initialize backend 'tpu': ... libtpu.so"). On a CPU or GPU host that line is noise that reads like a failure;
`quiet_backend_probe` drops it (an explicitly requested platform that fails still raises, as jax does).
"""

from __future__ import annotations

import logging

_PROBE_PREFIX = "Unable to initialize backend"


class _DropBackendProbe(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno < logging.WARNING and str(record.msg).startswith(_PROBE_PREFIX))


def quiet_backend_probe() -> None:
  """Hides jax's INFO lines about optional backends that are not installed (idempotent)."""
  logger = logging.getLogger("jax._src.xla_bridge")
  if not any(isinstance(f, _DropBackendProbe) for f in logger.filters):
    logger.addFilter(_DropBackendProbe())
