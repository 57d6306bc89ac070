"""Test set-up: 8 fake CPU devices (for sharding tests) and no hub access, fixed before jax initialises."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


def pytest_configure(config):
  config.addinivalue_line("markers", "gpu: needs a GPU (run with JAX_PLATFORMS=cuda); skipped elsewhere")
