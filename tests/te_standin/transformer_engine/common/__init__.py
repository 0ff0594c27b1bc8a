"""transformer_engine.common (stand-in): the FP8 recipes."""

from . import recipe  # noqa: F401
