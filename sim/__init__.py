"""Single-machine Flower simulation / loopback deployment launcher (see sim.launcher)."""
