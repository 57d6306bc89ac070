"""Build scripts for the shipped assets (run from the repository root: `python -m tools.<name>`); not installed."""
