"""Metrics: multiple-choice decisions, perplexities, exact match, bootstrap CIs, cross-sparsity agreement.

Pure numpy functions over per-item arrays, so the experiment driver can recompute anything from the per-sample
files. Conventions:
* Multiple choice (`mc_predictions`): `acc` = argmax of summed log-likelihood; `acc_norm` = argmax of LL / number
  of characters of the choice text (without the leading " " delimiter); `acc_bytes` = argmax of LL / its UTF-8
  bytes. Ties go to the lowest index (np.argmax).
* Perplexity (`perplexities`): exp(-ΣLL / Σunits) for units = tokens, words (whitespace-separated), bytes;
  bits_per_byte = -ΣLL / Σbytes / ln 2; sums over documents (a corpus-level figure, as the harness computes).
* Bootstrap: percentile intervals, 95% by default, a fixed seed, resamples drawn in vectorised blocks.
* Agreement (PHDS §4.2): the share of items whose chosen answer is the same under two runs (two k of one
  checkpoint, or two checkpoints), aligned by item id.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable, Mapping, Sequence

import numpy as np

MC_METRICS: tuple[str, ...] = ("acc", "acc_norm", "acc_bytes")
N_BOOT = 1000
_BLOCK = 200  # resamples per vectorised block: bounds memory at _BLOCK * n indices


def mc_predictions(lls: Sequence[float], choices: Sequence[str]) -> dict[str, int]:
  """The chosen index under each MC metric, from per-choice log-likelihoods and the choice texts."""
  lls = np.asarray(lls, np.float64)
  chars = np.array([max(len(c), 1) for c in choices], np.float64)
  nbytes = np.array([max(len(c.encode("utf-8")), 1) for c in choices], np.float64)
  return {"acc": int(np.argmax(lls)), "acc_norm": int(np.argmax(lls / chars)),
          "acc_bytes": int(np.argmax(lls / nbytes))}


def perplexities(ll: Sequence[float], tokens: Sequence[int], words: Sequence[int],
                 nbytes: Sequence[int]) -> dict[str, float]:
  """Corpus-level token / word / byte perplexity and bits per byte from per-document sums."""
  total = float(np.sum(ll))
  t, w, b = float(np.sum(tokens)), float(np.sum(words)), float(np.sum(nbytes))
  return {"token_perplexity": math.exp(-total / t), "word_perplexity": math.exp(-total / w),
          "byte_perplexity": math.exp(-total / b), "bits_per_byte": -total / b / math.log(2)}


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
  """SQuAD/TriviaQA normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
  return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def exact_match(prediction: str, aliases: Sequence[str]) -> bool:
  pred = normalize_answer(prediction)
  return any(pred == normalize_answer(a) for a in aliases)


# ----------------------------------------------------------------------------------------------- bootstrap


def _resampled(n: int, n_boot: int, seed: int, stat: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
  """`stat(idx)` for n_boot resamples of range(n) (idx is [block, n]); one RNG stream per seed."""
  rng = np.random.default_rng(seed)
  out = []
  for start in range(0, n_boot, _BLOCK):
    idx = rng.integers(0, n, size=(min(_BLOCK, n_boot - start), n))
    out.append(stat(idx))
  return np.concatenate(out)


def _interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
  tail = (1 - confidence) / 2 * 100
  lo, hi = np.percentile(samples, [tail, 100 - tail])
  return float(lo), float(hi)


def bootstrap_ci(values: Sequence[float], *, n_boot: int = N_BOOT, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
  """Percentile bootstrap CI of the mean of `values` (e.g. per-item 0/1 correctness)."""
  v = np.asarray(values, np.float64)
  if v.size == 0:
    return (math.nan, math.nan)
  return _interval(_resampled(v.size, n_boot, seed, lambda idx: v[idx].mean(axis=1)), confidence)


def bootstrap_ratio_ci(numerator: Sequence[float], denominator: Sequence[float],
                       transform: Callable[[np.ndarray], np.ndarray] = lambda r: r, *, n_boot: int = N_BOOT,
                       confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
  """CI of transform(Σnum / Σden) resampling documents, e.g. perplexity = exp(-ΣLL / Σtokens)."""
  num, den = np.asarray(numerator, np.float64), np.asarray(denominator, np.float64)
  if num.size == 0:
    return (math.nan, math.nan)
  stats = _resampled(num.size, n_boot, seed, lambda idx: transform(num[idx].sum(1) / den[idx].sum(1)))
  return _interval(stats, confidence)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, n_boot: int = N_BOOT, confidence: float = 0.95,
                     seed: int = 0) -> dict[str, float]:
  """mean(a) - mean(b) on the same items, its paired-bootstrap CI and a two-sided bootstrap p-value.

  Both methods are resampled with the same item indices, so item difficulty cancels out. The p-value is
  2 * min(P*(diff <= 0), P*(diff >= 0)) over the resamples (capped at 1): a sign test, not an exact one.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"paired samples must align item by item, got shapes {a.shape} and {b.shape}")
  if a.size == 0:
    return {"diff": math.nan, "lo": math.nan, "hi": math.nan, "p_value": math.nan, "n": 0}
  d = a - b
  diffs = _resampled(d.size, n_boot, seed, lambda idx: d[idx].mean(axis=1))
  lo, hi = _interval(diffs, confidence)
  p = min(1.0, 2 * min(float(np.mean(diffs <= 0)), float(np.mean(diffs >= 0))))
  return {"diff": float(d.mean()), "lo": lo, "hi": hi, "p_value": p, "n": int(d.size)}


# ----------------------------------------------------------------------------------------------- agreement


def agreement_indicators(pred_a: Sequence, pred_b: Sequence) -> np.ndarray:
  """1.0 where two runs chose the same answer, item by item (equal-length aligned sequences)."""
  if len(pred_a) != len(pred_b):
    raise ValueError(f"agreement needs aligned items, got {len(pred_a)} and {len(pred_b)}")
  return np.array([x == y for x, y in zip(pred_a, pred_b)], np.float64)


def agreement(pred_a: Sequence, pred_b: Sequence) -> float:
  """Share of items with the same chosen answer in both runs."""
  ind = agreement_indicators(pred_a, pred_b)
  return float(ind.mean()) if ind.size else math.nan


def align(pred_a: Mapping[str, object], pred_b: Mapping[str, object]) -> tuple[list, list]:
  """Predictions of the items (ids) two result sets share, in a fixed order, e.g. two checkpoints' samples."""
  common = sorted(set(pred_a) & set(pred_b))
  if not common:
    raise ValueError("the two result sets share no item ids")
  return [pred_a[i] for i in common], [pred_b[i] for i in common]


def agreement_matrix(preds_by_k: Mapping[int, Sequence]) -> tuple[list[int], np.ndarray]:
  """(sorted ks, [K, K] agreement matrix) for one checkpoint's predictions at several k."""
  ks = sorted(preds_by_k)
  m = np.ones((len(ks), len(ks)))
  for i, ki in enumerate(ks):
    for j in range(i + 1, len(ks)):
      m[i, j] = m[j, i] = agreement(preds_by_k[ki], preds_by_k[ks[j]])
  return ks, m


def compare_agreements(agree_a: float, agree_b: float) -> dict[str, float]:
  """How much higher agreement a is than b (e.g. PHDS@(k1,k2) vs Oracle-k1@k1 / Oracle-k2@k2), both ways."""
  rel = (agree_a - agree_b) / agree_b if agree_b else math.nan
  return {"absolute": agree_a - agree_b, "relative": rel}


def relative_drop(acc_by_k: Mapping[int, float], k_ref: int) -> dict[int, float]:
  """(acc@k_ref - acc@k) / acc@k_ref for every k (PHDS §4.3); for perplexity use `relative_increase`."""
  ref = acc_by_k[k_ref]
  return {k: (ref - v) / ref if ref else math.nan for k, v in acc_by_k.items()}


def relative_increase(value_by_k: Mapping[int, float], k_ref: int) -> dict[int, float]:
  """(v@k - v@k_ref) / v@k_ref, e.g. the relative perplexity increase when k is lowered."""
  ref = value_by_k[k_ref]
  return {k: (v - ref) / ref if ref else math.nan for k, v in value_by_k.items()}
