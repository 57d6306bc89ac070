"""The demo teaches: its settings, the progress line's held-out loss, integer k ticks on its plots.

(That the held-out loss falls over the full 100-step demo was measured on 2 CPU cores, see configs/demo.py; the
docs test runs a shortened demo end to end.)"""

from pathlib import Path

import numpy as np

from configs import demo
from phds_jax.evaluation import report
from phds_jax.training import observe


def test_demo_settings_and_checkpoint_policy_are_what_the_readme_says():
  c = demo.get_config()
  assert (c.optimizer.lr, c.num_steps, c.eval.every_steps) == (3e-4, 100, 25)
  assert (c.checkpoint.every_steps, c.checkpoint.keep) == (50, 2)
  assert "the best step by held-out loss" in (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")


def test_progress_line_shows_the_latest_held_out_loss(tmp_path):
  log = observe.RunLog(str(tmp_path), total_steps=3, start_step=0, tensorboard=False)
  base = dict(loss=2.5, lr=1e-4, grad_norm=1.0, lb_loss=0.0, z_loss=0.0, k_M=[2], loss_M=[2.5])
  args = ([2], np.array([25.0]), np.array([10.0]), 10.0, 1.0, 0.0)
  log.step(dict(base, step=1), *args)
  assert "val@" not in log.bar.postfix
  log.step(dict(base, step=2, val_loss=3.4567), *args)
  log.step(dict(base, step=3), *args)  # shown until the next evaluation
  assert "val@2=3.457" in log.bar.postfix and "loss=2.5000" in log.bar.postfix
  log.close()


def test_k_axes_have_integer_ticks(tmp_path, monkeypatch):
  figures = []
  real_save = observe._save
  monkeypatch.setattr(observe, "_save", lambda fig, workdir, name: figures.append((name, fig.axes[0].get_xticks()))
                      or real_save(fig, workdir, name))
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "k": 2, "k_M": [2], "loss_M": [2.0]}\n')
  observe.plot_run(str(tmp_path), {2: 3, 3: 1}, {1: 3.5, 2: 3.4, 3: 3.3, 4: 3.2})
  ticks = dict(figures)["heldout_loss_vs_k.png"]
  assert list(ticks) == [1, 2, 3, 4]
  summary = {"meta": {"ks": [1, 2, 3, 4]}, "tasks": {"jsonl:x": {"kind": "mc", "primary": "acc", "agreement": {
      "ks": [1, 2, 3, 4], "matrix": np.eye(4).tolist()}, "by_k": {str(k): {"acc": 0.3} for k in (1, 2, 3, 4)}}},
             "average": {}}
  assert [p.name for p in report.plot(summary, tmp_path)] == ["accuracy_vs_k.png", "agreement.png"]
