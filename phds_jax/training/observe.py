"""What a run shows: a progress line, metrics.jsonl, TensorBoard events, and plots per k at the end."""

from __future__ import annotations

import collections
import json
import os
import time
from typing import Any

import jax
import numpy as np
import tqdm

from phds_jax import models, paths

# Dense bf16 peak TFLOP/s per device, for the MFU estimate (device_kind prefixes).
PEAK_TFLOPS = {"NVIDIA H100": 989.0, "NVIDIA H200": 989.0, "NVIDIA A100": 312.0, "TPU v4": 275.0,
               "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6": 918.0}


def peak_tflops(override: float = 0.0) -> float:
  """Per-device peak (0 = unknown, e.g. CPU: MFU is then not shown)."""
  if override:
    return override
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_TFLOPS.items() if kind.startswith(k)), 0.0)


def train_flops_per_token(cfg: models.ModelConfig, seq_len: int, slots: int) -> float:
  """≈ 6 × active parameters + attention, with `slots` experts computed per token (k_pre in soft mode)."""
  d, hd = cfg.hidden_size, cfg.head_dim
  attn = d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  routed = 3 * d * cfg.moe_ffn * slots + d * cfg.num_experts
  shared = 3 * d * cfg.shared_ffn + d if cfg.shared_ffn else 0
  dense = 3 * d * cfg.dense_ffn
  per_layer = [attn + (routed + shared if moe else dense) for moe in cfg.moe_layers]
  params = sum(per_layer) + d * cfg.vocab_size
  attention_scores = 2 * cfg.num_layers * seq_len * cfg.num_heads * hd  # causal: half of 4·T·H·hd
  return 6.0 * params + 3.0 * attention_scores


class RunLog:
  """Writes one JSON object per logged step (step, k, loss, ...), TensorBoard scalars and the progress bar."""

  def __init__(self, workdir: str, total_steps: int, start_step: int, *, enabled: bool = True,
               tensorboard: bool = True):
    self.path = paths.join(workdir, "metrics.jsonl")
    self.remote = paths.is_remote(workdir)  # object stores cannot append: records are rewritten on flush()
    self.enabled = enabled
    self.loss_by_k: dict[int, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=50))
    self.k_counts: collections.Counter = collections.Counter()
    self.lines: list[str] = []
    if enabled:
      self.lines = _truncate_after(self.path, start_step)
    self.writer = None
    if enabled and tensorboard and not self.remote:
      # Lazy: only a run that writes events pays for the import (maintained, TensorFlow-free event writer).
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self.bar = tqdm.tqdm(total=total_steps, initial=start_step, disable=not enabled, dynamic_ncols=True,
                         desc="train", unit="step")
    self.last_time = time.perf_counter()
    self.last_val: tuple[int, float] | None = None  # (step, mean held-out loss over k): shown until the next eval

  def step(self, record: dict[str, Any], ks: list[int], nll_M: np.ndarray, tokens_M: np.ndarray,
           tokens_per_step: float, flops_per_token: float, peak: float) -> None:
    """Records one step; `ks`, `nll_M`, `tokens_M` are per microbatch (for the per-k running losses)."""
    now = time.perf_counter()
    elapsed, self.last_time = now - self.last_time, now
    for k, nll, n in zip(ks, nll_M, tokens_M):
      self.k_counts[k] += 1
      if n > 0:
        self.loss_by_k[k].append(float(nll / n))
    tok_s = tokens_per_step / max(elapsed, 1e-9)
    record = dict(record, k=ks[0] if len(set(ks)) == 1 else ks, tokens_per_s=tok_s)
    if peak:
      record["mfu"] = tok_s * flops_per_token / (peak * 1e12 * jax.device_count())
    self.write(record)
    running = " ".join(f"k{k}:{np.mean(v):.3f}" for k, v in sorted(self.loss_by_k.items()))
    if "val_loss" in record:
      self.last_val = (record["step"], record["val_loss"])
    postfix = f"k={record['k']} loss={record['loss']:.4f} [{running}]"
    if self.last_val is not None:  # held-out, mean over the eval ks: the number that says if the run generalises
      postfix += f" val@{self.last_val[0]}={self.last_val[1]:.3f}"
    postfix += f" {tok_s:,.0f} tok/s"
    if "mfu" in record:
      postfix += f" mfu={100 * record['mfu']:.1f}%"
    self.bar.set_postfix_str(postfix, refresh=False)
    self.bar.update(1)

  def write(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    line = json.dumps(record) + "\n"
    if self.remote:
      self.lines.append(line)
    else:
      with open(self.path, "a") as f:
        f.write(line)
    if self.writer is not None:
      for key, value in record.items():
        if isinstance(value, (int, float)) and key != "step":
          self.writer.add_scalar(key, value, record["step"])

  def flush(self) -> None:
    if self.enabled and self.remote:
      paths.write_text(self.path, "".join(self.lines))

  def close(self) -> None:
    self.flush()
    self.bar.close()
    if self.writer is not None:
      self.writer.close()


def _truncate_after(path: str, step: int) -> list[str]:
  """On resume, drop logged records past the restored step (they are about to be re-run); returns the rest."""
  if not paths.exists(path):
    return []
  keep = [line + "\n" for line in paths.read_text(path).splitlines()
          if line.strip() and json.loads(line).get("step", 0) <= step]
  paths.write_text(path, "".join(keep))
  return keep


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  text = paths.read_text(paths.join(workdir, "metrics.jsonl"))
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def plot_run(workdir: str, k_hist: dict[int, int], eval_by_k: dict[int, float] | None = None) -> list[str]:
  """loss_per_k.png (training loss by the step's k), k_histogram.png, heldout_loss_vs_k.png."""
  import matplotlib  # pylint: disable=g-import-not-at-top  (lazy: slow to import, only the end of a run plots)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  records = [r for r in read_metrics(workdir) if "loss" in r and "k" in r]
  paths = []
  fig, ax = plt.subplots(figsize=(7, 4))
  by_k = collections.defaultdict(list)
  for r in records:
    for k, nll in zip(r["k_M"], r["loss_M"]):
      by_k[k].append((r["step"], nll))
  for k in sorted(by_k):
    steps, losses = zip(*by_k[k])
    ax.plot(steps, losses, ".", ms=3, alpha=0.6, label=f"k={k}")
  ax.set(xlabel="step", ylabel="train loss (microbatch)", title="Training loss by the microbatch's k")
  ax.legend()
  paths.append(_save(fig, workdir, "loss_per_k.png"))
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.bar([str(k) for k in sorted(k_hist)], [k_hist[k] for k in sorted(k_hist)])
  ax.set(xlabel="k", ylabel="microbatches", title="k sampled over the run")
  paths.append(_save(fig, workdir, "k_histogram.png"))
  if eval_by_k:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ks = sorted(eval_by_k)
    ax.plot(ks, [eval_by_k[k] for k in ks], "o-")
    ax.set(xlabel="k (hard routing)", ylabel="held-out loss", title="Held-out loss vs k", xticks=ks)
    paths.append(_save(fig, workdir, "heldout_loss_vs_k.png"))
  return paths


def _save(fig, workdir: str, name: str) -> str:
  path = paths.join(workdir, name)
  fig.tight_layout()
  with paths.as_epath(path).open("wb") as f:
    fig.savefig(f, dpi=120, format="png")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  plt.close(fig)  # runs repeated in one process (experiment driver) must not accumulate open figures
  return path
