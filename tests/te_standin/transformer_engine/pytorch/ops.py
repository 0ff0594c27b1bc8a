"""transformer_engine.pytorch.ops (stand-in): names only. Megatron's `TEFusedMLP` annotates with them at class
definition; our specs never use fused ops, so constructing any of these raises."""


class FusibleOperation:
    def __init__(self, *args, **kwargs) -> None:
        raise NotImplementedError(f"TE stand-in: te.pytorch.ops.{type(self).__name__} is not emulated")


def _op(name: str) -> type:
    return type(name, (FusibleOperation,), {"__doc__": f"te.pytorch.ops.{name} (not emulated)"})


Sequential = _op("Sequential")
BasicLinear = _op("BasicLinear")
Bias = _op("Bias")
AllReduce = _op("AllReduce")
ReduceScatter = _op("ReduceScatter")
LayerNorm = _op("LayerNorm")
RMSNorm = _op("RMSNorm")
GELU, GEGLU, ReLU, ReGLU, SiLU, SwiGLU = (_op(n) for n in ("GELU", "GEGLU", "ReLU", "ReGLU", "SiLU", "SwiGLU"))
