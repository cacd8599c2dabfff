"""Errors both sides raise, in a module that imports nothing (a config error must be cheap to report)."""


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what to change."""
