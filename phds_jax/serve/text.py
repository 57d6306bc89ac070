"""Incremental detokenization with stop strings, for streaming text out of a token-by-token generator."""

from __future__ import annotations

from collections.abc import Sequence

import tokenizers


class TextStream:
  """Incremental detokenization of one request's tokens, cut at the first stop string.

  Each token re-decodes the whole output (decoding is prefix-stable for the byte-level and metaspace
  decoders, and this costs microseconds at our lengths), then releases only text that can no longer change:
  a trailing U+FFFD (a multi-byte character split across tokens) and any tail that could still grow into a
  stop string are held back until the next token or the end.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, stop: Sequence[str] = ()):
    self._tokenizer = tokenizer
    self._stop = [s for s in stop if s]
    self.ids: list[int] = []
    self.text = ""
    self.stopped = False
    self._sent = 0

  def push(self, token: int) -> str:
    """Adds a token; returns the newly released text (sets `stopped` when a stop string appeared)."""
    self.ids.append(token)
    text = self._tokenizer.decode(self.ids, skip_special_tokens=True)
    stable = len(text.rstrip("\ufffd"))
    hits = [p for s in self._stop if 0 <= (p := text.find(s, self._sent)) and p + len(s) <= stable]
    if hits:
      end = min(hits)
      self.stopped, self.text = True, text[:end]
    else:
      self.text = text
      end = stable - self._held_back(text[self._sent:stable])
    delta, self._sent = text[self._sent:end], end
    return delta

  def finish(self) -> str:
    """The text still held back, once the request has ended."""
    delta, self._sent = self.text[self._sent:], len(self.text)
    return delta

  def _held_back(self, tail: str) -> int:
    """Length of the longest suffix of `tail` that is a proper prefix of some stop string."""
    for n in range(min(len(tail), max((len(s) for s in self._stop), default=1) - 1), 0, -1):
      if any(s.startswith(tail[-n:]) for s in self._stop):
        return n
    return 0
