"""The SPES coordinator: Flower ServerApp (app.py), run config, node discovery, run log."""
