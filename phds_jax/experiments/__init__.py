"""Experiment drivers: `compare` runs PHDS against its baselines (docs/method.md §4) and writes one report.

    from phds_jax.experiments.compare import run_comparison
    report = run_comparison(config, workdir)   # config: configs/compare_demo.py's get_config()
"""
