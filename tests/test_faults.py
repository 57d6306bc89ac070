"""Fault injection: every fault of issue 11 is tried for real (real Orbax files, real SIGKILL, a real write limit).

Each test names the fault, injects it, and checks the run survives it with no data lost: no checkpoint with a
non-finite value, a damaged newest step reported and replaced by the older good one, a changed config refused
with a readable diff, user errors as one line with exit code 2. Figures: docs/reliability.md.
"""

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import chex
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import demo
from tests.conftest import override
from phds_jax import cli, hf, models, paths
from phds_jax import data as data_lib
from phds_jax.experiments import runs
from phds_jax.training import loop, observe, resume, run as run_lib, step as step_lib
from phds_jax.checkpoint import ResumeError, RunCheckpointer
from phds_jax.training.config_checks import TrainConfigError, validate_config

ASSETS = paths.ASSETS_DIR
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fast_config(ckpt: str, **changes):
  """One k level (one compiled branch), no eval, no export: seconds per run on CPU."""
  c = demo.get_config()
  c.init.path = ckpt
  c.schedule.update(dict(mode="fixed", k_train=(2,), anchor=0))
  c.num_steps, c.batch_size, c.microbatches = 3, 8, 1
  c.data.max_len = 32
  c.checkpoint.update(dict(every_steps=1, keep=2, async_save=False))
  c.eval.update(dict(every_steps=100, batches=0))
  c.final_eval.tasks = ()
  c.export.update(dict(hf=False, orbax=False))
  return override(c, **changes)


def step_dirs(workdir: str) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def restore_params(workdir: str, step: int):
  return runs.restore_params(os.path.join(workdir, "checkpoints"), step)


def largest_state_file(step_dir: str) -> str:
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
  return max(files, key=os.path.getsize)


def truncate(path: str) -> None:
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def flip_bytes(path: str, n: int = 64) -> None:
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    chunk = f.read(n)
    f.seek(os.path.getsize(path) // 2)
    f.write(bytes(b ^ 0xFF for b in chunk))


# ----- 1. non-finite updates -----

def _toy_batch(cfg, m=1):
  tok = np.random.default_rng(0).integers(0, cfg.vocab_size, (m, 2, 9))
  return dict(tokens=jnp.asarray(tok[..., :-1], jnp.int32), targets=jnp.asarray(tok[..., 1:], jnp.int32),
              loss_mask=jnp.ones((m, 2, 8)), segment_ids=jnp.ones((m, 2, 8), jnp.int32),
              positions=jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (m, 2, 8)))


def test_nonfinite_update_is_skipped_inside_the_step():
  """A NaN weight (loss and gradients NaN) or a NaN in Adam's moments (finite loss and gradients, NaN update)
  leaves the whole state as it was and counts one skip; a healthy state is updated. One compiled step."""
  cfg = models.tiny("olmoe", num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=2)
  tx = optax.adamw(1e-3)
  fn = jax.jit(step_lib.make_train_step(cfg, (2,), tx))
  healthy = step_lib.init_state(models.init_params(cfg, jax.random.PRNGKey(0)), tx)
  nan_weight = healthy.replace(params=jax.tree_util.tree_map(lambda x: x, healthy.params))
  nan_weight.params["final_norm"]["scale"] = nan_weight.params["final_norm"]["scale"].at[0].set(jnp.nan)
  adam = healthy.opt_state[0]
  nan_moment = healthy.replace(opt_state=(adam._replace(mu=jax.tree_util.tree_map(
      lambda m: m.at[(0,) * m.ndim].set(jnp.nan), adam.mu)),) + tuple(healthy.opt_state[1:]))
  batch, idx = _toy_batch(cfg), jnp.zeros((1,), jnp.int32)
  for state, grads_finite in ((nan_weight, False), (nan_moment, True)):
    new, metrics = fn(state, batch, idx)
    assert not bool(metrics["applied"]) and bool(metrics["grads_finite"]) == grads_finite
    assert int(new.skipped) == 1 and int(new.step) == 1
    jax.tree_util.tree_map(np.testing.assert_array_equal, (new.params, new.opt_state),
                           (state.params, state.opt_state))
  new, metrics = fn(healthy, batch, idx)
  assert bool(metrics["applied"]) and int(new.skipped) == 0
  chex.assert_tree_all_finite((new.params, new.opt_state))
  assert not np.array_equal(new.params["final_norm"]["scale"], healthy.params["final_norm"]["scale"])


def test_huge_lr_never_checkpoints_a_nonfinite_state(tiny_ckpt, tmp_path):
  """Issue 11.1: a huge lr used to save NaN params (grad_norm=nan applied) as "the last good checkpoint"."""
  workdir = str(tmp_path / "lr")
  config = fast_config(tiny_ckpt, **{"optimizer.lr": 1e30, "optimizer.clip": 0.0, "optimizer.warmup_steps": 0,
                                     "num_steps": 8})
  with pytest.raises(loop.TrainingDiverged) as stopped:
    loop.train_and_evaluate(config, workdir)
  records = observe.read_metrics(workdir)
  assert records[-1]["skipped"] and not np.isfinite(records[-1]["grad_norm"] * records[-1]["loss"])
  assert step_dirs(workdir) and step_dirs(workdir)[-1] == records[-1]["step"] - 1
  for s in step_dirs(workdir):
    chex.assert_tree_all_finite(restore_params(workdir, s))
  assert f"last good checkpoint is step {step_dirs(workdir)[-1]}" in str(stopped.value)
  assert f"at step {records[-1]['step']} (k=[2])" in str(stopped.value)


# ----- 2. damaged checkpoints -----

def _toy_state(seed: int):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32), "b": jnp.asarray(rng.normal(size=(64,)))}


def _data_iter():
  return iter(grain.MapDataset.range(100).to_iter_dataset())


def _save_steps(directory, steps, keep=3, **kw):
  ckpt = RunCheckpointer(directory, keep=keep, async_save=False, **kw)
  for s in steps:
    ckpt.save(s, _toy_state(s), _data_iter(), {"step": s})
  return ckpt


@pytest.mark.parametrize("damage, why", [(truncate, "unreadable"), (flip_bytes, "checksum mismatch: array w")])
def test_damaged_newest_step_falls_back_to_the_older_good_one(tmp_path, damage, why):
  """Issue 11.2: a truncated or bit-flipped newest step is reported, moved aside, and the older step restored."""
  directory = str(tmp_path / "checkpoints")
  _save_steps(directory, [1, 2]).close()
  damage(largest_state_file(os.path.join(directory, "2")))
  ckpt = RunCheckpointer(directory, keep=3, async_save=False)
  step, state, meta = ckpt.restore_latest_good(_toy_state(0), _data_iter())
  assert step == 1 and meta == {"step": 1}
  jax.tree_util.tree_map(np.testing.assert_array_equal, state, _toy_state(1))
  assert ckpt.all_steps() == [1]
  (bad,) = os.listdir(directory + "_bad")
  assert bad.startswith("2-") and open(os.path.join(directory + "_bad", bad, "WHY.txt")).read().startswith(why)
  ckpt.close()


def test_older_step_outlives_a_newer_one_that_fails_its_read_back(tmp_path):
  """keep=1: step 1 is deleted only after step 2 is written, read back and matched; damaged, step 1 stays."""
  directory = str(tmp_path / "checkpoints")
  ckpt = RunCheckpointer(directory, keep=1, async_save=True)
  ckpt.save(1, _toy_state(1), _data_iter(), {"step": 1})
  ckpt.finish()
  ckpt.save(2, _toy_state(2), _data_iter(), {"step": 2})
  ckpt.manager.wait_until_finished()
  truncate(largest_state_file(os.path.join(directory, "2")))
  ckpt.finish()
  assert ckpt.all_steps() == [1]
  ckpt.save(3, _toy_state(3), _data_iter(), {"step": 3})
  ckpt.finish()
  assert ckpt.all_steps() == [3]  # a verified newer step: now the older one goes
  ckpt.close()


def test_nonfinite_state_is_refused_at_save(tmp_path):
  ckpt = RunCheckpointer(str(tmp_path / "c"), keep=2, async_save=False)
  state = _toy_state(0)
  state["b"] = state["b"].at[3].set(jnp.inf)
  with pytest.raises(FloatingPointError, match="non-finite.*b"):
    ckpt.save(1, state, _data_iter(), {})
  assert ckpt.all_steps() == []
  ckpt.close()


def test_truncated_newest_step_in_a_real_run(tiny_ckpt, tmp_path):
  """The trainer resumes past a truncated newest step from the older one and finishes; data_stats.json written;
  the first run's workdir is given as a file:// URL."""
  workdir = str(tmp_path / "run")
  first = loop.train_and_evaluate(fast_config(tiny_ckpt, **{"export.orbax": True}), f"file://{workdir}")
  assert first.workdir == workdir and step_dirs(workdir) == [2, 3]  # a file:// URL is a local path
  assert os.path.isdir(os.path.join(first.orbax_dir, "params"))
  truncate(largest_state_file(os.path.join(workdir, "checkpoints", "3")))
  result = loop.train_and_evaluate(fast_config(tiny_ckpt), workdir)
  assert result.final_step == 3 and step_dirs(workdir) == [2, 3]
  assert [r["step"] for r in observe.read_metrics(workdir)] == [1, 2, 3]
  assert len(os.listdir(os.path.join(workdir, "checkpoints_bad"))) == 1
  history = [json.loads(line) for line in open(os.path.join(workdir, resume.HISTORY))]
  assert [h["start_step"] for h in history] == [0, 2]
  stats = json.load(open(os.path.join(workdir, "data_stats.json")))
  assert stats["counts"].get("overlong_truncate", 0) > 0 and stats["first_reasons"]["overlong_truncate"]


# ----- 3. changed config on resume -----

def test_changed_config_resume(tiny_ckpt, tmp_path):
  """Issue 11.3: changes that alter training are refused with a diff unless allowed; num_steps rules."""
  workdir = str(tmp_path / "cfg")
  loop.train_and_evaluate(fast_config(tiny_ckpt, num_steps=2), workdir)
  lr = fast_config(tiny_ckpt).optimizer.lr
  refused = [({"schedule.k_train": (3,), "schedule.mode": "fixed"}, r"schedule\.k_train: \[2\] -> \[3\]"),
             ({"optimizer.lr": lr / 2}, re.escape(f"optimizer.lr: {lr!r} -> {lr / 2!r}")),
             ({"seed": 7}, r"seed: 0 -> 7"),
             ({"num_steps": 1}, r"num_steps=1 is below the checkpoint's step 2")]
  for change, match in refused:
    with pytest.raises(ResumeError, match=match):
      loop.train_and_evaluate(fast_config(tiny_ckpt, **{"num_steps": 2, **change}), workdir)
  other = str(tmp_path / "other_init")
  shutil.copytree(tiny_ckpt, other)
  with pytest.raises(ResumeError, match="init.path"):
    loop.train_and_evaluate(fast_config(other, num_steps=2), workdir)
  # Allowed: a new lr, and more steps (the steps already taken are kept).
  result = loop.train_and_evaluate(
      fast_config(tiny_ckpt, **{"num_steps": 3, "optimizer.lr": lr / 2, "resume.allow_changes": ("optimizer.lr",)}),
      workdir)
  assert result.final_step == 3 and [r["step"] for r in observe.read_metrics(workdir)] == [1, 2, 3]
  history = [json.loads(line) for line in open(os.path.join(workdir, resume.HISTORY))]
  assert len(history) == 2 and history[1]["allow_changes"] == ["optimizer.lr"]
  assert history[1]["changes"]["optimizer.lr"] == [lr, lr / 2] and history[1]["changes"]["num_steps"] == [2, 3]
  assert json.load(open(os.path.join(workdir, "run_info.json")))["config"]["optimizer"]["lr"] == lr


def test_fields_added_after_a_run_started_are_no_change_at_their_default():
  saved = {"optimizer": {"lr": 1e-3}}
  new = {"optimizer": {"lr": 1e-3, "new_knob": 0}, "new_section": {"x": 1}}
  assert resume.config_changes(saved, new, {"optimizer": {"new_knob": 0}, "new_section": {"x": 1}}) == {}
  assert resume.config_changes(saved, new, {"optimizer": {"new_knob": 5}}) == {
      "new_section.x": (None, 1), "optimizer.new_knob": (None, 0)}


def test_changed_shapes_give_a_readable_error(tmp_path):
  """A model of another width is not a damaged checkpoint: one readable line per differing array, nothing moved."""
  def state(width):
    params = {"embed": {"embedding": jnp.zeros((8, width))}, "final_norm": {"scale": jnp.ones((width,))}}
    return step_lib.init_state(params, optax.sgd(0.1))
  ckpt = RunCheckpointer(str(tmp_path / "checkpoints"), keep=2, async_save=False)
  ckpt.save(1, state(4), _data_iter(), {})
  with pytest.raises(ResumeError, match=r"embed/embedding: checkpoint \(8, 4\), config \(8, 6\)"):
    ckpt.restore_latest_good(state(6), _data_iter())
  assert ckpt.all_steps() == [1]
  ckpt.close()


# ----- 4. + 5. validation before loading, library errors naming the file -----

@pytest.mark.parametrize("change, match", [
    ({"eval.ks": (0,)}, r"eval\.ks=\(0,\)"),
    ({"final_eval.tasks": ("no_such_task",)}, "unknown task 'no_such_task'"),
    ({"optimizer.decay": "cosin"}, "optimizer.decay='cosin'"),
    ({"data.on_error": "skp"}, "data.on_error='skp'"),
    ({"optimizer.lr": -1e-3}, r"optimizer\.lr=-0\.001 must be"),
    ({"optimizer.decya": "linear"}, r"unknown config field 'optimizer\.decya' \(did you mean optimizer\.decay"),
    ({"init.path": "gs://no-such-bucket/ckpt"}, "init.path='gs://no-such-bucket/ckpt'"),
    ({"resume.allow_changes": ("optimizer.lrr",)}, r"unknown field 'optimizer\.lrr' \(did you mean optimizer\.lr"),
])
def test_config_errors_before_loading(tiny_ckpt, change, match):
  config = fast_config(tiny_ckpt)
  with config.unlocked():
    override(config, **change)
  with pytest.raises(TrainConfigError, match=match):
    validate_config(config)


def test_overlong_error_fails_before_the_model_loads(tiny_ckpt, tmp_path):
  workdir = str(tmp_path / "overlong")
  with pytest.raises(Exception, match=r"train\.jsonl:\d+: \d+ tokens > max_len 16"):
    loop.train_and_evaluate(fast_config(tiny_ckpt, **{"data.overlong": "error", "data.max_len": 16}), workdir)
  assert not os.path.exists(os.path.join(workdir, "metrics.jsonl")) and step_dirs(workdir) == []


@pytest.mark.parametrize("damage", ["truncated_safetensors", "malformed_config"])
def test_damaged_init_checkpoint_names_the_file(tiny_ckpt, tmp_path, damage):
  bad = str(tmp_path / "bad")
  shutil.copytree(tiny_ckpt, bad)
  if damage == "truncated_safetensors":
    truncate(os.path.join(bad, "model.safetensors"))
    name = "model.safetensors"
  else:
    with open(os.path.join(bad, "config.json"), "a") as f:
      f.write("{,")
    name = "config.json"
  with pytest.raises(TrainConfigError, match=os.path.join(bad, name)):
    validate_config(fast_config(bad))
  with pytest.raises((hf.CheckpointError, models.ConfigError), match=os.path.join(bad, name)):
    hf.load(bad)  # the library API names the file too


def _cli(args: list[str], env=None) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
  return subprocess.run([sys.executable, "-m", "phds_jax.train", "--config=configs/demo.py", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)


def test_cli_user_errors_are_one_line_exit_2(tmp_path):
  unknown = _cli(["--config.foo=1"])
  assert unknown.returncode == cli.EXIT_USER_ERROR and "Traceback" not in unknown.stderr
  assert "error: unknown config field 'foo'" in unknown.stderr
  bad_lr = _cli(["--config.optimizer.lr=-1", f"--workdir={tmp_path / 'w'}", "--debug"])
  assert bad_lr.returncode != 0 and "Traceback" in bad_lr.stderr and "optimizer.lr=-1.0" in bad_lr.stderr


# ----- 6. remote-style paths -----

def test_url_handling_without_network(tiny_ckpt, tmp_path, monkeypatch):
  """gs:// stays a URL (never ./gs:/...) and fails with a message naming it; file:// URLs are local paths."""
  assert paths.normalize(f"file://{tmp_path}/run") == f"{tmp_path}/run"
  assert paths.normalize("gs://bucket/run/") == "gs://bucket/run"
  assert paths.join("gs://bucket/run", "checkpoints") == "gs://bucket/run/checkpoints"
  monkeypatch.chdir(tmp_path)
  with pytest.raises(TrainConfigError, match="workdir 'gs://bucket/run' cannot be created"):
    loop.train_and_evaluate(fast_config(tiny_ckpt), "gs://bucket/run")
  assert not os.path.exists(tmp_path / "gs:")  # (a file:// workdir runs in test_truncated_newest_step_in_a_real_run)


def test_staging_copies_a_tree_and_leaves_local_paths_alone(tmp_path):
  """Readers that need local files get a staged copy of remote inputs; the copy itself runs store to store."""
  src = tmp_path / "src"
  (src / "sub").mkdir(parents=True)
  (src / "config.json").write_text("{}")
  (src / "sub" / "a.txt").write_text("a")
  paths.copy_tree(paths.as_epath(str(src)), paths.as_epath(str(tmp_path / "dst")))
  assert (tmp_path / "dst" / "sub" / "a.txt").read_text() == "a" and (tmp_path / "dst" / "config.json").exists()
  assert paths.staged(f"file://{src}") == str(src)  # local: no copy
  assert [paths.is_remote(u) for u in ("gs://b/x", "s3://b/x", "file:///x", "/x", "x")] == [True, True] + [False] * 3


def test_remote_inputs_are_staged_into_a_runnable_config(tiny_ckpt, tmp_path, monkeypatch):
  """gs:// init, tokenizer and data globs become local copies in a config the data pipeline reads (the bucket is
  stood in for by a local folder: no network here; the copy itself is tested above)."""
  bucket = tmp_path / "bucket"
  shutil.copytree(os.path.join(os.path.dirname(paths.__file__), "assets", "demo_sft"), bucket / "data")
  shutil.copytree(tiny_ckpt, bucket / "ckpt")
  to_local = lambda url: str(bucket / url[len("gs://bucket/"):])
  monkeypatch.setattr(paths, "staged", lambda url, cache_dir=None: to_local(url) if paths.is_remote(url) else url)
  monkeypatch.setattr(paths, "glob", lambda pattern: sorted(
      "gs://bucket/" + os.path.relpath(f, bucket) for f in __import__("glob").glob(to_local(pattern))))
  config = fast_config(tiny_ckpt)
  config.init.path = "gs://bucket/ckpt"
  config.data.path = "gs://bucket/data/train*.jsonl"
  local = run_lib.local_inputs(config)
  assert local.init.path == str(bucket / "ckpt") and local.tokenizer_dir == str(bucket / "ckpt")
  assert local.data.path == (str(bucket / "data" / "train.jsonl"),)
  assert config.data.path == "gs://bucket/data/train*.jsonl"  # the saved, compared config keeps the URLs
  records = data_lib.load_source(run_lib.data_config(local, 8, "train", validation_fraction=0.0))
  assert len(records) > 0


# ----- SIGKILL mid-save, disk full during save -----

def _train_cmd(ckpt: str, workdir: str, num_steps: int) -> list[str]:
  return [sys.executable, "-m", "phds_jax.train", "--config=configs/demo.py", f"--workdir={workdir}",
          f"--config.init.path={ckpt}", f"--config.num_steps={num_steps}", "--config.batch_size=8",
          "--config.microbatches=1", "--config.data.max_len=32", "--config.schedule.mode=fixed",
          "--config.schedule.k_train=(2,)", "--config.schedule.anchor=0", "--config.checkpoint.every_steps=1",
          "--config.eval.batches=0", "--config.export.hf=False", "--config.export.orbax=False",
          "--config.final_eval.tasks=()"]


def _limit_file_size(limit: int):
  def apply():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, like ENOSPC
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
  return apply


def test_sigkill_mid_save_and_disk_full_during_save(tiny_ckpt, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  workdir = str(tmp_path / "kill")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  proc = subprocess.Popen(_train_cmd(tiny_ckpt, workdir, 40), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline, killed_during_save = time.time() + 300, False
  while time.time() < deadline and proc.poll() is None:  # SIGKILL while a step folder is still temporary
    names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    if any("tmp" in n for n in names) and any(n.isdigit() for n in names):
      proc.send_signal(signal.SIGKILL)
      killed_during_save = True
      break
    time.sleep(0.002)
  proc.wait()
  assert killed_during_save, "the run ended before a save could be interrupted"
  kept = step_dirs(workdir)
  assert kept, os.listdir(ckpt_dir)
  # Disk full during the next save: every write past 64 KiB fails (the state files are larger).
  full = subprocess.run(_train_cmd(tiny_ckpt, workdir, 40), cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300, preexec_fn=_limit_file_size(64 * 1024))
  assert full.returncode == cli.EXIT_USER_ERROR, full.stderr[-2000:]
  lines = full.stderr.splitlines()
  at = [i for i, line in enumerate(lines) if line.startswith("error:")]  # TensorStore's threads may print more
  assert len(at) == 1, full.stderr[-3000:]
  at = at[0]
  assert lines[at].startswith("error: saving checkpoint step") and "older checkpoints are untouched" in lines[at]
  assert lines[at + 1].startswith("fix:") and f'File "{REPO}' not in full.stderr  # no traceback through our code
  assert step_dirs(workdir)[-1] == kept[-1]  # nothing older was lost
  # Space back: the same command resumes from the newest good step and finishes.
  done = subprocess.run(_train_cmd(tiny_ckpt, workdir, kept[-1] + 2), cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert [r["step"] for r in observe.read_metrics(workdir)] == list(range(1, kept[-1] + 3))
  for s in step_dirs(workdir):
    chex.assert_tree_all_finite(restore_params(workdir, s))
