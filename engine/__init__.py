"""Ways to execute a run: in this process (`engine.inprocess`) or as Flower processes on this machine."""
