"""transformer_engine.pytorch.tensor (stand-in): the QuantizedTensor base class, for Megatron's isinstance
checks (`fp8_utils.is_float8tensor`). The stand-in never creates one: parameters stay in high precision."""

import torch


class QuantizedTensor(torch.Tensor):
    """TE 2.11 `tensor/quantized_tensor.py`: base of Float8Tensor, MXFP8Tensor, ... (never instantiated here)."""
