"""The errors a user can fix, and the hints they carry: the ground floor every layer raises from.

A `UserError` is printed by the entry points (cli.py) as one `error:` line and one `fix:` line, exit status 2.
`close_matches` and `config_field_names` build the "did you mean ...?" hints for a mistyped name.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable


class UserError(Exception):
  """An error the user can fix (bad config, bad input file, refused resume); `fix` says how."""

  def __init__(self, message: str, fix: str | None = None):
    super().__init__(message)
    self.fix = fix


def close_matches(name: str, candidates: Iterable[str], n: int = 3) -> str:
  """' (did you mean a, b?)' for the nearest candidates by difflib, or ''."""
  hits = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.6)
  return f" (did you mean {', '.join(hits)}?)" if hits else ""


def config_field_names(config: Any, prefix: str = "") -> list[str]:
  """Every dotted field name of a ConfigDict (nested dicts included)."""
  names = []
  for key, value in config.items():
    name = f"{prefix}{key}"
    names.append(name)
    if hasattr(value, "items"):
      names += config_field_names(value, name + ".")
  return names
