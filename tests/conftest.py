"""Test set-up: 8 fake CPU devices (for sharding tests) and no hub access, fixed before jax initialises."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


def pytest_configure(config):
  config.addinivalue_line("markers", "gpu: needs a GPU (run with JAX_PLATFORMS=cuda); skipped elsewhere")


import os  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> str:
  """A tiny random OLMoE (k_pre 4) in HF format with the demo tokenizer (vocab 2048): the trainer's tests."""
  from phds_jax import hf, models, paths
  path = str(tmp_path_factory.mktemp("ckpt") / "tiny")
  cfg = models.tiny("olmoe", vocab_size=2048, hidden_size=32, num_heads=2, num_kv_heads=2, moe_ffn=16)
  hf.save(path, cfg, models.init_params(cfg, jax.random.PRNGKey(0)),
          tokenizer_dir=os.path.join(paths.ASSETS_DIR, "demo_tokenizer"))
  return path


def override(config, **changes):
  """`config` with dotted fields set ({"optimizer.lr": 1e-3}), as `--config.FIELD=value` sets them; returns it."""
  for key, value in changes.items():
    target = config
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config
