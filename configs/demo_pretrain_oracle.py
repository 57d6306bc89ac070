"""Oracle bases for the comparison (phds_jax/assets/oracle_k{K}): the demo base's recipe, pretrained at top-K.

    python -m phds_jax.train --config=configs/demo_pretrain_oracle.py:2 --workdir=runs/oracle_k2_pretrain
    cp -r runs/oracle_k2_pretrain/final/hf phds_jax/assets/oracle_k2

Everything but `scratch_model.k_pre` and the fixed training k is configs/demo_pretrain.py (same data, steps,
optimizer, seed), so Oracle-K differs from the k_pre=4 demo base only in the sparsity it was pretrained at:
the "proprietary models fit on multiple operating points" of the paper (docs/method.md §4.1).
"""

from configs import demo_pretrain


def get_config(arg: str | None = None):
  if not arg or not arg.isdigit():
    raise ValueError(f"configs/demo_pretrain_oracle.py needs the pretraining k as its argument (e.g. ':2'), "
                     f"got {arg!r}")
  k = int(arg)
  c = demo_pretrain.get_config()
  if not 1 <= k <= c.scratch_model.num_experts:
    raise ValueError(f"k={k} must be in [1, num_experts={c.scratch_model.num_experts}]")
  c.name = f"demo-pretrain-oracle-k{k}"
  c.scratch_model.k_pre = k
  c.schedule.k_train = (k,)
  return c
