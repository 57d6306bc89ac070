"""The Hugging Face transformers + PyTorch side of the benchmarks: the same architecture as a phds_jax config,
timed for a forward (prefill) or a train step on the best local torch device. Imports torch lazily, so a
machine without it gets "n/a (missing)" in that column instead of a failed run."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from phds_jax.hf.config import config_to_hf
from phds_jax.models.config import ModelConfig


def torch_device() -> str:
  import torch

  return "cuda" if torch.cuda.is_available() else "cpu"


def build(cfg: ModelConfig, weights_dtype: str = "float32") -> Any:
  """A randomly initialised transformers model of cfg's architecture, in eval mode, on torch_device(), with
  weights in `weights_dtype` (fp32 for training: autocast then computes in bf16 over fp32 master weights)."""
  import torch
  import transformers

  hf = config_to_hf(cfg)
  hf.pop("architectures", None)
  hf.pop("dtype", None)
  config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, weights_dtype))
  return model.to(torch_device()).eval()


def set_k(model: Any, k: int) -> None:
  """Re-dial every router to top-k (how transformers runs an MoE checkpoint at another k)."""
  for layer in model.model.layers:
    gate = getattr(layer.mlp, "gate", None)
    if gate is not None and hasattr(gate, "top_k"):
      gate.top_k = k


def _autocast(dtype: str):
  import contextlib

  import torch

  if dtype == "float32":
    return contextlib.nullcontext()
  return torch.autocast(torch_device(), dtype=getattr(torch, dtype))


def _sync() -> None:
  import torch

  if torch.cuda.is_available():
    torch.cuda.synchronize()


def _median_ms(fn, repeats: int, warmup: int) -> float:
  for _ in range(warmup):
    fn()
  _sync()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    _sync()
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def forward_ms(model: Any, tokens: np.ndarray, *, dtype: str = "float32", repeats: int = 3, warmup: int = 1) -> float:
  """Median ms of a no-grad forward over `tokens` [B, T] (logits for every position, like ours)."""
  import torch

  x = torch.as_tensor(tokens, device=torch_device())

  def run():
    with torch.no_grad(), _autocast(dtype):
      model(x)

  return _median_ms(run, repeats, warmup)


def train_step_ms(model: Any, tokens: np.ndarray, *, dtype: str = "float32", repeats: int = 3,
                  warmup: int = 1) -> float:
  """Median ms of forward + cross-entropy + backward + AdamW step (fp32 master weights, autocast compute)."""
  import torch

  x = torch.as_tensor(tokens, device=torch_device())  # transformers shifts the labels itself
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

  def run():
    with _autocast(dtype):
      loss = model(x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  try:
    return _median_ms(run, repeats, warmup)
  finally:
    model.eval()


def per_k(model: Any, ks: list[int], measure, *args, **kwargs) -> dict[int, Any]:
  """`measure(model, *args, **kwargs)` with the model re-dialled to each k; a model that did not build (an NA
  from `attempt`) fills every cell with its reason. Failures of one k stay in that k's cell."""
  from benchmarks.common import NA, attempt  # pylint: disable=g-import-not-at-top
  out = {}
  for k in ks:
    if isinstance(model, NA):
      out[k] = model
    else:
      set_k(model, k)
      out[k] = attempt(measure, model, *args, **kwargs)
  return out
