"""Qwen2.5-VL vision tower (ViT with 2D RoPE + window attention + 2x2 patch merger) on Megatron-Core parts.

Decision: the tower is tensor-parallel, built from the same Megatron `TransformerLayer` slots as the
decoder (column-parallel fused QKV, row-parallel projection, column/row-parallel SwiGLU MLP), not a
plain module replicated on every TP rank. Why:
  * size: the tower has ~670M parameters in every Qwen2.5-VL (3B..72B); replicated, its bf16 weights,
    fp32 grads/master copy and Adam state cost ~12 GB on every GPU, and its attention over thousands of
    patches would be computed TP times over;
  * one implementation of attention/MLP for both towers: the same spec switch (local on CPU, TE on GPU),
    the same HF<->Megatron rules (QKV interleave, gate/up fusion) and the same checkpoint sharding.
What it takes:
  * windows: Megatron's layers get one attention mask per call, so the tower runs its layers itself and
    hands each a block-diagonal mask (per window, or per image/frame for `fullatt_block_indexes`), with
    mask type `arbitrary` (TE accepts the same mask type; not yet run with TE here). Dense masks cost
    O(patches^2) memory; packed THD attention with cu_seqlens on TE is the upgrade for large images
    (not done: Megatron's THD RoPE restarts positions per sequence, which the 2D RoPE must not).
  * 2D RoPE: the per-patch (h, w) frequencies are passed as `rotary_pos_emb [s, 1, 1, head_dim]`; Megatron
    applies them with the same rotate-half rule as HF.
  * TP divisibility: the MLP width (3420 in the real towers) is zero-padded to a multiple of TP; zero
    gate/up rows and down columns add exactly nothing (`silu(0) * 0 = 0`).
  * no sequence parallelism inside the tower (its activations are small next to the decoder's); the
    patch embedding (a Conv3d, 1.5M parameters) and the norms are replicated, and their grads agree
    across TP ranks because every TP region's input grad is all-reduced by Megatron's linears.
Pipeline parallelism: the tower exists only on the first stage (`pre_process`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor, nn

from .specs import Backend, backend_config_kwargs, block_spec, mlp_spec, norm_module
from .vlm_base import vision_adapter_config, vision_tower_sizes

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
VISION_NORM_EPS = 1e-6  # hard-coded in HF's Qwen2.5-VL vision blocks and merger


def vision_configs(
    hf_vision, *, tp_size: int, params_dtype: torch.dtype, backend: Backend
) -> tuple[TransformerConfig, TransformerConfig]:
    """(tower config, merger config) from HF's `Qwen2_5_VLVisionConfig`."""
    common = backend_config_kwargs(backend, params_dtype)
    hidden, heads = hf_vision.hidden_size, hf_vision.num_heads
    sizes = vision_tower_sizes(
        "vision num_heads", hidden=hidden, heads=heads, mlp=hf_vision.intermediate_size, tp_size=tp_size
    )
    tower = TransformerConfig(
        num_layers=hf_vision.depth,
        add_bias_linear=True,
        add_qkv_bias=True,
        gated_linear_unit=True,
        activation_func=ACTIVATIONS[hf_vision.hidden_act],
        normalization="RMSNorm",
        layernorm_epsilon=VISION_NORM_EPS,
        **sizes,  # incl. the parallel layout: the tower lives whole on the first stage
        **common,
    )
    merged = hidden * hf_vision.spatial_merge_size**2
    common["bias_activation_fusion"] = False  # Megatron's fused bias-GELU is the tanh approximation
    merger = vision_adapter_config(
        hf_vision.out_hidden_size, merged, heads,
        activation=F.gelu,  # HF: nn.GELU() (exact erf form)
        norm="RMSNorm", eps=VISION_NORM_EPS, tp_size=tp_size, **common,
    )  # fmt: skip
    return tower, merger


# ---- patch geometry (pure functions of grid_thw) -------------------------------------------------------


def patch_hw_positions(grid_thw: Tensor, merge: int) -> Tensor:
    """[n_patches, 2] (row, col) of each patch, in the processor's order: merge x merge blocks, row-major."""
    out = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h).view(h, 1).expand(h, w)
        cols = torch.arange(w).view(1, w).expand(h, w)
        # [h, w] -> [h/m, m, w/m, m] -> [h/m, w/m, m, m]: patches of one merged token become contiguous.
        block = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(block).permute(0, 2, 1, 3).flatten()
        cols = cols.reshape(block).permute(0, 2, 1, 3).flatten()
        out.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))
    return torch.cat(out)


def window_partition(grid_thw: Tensor, merge: int, window_merged: int) -> tuple[Tensor, Tensor]:
    """Window order of merged tokens and window lengths.

    Returns (window_index [n_merged], window_sizes [n_windows]): `window_index[i]` is the merged token
    placed at slot i when tokens are grouped window by window (windows of window_merged^2 merged tokens,
    row-major over each frame, edge windows clipped); sizes count merged tokens.
    """
    order, sizes, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        hm, wm = h // merge, w // merge
        nh, nw = math.ceil(hm / window_merged), math.ceil(wm / window_merged)
        index = torch.arange(t * hm * wm).view(t, hm, wm)
        padded = F.pad(index, (0, nw * window_merged - wm, 0, nh * window_merged - hm), value=-1)
        # [t, nh*v, nw*v] -> [t, nh, v, nw, v] -> [t, nh, nw, v, v] -> [t * nh * nw, v * v]
        windows = padded.view(t, nh, window_merged, nw, window_merged).permute(0, 1, 3, 2, 4)
        windows = windows.reshape(t * nh * nw, window_merged * window_merged)
        valid = windows >= 0
        order.append(windows[valid] + offset)
        counts = valid.sum(-1)
        sizes.append(counts[counts > 0])
        offset += t * hm * wm
    return torch.cat(order), torch.cat(sizes)


def block_diagonal_mask(sizes: Tensor, device: torch.device) -> Tensor:
    """[1, 1, n, n] bool, True = masked (Megatron's convention): tokens attend only inside their segment."""
    segment = torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes.to(device))
    return (segment[:, None] != segment[None, :])[None, None]


# ---- modules --------------------------------------------------------------------------------------------


class Qwen2_5_VisionRotary(nn.Module):
    """2D RoPE: half of each head's rotary frequencies follow the patch row, half the column."""

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        spatial = head_dim // 2
        self.register_buffer(
            "inv_freq",
            1.0 / theta ** (torch.arange(0, spatial, 2, dtype=torch.float32) / spatial),
            persistent=False,
        )

    def forward(self, positions: Tensor) -> Tensor:
        """positions [n, 2] -> frequencies [n, head_dim/2] = [row freqs | col freqs]."""
        freqs = positions[..., None].float() * self.inv_freq  # [n, 2, head_dim/4]
        return freqs.flatten(1)


class Qwen2_5_VisionPatchMerger(MegatronModule):
    """RMSNorm per patch, then concatenate merge x merge patches and apply Linear-GELU-Linear (TP-split)."""

    def __init__(
        self, tower: TransformerConfig, merger: TransformerConfig, merge: int, backend: Backend
    ) -> None:
        super().__init__(config=merger)
        self.merged_size = tower.hidden_size * merge * merge
        self.ln_q = norm_module(backend)(config=tower, hidden_size=tower.hidden_size, eps=VISION_NORM_EPS)
        self.mlp = MLP(
            merger, mlp_spec(backend), input_size=self.merged_size, ffn_hidden_size=self.merged_size
        )

    def forward(self, hidden: Tensor) -> Tensor:
        """[n_patches, h_vision] -> [n_patches / merge^2, h_out]."""
        x = self.ln_q(hidden).view(-1, 1, self.merged_size)  # [n/m^2, 1, m^2 * h_vision]
        out, bias = self.mlp(x)  # Megatron's MLP returns the fc2 bias separately (skip_bias_add)
        out = out if bias is None else out + bias
        return out.squeeze(1)


class Qwen2_5_VisionModel(MegatronModule):
    """pixel_values [n_patches, C*T*P*P] + grid_thw [n_images, 3] -> [n_patches / merge^2, h_out]."""

    def __init__(
        self, hf_vision, tower: TransformerConfig, merger: TransformerConfig, backend: Backend
    ) -> None:
        super().__init__(config=tower)
        self.in_channels = hf_vision.in_channels
        self.temporal_patch = hf_vision.temporal_patch_size
        self.patch = hf_vision.patch_size
        self.merge = hf_vision.spatial_merge_size
        self.window_merged = hf_vision.window_size // self.merge // self.patch
        self.full_attention_layers = frozenset(hf_vision.fullatt_block_indexes)
        kernel = (self.temporal_patch, self.patch, self.patch)
        self.patch_embed = nn.Conv3d(
            self.in_channels,
            tower.hidden_size,
            kernel_size=kernel,
            stride=kernel,
            bias=False,
            dtype=tower.params_dtype,
        )
        rope = getattr(hf_vision, "rope_parameters", None) or {}
        self.rotary = Qwen2_5_VisionRotary(tower.kv_channels, theta=rope.get("rope_theta", 10000.0))
        self.decoder = TransformerBlock(
            config=tower,
            spec=block_spec(backend, tower, AttnMaskType.arbitrary),
            post_layer_norm=False,  # HF has no final norm; the merger's ln_q follows the last block
        )
        self.merger = Qwen2_5_VisionPatchMerger(tower, merger, self.merge, backend)

    def forward(self, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
        n = pixel_values.shape[0]
        unit = self.merge * self.merge
        device = pixel_values.device
        # [n, C*T*P*P] -> [n, C, T, P, P] -> conv -> [n, h]
        patches = pixel_values.view(n, self.in_channels, self.temporal_patch, self.patch, self.patch)
        hidden = self.patch_embed(patches.to(self.patch_embed.weight.dtype)).view(n, -1)

        window_index, window_sizes = window_partition(grid_thw.cpu(), self.merge, self.window_merged)
        window_index = window_index.to(device)
        frame_sizes = torch.tensor([h * w for t, h, w in grid_thw.tolist() for _ in range(t)])
        masks = {
            True: block_diagonal_mask(frame_sizes, device),  # full attention: one segment per image frame
            False: block_diagonal_mask(window_sizes * unit, device),  # window attention
        }

        # Reorder patches window by window (in groups of one merged token): [n, h] -> [n/u, u, h] -> [n, h]
        hidden = hidden.view(n // unit, unit, -1)[window_index].reshape(n, -1)
        freqs = self.rotary(patch_hw_positions(grid_thw.cpu(), self.merge).to(device))  # [n, d/2]
        freqs = freqs.view(n // unit, unit, -1)[window_index].reshape(n, -1)
        rotary = torch.cat([freqs, freqs], dim=-1)[:, None, None, :]  # [s=n, b=1, 1, head_dim]

        hidden = hidden.unsqueeze(1)  # [s=n, b=1, h]
        for i, layer in enumerate(self.decoder.layers):
            mask = masks[i in self.full_attention_layers]
            hidden, _ = layer(hidden_states=hidden, attention_mask=mask, rotary_pos_emb=rotary)
        merged = self.merger(hidden.squeeze(1))  # [n/u, h_out], window order
        return merged[torch.argsort(window_index)]  # back to the processor's (image, row, col) order

    def set_input_tensor(self, input_tensor: Tensor | None) -> None:
        """The tower only runs on the first pipeline stage, which receives no activations."""
