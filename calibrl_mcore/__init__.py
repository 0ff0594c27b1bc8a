"""calibrl-mcore: a Megatron-Core trainer for CalibRL (hybrid-policy RLVR with expert calibration)."""

__version__ = "0.1.0"
