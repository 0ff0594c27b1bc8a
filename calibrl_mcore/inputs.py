"""Checks of a command's input files before any heavy work: each problem is one line naming the field or flag,
the path, and what to do (the CLI prints `calibrl <command>: error: <line>` and exits 2).

    check_command_inputs("train", cfg)            # model.hf_path, data.train_path, data.eval_path
    require_hf_checkpoint(path, "--model")        # a directory with config.json and *.safetensors

Only cheap file-system checks live here; what a file contains is checked by its reader (dataset schema,
config keys), which names the file too.
"""

from __future__ import annotations

from pathlib import Path

from calibrl_mcore.config import Config

DATA_SUFFIXES = (".jsonl", ".parquet")
# Files an HF checkpoint directory needs for each use (any one name of a tuple will do).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


class InputError(ValueError):
    """A missing or unusable input file; the message is one line that says what to do."""


def _describe(field: str, value: str) -> str:
    return f"{field} {value}" if field.startswith("-") else f"{field}={value}"


def require_hf_checkpoint(path: str | Path, field: str, *, tokenizer: bool = True,
                          processor: bool = True) -> Path:
    """`path` is an HF checkpoint directory: config.json and *.safetensors (+ tokenizer / processor files)."""
    if not str(path):
        raise InputError(f"{field} is empty: give an HF checkpoint directory (e.g. one made by "
                         f"`python tools/make_tiny_model.py --arch qwen2_5_vl --out ckpt/tiny`)")
    p = Path(path)
    where = _describe(field, str(path))
    if not p.is_dir():
        raise InputError(f"{where}: no such directory; point {field} at an HF checkpoint directory")
    if not (p / "config.json").is_file():
        raise InputError(f"{where}: no config.json in it; point {field} at an HF checkpoint directory")
    if not any(p.glob("*.safetensors")):
        raise InputError(f"{where}: no *.safetensors weights in it (only safetensors checkpoints are read)")
    for needed, names in (("tokenizer", TOKENIZER_FILES), ("processor", PROCESSOR_FILES)):
        if (tokenizer if needed == "tokenizer" else processor) and not any((p / n).is_file() for n in names):
            raise InputError(f"{where}: no {needed} files ({' or '.join(names)}); copy them from the "
                             f"checkpoint the weights came from")
    return p


def require_data_file(path: str | Path, field: str) -> Path:
    """`path` is an existing .jsonl / .parquet file."""
    if not str(path):
        raise InputError(f"{field} is empty: give a .jsonl or .parquet file (`calibrl data synth --out DIR --n N` "
                         f"makes one)")
    p = Path(path)
    where = _describe(field, str(path))
    if p.suffix.lower() not in DATA_SUFFIXES:
        raise InputError(f"{where}: expected a {' or '.join(DATA_SUFFIXES)} file")
    if not p.is_file():
        raise InputError(f"{where}: no such file")
    return p


def require_benchmark_paths(paths: dict[str, Path]) -> None:
    """Each `calibrl eval --suite` benchmark's data file or folder exists."""
    for name, path in paths.items():
        if not Path(path).exists():
            raise InputError(f"--bench {name}={path}: no such file or folder (or a --suite-dir without it)")


def check_command_inputs(command: str, cfg: Config, *, model: str | None = None) -> None:
    """The inputs `calibrl train | sft | eval` read, checked before anything is built or launched."""
    if command == "eval":
        require_hf_checkpoint(model or cfg.model.hf_path, "--model" if model else "model.hf_path")
        require_data_file(cfg.data.eval_path, "data.eval_path")
        return
    require_hf_checkpoint(cfg.model.hf_path, "model.hf_path")
    require_data_file(cfg.data.train_path, "data.train_path")
    if command == "train" and cfg.data.eval_path:
        require_data_file(cfg.data.eval_path, "data.eval_path")
