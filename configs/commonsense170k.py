"""PHDS on CommonSense170K, the setting of the paper's internal-model runs (docs/method.md §3).

    python -m phds_jax.train --config=configs/commonsense170k.py \
      --config.init.path=/ckpt/OLMoE-1B-7B-0125 --config.data.path=/data/commonsense_170k.json
    python -m phds_jax.train --config=configs/commonsense170k.py:qwen --config.init.path=/ckpt/Qwen1.5-MoE-A2.7B ...

CommonSense170K is the LLM-Adapters mixture (Hu et al. 2023): the training sets of BoolQ, PIQA, SIQA, HellaSwag,
WinoGrande, ARC-e, ARC-c and OBQA as `{"instruction", "input", "output", "answer"}` records (one JSON array,
`ft-training_set/commonsense_170k.json` in that repository). The paper ran it on internal MoEs that are not
public; here a public base stands in (OLMoE by default, `:qwen` for Qwen1.5-MoE). One example per row, one
epoch, the anchor from 93.9% of it and selection after 5,000 steps: the paper's timing as far as it is known.
Tags as in docs/method.md: (summary), (review), (model card), (inferred), (ours).
"""

from configs.base import base_config, tiny_overrides


def get_config(arg: str | None = None):
  c = base_config()
  qwen = arg is not None and arg.startswith("qwen")
  c.name = "commonsense170k-phds" + ("-qwen" if qwen else "")
  c.model_type = "qwen2_moe" if qwen else "olmoe"
  c.init.path = "/ckpt/Qwen1.5-MoE-A2.7B" if qwen else "/ckpt/OLMoE-1B-7B-0125"
  if qwen:
    c.schedule.update(dict(k_train=(2, 3, 4), anchor=3))  # (summary) "[2,3,4]->3" on a k_pre = 4 model
    c.data.template = "chatml"
  else:
    c.schedule.update(dict(k_train=(4, 5, 6, 7, 8), anchor=4))  # (summary) "mix 4-8"; anchor k_pre/2 (inferred)
  c.schedule.update(dict(switch_at=0.939, switch_unit="epochs"))  # (summary) ~93.9% of one epoch, ~10,000 steps
  c.data.update(dict(path="/data/commonsense_170k.json", format="instruction", max_len=512,  # ours: short items
                     packing="none",  # (inferred) one example per row, see batch_size
                     validation_fraction=0.01))
  # (inferred) ~10,000 steps at 93.9% of one epoch of ~170K examples is ~16 examples per step.
  c.batch_size = 16
  c.microbatches = 1
  c.num_epochs = 1  # (inferred) the curriculum falls inside the first epoch; a longer run is not reported
  c.optimizer.update(dict(lr=1e-5, warmup_steps=300))  # ours
  # (summary) load-balancing coefficient 0.01 for the internal models. In which normalisation is not stated;
  # a quoted 0.01 reads as the usual Switch/transformers form (inferred), so router_lb_norm='hf'.
  c.loss.lb_coef = 0.01
  c.model.router_lb_norm = "hf"
  c.mesh.update(dict(data=-1, fsdp=1, expert=1))
  c.checkpoint.every_steps = 500
  c.eval.every_steps = 500
  # (summary) after a 5,000-step burn-in, the checkpoint with the best multiple-choice validation accuracy at
  # k_pre. ARC-Easy's validation split is ours: the paper's validation items are not named.
  c.select.update(dict(signal="mc", task="arc_easy:tfds:ai2_arc/ARC-Easy/validation", limit=0, batch_size=32,
                       rule="best_at_kpre", burn_in_steps=5000, export="selected"))
  if arg is not None and arg.endswith("tiny"):
    c = tiny_overrides(c)
    c.num_epochs = 0
    c.schedule.update(dict(switch_at=0.939, switch_unit="fraction"))
    c.select.update(dict(signal="loss", burn_in_steps=0, export="final"))
  return c
