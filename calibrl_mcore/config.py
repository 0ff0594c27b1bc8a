"""Typed run configuration (OmegaConf structured configs).

`load_config(path, overrides)` merges, in order: these dataclass defaults, `configs/defaults.yaml`
semantics (identical values, documented there key by key), the user's YAML, then `key.sub=value`
command-line overrides. Unknown keys and wrong types are errors that name the key. Each component
receives only its own section (`cfg.algo`, `cfg.rollout`, ...), never the whole config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


@dataclass
class ModelConfig:
    hf_path: str = ""
    """HF checkpoint directory (config, safetensors, tokenizer, processor) the policy starts from."""
    arch: str = "auto"
    """'qwen2_5_vl', 'internvl' or 'auto' (read from the checkpoint's config.json)."""
    dtype: str = "fp32"
    """training parameter dtype: 'fp32' (CPU) or 'bf16' (GPU)."""
    spec: str = "auto"
    """layer spec: 'local' (CPU), 'sdpa' (torch SDPA attention), 'te' (Transformer Engine), 'auto' (te on GPU
    when installed, else sdpa on GPU, local on CPU)."""
    fp8: str = "none"
    """FP8 training of the decoder's linears (H100+): none | delayed | tensorwise | blockwise (fp8_backend te)
    | tensorwise | rowwise (fp8_backend torchao). Micro-batches are then padded so each rank's tokens are a
    multiple of 16 (blockwise: 128). The vision towers always run in bf16."""
    fp8_backend: str = "te"
    """te (Transformer Engine layers, model.spec=te) | torchao (torchao float8 GEMMs in the sdpa/local spec's
    Megatron linears; no TE needed)."""
    fp8_bf16_layers: list[str] = field(default_factory=lambda: ["first", "last"])
    """decoder layers kept in bf16 under FP8: 'first' / 'last' layer of the whole model (global indices: under
    PP only the first / last stage has one). Must be empty for fp8=delayed (Megatron refuses it)."""
    fp8_amax_history_len: int = 1024
    """fp8=delayed: amax history length (TE / NeMo default 1024; Megatron's own default is 1)."""
    fp8_amax_compute_algo: str = "max"
    """fp8=delayed: scale from the history's max | most_recent amax (TE / NeMo default max)."""
    recompute: str = "none"
    """activation recompute: none | selective (core attention) | full (whole layers)."""
    compile: bool = False
    """torch.compile each decoder layer (sdpa/local spec; fuses the elementwise kernels around matmuls and
    attention; the first steps pay the compile time)."""
    packed_sequences: bool = False
    """run the decoder on each micro-batch's real tokens packed into one sequence (THD, no padding compute;
    spec auto (picks sdpa on CPU), sdpa or te; not with context parallelism)."""


@dataclass
class ParallelSection:
    tensor_model_parallel_size: int = 1
    """TP degree (must divide attention heads and KV groups)."""
    pipeline_model_parallel_size: int = 1
    """PP degree; 1F1B schedule. Stages hold equal shares of the decoder layers unless the two keys below
    are set."""
    num_layers_in_first_pipeline_stage: int | None = None
    """decoder layers on the first PP stage, which also runs the vision tower (Megatron's uneven pipeline;
    null = the middle stages' share). The stages between first and last share the rest evenly."""
    num_layers_in_last_pipeline_stage: int | None = None
    """decoder layers on the last PP stage, which also runs the LM head and the loss (null = the middle
    stages' share). A checkpoint saved at one split resumes at any other, or at PP = 1."""
    context_parallel_size: int = 1
    """CP degree: each sequence split into 2·CP load-balanced chunks; needs model.spec te or sdpa (not local)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism: norm/dropout activations split over TP (TP > 1; model.spec te or sdpa)."""


@dataclass
class DataConfig:
    train_path: str = ""
    """training prompts (.jsonl or .parquet, ViRL-style schema)."""
    eval_path: str = ""
    """held-out prompts for `calibrl eval` and periodic evaluation ('' = none)."""
    max_prompt_tokens: int = 1024
    """prompts longer than this (after image-token expansion) are filtered out."""
    max_images: int = 10
    """images per prompt above this are an error for that row (skipped and counted)."""
    image_backend: str = "processor"
    """trainer-side image preprocessing: processor (the HF processor, CPU) | pil (data/dali.py's PIL path,
    identical pixels) | dali (NVIDIA DALI on the GPU) | auto (dali when CUDA and DALI are there, else pil)."""


@dataclass
class RolloutConfig:
    urls: list[str] = field(default_factory=list)
    """external rollout servers; empty = start the embedded server as a child process on loopback."""
    engine: str = "embedded"
    """engine of a server the trainer starts itself: 'embedded' (CPU/GPU), 'sglang', 'vllm'."""
    n_samples: int = 4
    """G: on-policy samples per prompt (the paper: 10)."""
    temperature: float = 1.0
    """sampling temperature for training rollouts (validation is greedy)."""
    top_p: float = 1.0
    """nucleus sampling."""
    top_k: int = -1
    """top-k sampling (-1 = off)."""
    max_new_tokens: int = 64
    """maximum response length."""
    timeout_s: float = 600.0
    """per-request timeout of the rollout client."""
    max_retries: int = 3
    """client retries (with backoff) before a rollout step fails."""
    min_live_servers: int = 1
    """below this many live servers (rollout.urls) a step waits for recovery, up to recovery_timeout_s, then the
    run stops naming every server and its last error. A server is out after a failed request or push, back
    (suspect) when it answers /health, and live again only after it took the current weights."""
    recovery_timeout_s: float = 300.0
    """how long a step waits for min_live_servers live servers before the run stops."""
    health_probe_interval_s: float = 2.0
    """how often the servers that are out are probed on /health."""
    api_key: str = ""
    """API key for weight-update routes ('' = none)."""
    weight_sync_bucket_mb: int = 64
    """weights are pushed to the server in buckets of at most this size."""
    weight_sync_method: str = "auto"
    """auto | tensor | disk | distributed. auto = tensor (HTTP safetensors) for the embedded engine, disk
    (HF checkpoint reload) for sglang/vllm; distributed = broadcast over a gloo/NCCL group joined through
    /init_weights_update_group (embedded or SGLang; SGLang needs NCCL between trainer and server GPUs)."""
    server_device: str = "cpu"
    """device of the embedded server the trainer starts ('cpu', 'cuda', 'cuda:1', ...)."""
    server_dtype: str = "float32"
    """dtype of the embedded server the trainer starts: float32 | bfloat16."""
    decode_graphs: str = "auto"
    """embedded server the trainer starts: auto | on | off. Decode on a static KV pool with one CUDA graph per
    (rows, columns) bucket (auto = on CUDA devices; on = also off CUDA, run eagerly); off = the padded slab."""
    server_tp_size: int = 1
    """tensor parallelism of an SGLang/vLLM server the trainer starts."""
    server_base_gpu: int = -1
    """first GPU of a server the trainer starts (SGLang --base-gpu-id, vLLM CUDA_VISIBLE_DEVICES, embedded with
    server_device=cuda: cuda:N); -1 = the first GPU after this node's trainer ranks. Sharing a trainer rank's GPU
    is refused for weight_sync_method=distributed (NCCL)."""
    server_mem_fraction: float = 0.5
    """GPU memory fraction an SGLang/vLLM server may take (colocated with training)."""


@dataclass
class AlgoConfig:
    name: str = "calibrl"
    """one of grpo, dapo, luffy, rlplus, calibrl."""
    alpha: float = 0.5
    """CalibRL LeakyReLU slope on the already-calibrated side."""
    lam: float = 0.1
    """CalibRL weight λ of the calibration term."""
    clip_low: float = 0.2
    """PPO ε_low."""
    clip_high: float = 0.2
    """PPO ε_high (DAPO: 0.28)."""
    dual_clip: float = 3.0
    """dual-clip constant c for A < 0 (0 = off)."""
    agg: str = "token-mean"
    """token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm."""
    norm_by_std: bool = False
    """divide advantages by the group std (GRPO option)."""
    pass_threshold: float = 0.1
    """a rollout passes when its reward is above this."""
    format_weight: float = 0.1
    """r = acc + format_weight · fmt."""
    entropy_coef: float = 0.0
    """entropy bonus coefficient (subtracted from the loss)."""
    kl_coef: float = 0.0
    """k3 KL-to-reference coefficient (needs a reference model when > 0)."""
    expert_mask: bool = False
    """CalibRL: mask positions past the expert's length instead of using b_t = 0 there."""
    luffy_gamma: float = 0.1
    """LUFFY policy-shaping γ in f(π) = π/(π+γ)."""
    rlplus_exponent: float = 0.5
    """RL-PLUS exploration weight exponent in (1 − π)^κ."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards all agree (defaults to on for dapo)."""
    dynamic_sampling_max_rounds: int = 2
    """with dynamic sampling: extra prompt batches sampled per step to refill train.prompts_per_step groups
    that carry signal (0 = no refill: the step trains on fewer groups)."""
    overlong_buffer: int = 0
    """DAPO soft overlong penalty: responses longer than max_new_tokens − buffer lose up to
    overlong_penalty of reward, linearly (0 = off)."""
    overlong_penalty: float = 1.0
    """DAPO: the reward lost by a response of max_new_tokens tokens (with overlong_buffer > 0)."""
    alpha_schedule: str = "constant"
    """α over the run: constant | linear | cosine (alpha → alpha_final) | pass_rate (alpha_max → alpha_min as
    the group pass rate rises)."""
    alpha_final: float = 0.5
    """α at the last step for linear/cosine schedules."""
    alpha_min: float = 0.1
    """α at pass rate 1 (pass_rate schedule)."""
    alpha_max: float = 0.9
    """α at pass rate 0 (pass_rate schedule)."""
    lam_schedule: str = "constant"
    """λ over the run: constant | linear | cosine (lam → lam_final) | entropy (feedback controller)."""
    lam_final: float = 0.1
    """λ at the last step for linear/cosine schedules."""
    entropy_target_low: float = 0.5
    """entropy controller: raise λ when the policy entropy falls below this."""
    entropy_target_high: float = 2.0
    """entropy controller: lower λ when the policy entropy rises above this."""
    lam_rate: float = 0.1
    """entropy controller: multiplicative step of λ per rollout step."""
    lam_min: float = 0.0
    """entropy controller: lower bound of λ."""
    lam_max: float = 1.0
    """entropy controller: upper bound of λ."""
    num_experts: int = 1
    """expert solutions used per prompt (from the data's list of experts)."""
    expert_agg: str = "mean"
    """baseline over several experts at each position: mean | max | logmeanexp of their log-probs."""
    expert_gate: str = "none"
    """experts failing the verifier: none (use them) | drop (no calibration for the group) | downweight."""
    expert_gate_weight: float = 0.5
    """calibration weight of a group whose experts all fail the verifier (expert_gate=downweight)."""
    calibration_groups: str = "all"
    """CalibRL: groups that get the calibration term: all (the paper) | with_pass (only groups where some rollout
    passes; a group where all fail but rewards differ, e.g. by format, would otherwise only push log-probs down)."""


@dataclass
class RewardsConfig:
    gate_on_format: bool = False
    """false: the paper's training reward r = acc + algo.format_weight · fmt, under which a right answer in a
    broken format still passes (watch reward/pass_broken_format_frac). true: r = acc · fmt + format_weight · fmt,
    accuracy counts only inside `<think>…</think><answer>…</answer>` (for tasks where the format matters).
    Validation scores acc × fmt either way."""


@dataclass
class OptimConfig:
    lr: float = 1e-6
    """peak learning rate (paper: 1e-6 constant)."""
    lr_schedule: str = "constant"
    """constant | cosine | linear (after warm-up)."""
    warmup_steps: int = 0
    """linear warm-up optimizer steps."""
    min_lr: float = 0.0
    """floor of cosine/linear decay."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """global gradient-norm clip (0 = off)."""
    adam_beta1: float = 0.9
    """Adam β1."""
    adam_beta2: float = 0.999
    """Adam β2."""
    adam_eps: float = 1e-8
    """Adam ε."""
    distributed_optimizer: bool = False
    """shard fp32 main weights and Adam states over DP (Megatron's distributed optimizer, ZeRO-1)."""


@dataclass
class TrainConfig:
    seed: int = 0
    """seeds everything random in a run: parameter init, dropout and the trainer's RNGs (offset per pipeline
    stage), the prompt order (resumable) and every rollout's sampling (`rollout_stage.rollout_seed`). Runs repeat
    bit for bit on one machine with the same thread count; other CPUs / thread counts / GPUs round differently."""
    steps: int = 10
    """rollout steps (each: rollout → advantages → mini-batch updates → weight sync)."""
    prompts_per_step: int = 8
    """prompts per rollout step, over all DP ranks (paper: 480)."""
    mini_batches_per_step: int = 1
    """optimizer steps per rollout step (paper: 480/120 = 4); one PPO epoch."""
    micro_batch_size: int = 4
    """sequences per micro-batch (sorted by length so padding stays small)."""
    max_tokens_per_micro_batch: int = 0
    """> 0: instead of micro_batch_size rows, as many length-sorted rows per micro-batch as fit this many
    tokens (model.packed_sequences: real tokens; else rows x longest row); a longer row goes alone."""
    run_dir: str = "runs/default"
    """metrics.jsonl, TensorBoard events, resolved config and checkpoints go here."""
    eval_every: int = 0
    """evaluate on data.eval_path every N steps (0 = only at the end if eval_path is set)."""
    eval_prompts: int = 64
    """held-out prompts per evaluation."""
    eval_samples: int = 0
    """> 0: each evaluation also samples this many responses per held-out prompt at rollout.temperature (seeded
    by train.seed, the same draws at every evaluation) and reports eval/pass@k, the unbiased estimate of the
    chance that one of k samples is right (acc × fmt), for k = 1, 2, 4, ... up to this number."""
    tensorboard: bool = True
    """also write TensorBoard events."""
    progress: bool = True
    """one progress line on rank 0 (rewritten in place on a terminal; a few plain lines in a log file)."""
    log_level: str = "info"
    """terminal output: warning | info (ours at INFO; Megatron, httpx, math-verify, transformers at WARNING;
    known library fallback warnings folded into the start-up line) | verbose (everything, as the libraries log
    it; the --verbose flag) | debug."""
    wandb: str = ""
    """W&B project: when set, metrics also go to a W&B run (files in <run_dir>/wandb; '' = off)."""
    wandb_mode: str = "auto"
    """auto (WANDB_MODE if set, else online) | online | offline (no network; `wandb sync` uploads later)."""


@dataclass
class SFTConfig:
    steps: int = 50
    """SFT optimizer steps on expert solutions."""
    lr: float = 1e-3
    """SFT learning rate."""
    batch_size: int = 8
    """examples per SFT step (global)."""
    out_dir: str = ""
    """where the warm-started HF checkpoint is written ('' = <run_dir>/sft_hf)."""


@dataclass
class CheckpointConfig:
    save_every: int = 0
    """save every N rollout steps (0 = only at the end)."""
    keep_last: int = 2
    """complete checkpoints kept (older ones are deleted)."""
    resume: bool = True
    """resume from <run_dir>/checkpoints/latest when it exists."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "model.arch": ("auto", "qwen2_5_vl", "internvl"),
    "model.dtype": ("fp32", "bf16"),
    "model.spec": ("auto", "local", "sdpa", "te"),
    "model.fp8": ("none", "delayed", "tensorwise", "blockwise", "rowwise"),
    "model.fp8_backend": ("te", "torchao"),
    "model.fp8_amax_compute_algo": ("max", "most_recent"),
    "model.recompute": ("none", "selective", "full"),
    "data.image_backend": ("processor", "pil", "dali", "auto"),
    "rollout.engine": ("embedded", "sglang", "vllm"),
    "rollout.decode_graphs": ("auto", "on", "off"),
    "algo.name": ("grpo", "dapo", "luffy", "rlplus", "calibrl"),
    "algo.alpha_schedule": ("constant", "linear", "cosine", "pass_rate"),
    "algo.lam_schedule": ("constant", "linear", "cosine", "entropy"),
    "algo.expert_agg": ("mean", "max", "logmeanexp"),
    "algo.expert_gate": ("none", "drop", "downweight"),
    "algo.calibration_groups": ("all", "with_pass"),
    "algo.agg": ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"),
    "optim.lr_schedule": ("constant", "cosine", "linear"),
    "train.log_level": ("warning", "info", "verbose", "debug"),
    "train.wandb_mode": ("auto", "online", "offline"),
}


MOVED_KEYS: dict[str, str] = {"data.seed": "train.seed", "parallel.seed": "train.seed"}
"""Keys that were replaced: a config that still sets one gets an error naming its successor."""


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key."""


def _validate(cfg: Config) -> None:
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {list(choices)}")
    positive = ["algo.num_experts", "rollout.n_samples", "rollout.max_new_tokens", "train.prompts_per_step",
                "train.mini_batches_per_step", "train.micro_batch_size", "sft.batch_size",
                "rollout.min_live_servers", "rollout.recovery_timeout_s", "rollout.health_probe_interval_s"]
    for key in positive:
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) <= 0:
            raise ConfigError(f"{key} must be > 0, got {getattr(getattr(cfg, section), name)}")
    if cfg.rollout.urls and cfg.rollout.min_live_servers > len(cfg.rollout.urls):
        raise ConfigError(f"rollout.min_live_servers={cfg.rollout.min_live_servers} is more than the "
                          f"{len(cfg.rollout.urls)} servers of rollout.urls")
    if cfg.algo.dynamic_sampling_max_rounds < 0:
        raise ConfigError(f"algo.dynamic_sampling_max_rounds must be >= 0, got {cfg.algo.dynamic_sampling_max_rounds}")
    if cfg.train.eval_samples < 0:
        raise ConfigError(f"train.eval_samples must be >= 0 (0 = greedy accuracy only), got {cfg.train.eval_samples}")
    if cfg.train.max_tokens_per_micro_batch < 0:
        raise ConfigError(f"train.max_tokens_per_micro_batch must be >= 0 (0 = off), got "
                          f"{cfg.train.max_tokens_per_micro_batch}")
    if cfg.train.prompts_per_step % cfg.train.mini_batches_per_step:
        raise ConfigError(
            f"train.prompts_per_step={cfg.train.prompts_per_step} must be divisible by "
            f"train.mini_batches_per_step={cfg.train.mini_batches_per_step}"
        )
    if not 0.0 <= cfg.algo.alpha <= 1.0:
        raise ConfigError(f"algo.alpha must be in [0, 1], got {cfg.algo.alpha}")
    if cfg.parallel.sequence_parallel and cfg.parallel.tensor_model_parallel_size == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1")
    _validate_pipeline_split(cfg.parallel)
    _validate_fp8(cfg.model)


def _validate_fp8(model: ModelConfig) -> None:
    """The FP8 keys together (recipe belongs to the backend, bf16 parts, delayed without bf16 layers); the
    spec is checked against the backend when the model is built (`model_providers.fp8`)."""
    from model_providers.fp8 import FP8Settings

    try:
        FP8Settings.from_model_config(model).validate()
    except ValueError as err:
        raise ConfigError(str(err)) from err


def _validate_pipeline_split(section: ParallelSection) -> None:
    """What needs no model: each count >= 1, and PP > 1. The fit to the model's decoder layers is checked
    when the model is built (`model_providers.pipeline_split`)."""
    split = {"first": section.num_layers_in_first_pipeline_stage, "last": section.num_layers_in_last_pipeline_stage}
    given = {k: v for k, v in split.items() if v is not None}
    for where, value in given.items():
        if value < 1:
            raise ConfigError(f"parallel.num_layers_in_{where}_pipeline_stage must be >= 1 (null = even), got {value}")
    if given and section.pipeline_model_parallel_size == 1:
        raise ConfigError(f"parallel.num_layers_in_{next(iter(given))}_pipeline_stage is set but "
                          "parallel.pipeline_model_parallel_size=1: uneven stages need PP > 1 (set them to null)")


CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""The shipped configs (package data; the checkout's top-level `configs/` links here)."""
LAYOUT_DIR = CONFIG_DIR / "layouts"


def _shipped(value: str | Path, folder: Path) -> Path | None:
    """`value` if it is a file, else the shipped YAML of that bare name in `folder` (with or without .yaml)."""
    path = Path(value)
    if path.is_file() or path.name != str(value):
        return path if path.is_file() else None
    return next((p for p in (folder / f"{value}.yaml", folder / str(value)) if p.is_file()), None)


def resolve_layout(layout: str | Path) -> Path:
    """A layout file path, or the name of one in configs/layouts (e.g. 'qwen2_5_vl_32b_h100x32')."""
    found = _shipped(layout, LAYOUT_DIR)
    if found is None:
        known = sorted(p.stem for p in LAYOUT_DIR.glob("*.yaml"))
        raise ConfigError(f"layout {str(layout)!r} is neither a file nor one of configs/layouts: {known}")
    return found


def resolve_config(config: str | Path) -> Path:
    """A config file path, or the name of a shipped one (e.g. 'tiny_cpu', 'qwen2_5_vl_7b'): an installed
    package finds its configs without a checkout."""
    found = _shipped(config, CONFIG_DIR)
    if found is None:
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"config file {config} does not exist (nor is it a shipped config: {known})")
    return found


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, layout: str | Path | None = None
) -> Config:
    """Defaults ← YAML file ← cluster layout file (`resolve_layout`) ← `key.sub=value` overrides; returns a
    validated typed `Config`."""
    files = [resolve_config(path)] if path else []
    if layout:
        files.append(resolve_layout(layout))
    bad = [o for o in overrides or [] if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key.sub=value, got {bad}")
    layers: list[tuple[str, Any]] = [(f" in {f}", lambda f=f: OmegaConf.load(f)) for f in files]
    if overrides:
        layers.append((" in the command-line overrides", lambda: OmegaConf.from_dotlist(overrides)))
    merged = OmegaConf.structured(Config)
    for where, layer in layers:  # one at a time, so that an error names its source
        try:
            loaded = layer()
            _refuse_moved_keys(loaded, where)
            merged = OmegaConf.merge(merged, loaded)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", None)
            msg = str(exc.msg if hasattr(exc, "msg") else exc).splitlines()[0]  # OmegaConf appends its key dump
            raise ConfigError(f"config error{where} at key {key!r}: {msg}") from exc
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    _restore_on_off(cfg)
    _validate(cfg)
    return cfg


def _refuse_moved_keys(layer: Any, where: str) -> None:
    for old, new in MOVED_KEYS.items():
        if isinstance(layer, DictConfig) and OmegaConf.select(layer, old, default=None) is not None:
            raise ConfigError(f"{old}{where} was replaced by {new} (one seed for init, data order and rollout "
                              f"sampling): set {new} instead")


def _restore_on_off(cfg: Config) -> None:
    """YAML 1.1 reads `on` / `off` as booleans (in files and in key=value overrides alike), which a str field
    stores as "True" / "False": map them back for the choice fields that offer on and off."""
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value in ("True", "False") and {"on", "off"} <= set(choices):
            setattr(getattr(cfg, section), name, "on" if value == "True" else "off")


def to_yaml(cfg: Config) -> str:
    """The fully resolved config, saved in every run directory and checkpoint."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def as_dictconfig(cfg: Config) -> DictConfig:
    return OmegaConf.structured(cfg)


def as_container(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain nested dicts (e.g. a W&B run's config)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]


def field_docs() -> dict[str, str]:
    """`section.key` -> the attribute docstring written under each field above (read from the source)."""
    import ast
    import inspect
    import sys

    tree = ast.parse(inspect.getsource(sys.modules[__name__]))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    sections = {
        stmt.target.id: stmt.annotation.id
        for stmt in classes["Config"].body
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.annotation, ast.Name)
    }
    docs: dict[str, str] = {}
    for section, cls_name in sections.items():
        body = classes[cls_name].body
        for stmt, nxt in zip(body, body[1:] + [None]):
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                doc = ""
                if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                    doc = " ".join(str(nxt.value.value).split())
                docs[f"{section}.{stmt.target.id}"] = doc
    return docs


def render_defaults_yaml() -> str:
    """configs/defaults.yaml: every key with its default and its documentation as a comment."""
    docs = field_docs()
    defaults = OmegaConf.to_container(OmegaConf.structured(Config))
    lines = ["# calibrl-mcore: every config key, its default and what it means.",
             "# Generated from calibrl_mcore/config.py (python -m calibrl_mcore.config > configs/defaults.yaml);",
             "# a test checks that this file and the dataclasses agree.", ""]
    for section, values in defaults.items():
        lines.append(f"{section}:")
        for key, value in values.items():
            rendered = OmegaConf.to_yaml({key: value}).strip().replace("\n", "\n  ")
            lines.append(f"  # {docs[f'{section}.{key}']}")
            lines.append(f"  {rendered}")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_defaults_yaml(), end="")
