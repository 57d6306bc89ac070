"""Perplexity documents: WikiText (harness conventions) and plain text.

WikiText (`wikitext:PATH`): the harness scores each *article* of wikitext-2-raw-v1 test after detokenizing it
(" @-@ " -> "-", " , " -> ", ", ...), but counts words (`len(re.split(r"\\s+", page))`) and UTF-8 bytes on the
original page. Accepted inputs: records with a `page` field (EleutherAI/wikitext_document_level), line records
with a `text` field (the HF `wikitext` parquet, or tfds line-per-record data), or the raw `wiki.test.raw` text
file; lines are grouped into articles at top-level headings (" = Title = "). tfds 4.9.10 ships no wikitext
builder, so there is no tfds default.

Plain text (`ppl:PATH`): a .txt file is one document, JSONL/parquet records give one document per `text`
field; words and bytes are counted on the text itself.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from phds_jax.evaluation.items import PplDoc
from phds_jax.evaluation.records import EvalDataError, Located, need

_HEADING = re.compile(r"^ = [^=].* = $")

# The harness's WikiText detokenization, in order: (regex?, pattern, replacement).
_DETOKENIZE: tuple[tuple[bool, str, str], ...] = (
    (False, "s '", "s'"),
    (True, r"/' [0-9]/", r"/'[0-9]/"),
    (False, " @-@ ", "-"), (False, " @,@ ", ","), (False, " @.@ ", "."),
    (False, " : ", ": "), (False, " ; ", "; "), (False, " . ", ". "), (False, " ! ", "! "),
    (False, " ? ", "? "), (False, " , ", ", "),
    (True, r"\(\s*([^\)]*?)\s*\)", r"(\1)"), (True, r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
    (True, r"{\s*([^}]*?)\s*}", r"{\1}"), (True, r"\"\s*([^\"]*?)\s*\"", r'"\1"'),
    (True, r"'\s*([^']*?)\s*'", r"'\1'"),
    (False, "= = = =", "===="), (False, "= = =", "==="), (False, "= =", "=="),
    (False, " \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"), (False, " \n", "\n"), (False, "\n ", "\n"),
    (False, " N ", " 1 "), (False, " 's", "'s"),
)


def wikitext_detokenize(text: str) -> str:
  for is_regex, pattern, replacement in _DETOKENIZE:
    text = re.sub(pattern, replacement, text) if is_regex else text.replace(pattern, replacement)
  return text


def count_words(text: str) -> int:
  return len(re.split(r"\s+", text))


def split_articles(lines: Sequence[str]) -> list[str]:
  """Joins WikiText lines (each ending in "\\n", or blank) into articles, starting one at each top heading."""
  articles: list[list[str]] = []
  for line in lines:
    if _HEADING.match(line.rstrip("\n")) or not articles:
      articles.append([])
    articles[-1].append(line if line.endswith("\n") or not line else line + "\n")
  return [text for text in ("".join(a) for a in articles) if text.strip()]


def _lines_of(docs: Sequence[Located], task: str) -> list[str]:
  lines: list[str] = []
  for where, doc in docs:
    text = need(doc, "text", where, task)
    if not isinstance(text, str):
      raise EvalDataError(f"{where}: {task}: field 'text' must be a string")
    lines.extend(text.splitlines(keepends=True) if "\n" in text.rstrip("\n") else [text])
  return lines


def wikitext_docs(docs: Sequence[Located], task: str = "wikitext",
                  source: str = "wikitext") -> list[tuple[str, PplDoc]]:
  """Article documents (detokenized text; words and bytes of the original) from any accepted input."""
  if docs and "page" in docs[0][1]:
    pages = [(where, need(doc, "page", where, task)) for where, doc in docs]
  else:
    pages = [(f"{source}: article {i}", a) for i, a in enumerate(split_articles(_lines_of(docs, task)))]
  out = [(where, PplDoc(wikitext_detokenize(p), count_words(p), len(p.encode("utf-8"))))
         for where, p in pages if p.strip()]
  if not out:
    raise EvalDataError(f"{source}: {task}: no non-empty articles")
  return out


def text_docs(docs: Sequence[Located], task: str = "ppl", source: str = "") -> list[tuple[str, PplDoc]]:
  out = []
  for where, doc in docs:
    text = need(doc, "text", where, task)
    if not isinstance(text, str) or not text.strip():
      raise EvalDataError(f"{where}: {task}: field 'text' must be a non-empty string")
    out.append((where, PplDoc(text, count_words(text), len(text.encode("utf-8")))))
  return out
