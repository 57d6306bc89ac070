"""phds_jax.checkpoint.load_params: one reader for exports and for a training run's steps (manifest-verified)."""

import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phds_jax import checkpoint
from phds_jax.checkpoint import BadCheckpoint, RunCheckpointer


def _state(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  return {"params": {"w": jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)},
          "opt": {"mu": jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)}, "step": jnp.asarray(seed)}


def _save(directory: str, steps: list[int]) -> None:
  ckpt = RunCheckpointer(directory, keep=len(steps), async_save=False)
  for s in steps:
    ckpt.save(s, _state(s), iter(grain.MapDataset.range(10).to_iter_dataset()), {"step": s})
  ckpt.close()


def _flip_middle(step_dir: str) -> None:
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
  path = max(files, key=os.path.getsize)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    chunk = f.read(64)
    f.seek(os.path.getsize(path) // 2)
    f.write(bytes(b ^ 0xFF for b in chunk))


def test_run_step_is_read_verified_and_a_damaged_step_is_refused(tmp_path):
  directory = str(tmp_path / "checkpoints")
  _save(directory, [1, 2])
  cfg, params = checkpoint.load_params(directory, step=1)
  assert cfg is None
  np.testing.assert_array_equal(params["w"], _state(1)["params"]["w"])
  _, half = checkpoint.load_params(directory, dtype="bfloat16", step=1)
  assert half["w"].dtype == jnp.bfloat16
  _flip_middle(os.path.join(directory, "2"))
  with pytest.raises(BadCheckpoint, match="checkpoint step 2 in .*checksum mismatch"):
    checkpoint.load_params(directory, step=2)
  assert sorted(os.listdir(directory)) == ["1", "2"]  # a reader reports, it never moves or deletes steps
  with pytest.raises(FileNotFoundError, match="no checkpoint step 3"):
    checkpoint.load_params(directory, step=3)
  jax.tree.map(np.testing.assert_array_equal, checkpoint.load_params(directory, step=1)[1], params)
