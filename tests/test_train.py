"""The trainer end to end on a tiny model: validation, no recompiles, resume after SIGKILL, NaN stop, export."""

import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import demo
from tests.conftest import override
from phds_jax import checkpoint as params_ckpt
from phds_jax import hf, models, paths
from phds_jax.training import loop, observe, optimizer, step as step_lib
from phds_jax.training.config_checks import TrainConfigError, validate_config

ASSETS = paths.ASSETS_DIR
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(ckpt: str, **changes):
  c = demo.get_config()
  c.init.path = ckpt
  c.num_steps, c.batch_size, c.microbatches = 6, 16, 2  # 8 fake devices x 2 microbatches
  c.data.max_len = 64
  c.checkpoint.update(dict(every_steps=2, async_save=False))
  c.eval.update(dict(every_steps=3, batches=1))
  c.final_eval.tasks = ()
  c.export.hf = True
  return override(c, **changes)


@pytest.mark.parametrize("change, match", [
    ({"schedule.k_train": (2, 9)}, "outside"),
    ({"schedule.anchor": 1}, "range"),
    ({"schedule.switch_at": 1.5}, "switch_at"),
    ({"batch_size": 7}, "divisible"),
    ({"mesh.data": 3}, "devices"),
    ({"init.path": "/does/not/exist"}, "does not exist"),
    ({"model_type": "qwen2_moe"}, "olmoe"),
    ({"data.path": "/nope/*.jsonl"}, "matches no file"),
    ({"router_mode": "fuzzy"}, "router_mode"),
])
def test_config_errors_before_compiling(tiny_ckpt, change, match):
  with pytest.raises(TrainConfigError, match=match):
    validate_config(tiny_config(tiny_ckpt, **change))


def test_train_step_never_recompiles_across_k():
  cfg = models.tiny("olmoe")
  tx = optax.adamw(1e-3)
  state = step_lib.init_state(models.init_params(cfg, jax.random.PRNGKey(0)), tx)
  fn = jax.jit(step_lib.make_train_step(cfg, (1, 2, 3, 4), tx))
  rng = np.random.default_rng(0)
  for s in range(5):
    tok = rng.integers(0, cfg.vocab_size, (2, 2, 9))
    batch = dict(tokens=jnp.asarray(tok[..., :-1], jnp.int32), targets=jnp.asarray(tok[..., 1:], jnp.int32),
                 loss_mask=jnp.ones((2, 2, 8)), segment_ids=jnp.ones((2, 2, 8), jnp.int32),
                 positions=jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 2, 8)))
    state, _ = fn(state, batch, jnp.asarray([s % 4, (s + 2) % 4], jnp.int32))
  assert fn._cache_size() == 1


def test_step_loss_equals_direct_per_k_loss():
  """The switch/scan step's loss is the token-weighted mean of each microbatch's loss at its own k."""
  cfg = models.tiny("qwen3_moe")
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  tx = optax.sgd(0.0)
  rng = np.random.default_rng(1)
  tok = rng.integers(0, cfg.vocab_size, (2, 2, 9))
  mask = (rng.random((2, 2, 8)) > 0.3).astype(np.float32)
  batch = dict(tokens=jnp.asarray(tok[..., :-1], jnp.int32), targets=jnp.asarray(tok[..., 1:], jnp.int32),
               loss_mask=jnp.asarray(mask), segment_ids=jnp.ones((2, 2, 8), jnp.int32),
               positions=jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 2, 8)))
  _, metrics = jax.jit(step_lib.make_train_step(cfg, (1, 3), tx))(step_lib.init_state(params, tx), batch,
                                                                   jnp.asarray([1, 0], jnp.int32))
  model = models.build(cfg)
  total = 0.0
  for m, k in ((0, 3), (1, 1)):
    logits, _ = model.apply({"params": params}, batch["tokens"][m], k=k, mode="soft")
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, batch["targets"][m][..., None], -1)[..., 0]
    total += float(jnp.sum(nll * batch["loss_mask"][m]))
  np.testing.assert_allclose(float(metrics["loss"]), total / mask.sum(), rtol=1e-5)


def test_frozen_router_and_weight_decay_mask():
  cfg = models.tiny("olmoe")
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  config = demo.get_config()
  config.optimizer.update(dict(freeze_router=True, weight_decay=0.1, warmup_steps=0, lr=1e-2))
  tx, _ = optimizer.make_optimizer(config, 10, params)
  mask = optimizer.decay_mask(params)
  assert mask["layer_0"]["moe"]["wi"] and not mask["layer_0"]["input_norm"]["scale"]
  state = step_lib.init_state(params, tx)
  rng = np.random.default_rng(0)
  tok = rng.integers(0, cfg.vocab_size, (1, 2, 9))
  batch = dict(tokens=jnp.asarray(tok[..., :-1], jnp.int32), targets=jnp.asarray(tok[..., 1:], jnp.int32),
               loss_mask=jnp.ones((1, 2, 8)), segment_ids=jnp.ones((1, 2, 8), jnp.int32),
               positions=jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (1, 2, 8)))
  new, _ = jax.jit(step_lib.make_train_step(cfg, (2,), tx))(state, batch, jnp.zeros((1,), jnp.int32))
  for i in range(cfg.num_layers):
    np.testing.assert_array_equal(new.params[f"layer_{i}"]["moe"]["router"]["kernel"],
                                  params[f"layer_{i}"]["moe"]["router"]["kernel"])
  assert not np.allclose(new.params["layer_0"]["moe"]["wi"], params["layer_0"]["moe"]["wi"])


def test_train_and_evaluate_exports_one_checkpoint(tiny_ckpt, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  result = loop.train_and_evaluate(tiny_config(tiny_ckpt), "run")  # a relative workdir, as users type it
  workdir = str(tmp_path / "run")
  records = observe.read_metrics(workdir)
  assert [r["step"] for r in records] == list(range(1, 7))
  for r in records:
    assert {"step", "k", "loss", "tokens_per_s", "lr"} <= set(r) and np.isfinite(r["loss"])
  assert "val_loss_k2" in records[2] and "val_loss_k4" in records[5]
  assert sum(result.k_histogram.values()) == 6 * 2 and set(result.k_histogram) <= {2, 3, 4}
  assert set(result.heldout_loss_by_k) == {1, 2, 3, 4}
  for name in ("loss_per_k.png", "k_histogram.png", "heldout_loss_vs_k.png", "run_info.json"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert any(f.startswith("events") for f in os.listdir(os.path.join(workdir, "tensorboard")))
  cfg_hf, params_hf = hf.load(result.hf_dir)
  cfg_ob, params_ob = params_ckpt.load_params(result.orbax_dir)
  assert cfg_hf.k_pre == cfg_ob.k_pre == 4
  jax.tree_util.tree_map(np.testing.assert_array_equal, params_hf, params_ob)
  # Re-running in a finished workdir resumes at the end and trains nothing more.
  again = loop.train_and_evaluate(tiny_config(tiny_ckpt), workdir)
  assert again.final_step == 6 and len(observe.read_metrics(workdir)) == 6


def test_nan_stops_and_keeps_last_good_checkpoint(tiny_ckpt, tmp_path):
  workdir = str(tmp_path / "nan")
  config = tiny_config(tiny_ckpt, **{"optimizer.lr": 1e30, "optimizer.clip": 0.0, "optimizer.warmup_steps": 0,
                                     "checkpoint.every_steps": 1, "num_steps": 20})
  with pytest.raises(FloatingPointError, match=r"at step \d+ \(k=\[\d, \d\]\).*last good checkpoint is step"):
    loop.train_and_evaluate(config, workdir)
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  records = observe.read_metrics(workdir)
  assert records[-1].get("skipped") and all(np.isfinite(r["loss"]) for r in records[:-1])
  assert steps and steps[-1] == records[-1]["step"] - 1  # the skipped step itself was never saved


def _train_cmd(ckpt: str, workdir: str) -> list[str]:
  return [sys.executable, "-m", "phds_jax.train", "--config=configs/demo.py", f"--workdir={workdir}",
          f"--config.init.path={ckpt}", "--config.num_steps=8", "--config.batch_size=8",
          "--config.microbatches=2", "--config.data.max_len=64", "--config.checkpoint.every_steps=3",
          "--config.eval.batches=0", "--config.export.hf=False", "--config.export.orbax=False",
          "--config.final_eval.tasks=()"]


def test_sigkill_then_resume_reproduces_losses(tiny_ckpt, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  full = str(tmp_path / "full")
  subprocess.run(_train_cmd(tiny_ckpt, full), cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
  reference = {r["step"]: r["loss"] for r in observe.read_metrics(full)}
  assert sorted(reference) == list(range(1, 9))

  killed = str(tmp_path / "killed")
  proc = subprocess.Popen(_train_cmd(tiny_ckpt, killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  metrics = os.path.join(killed, "metrics.jsonl")
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:  # kill once step 4 is logged (checkpoint 3 exists)
    if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 4:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert 4 <= len(observe.read_metrics(killed)) < 8
  subprocess.run(_train_cmd(tiny_ckpt, killed), cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
  resumed = {r["step"]: r["loss"] for r in observe.read_metrics(killed)}
  assert sorted(resumed) == list(range(1, 9))
  np.testing.assert_allclose([resumed[s] for s in range(1, 9)], [reference[s] for s in range(1, 9)], rtol=1e-6)
