"""Task registry and task specs.

A spec is `NAME` (read from tfds under `data_dir`), `NAME:PATH` (the same task from a local JSONL / JSON /
parquet file in the Hugging Face schema of the harness's dataset), `NAME:tfds:DATASET[/CONFIG]/SPLIT` (another
prepared tfds dataset, e.g. `boolq:tfds:bool_q/validation`), `jsonl:PATH` (generic multiple choice, see
`items.generic_mc`), `ppl:PATH` (perplexity of plain text). Defaults (tfds name, split) follow the harness's
splits: ARC / OpenBookQA test, the rest validation. sciq, siqa and wikitext have no tfds builder in
tensorflow-datasets 4.9.10, so they need a PATH.

Primary metric (the one averaged, plotted and used for agreement): acc_norm where the harness's leaderboards
use it for length-varying choices (arc_challenge, hellaswag, openbookqa, piqa, sciq), acc otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

from phds_jax.evaluation import items, perplexity
from phds_jax.evaluation.records import EvalDataError, read_file, read_tfds

MC, PPL, GEN = "mc", "ppl", "gen"
PPL_METRICS: tuple[str, ...] = ("token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")


@dataclasses.dataclass(frozen=True)
class Task:
  """A named evaluation: where its documents come from and how each becomes a scoring item."""

  name: str
  kind: str  # MC, PPL or GEN
  convert: Callable  # MC/GEN: (doc, where, task) -> item; PPL: (docs, task, source) -> [(where, PplDoc)]
  primary: str
  metrics: tuple[str, ...]
  prompt: str  # the format, for reports
  tfds: tuple[str, str] | None = None  # (name, split)
  path: str | None = None  # local file instead of tfds

  @property
  def source(self) -> str:
    if self.path:
      return self.path
    return f"tfds:{self.tfds[0]}/{self.tfds[1]}" if self.tfds else "(none)"

  def load(self, data_dir: str | None = None, limit: int | None = None) -> list[tuple[str, object]]:
    """(location, item) for the first `limit` documents (perplexity: articles / documents)."""
    if self.path:
      docs = read_file(self.path, None if self.kind == PPL else limit)
    elif self.tfds:
      docs = read_tfds(*self.tfds, data_dir=data_dir, limit=None if self.kind == PPL else limit)
    else:
      raise EvalDataError(f"{self.name}: no tfds dataset is available for this task; pass {self.name}:PATH "
                          "to a local JSONL/parquet file")
    if self.kind == PPL:
      return self.convert(docs, self.name, self.source)[:limit]
    return [(where, self.convert(doc, where, self.name)) for where, doc in docs]


_MC_ACC = ("acc",)
_MC_ALL = ("acc", "acc_norm", "acc_bytes")


def _mc(name: str, convert: Callable, prompt: str, tfds: tuple[str, str] | None, primary: str = "acc",
        metrics: tuple[str, ...] = _MC_ALL) -> Task:
  return Task(name, MC, convert, primary, metrics, prompt, tfds)


_QA = "Question: {question}\\nAnswer: → ' ' + choice"
REGISTRY: dict[str, Task] = {t.name: t for t in (
    _mc("arc_easy", items.arc, _QA, ("ai2_arc/ARC-Easy", "test")),
    _mc("arc_challenge", items.arc, _QA, ("ai2_arc/ARC-Challenge", "test"), "acc_norm"),
    _mc("boolq", items.boolq, "{passage}\\nQuestion: {question}?\\nAnswer: → ' no' / ' yes'",
        ("super_glue/boolq", "validation")),
    _mc("hellaswag", items.hellaswag, "preprocess({activity_label}: {ctx_a} {ctx_b.capitalize()}) → "
        "' ' + preprocess(ending)", ("hellaswag", "validation"), "acc_norm"),
    _mc("piqa", items.piqa, "Question: {goal}\\nAnswer: → ' ' + sol1 / sol2", ("piqa", "validation"),
        "acc_norm"),
    _mc("sciq", items.sciq, "{support}\\nQuestion: {question}\\nAnswer: → ' ' + [d1, d2, d3, correct]", None,
        "acc_norm"),
    _mc("winogrande", items.winogrande, "sentence[:_] + option → ' ' + sentence[_+1:].strip() (suffix scored)",
        ("winogrande", "validation"), metrics=_MC_ACC),
    _mc("siqa", items.siqa, "Q: {context} {question}\\nA: → ' ' + answerA/B/C", None),
    _mc("openbookqa", items.openbookqa, "{question_stem} → ' ' + choice", ("openbookqa", "test"), "acc_norm"),
    Task("triviaqa", GEN, items.triviaqa, "exact_match", ("exact_match",),
         "Question: {question}?\\nAnswer: → greedy, stop at newline", ("trivia_qa/rc.nocontext", "validation")),
    Task("wikitext", PPL, perplexity.wikitext_docs, "word_perplexity", PPL_METRICS,
         "detokenized article, rolling windows"),
)}

_GENERIC = {
    "jsonl": lambda path: Task(f"jsonl:{Path(path).stem}", MC, items.generic_mc, "acc", _MC_ALL,
                               "{context} → ' ' + choice", path=path),
    "ppl": lambda path: Task(f"ppl:{Path(path).stem}", PPL, perplexity.text_docs, "word_perplexity",
                             PPL_METRICS, "text, rolling windows", path=path),
}


def available() -> list[str]:
  return sorted(REGISTRY) + [f"{g}:PATH" for g in _GENERIC]


def get_task(spec: str) -> Task:
  """The Task for a spec string (see the module docstring); unknown names list the valid ones."""
  name, _, path = spec.strip().partition(":")
  if name in _GENERIC:
    if not path:
      raise ValueError(f"task {spec!r}: {name}: needs a file, as {name}:PATH")
    return _GENERIC[name](path)
  if name not in REGISTRY:
    raise ValueError(f"unknown task {name!r}; available: {', '.join(available())}")
  task = REGISTRY[name]
  if path.startswith("tfds:"):
    dataset, _, split = path[len("tfds:"):].rpartition("/")
    if not dataset or not split:
      raise ValueError(f"task {spec!r}: expected {name}:tfds:DATASET[/CONFIG]/SPLIT")
    return dataclasses.replace(task, tfds=(dataset, split))
  return dataclasses.replace(task, path=path) if path else task


def get_tasks(specs: Sequence[str | Task]) -> list[Task]:
  tasks = [s if isinstance(s, Task) else get_task(s) for s in specs]
  names = [t.name for t in tasks]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f"duplicate task names {duplicates}")
  if not tasks:
    raise ValueError("no tasks given")
  return tasks
