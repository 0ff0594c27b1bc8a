"""Declarative HF <-> Megatron parameter maps, per architecture, and the two generic converters.

A map is a list of `Rule`s. A rule says, for one Megatron parameter:
  * its name template and the HF name template(s) of its source tensor(s) (`{layer}` = layer index);
  * how several HF tensors fuse into it (`Fusion`: QKV with Megatron's GQA interleave, gate/up concat);
  * its tensor-parallel split axis (0 column-parallel / vocab rows, 1 row-parallel, None replicated) and,
    where Megatron pads that axis to a multiple of TP (vocab, vision MLP width), the true HF size;
  * which pipeline stage holds it (`Stage`).
The converters never look at a parameter's name beyond matching templates: everything model-specific
lives in the rule tables (`_qwen2_5_vl_mapping`), registered per architecture with `register_mapping`
and fetched with `get_mapping(arch, hf_config, backend)` (an InternVL table plugs in the same way).

Conversion works shard-first: each HF tensor is padded, cut to this TP rank's slice, and only then fused,
so `hf_to_megatron` can consume a stream of (name, tensor) pairs (e.g. safetensors shard by shard) holding
at most the parts of one fused parameter at a time. The inverse cuts each TP shard into its parts and
concatenates the parts over ranks. Both directions are pure copies: HF -> Megatron -> HF is bit-exact.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from .specs import NORM_PARAM_NAMES, Backend

Stage = Literal["first", "last", "decoder", "last_not_first"]
"""first: embedding + vision (pre_process stage); last: final norm + output layer (post_process stage);
decoder: a decoder layer, `{layer}` is global in HF names and stage-local in Megatron names;
last_not_first: a tied output-layer copy, which Megatron allocates only on a last stage without the
embedding (with one stage the output layer reads the embedding weight itself)."""


def tp_padded(size: int, tp_size: int) -> int:
    """The size Megatron allocates for an axis of HF size `size` split over `tp_size` ranks."""
    return -(-size // tp_size) * tp_size


# ---- fusions: how HF parts (each already cut to one TP rank's slice) form one Megatron tensor ------------


class Fusion:
    """One HF tensor <-> one Megatron tensor (the default)."""

    num_parts = 1

    def fuse(self, parts: Sequence[Tensor]) -> Tensor:
        return parts[0]

    def split(self, fused: Tensor) -> list[Tensor]:
        return [fused]


@dataclass(frozen=True)
class ConcatFusion(Fusion):
    """Parts concatenated on axis 0, per TP rank: SwiGLU `linear_fc1` = [gate_r; up_r] on rank r."""

    num_parts: int = 2

    def fuse(self, parts: Sequence[Tensor]) -> Tensor:
        return torch.cat(list(parts), dim=0)

    def split(self, fused: Tensor) -> list[Tensor]:
        return list(fused.chunk(self.num_parts, dim=0))


@dataclass(frozen=True)
class QKVFusion(Fusion):
    """q, k, v -> Megatron `linear_qkv`: per query group g, [q heads of g; k_g; v_g] (weights and biases).

    Works on TP slices: a rank's q/k/v slices hold whole query groups, so the number of local groups is
    read off k's slice.
    """

    num_heads: int
    num_groups: int
    head_dim: int
    num_parts: int = 3

    def fuse(self, parts: Sequence[Tensor]) -> Tensor:
        q, k, v = parts
        groups = k.shape[0] // self.head_dim
        rest = q.shape[1:]
        q_per_group = self.num_heads // self.num_groups * self.head_dim
        # [heads*d, ...] -> [groups, heads_per_group*d, ...]; k, v: [groups, d, ...]
        fused = torch.cat(
            [
                q.reshape(groups, q_per_group, *rest),
                k.reshape(groups, self.head_dim, *rest),
                v.reshape(groups, self.head_dim, *rest),
            ],
            dim=1,
        )
        return fused.reshape(-1, *rest)  # [groups * (heads_per_group + 2) * d, ...]

    def split(self, fused: Tensor) -> list[Tensor]:
        q_per_group = self.num_heads // self.num_groups * self.head_dim
        rest = fused.shape[1:]
        grouped = fused.reshape(-1, q_per_group + 2 * self.head_dim, *rest)  # [groups, (hpg+2)*d, ...]
        q, k, v = grouped.split([q_per_group, self.head_dim, self.head_dim], dim=1)
        return [x.reshape(-1, *rest) for x in (q, k, v)]


IDENTITY = Fusion()


@dataclass(frozen=True)
class Rule:
    """One Megatron parameter and where it comes from in HF (see module docstring)."""

    megatron: str
    hf: tuple[str, ...]
    stage: Stage
    tp_axis: int | None = None
    fusion: Fusion = IDENTITY
    hf_chunks: int = 1
    """>1 when a single HF tensor is itself the concatenation of the fusion's parts on axis 0 (vision qkv)."""
    hf_size: int | None = None
    """True HF length of `tp_axis` when Megatron pads it to a multiple of TP (vocab, vision MLP width)."""
    export: bool = True
    """False for a copy that is loaded but not written back (the tied output layer)."""

    def __post_init__(self) -> None:
        parts = len(self.hf) * self.hf_chunks
        if parts != self.fusion.num_parts:
            raise ValueError(f"{self.megatron}: {parts} HF parts for a fusion of {self.fusion.num_parts}")
        if self.hf_size is not None and self.tp_axis is None:
            raise ValueError(f"{self.megatron}: padding (hf_size) needs a tp_axis")


@dataclass
class ArchMapping:
    """All rules of one architecture (for one HF config and one backend)."""

    arch: str
    rules: list[Rule]
    ignore: tuple[str, ...] = ()
    """Regexes of HF names that are skipped on input (tied lm_head, non-persistent buffers)."""
    checkpoint_prefixes: tuple[tuple[str, str], ...] = ()
    """(transformers module prefix, on-disk checkpoint prefix) pairs: hub checkpoints keep older names."""
    _hf_index: list[tuple[re.Pattern, int, int]] = field(default_factory=list, repr=False)
    _megatron_index: list[tuple[re.Pattern, int]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        for i, rule in enumerate(self.rules):
            self._megatron_index.append((_template_regex(rule.megatron), i))
            for j, name in enumerate(rule.hf):
                self._hf_index.append((_template_regex(name), i, j))
        self._ignore = [re.compile(p) for p in self.ignore]

    def canonical_hf_name(self, name: str) -> str:
        """On-disk checkpoint name -> transformers module name (identity when already canonical)."""
        if any(name.startswith(module_prefix) for module_prefix, _ in self.checkpoint_prefixes):
            return name
        for module_prefix, ckpt_prefix in self.checkpoint_prefixes:
            if name.startswith(ckpt_prefix):
                return module_prefix + name[len(ckpt_prefix) :]
        return name

    def checkpoint_hf_name(self, name: str) -> str:
        """transformers module name -> on-disk checkpoint name (what SGLang/vLLM loaders expect)."""
        for module_prefix, ckpt_prefix in self.checkpoint_prefixes:
            if name.startswith(module_prefix):
                return ckpt_prefix + name[len(module_prefix) :]
        return name

    def match_hf(self, name: str) -> list[tuple[Rule, int, int | None]]:
        """All (rule, part index, layer) that read HF tensor `name`; [] if ignored; KeyError if unknown."""
        hits = []
        for regex, i, j in self._hf_index:
            m = regex.fullmatch(name)
            if m:
                hits.append((self.rules[i], j, _layer(m)))
        if not hits and not any(p.fullmatch(name) for p in self._ignore):
            raise KeyError(f"{self.arch}: no rule for HF tensor {name!r}")
        return hits

    def match_megatron(self, name: str) -> tuple[Rule, int | None]:
        for regex, i in self._megatron_index:
            m = regex.fullmatch(name)
            if m:
                return self.rules[i], _layer(m)
        raise KeyError(f"{self.arch}: no rule for Megatron parameter {name!r}")


def _template_regex(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{layer\}", r"(?P<layer>\d+)"))


def _layer(match: re.Match) -> int | None:
    layer = match.groupdict().get("layer")
    return None if layer is None else int(layer)


# ---- placement: which part of the model this rank holds -------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """This rank's TP slice and pipeline stage (decoder layers [layer_start, layer_end))."""

    tp_rank: int = 0
    tp_size: int = 1
    layer_start: int = 0
    layer_end: int | None = None
    first_stage: bool = True
    last_stage: bool = True

    @classmethod
    def from_parallel_state(cls, language_config) -> Placement:
        """From Megatron's parallel_state and the decoder's TransformerConfig (after init_distributed)."""
        from megatron.core import parallel_state
        from megatron.core.transformer.transformer_block import get_num_layers_to_build
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        start = get_transformer_layer_offset(language_config)
        return cls(
            tp_rank=parallel_state.get_tensor_model_parallel_rank(),
            tp_size=parallel_state.get_tensor_model_parallel_world_size(),
            layer_start=start,
            layer_end=start + get_num_layers_to_build(language_config),
            first_stage=parallel_state.is_pipeline_first_stage(ignore_virtual=True),
            last_stage=parallel_state.is_pipeline_last_stage(ignore_virtual=True),
        )

    def holds(self, rule: Rule, layer: int | None) -> bool:
        if rule.stage == "first":
            return self.first_stage
        if rule.stage == "last":
            return self.last_stage
        if rule.stage == "last_not_first":
            return self.last_stage and not self.first_stage
        end = self.layer_end if self.layer_end is not None else float("inf")
        return layer is not None and self.layer_start <= layer < end

    def megatron_name(self, rule: Rule, layer: int | None) -> str:
        local = layer - self.layer_start if rule.stage == "decoder" else layer
        return rule.megatron.format(layer=local) if local is not None else rule.megatron

    def hf_names(self, rule: Rule, local_layer: int | None) -> list[str]:
        layer = local_layer + self.layer_start if rule.stage == "decoder" else local_layer
        return [h.format(layer=layer) if layer is not None else h for h in rule.hf]


# ---- HF -> Megatron --------------------------------------------------------------------------------------


def _hf_parts(rule: Rule, tensors: Sequence[Tensor]) -> list[Tensor]:
    if rule.hf_chunks == 1:
        return list(tensors)
    return [c for t in tensors for c in t.chunk(rule.hf_chunks, dim=0)]


def _tp_slice(rule: Rule, part: Tensor, tp_rank: int, tp_size: int) -> Tensor:
    """Pad `part` on the TP axis (if the rule says so) and return this rank's contiguous slice."""
    if rule.tp_axis is None:
        return part
    if rule.hf_size is not None:
        if part.shape[rule.tp_axis] != rule.hf_size:
            raise ValueError(
                f"{rule.megatron}: HF axis {rule.tp_axis} is {part.shape}, expected {rule.hf_size}"
            )
        extra = tp_padded(rule.hf_size, tp_size) - rule.hf_size
        if extra:
            pad_shape = list(part.shape)
            pad_shape[rule.tp_axis] = extra
            part = torch.cat([part, part.new_zeros(pad_shape)], dim=rule.tp_axis)
    if part.shape[rule.tp_axis] % tp_size:
        raise ValueError(
            f"{rule.megatron}: axis {rule.tp_axis} of {tuple(part.shape)} not divisible by TP={tp_size}"
        )
    return part.chunk(tp_size, dim=rule.tp_axis)[tp_rank].clone()


def hf_to_megatron(
    hf_state: Iterable[tuple[str, Tensor]], mapping: ArchMapping, placement: Placement = Placement()
) -> dict[str, Tensor]:
    """Stream HF (name, tensor) pairs into this rank's Megatron state dict (TP slice, PP stage).

    Every HF tensor must match a rule or an ignore pattern; every rule this rank holds must be filled.
    """
    out: dict[str, Tensor] = {}
    pending: dict[str, dict[int, Tensor]] = {}  # megatron name -> {part index: sliced part}
    for raw_name, tensor in hf_state:
        name = mapping.canonical_hf_name(raw_name)
        for rule, index, layer in mapping.match_hf(name):
            if not placement.holds(rule, layer):
                continue
            target = placement.megatron_name(rule, layer)
            parts = pending.setdefault(target, {})
            for k, part in enumerate(_hf_parts(rule, [tensor])):
                parts[index * rule.hf_chunks + k] = _tp_slice(
                    rule, part, placement.tp_rank, placement.tp_size
                )
            if len(parts) == rule.fusion.num_parts:
                out[target] = rule.fusion.fuse([parts[i] for i in range(rule.fusion.num_parts)]).contiguous()
                del pending[target]
    if pending:
        raise ValueError(f"incomplete fused parameters (missing HF parts): {sorted(pending)}")
    return out


def load_hf_weights(
    model: torch.nn.Module,
    hf_state: Iterable[tuple[str, Tensor]],
    mapping: ArchMapping,
    placement: Placement = Placement(),
) -> None:
    """Copy HF weights into `model`'s parameters in place; every parameter must receive a value."""
    state = hf_to_megatron(hf_state, mapping, placement)
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"HF -> Megatron mismatch: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, value in state.items():
            if params[name].shape != value.shape:
                raise ValueError(
                    f"{name}: model shape {tuple(params[name].shape)} != converted {tuple(value.shape)}"
                )
            params[name].copy_(value)


# ---- Megatron -> HF --------------------------------------------------------------------------------------


def _merge_tp(rule: Rule, shards: Sequence[Tensor]) -> list[Tensor]:
    """TP shards of one Megatron tensor -> the HF tensors of the rule (unpadded, unfused)."""
    per_rank = [rule.fusion.split(s) for s in shards]  # [rank][part]
    parts = []
    for p in range(rule.fusion.num_parts):
        if rule.tp_axis is None:
            part = per_rank[0][p]
        else:
            part = torch.cat([r[p] for r in per_rank], dim=rule.tp_axis)
            if rule.hf_size is not None:
                part = part.narrow(rule.tp_axis, 0, rule.hf_size)
        parts.append(part)
    if rule.hf_chunks > 1:
        parts = [torch.cat(parts[i : i + rule.hf_chunks]) for i in range(0, len(parts), rule.hf_chunks)]
    return [p.contiguous() for p in parts]


def _exported(mapping: ArchMapping, name: str) -> bool:
    """Whether Megatron tensor `name` is written back to HF (not TE metadata, not a tied copy)."""
    return not name.endswith("._extra_state") and mapping.match_megatron(name)[0].export


def _shards_to_hf(
    named_shards: Iterable[tuple[str, Sequence[Tensor]]],
    mapping: ArchMapping,
    placement: Placement,
    checkpoint_names: bool,
) -> Iterator[tuple[str, Tensor]]:
    """(Megatron name, its TP shards by rank) pairs -> HF (name, tensor) pairs."""
    for name, shards in named_shards:
        rule, local_layer = mapping.match_megatron(name)
        hf_names = placement.hf_names(rule, local_layer)
        for hf_name, tensor in zip(hf_names, _merge_tp(rule, shards)):
            yield (mapping.checkpoint_hf_name(hf_name) if checkpoint_names else hf_name), tensor


def megatron_to_hf(
    tp_states: Sequence[Mapping[str, Tensor]],
    mapping: ArchMapping,
    placement: Placement = Placement(),
    *,
    checkpoint_names: bool = False,
) -> Iterator[tuple[str, Tensor]]:
    """The TP shards of one pipeline stage (state dicts by TP rank) -> HF (name, tensor) pairs.

    `placement` gives the stage (its tp fields are ignored: the TP size is len(tp_states)).
    `checkpoint_names=True` emits on-disk hub names (`model.layers.*`, `visual.*`) instead of
    transformers module names.
    """
    named = ((n, [s[n] for s in tp_states]) for n in tp_states[0] if _exported(mapping, n))
    yield from _shards_to_hf(named, mapping, placement, checkpoint_names)


def gather_megatron_to_hf(
    named_tensors: Iterable[tuple[str, Tensor]],
    mapping: ArchMapping,
    placement: Placement,
    tp_group=None,
    *,
    checkpoint_names: bool = False,
) -> Iterator[tuple[str, Tensor]]:
    """Distributed variant: all-gather each local tensor over the TP group, yield HF pairs on every rank.

    Feed it `model.named_parameters()` (weight sync, export) or (name, param.grad) pairs, in the same
    order on every TP rank (all-gather is collective). One parameter is gathered at a time, so the peak
    extra memory is one full (unsharded) tensor.
    """
    import torch.distributed as dist

    def gathered(name: str, local: Tensor) -> list[Tensor]:
        local = local.detach().contiguous()
        if mapping.match_megatron(name)[0].tp_axis is None or placement.tp_size == 1:
            return [local] * placement.tp_size
        shards = [torch.empty_like(local) for _ in range(placement.tp_size)]
        dist.all_gather(shards, local, group=tp_group)
        return shards

    named = ((n, gathered(n, t)) for n, t in named_tensors if _exported(mapping, n))
    yield from _shards_to_hf(named, mapping, placement, checkpoint_names)


# ---- registry ----------------------------------------------------------------------------------------------

MappingFactory = Callable[..., ArchMapping]
_MAPPINGS: dict[str, MappingFactory] = {}


def register_mapping(arch: str) -> Callable[[MappingFactory], MappingFactory]:
    """Register `factory(hf_config, backend) -> ArchMapping` under an HF `model_type`."""

    def wrap(factory: MappingFactory) -> MappingFactory:
        _MAPPINGS[arch] = factory
        return factory

    return wrap


def get_mapping(arch: str, hf_config, backend: Backend = "local") -> ArchMapping:
    """The rule table of `arch` (HF model_type, e.g. 'qwen2_5_vl') for this config and layer backend."""
    if arch not in _MAPPINGS:
        raise KeyError(f"no HF<->Megatron mapping for {arch!r}; known: {sorted(_MAPPINGS)}")
    return _MAPPINGS[arch](hf_config, backend)


# ---- rule builders (shared by the architectures) -----------------------------------------------------------


def _layer_rules(
    m: str,
    h: str,
    stage: Stage,
    backend: Backend,
    hf: dict,
    *,
    qkv: QKVFusion,
    bias: bool,
    mlp_size: int | None,
) -> list[Rule]:
    """The rules of one pre-norm transformer layer (attention + SwiGLU MLP).

    m / h: Megatron / HF layer prefixes; hf: HF leaf names by slot (`qkv` is one fused HF tensor when a
    str, separate q/k/v when a tuple); bias: every linear has a bias (vision blocks; row-parallel biases
    are replicated); mlp_size: the HF MLP width when Megatron pads it to a multiple of TP.
    """
    norms, glu = NORM_PARAM_NAMES[backend], ConcatFusion()
    qkv_hf, chunks = ((hf["qkv"],), 3) if isinstance(hf["qkv"], str) else (hf["qkv"], 1)
    gate_up = (hf["gate"], hf["up"])
    # (Megatron leaf, HF leaves, TP axis, fusion, parts per HF tensor, padded HF size)
    table = [
        (norms["attn_norm"],                 (f"{hf['attn_norm']}.weight",),        None, IDENTITY, 1, None),
        ("self_attention.linear_qkv.weight", tuple(f"{x}.weight" for x in qkv_hf), 0,    qkv,      chunks, None),
        ("self_attention.linear_qkv.bias",   tuple(f"{x}.bias" for x in qkv_hf),   0,    qkv,      chunks, None),
        ("self_attention.linear_proj.weight", (f"{hf['proj']}.weight",),            1,    IDENTITY, 1, None),
        (norms["mlp_norm"],                  (f"{hf['mlp_norm']}.weight",),         None, IDENTITY, 1, None),
        ("mlp.linear_fc1.weight",            tuple(f"{x}.weight" for x in gate_up), 0,    glu,      1, mlp_size),
        ("mlp.linear_fc2.weight",            (f"{hf['down']}.weight",),             1,    IDENTITY, 1, mlp_size),
    ]  # fmt: skip
    if bias:
        table += [
            ("self_attention.linear_proj.bias", (f"{hf['proj']}.bias",),          None, IDENTITY, 1, None),
            ("mlp.linear_fc1.bias",             tuple(f"{x}.bias" for x in gate_up), 0, glu,      1, mlp_size),
            ("mlp.linear_fc2.bias",             (f"{hf['down']}.bias",),          None, IDENTITY, 1, None),
        ]  # fmt: skip
    return [
        Rule(f"{m}.{leaf}", tuple(f"{h}.{x}" for x in leaves), stage, axis, fusion, parts, size)
        for leaf, leaves, axis, fusion, parts, size in table
    ]


def qwen2_text_rules(hf_config, backend: Backend) -> list[Rule]:
    """The Qwen2 decoder of a vision-language model (`language_model` <-> `model.language_model`):
    word embedding (first stage), final norm and output layer (last stage; a copy of the embedding when
    tied) and the decoder layers."""
    text = hf_config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    vocab = text.vocab_size
    lm, hl = "language_model", "model.language_model"
    embed = f"{hl}.embed_tokens.weight"
    rules = [
        Rule(f"{lm}.embedding.word_embeddings.weight", (embed,), "first", 0, hf_size=vocab),
        Rule(f"{lm}.decoder.final_layernorm.weight", (f"{hl}.norm.weight",), "last"),
        Rule(f"{lm}.output_layer.weight", (embed,), "last_not_first", 0, hf_size=vocab, export=False)
        if hf_config.tie_word_embeddings
        else Rule(f"{lm}.output_layer.weight", ("lm_head.weight",), "last", 0, hf_size=vocab),
    ]
    return rules + _layer_rules(
        f"{lm}.decoder.layers.{{layer}}", f"{hl}.layers.{{layer}}", "decoder", backend,
        qkv=QKVFusion(text.num_attention_heads, text.num_key_value_heads, head_dim), bias=False, mlp_size=None,
        hf=dict(attn_norm="input_layernorm", qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                proj="self_attn.o_proj", mlp_norm="post_attention_layernorm", gate="mlp.gate_proj",
                up="mlp.up_proj", down="mlp.down_proj"),
    )  # fmt: skip


# ---- Qwen2.5-VL --------------------------------------------------------------------------------------------


@register_mapping("qwen2_5_vl")
def _qwen2_5_vl_mapping(hf_config, backend: Backend = "local") -> ArchMapping:
    vision = hf_config.vision_config
    vm, hv = "vision_model", "model.visual"
    tied = bool(hf_config.tie_word_embeddings)

    rules = qwen2_text_rules(hf_config, backend)
    rules += [
        Rule(f"{vm}.patch_embed.weight", (f"{hv}.patch_embed.proj.weight",), "first"),
        Rule(f"{vm}.merger.ln_q.weight", (f"{hv}.merger.ln_q.weight",), "first"),
        Rule(f"{vm}.merger.mlp.linear_fc1.weight", (f"{hv}.merger.mlp.0.weight",), "first", 0),
        Rule(f"{vm}.merger.mlp.linear_fc1.bias", (f"{hv}.merger.mlp.0.bias",), "first", 0),
        Rule(f"{vm}.merger.mlp.linear_fc2.weight", (f"{hv}.merger.mlp.2.weight",), "first", 1),
        Rule(f"{vm}.merger.mlp.linear_fc2.bias", (f"{hv}.merger.mlp.2.bias",), "first"),
    ]
    rules += _layer_rules(
        f"{vm}.decoder.layers.{{layer}}", f"{hv}.blocks.{{layer}}", "first", backend,
        qkv=QKVFusion(vision.num_heads, vision.num_heads, vision.hidden_size // vision.num_heads),
        bias=True, mlp_size=vision.intermediate_size,
        hf=dict(attn_norm="norm1", qkv="attn.qkv", proj="attn.proj", mlp_norm="norm2", gate="mlp.gate_proj",
                up="mlp.up_proj", down="mlp.down_proj"),
    )  # fmt: skip
    return ArchMapping(
        arch="qwen2_5_vl",
        rules=rules,
        ignore=(r"lm_head\.weight",) if tied else (),
        checkpoint_prefixes=(("model.visual.", "visual."), ("model.language_model.", "model.")),
    )
