"""Two processes on localhost with jax.distributed (gloo collectives on CPU) train like one process."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from phds_jax.training import step as step_lib
from tests import distributed_worker as worker

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_process_data_parallel_matches_single_process():
  port = str(_free_port())
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  procs = [subprocess.Popen([sys.executable, "-m", "tests.distributed_worker", str(i), port], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outputs
  results = [json.loads(line[len("LOSSES "):]) for out in outputs for line in out.splitlines()
             if line.startswith("LOSSES ")]
  assert sorted(r["process"] for r in results) == [0, 1] and all(r["processes"] == 2 for r in results)

  cfg, params, tx = worker.setup()
  batch = {k: jnp.asarray(v) for k, v in worker.global_batch(cfg).items()}
  fn = jax.jit(step_lib.make_train_step(cfg, worker.LEVELS, tx))
  state, reference = step_lib.init_state(params, tx), []
  for step in range(worker.STEPS):
    state, metrics = fn(state, batch, jnp.asarray([step % len(worker.LEVELS)], jnp.int32))
    reference.append(float(metrics["loss"]))
  for r in results:
    np.testing.assert_allclose(r["losses"], reference, rtol=2e-5)
