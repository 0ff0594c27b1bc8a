"""Qwen2.5-VL policy on Megatron-Core: HF config -> vision tower + Megatron GPTModel decoder with M-RoPE.

    model = build_qwen2_5_vl(hf_config, pre_process=..., post_process=..., spec="auto")
    load_hf_weights(model, hf_tensors, get_mapping("qwen2_5_vl", hf_config, model.backend),
                    Placement.from_parallel_state(model.config))
    logits = model(input_ids, position_ids, None, pixel_values=..., image_grid_thw=...)

Layout (Megatron conventions):
  * `language_model`: a stock `GPTModel` configured as Qwen2 (QKV bias only, GQA, RMSNorm, SwiGLU,
    untied or tied output layer) with `position_embedding_type="mrope"`: `position_ids [3, b, s]` from
    `model_providers.rope.get_rope_index` drive Megatron's `MultimodalRotaryEmbedding` on every stage.
  * `vision_model` (first pipeline stage only): `qwen2_5_vl_vision.Qwen2_5_VisionModel`. Its outputs
    replace the embeddings at `image_token_id` positions before the decoder, exactly like HF's
    `masked_scatter` (batch-major order).
  * vocab: padded to a multiple of TP when needed; gathered logits are cut back to the HF vocab, sharded
    ones get the padded columns masked, so softmax, log-probs and cross-entropy never see them.
  * attention: causal. Batches are expected right-padded (pads after the real tokens), where the causal
    mask alone gives exact results for every real token; `attention_mask` may instead carry a full
    Megatron mask ([b, 1, s, s] bool, True = masked) for the local spec.
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

from .hf_mapping import tp_padded
from .qwen2_5_vl_vision import Qwen2_5_VisionModel, vision_configs
from .specs import Backend, SpecChoice, backend_config_kwargs, block_spec, resolve_backend

DEFAULT_MROPE_SECTION = (16, 24, 24)  # HF's fallback when rope_parameters has none


def language_config(
    hf_text,
    *,
    tp_size: int,
    pp_size: int,
    params_dtype: torch.dtype,
    backend: Backend,
    sequence_parallel: bool = False,
) -> TransformerConfig:
    """The decoder's TransformerConfig from HF's `Qwen2_5_VLTextConfig` (Qwen2 block + M-RoPE)."""
    if getattr(hf_text, "use_sliding_window", False):
        raise NotImplementedError("Qwen2.5-VL with use_sliding_window=True is not supported")
    if sequence_parallel and backend != "te":
        raise ValueError("sequence_parallel needs the TE spec: Megatron's local (torch) norms reject it")
    if hf_text.num_key_value_heads % tp_size:
        raise ValueError(f"num_key_value_heads={hf_text.num_key_value_heads} not divisible by TP={tp_size}")
    head_dim = getattr(hf_text, "head_dim", None) or hf_text.hidden_size // hf_text.num_attention_heads
    mrope_section = list(hf_text.rope_parameters.get("mrope_section", DEFAULT_MROPE_SECTION))
    if 2 * sum(mrope_section) != head_dim:
        raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    return TransformerConfig(
        num_layers=hf_text.num_hidden_layers,
        hidden_size=hf_text.hidden_size,
        num_attention_heads=hf_text.num_attention_heads,
        num_query_groups=hf_text.num_key_value_heads,
        kv_channels=head_dim,
        ffn_hidden_size=hf_text.intermediate_size,
        add_bias_linear=False,
        add_qkv_bias=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        layernorm_epsilon=hf_text.rms_norm_eps,
        mrope_section=mrope_section,
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=pp_size,
        sequence_parallel=sequence_parallel,
        **backend_config_kwargs(backend, params_dtype),
    )


class Qwen2_5_VLModel(MegatronModule):
    """One pipeline stage of Qwen2.5-VL (see module docstring). `config` is the decoder's config."""

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
        self.vocab_size = text.vocab_size
        self.padded_vocab_size = tp_padded(text.vocab_size, config.tensor_model_parallel_size)

        self.vision_model = None
        if pre_process:
            tower, merger = vision_configs(
                hf_config.vision_config,
                tp_size=config.tensor_model_parallel_size,
                params_dtype=config.params_dtype,
                backend=backend,
            )
            self.vision_model = Qwen2_5_VisionModel(hf_config.vision_config, tower, merger, backend)
        self.language_model = GPTModel(
            config=config,
            transformer_layer_spec=block_spec(backend, config, AttnMaskType.causal),
            vocab_size=self.padded_vocab_size,
            max_sequence_length=text.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
            position_embedding_type="mrope",
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

    def embed(self, input_ids: Tensor, pixel_values: Tensor | None, image_grid_thw: Tensor | None) -> Tensor:
        """Token embeddings with image features scattered into the placeholders: [s, b, h]."""
        embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
        if pixel_values is not None:
            if image_grid_thw is None:
                raise ValueError("pixel_values given without image_grid_thw")
            image_embeds = self.vision_model(pixel_values, image_grid_thw)  # [n_image_tokens, h]
            placeholders = input_ids == self.image_token_id  # [b, s]
            if int(placeholders.sum()) != image_embeds.shape[0]:
                raise ValueError(
                    f"{int(placeholders.sum())} image placeholder tokens but {image_embeds.shape[0]} image "
                    f"features (grid_thw={image_grid_thw.tolist()})"
                )
            # HF fills placeholders in [b, s] order; do the same on a [b, s, h] view.
            embeddings = (
                embeddings.transpose(0, 1)
                .masked_scatter(placeholders.unsqueeze(-1), image_embeds.to(embeddings.dtype))
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
        """input_ids [b, s], position_ids [3, b, s] (or [b, s] for text-only), pixel_values
        [n_patches, C*T*P*P] and image_grid_thw [n_images, 3] as the HF processor returns them.

        Returns on the last stage logits [b, s, V/tp] (V when gathered), or per-token cross-entropy
        [b, s] if `labels` [b, s] are given (labels[t] = the token that follows position t); on other
        stages the hidden states [s, b, h] for the next stage.
        """
        if position_ids.dim() == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)  # text-only: t = h = w
        decoder_input = self.embed(input_ids, pixel_values, image_grid_thw) if self.pre_process else None
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
        """Drop (gathered) or mask (TP-sharded) the logits of the vocab rows Megatron added for TP.

        Sharded logits keep their width so vocab-parallel ops still line up; the padded columns get a
        huge negative value (exp() == 0, and no NaN from `0 * log 0` in entropies).
        """
        if self.padded_vocab_size == self.vocab_size:
            return logits
        width = logits.shape[-1]
        if width == self.padded_vocab_size:
            return logits[..., : self.vocab_size]
        start = parallel_state.get_tensor_model_parallel_rank() * width
        column = torch.arange(start, start + width, device=logits.device)
        return logits.masked_fill(column >= self.vocab_size, torch.finfo(logits.dtype).min)


def build_qwen2_5_vl(
    hf_config,
    *,
    params_dtype: torch.dtype = torch.float32,
    pre_process: bool = True,
    post_process: bool = True,
    spec: SpecChoice = "auto",
    parallel_output: bool = True,
    sequence_parallel: bool = False,
) -> Qwen2_5_VLModel:
    """Build this rank's stage of Qwen2.5-VL. Needs Megatron's parallel_state (`init_distributed`).

    `spec`: 'local' (Megatron's PyTorch modules, CPU), 'te' (Transformer Engine, GPU) or 'auto'.
    Weights are randomly initialised; load HF weights with `hf_mapping.load_hf_weights`. On a CUDA
    machine the model is moved to the current device.
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
    model = Qwen2_5_VLModel(
        hf_config,
        config,
        backend,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
    )
    if torch.cuda.is_available():
        # Like Megatron-LM's get_model: norms, the patch Conv3d and buffers are built on the CPU.
        model.cuda(torch.cuda.current_device())
    return model
