"""What the vision-language providers share: a Qwen2 decoder (`GPTModel`) behind a vision side.

`qwen2_5_vl.Qwen2_5_VLModel` and `internvl.InternVLModel` differ only in their vision side and in how
their decoder positions are given; everything else lives here:
  * `VisionLanguageModel`: one pipeline stage = the vision modules (first stage only, built by the
    subclass) + `language_model`, a stock Megatron `GPTModel`. It carries the Megatron plumbing the
    pipeline schedules and finalize_model_grads look for, the image-feature scatter into the
    `image_token_id` placeholders (HF's `masked_scatter`, batch-major order), the sequence-parallel
    scatter, the decoder call and the loss, and the vocab-padding mask. Subclasses provide
    `_build_vision`, `image_features` and `rope_positions` (and `position_embedding_type`).
  * `qwen2_language_config`: the decoder's TransformerConfig (Qwen2 block) for M-RoPE or plain RoPE.
  * `vision_tower_sizes`, `vision_adapter_config`: TransformerConfig pieces of the tensor-parallel vision
    towers and of their vision -> text MLP adapters (merger / projector).
  * `build_stage`: HF config -> this rank's stage, on the current CUDA device when there is one.
Module names (hence state-dict keys, HF<->Megatron rules and distributed checkpoints) are the subclasses'
own: `vision_model` (+ `vision_projection`) and `language_model`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from .context_parallel import split_for_cp
from .fp8 import NO_FP8, FP8Settings, apply_torchao_fp8, check_fp8_weight_shapes, te_config_kwargs
from .hf_mapping import tp_padded
from .packing import PackedLayout, check_packing_supported
from .pipeline_split import EVEN, PipelineSplit
from .specs import Backend, SpecChoice, backend_config_kwargs, block_spec, resolve_backend

RopeKind = Literal["rope", "mrope"]
"""rope: plain 1-D RoPE at positions 0..s-1; mrope: Qwen2.5-VL's 3-D multimodal RoPE ([3, b, s] positions)."""
DEFAULT_MROPE_SECTION = (16, 24, 24)  # HF's fallback when rope_parameters has none


def qwen2_language_config(
    hf_text,
    *,
    rope: RopeKind,
    name: str,
    tp_size: int,
    pp_size: int,
    params_dtype: torch.dtype,
    backend: Backend,
    sequence_parallel: bool = False,
    cp_size: int = 1,
    pipeline_split: PipelineSplit = EVEN,
    fp8: FP8Settings = NO_FP8,
) -> TransformerConfig:
    """The TransformerConfig of a Qwen2 decoder (QKV bias only, GQA, RMSNorm, SwiGLU) from its HF text config.

    `rope="mrope"` reads the M-RoPE sections from `rope_parameters["mrope_section"]`; `rope="rope"` accepts
    only the 'default' rope_type (Megatron's plain RoPE). `name` is the model in error messages.
    `pipeline_split`: decoder layers of the first / last PP stage (None: even), checked against the layers.
    `fp8`: TE FP8 settings go into the constructor, so Megatron's own FP8 checks run (`fp8.te_config_kwargs`).
    """
    if rope not in ("rope", "mrope"):
        raise ValueError(f"rope={rope!r}: expected 'rope' or 'mrope'")
    if getattr(hf_text, "use_sliding_window", False):
        raise NotImplementedError(f"{name} with use_sliding_window=True is not supported")
    if rope == "rope":
        rope_type = (hf_text.rope_parameters or {}).get("rope_type", "default")
        if rope_type != "default":
            raise NotImplementedError(f"rope_type {rope_type!r}: only 'default' RoPE is supported")
    if sequence_parallel and backend == "local":
        raise ValueError("sequence_parallel needs the 'te' or 'sdpa' spec: Megatron's local (torch) norms reject it")
    if cp_size > 1 and backend == "local":
        raise ValueError(
            f"context_parallel_size={cp_size} needs the 'sdpa' or 'te' spec: Megatron's local attention "
            "rejects context parallelism (model.spec=sdpa runs it on CPU too)"
        )
    pipeline_split.stage_layers(hf_text.num_hidden_layers, pp_size)  # a clear error before Megatron's asserts
    heads, groups = hf_text.num_attention_heads, hf_text.num_key_value_heads
    if heads % tp_size or groups % tp_size:
        raise ValueError(
            f"text num_attention_heads={heads} / num_key_value_heads={groups} not divisible by TP={tp_size}"
        )
    head_dim = getattr(hf_text, "head_dim", None) or hf_text.hidden_size // heads
    rope_kwargs = {}
    if rope == "mrope":
        mrope_section = list(hf_text.rope_parameters.get("mrope_section", DEFAULT_MROPE_SECTION))
        if 2 * sum(mrope_section) != head_dim:
            raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 = {head_dim // 2}")
        rope_kwargs["mrope_section"] = mrope_section
    return TransformerConfig(
        num_layers=hf_text.num_hidden_layers,
        hidden_size=hf_text.hidden_size,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=head_dim,
        ffn_hidden_size=hf_text.intermediate_size,
        add_bias_linear=False,
        add_qkv_bias=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        layernorm_epsilon=hf_text.rms_norm_eps,
        **rope_kwargs,
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=pp_size,
        **pipeline_split.config_kwargs(),
        context_parallel_size=cp_size,
        sequence_parallel=sequence_parallel,
        **backend_config_kwargs(backend, params_dtype),
        **te_config_kwargs(fp8),
    )


def _first_stage_tp(tp_size: int) -> dict[str, Any]:
    """Vision modules live whole on the first pipeline stage, tensor-parallel, without sequence parallelism."""
    return dict(tensor_model_parallel_size=tp_size, pipeline_model_parallel_size=1, sequence_parallel=False)


def vision_tower_sizes(heads_name: str, *, hidden: int, heads: int, mlp: int, tp_size: int) -> dict[str, Any]:
    """TransformerConfig kwargs of a tensor-parallel vision tower: full multi-head attention (TP must divide
    the heads; `heads_name` names them in the error), MLP width zero-padded to a multiple of TP, the whole
    tower on the first pipeline stage, no sequence parallelism."""
    if heads % tp_size:
        raise ValueError(f"{heads_name}={heads} is not divisible by tensor parallel size {tp_size}")
    return dict(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=heads,
        kv_channels=hidden // heads,
        ffn_hidden_size=tp_padded(mlp, tp_size),
        **_first_stage_tp(tp_size),
    )


def vision_adapter_config(
    hidden: int, ffn: int, heads: int, *, activation: Callable, norm: str, eps: float, tp_size: int, **common
) -> TransformerConfig:
    """The config of a vision -> text MLP adapter (Qwen2.5-VL's merger, InternVL's projector): one norm,
    fc1 (`ffn` wide), activation and fc2, all linears with a bias, no GLU, on the first stage. `heads` only
    has to pass Megatron's divisibility check (the adapter has no attention). `common`: the backend's
    TransformerConfig kwargs."""
    return TransformerConfig(
        num_layers=1,
        hidden_size=hidden,
        num_attention_heads=heads,
        ffn_hidden_size=ffn,
        add_bias_linear=True,
        gated_linear_unit=False,
        activation_func=activation,
        normalization=norm,
        layernorm_epsilon=eps,
        **_first_stage_tp(tp_size),
        **common,
    )


class VisionLanguageModel(MegatronModule):
    """One pipeline stage of a vision-language model (see module docstring). `config` is the decoder's."""

    position_embedding_type: RopeKind  # set by each subclass

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
        # The vision side first: it keeps the parameter creation (init RNG) and state-dict order.
        self._build_vision(hf_config)
        self.language_model = GPTModel(
            config=config,
            transformer_layer_spec=block_spec(backend, config, AttnMaskType.causal),
            vocab_size=self.padded_vocab_size,
            max_sequence_length=text.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
            position_embedding_type=self.position_embedding_type,
            rotary_base=text.rope_parameters["rope_theta"],
            scatter_embedding_sequence_parallel=False,  # images are merged first, then we scatter
        )

    # -- what a subclass provides ---------------------------------------------------------------------------

    def _build_vision(self, hf_config) -> None:
        """Create the vision modules (`vision_model`, ...) on the first stage (`self.pre_process`); set the
        same attributes to None on the other stages."""
        raise NotImplementedError

    def image_features(self, pixel_values: Tensor, image_grid_thw: Tensor | None) -> Tensor:
        """The features that replace the image placeholders, in placeholder order: [n_image_tokens, h]."""
        raise NotImplementedError

    def _describe_images(self, pixel_values: Tensor, image_grid_thw: Tensor | None) -> str:
        """The images' layout, for the placeholder-count error."""
        raise NotImplementedError

    def rope_positions(self, position_ids: Tensor, input_ids: Tensor) -> Tensor:
        """The checked / normalised `position_ids` the decoder's RoPE takes."""
        raise NotImplementedError

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

    def embed(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None,
        image_grid_thw: Tensor | None = None,
        packed: PackedLayout | None = None,
    ) -> Tensor:
        """Token embeddings with image features scattered into the placeholders: [s, b, h], or under context
        parallelism this rank's [s / cp, b, h] (`context_parallel`: the merge needs the whole sequence,
        so the split comes after it), or packed [T, 1, h] (`packing`). Under sequence parallelism this
        rank's 1/tp of that."""
        embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
        if pixel_values is not None:
            features = self.image_features(pixel_values, image_grid_thw)  # [n_image_tokens, h]
            placeholders = input_ids == self.image_token_id  # [b, s]
            if int(placeholders.sum()) != features.shape[0]:
                raise ValueError(
                    f"{int(placeholders.sum())} image placeholder tokens but {features.shape[0]} image "
                    f"features ({self._describe_images(pixel_values, image_grid_thw)})"
                )
            # HF fills placeholders in [b, s] order; do the same on a [b, s, h] view.
            embeddings = (
                embeddings.transpose(0, 1)
                .masked_scatter(placeholders.unsqueeze(-1), features.to(embeddings.dtype))
                .transpose(0, 1)
                .contiguous()
            )  # back to [s, b, h]
        if packed is not None:
            embeddings = packed.pack(embeddings.transpose(0, 1)).unsqueeze(1)  # [b, s, h] -> [T, 1, h]
        embeddings = split_for_cp(embeddings, 0)  # [s / cp, b, h]
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
        packed: PackedLayout | None = None,
    ) -> Tensor:
        """input_ids [b, s]; position_ids, pixel_values and image_grid_thw as the subclass's
        `rope_positions` and `image_features` take them (the HF processor's outputs).

        Returns on the last stage logits [b, s, V/tp] (V when gathered), or per-token cross-entropy
        [b, s] if `labels` [b, s] are given (labels[t] = the token that follows position t); on other
        stages the hidden states [s, b, h] for the next stage. Under context parallelism every s is this
        rank's s / cp tokens (`context_parallel.split_for_cp` order; `labels` full length, split here)
        while `input_ids` and `position_ids` stay full length.

        `packed` (`packing.PackedLayout` of these rows): the decoder runs on the real tokens only, packed
        into one [T] sequence; inputs and outputs keep their [b, s] shapes (zeros at padding), and the
        hidden states between pipeline stages are the packed [T, 1, h].
        """
        if packed is not None:
            check_packing_supported(self.backend, self.config.context_parallel_size)
        position_ids = self.rope_positions(position_ids, input_ids)
        decoder_input = self.embed(input_ids, pixel_values, image_grid_thw, packed) if self.pre_process else None
        packed_seq_params = None
        if packed is not None:
            packed_seq_params = packed.packed_seq_params(device_boundaries_only=self.backend == "te")
            input_ids = packed.pack(input_ids).unsqueeze(0)  # [1, T]
            position_ids = packed.pack(position_ids, batch_dim=position_ids.dim() - 2).unsqueeze(-2)  # [(3,) 1, T]
            labels = None if labels is None else packed.pack(labels).unsqueeze(0)  # [1, T]
        padded = self.padded_vocab_size != self.vocab_size
        output = self.language_model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            decoder_input=decoder_input,
            # Without vocab padding GPTModel's own loss is exact (and skips a [b, s, V/tp] transpose copy).
            labels=None if padded or labels is None else split_for_cp(labels, 1),
            runtime_gather_output=False if labels is not None else runtime_gather_output,
            packed_seq_params=packed_seq_params,
        )
        if not self.post_process:
            return output  # hidden states [s, b, h] (packed: [T, 1, h]) for the next stage
        if labels is None or padded:
            output = self._mask_vocab_padding(output)  # logits [b, s, V/tp or V]
            if labels is not None:
                # Vocab-parallel cross-entropy on the masked sharded logits: [b, s, V/tp] -> [s, b, V/tp] -> [b, s]
                output = self.language_model.compute_language_model_loss(
                    split_for_cp(labels, 1), output.transpose(0, 1).contiguous()
                )
        # output: logits [b, s, V/tp] or the loss [b, s] (packed: b = 1, s = T)
        return output if packed is None else packed.unpack(output[0])

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


RECOMPUTE_CHOICES = ("none", "selective", "full")


def apply_recompute(config: TransformerConfig, recompute: str) -> None:
    """Set Megatron's recompute fields (read when layers are built and in TransformerBlock.forward)."""
    if recompute not in RECOMPUTE_CHOICES:
        raise ValueError(f"recompute={recompute!r} is not one of {list(RECOMPUTE_CHOICES)}")
    if recompute == "full":
        config.recompute_granularity, config.recompute_method, config.recompute_num_layers = "full", "uniform", 1
    elif recompute == "selective":
        config.recompute_granularity = "selective"
        config.recompute_modules = ["core_attn"]


def build_stage(
    model_cls: type[VisionLanguageModel],
    language_config: Callable[..., TransformerConfig],
    hf_config,
    *,
    params_dtype: torch.dtype = torch.float32,
    pre_process: bool = True,
    post_process: bool = True,
    spec: SpecChoice = "auto",
    parallel_output: bool = True,
    sequence_parallel: bool = False,
    recompute: str = "none",
    fp8: FP8Settings = NO_FP8,
    packed_sequences: bool = False,
    compile_layers: bool = False,
    pipeline_split: PipelineSplit = EVEN,
) -> VisionLanguageModel:
    """Build this rank's stage of `model_cls`, its decoder configured by `language_config(hf_text, ...)`.

    `recompute`: activation recompute of the decoder: 'none', 'selective' (core attention only) or
    'full' (every layer's activations, recomputed one layer at a time in backward).
    `fp8`: FP8 training of the decoder's linears (`model_providers.fp8`): TE recipes in the te spec's layers,
    torchao's by swapping the sdpa / local spec's linears after the build.
    `packed_sequences`: the model will get packed micro-batches (`forward(packed=...)`): spec 'auto' then
    picks sdpa rather than local on CPU, and a layout that cannot run them is refused here.
    `compile_layers`: `torch.compile` every decoder layer (`compile_decoder_layers`).
    `pipeline_split`: decoder layers on the first / last PP stage (`pipeline_split.PipelineSplit`; default
    even). The vision tower always sits on the first stage, whole.

    Needs Megatron's parallel_state (`init_distributed`). `spec`: 'local' (Megatron's PyTorch modules,
    CPU), 'te' (Transformer Engine, GPU) or 'auto'. Weights are randomly initialised (load HF weights with
    `hf_mapping.load_hf_weights`). On a CUDA machine the model is moved to the current device.
    """
    cp_size = parallel_state.get_context_parallel_world_size()
    backend = resolve_backend(spec, cp_size=cp_size, packed_sequences=packed_sequences)
    fp8.check_spec(backend)
    config = language_config(
        hf_config.text_config,
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        pp_size=parallel_state.get_pipeline_model_parallel_world_size(),
        cp_size=cp_size,
        params_dtype=params_dtype,
        backend=backend,
        sequence_parallel=sequence_parallel,
        pipeline_split=pipeline_split,
        fp8=fp8,
    )
    apply_recompute(config, recompute)
    if packed_sequences:
        check_packing_supported(backend, cp_size)
    model = model_cls(
        hf_config,
        config,
        backend,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
    )
    check_fp8_weight_shapes(model, fp8)
    apply_torchao_fp8(model, fp8)
    if torch.cuda.is_available():
        # Like Megatron-LM's get_model: norms, the patch convolution and buffers are built on the CPU.
        model.cuda(torch.cuda.current_device())
    if compile_layers:
        if backend == "te":
            raise ValueError("model.compile is for the sdpa / local specs: TE layers run fused kernels already")
        compile_decoder_layers(model)
    return model


def compile_decoder_layers(model: VisionLanguageModel) -> None:
    """`torch.compile` each decoder `TransformerLayer` of this stage in place (`nn.Module.compile`).

    Without Transformer Engine the sdpa spec runs a layer as ~20 separate kernels (norm, rotary, bias,
    SwiGLU, residual adds); Inductor fuses the elementwise ones around the matmuls and SDPA (the anchor in
    docs/gpu.md: transformers' Qwen2 went from 20.6k to 24.6k tokens/s on an H200 with per-layer compile).
    Layers are identical modules, so Dynamo compiles one graph (parameters are graph inputs) and reuses it;
    shapes become dynamic after the first new sequence length, so variable micro-batch lengths do not
    recompile per length. Parameter names and state dicts are unchanged (the compiled wrapper is internal
    to `nn.Module.compile`). The first step pays the compile time.
    """
    for layer in model.language_model.decoder.layers:
        layer.compile()
