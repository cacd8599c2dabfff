"""The SPES node: Flower ClientApp (app.py) around a Flower-free local round."""
