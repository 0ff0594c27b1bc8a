"""Rollout: generate samples for RL through one HTTP API, whatever engine serves it.

- server.py:   FastAPI app with SGLang-native routes (/generate, weight updates, ...) and OpenAI chat.
- protocol.py: request/response models of that API (strict: unknown fields are 400s).
- client.py:   RolloutClient (batching, n samples, retries, round-robin) -> list[Sample].
- engines/:    embedded.py (HF model + KV-cached continuous batching; CPU and GPU), sglang.py / vllm.py
               (launch and supervise real servers on GPU machines), base.py (the engine interface).
"""
