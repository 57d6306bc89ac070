"""One process of the two-process jax.distributed test (tests/test_distributed.py); not a test itself.

Usage: python -m tests.distributed_worker PROCESS_ID PORT. Each process holds one CPU device and feeds its half
of a fixed global batch; it prints the per-step losses of a data-parallel PHDS train step.
"""

import json
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process collectives on CPU

import numpy as np  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from phds_jax import models, sharding  # noqa: E402
from phds_jax.training import step as step_lib  # noqa: E402

STEPS = 3
LEVELS = (2, 4)


def global_batch(cfg, rows: int = 4, seq: int = 16) -> dict[str, np.ndarray]:
  tok = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, rows, seq + 1))
  return dict(tokens=tok[..., :-1].astype(np.int32), targets=tok[..., 1:].astype(np.int32),
              loss_mask=np.ones((1, rows, seq), np.float32), segment_ids=np.ones((1, rows, seq), np.int32),
              positions=np.broadcast_to(np.arange(seq, dtype=np.int32), (1, rows, seq)).copy())


def setup():
  cfg = models.tiny("olmoe")
  return cfg, models.init_params(cfg, jax.random.PRNGKey(0)), optax.adamw(3e-3)


def main(pid: int, port: str) -> None:
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
  cfg, params, tx = setup()
  mesh = sharding.make_mesh(dict(data=2))
  full = global_batch(cfg)
  rows = full["tokens"].shape[1] // 2
  local = {k: v[:, pid * rows:(pid + 1) * rows] for k, v in full.items()}  # this host's shard only
  with jax.set_mesh(mesh):
    state, shardings = step_lib.sharded_init_state(params, tx, mesh)
    bs = sharding.batch_sharding(mesh, leading_unsharded=1)
    batch = {k: jax.make_array_from_process_local_data(bs, v) for k, v in local.items()}
    fn = jax.jit(step_lib.make_train_step(cfg, LEVELS, tx), in_shardings=(shardings, bs, None),
                 out_shardings=(shardings, None))
    losses = []
    for step in range(STEPS):
      state, metrics = fn(state, batch, jnp.asarray([step % len(LEVELS)], jnp.int32))
      losses.append(float(metrics["loss"]))
  print("LOSSES " + json.dumps(dict(process=pid, processes=jax.process_count(), losses=losses)), flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2])
