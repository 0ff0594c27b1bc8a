"""Config loading: defaults.yaml documents every key, shipped configs load, bad keys/types are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from calibrl_mcore.config import ConfigError, field_docs, load_config, render_defaults_yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_yaml_is_current_and_documents_every_key():
    assert (CONFIGS / "defaults.yaml").read_text() == render_defaults_yaml(), (
        "configs/defaults.yaml is stale: run `python -m calibrl_mcore.config > configs/defaults.yaml`"
    )
    undocumented = [k for k, doc in field_docs().items() if not doc]
    assert not undocumented


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    load_config(path)


def test_overrides_and_errors():
    cfg = load_config(CONFIGS / "tiny_cpu.yaml", ["algo.name=grpo", "algo.alpha=0.25", "train.steps=7"])
    assert (cfg.algo.name, cfg.algo.alpha, cfg.train.steps) == ("grpo", 0.25, 7)
    with pytest.raises(ConfigError, match="algo.nam"):
        load_config(None, ["algo.nam=grpo"])
    with pytest.raises(ConfigError, match="algo.alpha"):
        load_config(None, ["algo.alpha=abc"])
    with pytest.raises(ConfigError, match="algo.name"):
        load_config(None, ["algo.name=ppo"])
    with pytest.raises(ConfigError, match="train.micro_batch_size"):
        load_config(None, ["train.micro_batch_size=0"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(CONFIGS / "nope.yaml")
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["algo.name"])


def test_replaced_seed_keys_name_train_seed(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("data:\n  seed: 3\n")
    with pytest.raises(ConfigError, match=f"data.seed in {old} was replaced by train.seed"):
        load_config(old)
    with pytest.raises(ConfigError, match="parallel.seed in the command-line overrides was replaced by train.seed"):
        load_config(overrides=["parallel.seed=1"])
    assert load_config(overrides=["train.seed=7"]).train.seed == 7


def test_unknown_key_in_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"train\.stepz"):
        load_config(bad)


def test_layout_is_merged_over_the_config_and_under_overrides():
    from omegaconf import OmegaConf

    cfg = load_config(CONFIGS / "qwen2_5_vl_32b.yaml", layout="qwen2_5_vl_32b_h100x16")
    layout = OmegaConf.load(CONFIGS / "layouts/qwen2_5_vl_32b_h100x16.yaml")
    assert cfg.parallel.tensor_model_parallel_size == layout.parallel.tensor_model_parallel_size
    assert cfg.parallel.pipeline_model_parallel_size == layout.parallel.pipeline_model_parallel_size
    assert cfg.train.prompts_per_step == 480  # from the config file, untouched by the layout
    cfg = load_config(CONFIGS / "qwen2_5_vl_32b.yaml", ["parallel.tensor_model_parallel_size=1", "parallel.sequence_parallel=false"],
                      layout=CONFIGS / "layouts/qwen2_5_vl_32b_h100x16.yaml")
    assert cfg.parallel.tensor_model_parallel_size == 1
    with pytest.raises(ConfigError, match="neither a file nor one of configs/layouts: .*qwen2_5_vl_3b_h100x8"):
        load_config(layout="no_such_layout")
    with pytest.raises(ConfigError, match="in the command-line overrides at key 'train.seed'"):
        load_config(overrides=["train.seed=abc"])
    with pytest.raises(ConfigError, match="sequence_parallel=true needs parallel.tensor_model_parallel_size > 1"):
        load_config(overrides=["parallel.sequence_parallel=true"])
