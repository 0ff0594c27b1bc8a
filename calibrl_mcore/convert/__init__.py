"""The parts of tools/convert_checkpoint.py (`calibrl convert`): stage and checks, HF reading, Megatron dist
checkpoint parts and reading, the hf-to-mcore / mcore-to-hf commands, verify.

Entry point (CLI, launching, re-exports): ``calibrl_mcore.convert_checkpoint``; its docstring explains the design.
"""
