"""InternVL vision side on Megatron-Core parts: InternViT tower, pixel shuffle, multi-modal projector.

Decision: the tower is tensor-parallel (like the Qwen2.5-VL tower), not replicated. Each InternViT layer
is a small module of our own (`InternVisionLayer`) whose attention and MLP are Megatron's `SelfAttention`
(column-parallel fused QKV, row-parallel projection) and `MLP` (column/row-parallel fc1/fc2), filled from
the same backend switch (local on CPU, TE on GPU). Why:
  * size: InternViT-6B (InternVL3-38B/78B) has ~6B parameters; replicated on every TP rank its weights,
    grads and Adam state would not fit next to the decoder, and InternViT-300M's attention over 1025
    tokens per 448px tile would be computed TP times over;
  * one attention/MLP implementation and one HF<->Megatron rule style for both towers.
Why not Megatron's `TransformerLayer`: InternViT scales both residual branches by learned per-channel
vectors (`lambda_1`, `lambda_2`, "layer scale"), which `TransformerLayer` has no slot for; folding them
into the projection weights would change the parameterisation (different grads, no exact round trip).
What it takes:
  * QK-norm (InternViT-6B): HF normalises q and k over the *whole* projection width (all heads), while
    Megatron's q/k-norm slots see this rank's heads only. `HeadShardedRMSNorm` all-reduces the sum of
    squares over TP (in forward and backward) and keeps its weight TP-sharded along the heads.
  * head count: TP must divide the tower's heads (16 for InternViT-300M; InternViT-6B has 25 heads, so
    it runs at TP=1 or 5 until dummy-head padding is added) - checked with a clear error.
  * MLP width is zero-padded to a multiple of TP (`gelu(0) = 0` and zero fc2 columns add nothing).
  * no sequence parallelism inside the tower; the patch embedding (Conv2d), class token, position
    embedding, norms and layer scales are replicated, and their grads agree across TP ranks because
    every TP region's input grad is all-reduced by Megatron's linears.
  * attention is full (bidirectional) within a tile: each tile is one sequence of 1 + patches tokens,
    tiles form the batch (`[s = 1 + P, b = tiles, h]`), so no mask is needed (`AttnMaskType.no_mask`).
Pipeline parallelism: the tower and the projector exist only on the first stage (`pre_process`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)
from torch import Tensor, nn

from .specs import (
    Backend,
    backend_config_kwargs,
    core_attention_module,
    linear_modules,
    mlp_spec,
    norm_module,
)
from .vlm_base import vision_adapter_config, vision_tower_sizes

ACTIVATIONS = {"gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu}
NORMS = {"layer_norm": "LayerNorm", "rms_norm": "RMSNorm"}
QK_NORM_EPS = 1e-6  # HF builds InternViT's q_norm / k_norm with the RMSNorm default, not layer_norm_eps
PROJECTOR_NORM_EPS = 1e-5  # HF: nn.LayerNorm default in the multi-modal projector


def check_supported(hf_config) -> None:
    """Raise for InternVL options this provider does not implement (none is used by InternVL3 -hf)."""
    vision = hf_config.vision_config
    unsupported = {
        "vision_feature_layer (a list)": isinstance(hf_config.vision_feature_layer, (list, tuple)),
        f"vision_feature_select_strategy={hf_config.vision_feature_select_strategy!r}": (
            hf_config.vision_feature_select_strategy != "default"
        ),
        "vision_config.use_mean_pooling=False (final vision LayerNorm)": not vision.use_mean_pooling,
        "vision_config.use_mask_token=True": vision.use_mask_token,
        f"vision_config.norm_type={vision.norm_type!r}": vision.norm_type not in NORMS,
        f"vision_config.hidden_act={vision.hidden_act!r}": vision.hidden_act not in ACTIVATIONS,
        f"projector_hidden_act={hf_config.projector_hidden_act!r}": (
            hf_config.projector_hidden_act not in ACTIVATIONS
        ),
    }
    bad = [name for name, is_bad in unsupported.items() if is_bad]
    if bad:
        raise NotImplementedError(f"InternVL options not supported by the Megatron provider: {bad}")
    shuffle = 1 / hf_config.downsample_ratio
    if abs(shuffle - round(shuffle)) > 1e-6:
        raise NotImplementedError(f"downsample_ratio={hf_config.downsample_ratio} is not 1/integer")


def vision_configs(
    hf_config, *, tp_size: int, params_dtype: torch.dtype, backend: Backend
) -> tuple[TransformerConfig, TransformerConfig]:
    """(tower config, projector config) from HF's `InternVLConfig`."""
    check_supported(hf_config)
    vision = hf_config.vision_config
    sizes = vision_tower_sizes(
        "InternViT num_attention_heads",
        hidden=vision.hidden_size,
        heads=vision.num_attention_heads,
        mlp=vision.intermediate_size,
        tp_size=tp_size,
    )
    text_hidden = hf_config.text_config.hidden_size
    if text_hidden % tp_size:
        raise ValueError(f"projector width (text hidden_size={text_hidden}) not divisible by TP={tp_size}")
    common = backend_config_kwargs(backend, params_dtype)
    common["bias_activation_fusion"] = False  # Megatron's fused bias-GELU is the tanh approximation
    tower = TransformerConfig(
        num_layers=vision.num_hidden_layers,
        add_bias_linear=True,  # projection_layer, fc1, fc2; the QKV bias follows attention_bias (spec)
        add_qkv_bias=vision.attention_bias,
        gated_linear_unit=False,
        activation_func=ACTIVATIONS[vision.hidden_act],
        normalization=NORMS[vision.norm_type],
        layernorm_epsilon=vision.layer_norm_eps,
        **sizes,  # incl. the parallel layout
        **common,
    )
    projector = vision_adapter_config(
        text_hidden, text_hidden, tp_size,  # heads: unused (no attention), only checked against TP
        activation=ACTIVATIONS[hf_config.projector_hidden_act],
        norm="LayerNorm", eps=PROJECTOR_NORM_EPS, tp_size=tp_size, **common,
    )  # fmt: skip
    return tower, projector


def feature_layers(vision_feature_layer: int, num_layers: int) -> int:
    """How many tower layers feed the projector: HF reads `hidden_states[k]`, where index 0 is the
    embedding output and index i the output of layer i (negative k counts from the end)."""
    count = vision_feature_layer + num_layers + 1 if vision_feature_layer < 0 else vision_feature_layer
    if not 0 <= count <= num_layers:
        raise ValueError(f"vision_feature_layer={vision_feature_layer} out of range for {num_layers} layers")
    return count


def pixel_shuffle(features: Tensor, ratio: float) -> Tensor:
    """HF InternVL's pixel shuffle: [n, a, b, c] -> [n, a*ratio, b*ratio, c/ratio^2] (ratio = 1/r).

    Each output token stacks the channels of an r x r block of neighbouring patches, in HF's order
    (the two spatial axes are swapped twice, so the order of channels inside a token matters).
    """
    r = round(1 / ratio)
    n, a, b, c = features.shape
    if a % r or b % r:
        raise ValueError(f"feature map {a}x{b} is not divisible by the shuffle factor {r}")
    x = features.reshape(n, a, b // r, c * r)  # merge r neighbours along axis 2 into channels
    x = x.permute(0, 2, 1, 3).contiguous()  # [n, b/r, a, c*r]
    x = x.view(n, b // r, a // r, c * r * r)  # merge r neighbours along the other axis
    return x.permute(0, 2, 1, 3).contiguous()  # [n, a/r, b/r, c*r*r]


# ---- QK-norm over all heads, with the heads TP-sharded ----------------------------------------------------


class _AllReduceSum(torch.autograd.Function):
    """Sum over a process group in forward *and* backward.

    Every rank's output feeds rank-local (head-sharded) computation, so the grad of each rank's input is
    the sum of all ranks' output grads. (Megatron's `reduce_from_tensor_model_parallel_region` has an
    identity backward: right only when what follows is replicated.)
    """

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class HeadShardedRMSNorm(nn.Module):
    """RMSNorm over the full q (or k) width of all heads, for Megatron's q/k-norm slot.

    Input [s, b, heads/tp, head_dim]; the weight is this rank's slice [heads/tp * head_dim] of HF's
    `q_norm.weight` / `k_norm.weight`. Built by `SelfAttention` with (config, hidden_size=head_dim, eps);
    the width and eps come from the config and HF instead.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = QK_NORM_EPS) -> None:
        super().__init__()
        tp = config.tensor_model_parallel_size
        self.full_width = config.num_attention_heads * config.kv_channels
        self.weight = nn.Parameter(torch.ones(self.full_width // tp, dtype=config.params_dtype))
        # Marks it TP-split for Megatron's grad-norm / optimizer code (otherwise counted on TP rank 0 only).
        tensor_parallel.set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)
        self.tp_group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        square_sum = x32.pow(2).sum(dim=(-2, -1), keepdim=True)  # [s, b, 1, 1], this rank's heads
        if self.tp_group is not None:
            square_sum = _AllReduceSum.apply(square_sum, self.tp_group)  # all heads
        normed = x32 * torch.rsqrt(square_sum / self.full_width + QK_NORM_EPS)
        return self.weight.view(x.shape[-2:]) * normed.to(x.dtype)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Distributed checkpoints: the weight is split over TP on axis 0 (not replicated)."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True),
            prefix,
            {"weight": 0},
            sharded_offsets,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
            dp_cp_group=metadata["dp_cp_group"],
        )


# ---- one InternViT layer: slots filled per backend ----------------------------------------------------------


@dataclass
class InternVisionLayerSubmodules:
    input_layernorm: type
    self_attention: ModuleSpec
    pre_mlp_layernorm: type
    mlp: ModuleSpec


def vision_layer_spec(backend: Backend, *, qkv_bias: bool, qk_norm: bool) -> ModuleSpec:
    """Standalone norms (no TE norm+linear fusion), so parameter names are the same on both backends."""
    column, row = linear_modules(backend)

    def qkv_linear(*args, bias: bool, **kwargs):
        # SelfAttention asks for a QKV bias whenever add_bias_linear is set; InternViT's follows attention_bias.
        return column(*args, bias=qkv_bias, **kwargs)

    qk_norm_module = HeadShardedRMSNorm if qk_norm else None
    return ModuleSpec(
        module=InternVisionLayer,
        submodules=InternVisionLayerSubmodules(
            input_layernorm=norm_module(backend),
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=qkv_linear,
                    core_attention=core_attention_module(backend),
                    linear_proj=row,
                    q_layernorm=qk_norm_module,
                    k_layernorm=qk_norm_module,
                ),
            ),
            pre_mlp_layernorm=norm_module(backend),
            mlp=ModuleSpec(module=MLP, submodules=mlp_spec(backend)),
        ),
    )


class InternVisionLayer(MegatronModule):
    """Pre-norm block with layer scale: x += lambda_1 * attn(norm(x)); x += lambda_2 * mlp(norm(x))."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: InternVisionLayerSubmodules,
        layer_number: int,
        init_scale: float,
    ) -> None:
        super().__init__(config=config)
        hidden, eps = config.hidden_size, config.layernorm_epsilon
        self.input_layernorm = build_module(
            submodules.input_layernorm, config=config, hidden_size=hidden, eps=eps
        )
        self.self_attention = build_module(
            submodules.self_attention, config=config, layer_number=layer_number
        )
        self.pre_mlp_layernorm = build_module(
            submodules.pre_mlp_layernorm, config=config, hidden_size=hidden, eps=eps
        )
        self.mlp = build_module(submodules.mlp, config=config, ffn_hidden_size=config.ffn_hidden_size)
        self.lambda_1 = nn.Parameter(torch.full((hidden,), init_scale, dtype=config.params_dtype))
        self.lambda_2 = nn.Parameter(torch.full((hidden,), init_scale, dtype=config.params_dtype))

    def forward(self, hidden: Tensor) -> Tensor:
        """[s, b, h] -> [s, b, h]. Megatron's linears return their (row-parallel) bias separately."""
        attn, bias = self.self_attention(self.input_layernorm(hidden), attention_mask=None)
        hidden = hidden + self.lambda_1 * (attn if bias is None else attn + bias)
        mlp, bias = self.mlp(self.pre_mlp_layernorm(hidden))
        return hidden + self.lambda_2 * (mlp if bias is None else mlp + bias)


# ---- the tower and the projector -----------------------------------------------------------------------------


class InternVisionEmbeddings(nn.Module):
    """Conv patch embedding + class token + absolute position embedding (replicated on TP ranks)."""

    def __init__(self, hf_vision, dtype: torch.dtype) -> None:
        super().__init__()
        hidden = hf_vision.hidden_size
        self.image_size = tuple(hf_vision.image_size)
        patch = tuple(hf_vision.patch_size)
        num_patches = (self.image_size[0] // patch[0]) * (self.image_size[1] // patch[1])
        self.patch_embedding = nn.Conv2d(
            hf_vision.num_channels, hidden, kernel_size=patch, stride=patch, bias=True, dtype=dtype
        )
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, hidden, dtype=dtype))
        self.position_embedding = None
        if hf_vision.use_absolute_position_embeddings:
            self.position_embedding = nn.Parameter(torch.zeros(1, num_patches + 1, hidden, dtype=dtype))

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Distributed checkpoints: every tensor is replicated over TP, with replica id (0, tp_rank, dp_rank).

        A plain `nn.Module` falls back to `sharded_state_dict_default`, whose replica id takes the TP rank
        from the `tp_group` argument only: without one every TP rank would claim to be the main replica
        (0, 0, dp_rank), which `dist_checkpointing.save` rejects. Pass the TP group explicitly here.
        """
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True),
            prefix,
            {},  # nothing TP-split
            sharded_offsets,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
            dp_cp_group=metadata["dp_cp_group"],
        )

    def forward(self, pixel_values: Tensor) -> Tensor:
        """pixel_values [n_tiles, C, H, W] -> tokens [s = 1 + patches, b = n_tiles, h]."""
        n, _, height, width = pixel_values.shape
        if (height, width) != self.image_size:
            # HF would interpolate the position embedding; InternVL's processor always gives config-size tiles.
            raise ValueError(f"tiles are {height}x{width}, the tower expects {self.image_size} (image_size)")
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype))  # [n, h, H/p, W/p]
        patches = patches.flatten(2).transpose(1, 2)  # [n, P, h], row-major over the patch grid
        tokens = torch.cat([self.class_embedding.expand(n, -1, -1), patches], dim=1)  # [n, 1 + P, h]
        if self.position_embedding is not None:
            tokens = tokens + self.position_embedding
        return tokens.transpose(0, 1).contiguous()  # [1 + P, n, h]


class InternVisionModel(MegatronModule):
    """pixel_values [n_tiles, C, H, W] -> hidden states [1 + P, n_tiles, h] of the configured feature layer.

    All layers are built (so every HF tensor has a home and round trips are complete), but only the
    first `feature_layers(...)` run; with InternVL3's `vision_feature_layer=-1` that is all of them.
    """

    def __init__(self, hf_config, config: TransformerConfig, backend: Backend) -> None:
        super().__init__(config=config)
        vision = hf_config.vision_config
        self.embeddings = InternVisionEmbeddings(vision, config.params_dtype)
        spec = vision_layer_spec(backend, qkv_bias=vision.attention_bias, qk_norm=vision.use_qk_norm)
        self.layers = nn.ModuleList(
            build_module(spec, config=config, layer_number=i + 1, init_scale=vision.layer_scale_init_value)
            for i in range(config.num_layers)
        )
        self.num_used_layers = feature_layers(hf_config.vision_feature_layer, config.num_layers)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Distributed checkpoints. Megatron's default recursion treats a plain `nn.ModuleList` as one
        replicated blob (saving only TP rank 0's shards); recurse into each layer instead. The TP group is
        passed down so that replicated tensors of plain `nn.Module` children get per-TP-rank replica ids
        (as `MegatronModule.sharded_state_dict` does); without it they would all be TP rank 0's."""
        tp_group = getattr(self, "tp_group", None) or parallel_state.get_tensor_model_parallel_group()
        sharded = {}
        for name, module in self.named_children():
            if isinstance(module, nn.ModuleList):
                children = [(f"{prefix}{name}.{i}.", layer) for i, layer in enumerate(module)]
            else:
                children = [(f"{prefix}{name}.", module)]
            for key, child in children:
                sharded.update(
                    sharded_state_dict_default(child, key, sharded_offsets, metadata, tp_group=tp_group)
                )
        return sharded

    def forward(self, pixel_values: Tensor) -> Tensor:
        hidden = self.embeddings(pixel_values)  # [1 + P, n, h]
        for layer in self.layers[: self.num_used_layers]:
            hidden = layer(hidden)
        return hidden

    def set_input_tensor(self, input_tensor: Tensor | None) -> None:
        """The tower only runs on the first pipeline stage, which receives no activations."""


class InternVLProjector(MegatronModule):
    """HF `multi_modal_projector`: LayerNorm -> Linear -> GELU -> Linear, the linears TP-split as an MLP."""

    def __init__(self, config: TransformerConfig, input_size: int, backend: Backend) -> None:
        super().__init__(config=config)
        self.layer_norm = norm_module(backend)(config=config, hidden_size=input_size, eps=PROJECTOR_NORM_EPS)
        self.mlp = MLP(config, mlp_spec(backend), input_size=input_size, ffn_hidden_size=config.hidden_size)

    def forward(self, features: Tensor) -> Tensor:
        """[n, t, h_vision * r^2] -> [n, t, h_text]."""
        out, bias = self.mlp(self.layer_norm(features))
        return out if bias is None else out + bias


def image_features(
    tower: InternVisionModel, projector: InternVLProjector, pixel_values: Tensor, ratio: float
) -> Tensor:
    """HF `get_image_features`: tower -> drop CLS -> pixel shuffle -> projector: [n_tiles, tokens, h_text]."""
    hidden = tower(pixel_values)[1:]  # drop the class token: [P, n, h]
    patches = hidden.transpose(0, 1)  # [n, P, h]
    n, num_patches, width = patches.shape
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patches per tile do not form a square grid")
    shuffled = pixel_shuffle(patches.reshape(n, side, side, width), ratio)  # [n, side/r, side/r, h * r^2]
    return projector(shuffled.reshape(n, -1, shuffled.shape[-1]))  # [n, tokens, h_text]
