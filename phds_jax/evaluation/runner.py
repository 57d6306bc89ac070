"""`evaluate`: every task at every k with one loaded checkpoint, plus the cross-k summaries.

Each task's documents are loaded and tokenized once and then scored at each k (k only changes the model call).
The summary (what `results.json` holds) has, per task and k, every metric with its 95% bootstrap CI and n; per
task the relative drop of the primary metric versus the reference k (k_pre when evaluated, else the largest k;
perplexity: the relative increase) and the agreement matrix across k (same chosen answer: the primary metric's
choice for multiple choice, the normalised answer for generation); and the same over the average of the
multiple-choice tasks.
"""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tokenizers
from tqdm.auto import tqdm

from phds_jax import kplan
from phds_jax.evaluation import metrics as M
from phds_jax.evaluation import report
from phds_jax.evaluation.encoding import TextEncoder
from phds_jax.evaluation.engine import Engine
from phds_jax.evaluation.records import EvalDataError
from phds_jax.evaluation.results import EvalResults, Record
from phds_jax.evaluation.tasks import GEN, MC, PPL, Task, get_tasks
from phds_jax.models.config import ModelConfig


# ------------------------------------------------------------------------------------------- per task kind


def _mc_requests(task: Task, located: list[tuple[str, Any]], encoder: TextEncoder,
                 max_length: int) -> tuple[list, list[list[int]]]:
  """Unique token-level requests, and per item the request index of each choice."""
  requests, index, slots = [], {}, []
  for where, item in located:
    row = []
    for ctx, cont in zip(item.contexts, item.continuations):
      try:
        pair = encoder.encode_pair(ctx, cont)
      except ValueError as e:
        raise EvalDataError(f"{where}: {task.name}: {e}") from e
      if len(pair[1]) > max_length:
        raise EvalDataError(f"{where}: {task.name}: continuation of {len(pair[1])} tokens exceeds "
                            f"max_length={max_length}")
      key = (tuple(pair[0]), tuple(pair[1]))
      if key not in index:
        index[key] = len(requests)
        requests.append(pair)
      row.append(index[key])
    slots.append(row)
  return requests, slots


class _Prepared:
  """A task's items and their token-level requests, built once for all k."""

  def __init__(self, task: Task, located: list[tuple[str, Any]], encoder: TextEncoder, engine: Engine):
    self.task, self.ids = task, [w for w, _ in located]
    self.items = [item for _, item in located]
    if task.kind == MC:
      self.requests, self.slots = _mc_requests(task, located, encoder, engine.max_length)
    elif task.kind == PPL:
      self.tokens = [encoder.encode(doc.text, add_special_tokens=False) for doc in self.items]
      self.windows, self.owner = [], []
      for i, ids in enumerate(self.tokens):
        for window in encoder.rolling_windows(ids, engine.max_length):
          self.windows.append(window)
          self.owner.append(i)
    else:
      self.prompts = [encoder.encode(item.prompt) for item in self.items]


def _mc_records(prep: _Prepared, ll: np.ndarray, greedy: np.ndarray) -> list[Record]:
  out = []
  for where, item, slots in zip(prep.ids, prep.items, prep.slots):
    lls = [float(ll[s]) for s in slots]
    preds = M.mc_predictions(lls, item.choices)
    preds = {m: preds[m] for m in prep.task.metrics}
    contexts = item.contexts[0] if len(set(item.contexts)) == 1 else list(item.contexts)
    out.append({"id": where, "gold": item.gold, "pred": preds[prep.task.primary], "preds": preds,
                "correct": {m: int(p == item.gold) for m, p in preds.items()}, "lls": lls,
                "is_greedy": [bool(greedy[s]) for s in slots], "context": contexts,
                "continuations": list(item.continuations), "choices": list(item.choices)})
  return out


def _mc_metrics(task: Task, records: list[Record], boot: dict) -> dict[str, Any]:
  out: dict[str, Any] = {"n": len(records)}
  for m in task.metrics:
    values = [r["correct"][m] for r in records]
    out[m], out[f"{m}_ci"] = float(np.mean(values)), list(M.bootstrap_ci(values, **boot))
  return out


def _ppl_records(prep: _Prepared, ll: np.ndarray) -> list[Record]:
  doc_ll = np.zeros(len(prep.items))
  np.add.at(doc_ll, np.asarray(prep.owner, np.int64), ll)
  return [{"id": where, "ll": float(doc_ll[i]), "tokens": len(prep.tokens[i]), "words": doc.words,
           "bytes": doc.nbytes} for i, (where, doc) in enumerate(zip(prep.ids, prep.items))]


def _ppl_metrics(records: list[Record], boot: dict) -> dict[str, Any]:
  ll = [r["ll"] for r in records]
  units = {u: [r[u] for r in records] for u in ("tokens", "words", "bytes")}
  out: dict[str, Any] = {"n": len(records), **M.perplexities(ll, units["tokens"], units["words"], units["bytes"])}
  for name, unit in (("token_perplexity", "tokens"), ("word_perplexity", "words"), ("byte_perplexity", "bytes")):
    out[f"{name}_ci"] = list(M.bootstrap_ratio_ci(ll, units[unit], lambda r: np.exp(-r), **boot))
  out["bits_per_byte_ci"] = list(M.bootstrap_ratio_ci(ll, units["bytes"], lambda r: -r / math.log(2), **boot))
  return out


def _gen_records(prep: _Prepared, generations: list[str]) -> list[Record]:
  out = []
  for where, item, text in zip(prep.ids, prep.items, generations):
    out.append({"id": where, "prompt": item.prompt, "generation": text, "pred": M.normalize_answer(text),
                "answers": list(item.answers), "correct": {"exact_match": int(M.exact_match(text, item.answers))}})
  return out


def _trim(text: str, until: Sequence[str]) -> str:
  cut = min((text.find(s) for s in until if s in text), default=len(text))
  return text[:cut].strip()


def _run(prep: _Prepared, engine: Engine, encoder: TextEncoder, k: int, gen: dict) -> list[Record]:
  if prep.task.kind == MC:
    return _mc_records(prep, *engine.loglikelihood(prep.requests, k))
  if prep.task.kind == PPL:
    return _ppl_records(prep, engine.loglikelihood(prep.windows, k)[0])
  until = tuple(gen["until"])
  ids = engine.generate(prep.prompts, k, max_new_tokens=gen["max_new_tokens"],
                        stop_ids=[] if encoder.eos_token_id is None else [encoder.eos_token_id],
                        is_done=lambda out: any(s in encoder.decode(out) for s in until))
  return _gen_records(prep, [_trim(encoder.decode(x), until) for x in ids])


def _metrics(task: Task, records: list[Record], boot: dict) -> dict[str, Any]:
  if task.kind == PPL:
    return _ppl_metrics(records, boot)
  return _mc_metrics(task, records, boot)  # generation records use the same `correct` layout


# ------------------------------------------------------------------------------------------------ summary


def _cross_k(task: Task, by_k: Mapping[int, dict], samples: Mapping[int, list[Record]], k_ref: int) -> dict:
  values = {k: by_k[k][task.primary] for k in by_k}
  if task.kind == PPL:
    return {"relative_increase": {str(k): v for k, v in M.relative_increase(values, k_ref).items()}}
  ks, matrix = M.agreement_matrix({k: [r["pred"] for r in recs] for k, recs in samples.items()})
  return {"relative_drop": {str(k): v for k, v in M.relative_drop(values, k_ref).items()},
          "agreement": {"ks": ks, "matrix": matrix.tolist()}}


def _average(summary_tasks: dict, ks: list[int], k_ref: int) -> dict:
  names = [n for n, t in summary_tasks.items() if t["kind"] == MC]
  if not names:
    return {}
  by_k = {k: float(np.mean([summary_tasks[n]["by_k"][str(k)][summary_tasks[n]["primary"]] for n in names]))
          for k in ks}
  matrix = np.mean([summary_tasks[n]["agreement"]["matrix"] for n in names], axis=0)
  return {"tasks": names, "by_k": {str(k): v for k, v in by_k.items()},
          "relative_drop": {str(k): v for k, v in M.relative_drop(by_k, k_ref).items()},
          "agreement": {"ks": ks, "matrix": matrix.tolist()}}


def evaluate(cfg: ModelConfig, params: Any, tokenizer: tokenizers.Tokenizer | TextEncoder,
             tasks: Sequence[str | Task], ks: Sequence[int] | None = None, *, limit: int | None = None,
             batch_size: int = 8, max_length: int | None = None, min_bucket: int = 16, data_dir: str | None = None,
             out_dir: str | None = None, n_boot: int = M.N_BOOT, seed: int = 0, max_new_tokens: int = 32,
             until: Sequence[str] = ("\n",), progress: bool = True, plots: bool = True,
             meta: Mapping[str, Any] | None = None, prefix_token_id: int | None = None) -> EvalResults:
  """Evaluates `tasks` (specs, see tasks.py) at each k in `ks` (default 1..k_pre); writes `out_dir` if given.

  `limit` takes the first N documents of each task; `max_length` (default cfg.max_position_embeddings) bounds
  every scored window; inputs are padded to power-of-two lengths >= `min_bucket` (fewer compilations when
  larger); generation stops at any string of `until` or after `max_new_tokens`; `prefix_token_id` overrides the
  token that conditions empty contexts and perplexity windows (see encoding.py for the default).

  Every task is loaded and tokenized before any scoring starts, so bad data or a missing prefix token fails in
  seconds, not after an hour of scoring. If scoring fails part-way (out of memory, an interrupt), the tasks
  finished so far are still written to `out_dir` (results.json's meta names the task that failed) and the
  error is re-raised.
  """
  ks = kplan.eval_ks(ks, cfg.k_pre, cfg.num_experts)
  k_ref = kplan.reference_k(cfg.k_pre, ks)
  task_list = get_tasks(tasks)
  if isinstance(tokenizer, TextEncoder):
    if prefix_token_id is not None:
      raise ValueError("pass prefix_token_id to the TextEncoder you built, not to evaluate()")
    encoder = tokenizer
  else:
    encoder = TextEncoder(tokenizer, hf_extra_json=cfg.hf_extra_json, prefix_token_id=prefix_token_id)
  engine = Engine(cfg, params, batch_size=batch_size, max_length=max_length, min_bucket=min_bucket)
  if any(t.kind == GEN for t in task_list) and not 1 <= max_new_tokens < engine.max_length:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be in [1, max_length={engine.max_length})")
  boot, gen = {"n_boot": n_boot, "seed": seed}, {"until": list(until), "max_new_tokens": max_new_tokens}
  prepared = []
  for task in task_list:  # all data checked first: nothing is scored if any task cannot run
    try:
      prepared.append(_Prepared(task, task.load(data_dir, limit), encoder, engine))
    except EvalDataError:
      raise
    except ValueError as e:  # e.g. no prefix token for a perplexity window
      raise EvalDataError(f"{task.name}: {e}") from e
  run_meta = {"ks": ks, "k_ref": k_ref, "k_pre": cfg.k_pre, "model_type": cfg.model_type,
              "num_experts": cfg.num_experts, "dtype": cfg.dtype, "param_dtype": cfg.param_dtype,
              "limit": limit, "batch_size": batch_size, "max_length": engine.max_length, "n_boot": n_boot,
              "seed": seed, "generation": gen, "prefix_token_id": encoder.prefix_token_id,
              "bos_added": bool(encoder.special_prefix), "time": datetime.datetime.now().isoformat(),
              **dict(meta or {})}
  summary_tasks: dict[str, Any] = {}
  samples: dict[str, dict[int, list[Record]]] = {}
  bar = tqdm(total=len(task_list) * len(ks), desc="eval", unit="task×k", disable=not progress)
  try:
    for prep in prepared:
      task = prep.task
      by_k: dict[int, dict] = {}
      task_samples: dict[int, list[Record]] = {}
      for k in ks:
        bar.set_description(f"{task.name} k={k}")
        start = time.perf_counter()
        records = _run(prep, engine, encoder, k, gen)
        by_k[k] = {**_metrics(task, records, boot), "seconds": round(time.perf_counter() - start, 3)}
        task_samples[k] = records
        bar.update(1)
      samples[task.name] = task_samples
      summary_tasks[task.name] = {
          "kind": task.kind, "primary": task.primary, "metrics": list(task.metrics), "prompt": task.prompt,
          "source": task.source, "n": len(prep.items), "by_k": {str(k): v for k, v in by_k.items()},
          **_cross_k(task, by_k, task_samples, k_ref)}
  except BaseException as e:  # also KeyboardInterrupt: keep what is finished, then stop as asked
    failed = next(p.task.name for p in prepared if p.task.name not in summary_tasks)
    run_meta["incomplete"] = {"failed_task": failed, "error": f"{type(e).__name__}: {e}",
                              "not_run": [p.task.name for p in prepared if p.task.name not in summary_tasks]}
    if out_dir is not None and summary_tasks:
      _write(out_dir, EvalResults(_summary(run_meta, summary_tasks, ks, k_ref), samples), plots)
    raise
  finally:
    bar.close()
  results = EvalResults(_summary(run_meta, summary_tasks, ks, k_ref), samples)
  if out_dir is not None:
    _write(out_dir, results, plots)
  return results


def _summary(meta: dict, summary_tasks: dict, ks: list[int], k_ref: int) -> dict[str, Any]:
  return {"meta": meta, "tasks": summary_tasks, "average": _average(summary_tasks, ks, k_ref)}


def _write(out_dir: str, results: EvalResults, plots: bool) -> None:
  report.write(out_dir, results, plots=plots)
