"""The parts of tools/make_tiny_model.py: sizes and chat templates, tokenizer, HF config, processor.

Entry point and Python API: ``calibrl_mcore.make_tiny_model`` (``make_tiny_model``, ``load_processor``, ...).
"""
