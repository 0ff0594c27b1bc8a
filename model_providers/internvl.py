"""InternVL3 policy on Megatron-Core: HF `InternVLConfig` -> InternViT + projector + Megatron GPTModel (Qwen2).

    model = build_internvl(hf_config, pre_process=..., post_process=..., spec="auto")
    load_hf_weights(model, hf_tensors, get_mapping("internvl", hf_config, model.backend),
                    Placement.from_parallel_state(model.config))
    logits = model(input_ids, position_ids, None, pixel_values=pixel_values)

Layout (Megatron conventions):
  * `language_model`: a stock `GPTModel` configured as Qwen2 (QKV bias only, GQA, RMSNorm, SwiGLU,
    untied or tied output layer) with plain 1-D RoPE (`position_embedding_type="rope"`).
  * `vision_model` + `vision_projection` (first pipeline stage only): `internvl_vision.InternVisionModel`
    (InternViT, tensor-parallel; see that module for why) and `InternVLProjector`. Each 448px tile gives
    (448/14)^2 = 1024 patches -> pixel shuffle (downsample_ratio 0.5) -> 256 tokens; the tokens of all
    tiles, in order, replace the embeddings at `image_token_id` positions exactly like HF's
    `masked_scatter` (batch-major order).
  * positions: Megatron's RoPE ("rope") always uses positions 0..s-1 and ignores `position_ids`; that is
    exactly `registry.position_ids` for the right-padded batches the trainer builds. Other positions
    (left padding, packed rows) are rejected rather than silently mis-rotated.
  * vocab: padded to a multiple of TP when needed; gathered logits are cut back to the HF vocab, sharded
    ones get the padded columns masked, so softmax, log-probs and cross-entropy never see them.
  * attention: causal; `attention_mask` may carry a full Megatron mask ([b, 1, s, s] bool, True = masked)
    for the local spec.

The HF<->Megatron rule table (`_internvl_mapping`) is registered here under "internvl"; importing this
module (as `registry.build_model` does) makes `hf_mapping.get_mapping("internvl", ...)` find it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from .hf_mapping import IDENTITY, ArchMapping, QKVFusion, Rule, _layer_rules, register_mapping, tp_padded
from .internvl_vision import InternVisionModel, InternVLProjector, image_features, vision_configs
from .specs import Backend, SpecChoice, backend_config_kwargs, block_spec, resolve_backend


def language_config(
    hf_text,
    *,
    tp_size: int,
    pp_size: int,
    params_dtype: torch.dtype,
    backend: Backend,
    sequence_parallel: bool = False,
) -> TransformerConfig:
    """The decoder's TransformerConfig from HF's `Qwen2Config` (InternVL3's language model)."""
    if hf_text.model_type != "qwen2":
        raise NotImplementedError(f"InternVL text model {hf_text.model_type!r}: only 'qwen2' (InternVL3)")
    if getattr(hf_text, "use_sliding_window", False):
        raise NotImplementedError("InternVL text model with use_sliding_window=True is not supported")
    rope = hf_text.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise NotImplementedError(f"rope_type {rope.get('rope_type')!r}: only 'default' RoPE is supported")
    if sequence_parallel and backend != "te":
        raise ValueError("sequence_parallel needs the TE spec: Megatron's local (torch) norms reject it")
    heads, groups = hf_text.num_attention_heads, hf_text.num_key_value_heads
    if heads % tp_size or groups % tp_size:
        raise ValueError(
            f"text num_attention_heads={heads} / num_key_value_heads={groups} not divisible by TP={tp_size}"
        )
    return TransformerConfig(
        num_layers=hf_text.num_hidden_layers,
        hidden_size=hf_text.hidden_size,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=getattr(hf_text, "head_dim", None) or hf_text.hidden_size // heads,
        ffn_hidden_size=hf_text.intermediate_size,
        add_bias_linear=False,
        add_qkv_bias=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        layernorm_epsilon=hf_text.rms_norm_eps,
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=pp_size,
        sequence_parallel=sequence_parallel,
        **backend_config_kwargs(backend, params_dtype),
    )


class InternVLModel(MegatronModule):
    """One pipeline stage of InternVL3 (see module docstring). `config` is the decoder's config."""

    def __init__(
        self,
        hf_config,
        config: TransformerConfig,
        backend: Backend,
        *,
        pre_process: bool = True,
        post_process: bool = True,
        parallel_output: bool = True,
    ) -> None:
        super().__init__(config=config)
        text = hf_config.text_config
        self.backend = backend
        self.model_type = ModelType.encoder_or_decoder  # read by Megatron's pipeline schedules
        self.pre_process = pre_process
        self.post_process = post_process
        self.image_token_id = hf_config.image_token_id
        self.downsample_ratio = hf_config.downsample_ratio
        self.vocab_size = text.vocab_size
        self.padded_vocab_size = tp_padded(text.vocab_size, config.tensor_model_parallel_size)

        self.vision_model = self.vision_projection = None
        if pre_process:
            tower, projector = vision_configs(
                hf_config,
                tp_size=config.tensor_model_parallel_size,
                params_dtype=config.params_dtype,
                backend=backend,
            )
            shuffled_width = hf_config.vision_config.hidden_size * round(1 / self.downsample_ratio) ** 2
            self.vision_model = InternVisionModel(hf_config, tower, backend)
            self.vision_projection = InternVLProjector(projector, shuffled_width, backend)
        self.language_model = GPTModel(
            config=config,
            transformer_layer_spec=block_spec(backend, config, AttnMaskType.causal),
            vocab_size=self.padded_vocab_size,
            max_sequence_length=text.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
            position_embedding_type="rope",
            rotary_base=text.rope_parameters["rope_theta"],
            scatter_embedding_sequence_parallel=False,  # images are merged first, then we scatter
        )

    # -- Megatron plumbing (pipeline schedules and finalize_model_grads look for these) --------------------

    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self) -> Tensor | None:
        return self.language_model.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        """Stages after the first receive the previous stage's hidden states [s, b, h] here."""
        self.language_model.set_input_tensor(input_tensor)

    # -- forward ------------------------------------------------------------------------------------------

    def embed(self, input_ids: Tensor, pixel_values: Tensor | None) -> Tensor:
        """Token embeddings with image features scattered into the placeholders: [s, b, h]."""
        embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
        if pixel_values is not None:
            features = image_features(
                self.vision_model, self.vision_projection, pixel_values, self.downsample_ratio
            )  # [n_tiles, tokens per tile, h]
            features = features.flatten(0, 1)  # [n_image_tokens, h], tile by tile
            placeholders = input_ids == self.image_token_id  # [b, s]
            if int(placeholders.sum()) != features.shape[0]:
                raise ValueError(
                    f"{int(placeholders.sum())} image placeholder tokens but {features.shape[0]} image "
                    f"features ({pixel_values.shape[0]} tiles)"
                )
            # HF fills placeholders in [b, s] order; do the same on a [b, s, h] view.
            embeddings = (
                embeddings.transpose(0, 1)
                .masked_scatter(placeholders.unsqueeze(-1), features.to(embeddings.dtype))
                .transpose(0, 1)
                .contiguous()
            )  # back to [s, b, h]
        if self.config.sequence_parallel:
            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings)  # [s/tp, b, h]
        return embeddings

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        attention_mask: Tensor | None = None,
        pixel_values: Tensor | None = None,
        image_grid_thw: Tensor | None = None,
        labels: Tensor | None = None,
        runtime_gather_output: bool | None = None,
    ) -> Tensor:
        """input_ids [b, s], position_ids [b, s] (0..s-1 per row; a [3, b, s] M-RoPE-style tensor is
        accepted and its first row used), pixel_values [n_tiles, 3, H, W] as the HF processor returns
        them. `image_grid_thw` is unused (kept for a uniform model signature).

        Returns on the last stage logits [b, s, V/tp] (V when gathered), or per-token cross-entropy
        [b, s] if `labels` [b, s] are given (labels[t] = the token that follows position t); on other
        stages the hidden states [s, b, h] for the next stage.
        """
        position_ids = _check_positions(position_ids, input_ids.shape)
        decoder_input = self.embed(input_ids, pixel_values) if self.pre_process else None
        padded = self.padded_vocab_size != self.vocab_size
        output = self.language_model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            decoder_input=decoder_input,
            # Without vocab padding GPTModel's own loss is exact (and skips a [b, s, V/tp] transpose copy).
            labels=None if padded else labels,
            runtime_gather_output=False if labels is not None else runtime_gather_output,
        )
        if not self.post_process or (labels is not None and not padded):
            return output  # hidden states [s, b, h] for the next stage, or the loss [b, s]
        logits = self._mask_vocab_padding(output)  # [b, s, V/tp or V]
        if labels is None:
            return logits
        # Vocab-parallel cross-entropy on the masked sharded logits: [b, s, V/tp] -> [s, b, V/tp] -> [b, s]
        return self.language_model.compute_language_model_loss(labels, logits.transpose(0, 1).contiguous())

    def _mask_vocab_padding(self, logits: Tensor) -> Tensor:
        """Drop (gathered) or mask (TP-sharded, with the most negative value) the padded vocab columns."""
        if self.padded_vocab_size == self.vocab_size:
            return logits
        width = logits.shape[-1]
        if width == self.padded_vocab_size:
            return logits[..., : self.vocab_size]
        start = parallel_state.get_tensor_model_parallel_rank() * width
        column = torch.arange(start, start + width, device=logits.device)
        return logits.masked_fill(column >= self.vocab_size, torch.finfo(logits.dtype).min)


def _check_positions(position_ids: Tensor, shape: torch.Size) -> Tensor:
    """[b, s] (or [3, b, s] -> row 0) positions; they must be 0..s-1 per row, what Megatron's RoPE applies."""
    if position_ids.dim() == 3:
        position_ids = position_ids[0]
    if position_ids.shape != shape:
        raise ValueError(f"position_ids {tuple(position_ids.shape)} do not match input_ids {tuple(shape)}")
    expected = torch.arange(shape[1], device=position_ids.device)
    if not bool((position_ids == expected).all()):
        raise ValueError(
            "InternVL on Megatron applies RoPE at positions 0..s-1 (right-padded rows); got position_ids "
            f"{position_ids.tolist() if position_ids.numel() <= 64 else '(non-default)'}"
        )
    return position_ids


def build_internvl(
    hf_config,
    *,
    params_dtype: torch.dtype = torch.float32,
    pre_process: bool = True,
    post_process: bool = True,
    spec: SpecChoice = "auto",
    parallel_output: bool = True,
    sequence_parallel: bool = False,
) -> InternVLModel:
    """Build this rank's stage of InternVL3. Needs Megatron's parallel_state (`init_distributed`).

    `spec`: 'local' (Megatron's PyTorch modules, CPU), 'te' (Transformer Engine, GPU) or 'auto'.
    Weights are randomly initialised; load HF weights with `hf_mapping.load_hf_weights` and
    `get_mapping("internvl", ...)`. On a CUDA machine the model is moved to the current device.
    """
    backend = resolve_backend(spec)
    config = language_config(
        hf_config.text_config,
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        pp_size=parallel_state.get_pipeline_model_parallel_world_size(),
        params_dtype=params_dtype,
        backend=backend,
        sequence_parallel=sequence_parallel,
    )
    model = InternVLModel(
        hf_config,
        config,
        backend,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
    )
    if torch.cuda.is_available():
        # Like Megatron-LM's get_model: norms, the patch Conv2d and the vision embeddings are built on the CPU.
        model.cuda(torch.cuda.current_device())
    return model


# ---- HF <-> Megatron map -------------------------------------------------------------------------------------


def _vision_rules(hf_config) -> list[Rule]:
    """InternViT + projector (first stage). TP: QKV/fc1/linear_1 and the QK-norm weights split on rows,
    projection/fc2/linear_2 on columns, everything else replicated."""
    vision = hf_config.vision_config
    heads, hidden = vision.num_attention_heads, vision.hidden_size
    vm, hv = "vision_model", "model.vision_tower"
    m, h = f"{vm}.layers.{{layer}}", f"{hv}.encoder.layer.{{layer}}"
    qkv, mlp = QKVFusion(heads, heads, hidden // heads), vision.intermediate_size
    norm_leaves = ("weight", "bias") if vision.norm_type == "layer_norm" else ("weight",)
    # (Megatron name, HF names, TP axis, fusion, true HF size of the TP axis when Megatron pads it)
    table = [
        (f"{vm}.embeddings.class_embedding",        (f"{hv}.embeddings.cls_token",),                         None, IDENTITY, None),
        (f"{vm}.embeddings.patch_embedding.weight", (f"{hv}.embeddings.patch_embeddings.projection.weight",), None, IDENTITY, None),
        (f"{vm}.embeddings.patch_embedding.bias",   (f"{hv}.embeddings.patch_embeddings.projection.bias",),   None, IDENTITY, None),
        (f"{m}.self_attention.linear_qkv.weight",   tuple(f"{h}.attention.{x}_proj.weight" for x in "qkv"),  0,    qkv,      None),
        (f"{m}.self_attention.linear_proj.weight",  (f"{h}.attention.projection_layer.weight",),             1,    IDENTITY, None),
        (f"{m}.self_attention.linear_proj.bias",    (f"{h}.attention.projection_layer.bias",),               None, IDENTITY, None),
        (f"{m}.lambda_1",                           (f"{h}.lambda_1",),                                      None, IDENTITY, None),
        (f"{m}.mlp.linear_fc1.weight",              (f"{h}.mlp.fc1.weight",),                                0,    IDENTITY, mlp),
        (f"{m}.mlp.linear_fc1.bias",                (f"{h}.mlp.fc1.bias",),                                  0,    IDENTITY, mlp),
        (f"{m}.mlp.linear_fc2.weight",              (f"{h}.mlp.fc2.weight",),                                1,    IDENTITY, mlp),
        (f"{m}.mlp.linear_fc2.bias",                (f"{h}.mlp.fc2.bias",),                                  None, IDENTITY, None),
        (f"{m}.lambda_2",                           (f"{h}.lambda_2",),                                      None, IDENTITY, None),
    ]  # fmt: skip
    table += [
        (f"{m}.{megatron}.{leaf}", (f"{h}.{hf}.{leaf}",), None, IDENTITY, None)
        for megatron, hf in (
            ("input_layernorm", "layernorm_before"),
            ("pre_mlp_layernorm", "layernorm_after"),
        )
        for leaf in norm_leaves
    ]
    if vision.use_absolute_position_embeddings:
        table.append((f"{vm}.embeddings.position_embedding", (f"{hv}.embeddings.position_embeddings",), None, IDENTITY, None))  # fmt: skip
    if vision.attention_bias:
        table.append((f"{m}.self_attention.linear_qkv.bias", tuple(f"{h}.attention.{x}_proj.bias" for x in "qkv"), 0, qkv, None))  # fmt: skip
    if vision.use_qk_norm:  # sharded with the heads (see internvl_vision.HeadShardedRMSNorm)
        table += [
            (
                f"{m}.self_attention.{x}_layernorm.weight",
                (f"{h}.attention.{x}_norm.weight",),
                0,
                IDENTITY,
                None,
            )
            for x in "qk"
        ]
    vp, hp = "vision_projection", "model.multi_modal_projector"
    table += [
        (f"{vp}.layer_norm.weight",     (f"{hp}.layer_norm.weight",), None, IDENTITY, None),
        (f"{vp}.layer_norm.bias",       (f"{hp}.layer_norm.bias",),   None, IDENTITY, None),
        (f"{vp}.mlp.linear_fc1.weight", (f"{hp}.linear_1.weight",),   0,    IDENTITY, None),
        (f"{vp}.mlp.linear_fc1.bias",   (f"{hp}.linear_1.bias",),     0,    IDENTITY, None),
        (f"{vp}.mlp.linear_fc2.weight", (f"{hp}.linear_2.weight",),   1,    IDENTITY, None),
        (f"{vp}.mlp.linear_fc2.bias",   (f"{hp}.linear_2.bias",),     None, IDENTITY, None),
    ]  # fmt: skip
    return [
        Rule(name, hf, "first", tp_axis=axis, fusion=fusion, hf_size=size)
        for name, hf, axis, fusion, size in table
    ]


@register_mapping("internvl")
def _internvl_mapping(hf_config, backend: Backend = "local") -> ArchMapping:
    text = hf_config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    vocab = text.vocab_size
    lm, hl = "language_model", "model.language_model"
    tied = bool(hf_config.tie_word_embeddings)
    embed = f"{hl}.embed_tokens.weight"

    rules = [
        Rule(f"{lm}.embedding.word_embeddings.weight", (embed,), "first", 0, hf_size=vocab),
        Rule(f"{lm}.decoder.final_layernorm.weight", (f"{hl}.norm.weight",), "last"),
        Rule(f"{lm}.output_layer.weight", (embed,), "last_not_first", 0, hf_size=vocab, export=False)
        if tied
        else Rule(f"{lm}.output_layer.weight", ("lm_head.weight",), "last", 0, hf_size=vocab),
    ]
    rules += _layer_rules(
        f"{lm}.decoder.layers.{{layer}}", f"{hl}.layers.{{layer}}", "decoder", backend,
        qkv=QKVFusion(text.num_attention_heads, text.num_key_value_heads, head_dim), bias=False, mlp_size=None,
        hf=dict(attn_norm="input_layernorm", qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                proj="self_attn.o_proj", mlp_norm="post_attention_layernorm", gate="mlp.gate_proj",
                up="mlp.up_proj", down="mlp.down_proj"),
    )  # fmt: skip
    rules += _vision_rules(hf_config)
    return ArchMapping(
        arch="internvl",
        rules=rules,
        ignore=(r"lm_head\.weight",) if tied else (),
        # On-disk -hf checkpoints keep the LLaVA-style names (transformers 5 renames them on load).
        checkpoint_prefixes=(
            ("model.language_model.", "language_model.model."),
            ("lm_head.", "language_model.lm_head."),
            ("model.vision_tower.", "vision_tower."),
            ("model.multi_modal_projector.", "multi_modal_projector."),
        ),
    )
