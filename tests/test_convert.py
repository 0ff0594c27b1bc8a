"""`calibrl convert` (tools/convert_checkpoint.py) on tiny random Qwen2.5-VL and InternVL3: CPU, fp32, gloo.

  * hf-to-mcore at TP=2 (inside an outside torchrun, small buffer: several parts merged into one checkpoint);
  * verify reloads it at TP=1 x PP=2 and TP=2 (the tool starts torchrun itself): max |dlogits| <= 1e-4 for
    text-only, one-image and two-image prompts; verify exits non-zero above --tol;
  * round trip HF -> Megatron (TP=2) -> reloaded at TP=1 x PP=2 -> HF is bit-identical, and transformers
    loads the exported directory (model + processor);
  * bad input (architecture, layout, missing / unexpected / mis-shaped tensors, existing output) gives a
    message naming the field or tensor, a non-zero exit, and no output directory;
  * uneven pipeline stages on 3-layer models (Megatron's num_layers_in_{first,last}_pipeline_stage): Qwen2.5-VL
    converted at --pp 2 (no split given: 1+2 chosen), verified at 2+1, exported at PP=1 bit-exactly;
  * InternVL3 (the same tool, nothing architecture-specific): HF -> Megatron at PP=2 split 2+1 -> verify at
    1+2 -> HF at PP=1, bit-exact. Converted at TP=1: at TP=2 Megatron's own save rejects the InternVL stage
    (the vision embeddings' replicated tensors carry replica_id (0, 0, 0) on every TP rank - a provider issue).
The HF checkpoint is make_tiny_model's, with seeded noise on every tensor (norm scales and biases would
otherwise be ones / zeros and hide a swapped mapping), split over two safetensors files with an index.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from calibrl_mcore.convert_checkpoint import main
from tests.torchrun_utils import run_torchrun

TOL = 1e-4


def _perturb_and_shard(hf_dir: Path) -> None:
    """Noise on every tensor; rewrite as two shards + model.safetensors.index.json (names unchanged)."""
    state = load_file(hf_dir / "model.safetensors")
    gen = torch.Generator().manual_seed(123)
    state = {
        k: (v + 0.1 * torch.randn(v.shape, generator=gen)).contiguous() for k, v in sorted(state.items())
    }
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    (hf_dir / "model.safetensors").unlink()
    for file, keys in halves.items():
        save_file({k: state[k] for k in keys}, str(hf_dir / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, ks in halves.items() for k in ks}}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))


def _hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("convert")


def _tiny(arch: str, path: Path, num_layers: int = 2) -> Path:
    from calibrl_mcore.make_tiny_model import make_tiny_model

    make_tiny_model(arch, path, seed=0, num_layers=num_layers)
    _perturb_and_shard(path)
    return path


@pytest.fixture(scope="module")
def hf_dir(work: Path) -> Path:
    return _tiny("qwen2_5_vl", work / "hf")


@pytest.fixture(scope="module")
def mcore_dir(work: Path, hf_dir: Path) -> Path:
    out = work / "mcore_tp2"
    ranks = run_torchrun("convert_worker.py", 2, work / "hf_to_mcore", "hf-to-mcore", "--hf-dir", str(hf_dir),
                         "--out-dir", str(out), "--tp", "2", "--buffer-mb", "0.25")  # fmt: skip
    assert [r["rc"] for r in ranks] == [0, 0]
    assert (out / "COMPLETE").is_file() and (out / "hf_config" / "config.json").is_file()
    assert not out.with_name(out.name + ".tmp").exists()
    return out


@pytest.mark.parametrize(("tp", "pp"), [(1, 2), (2, 1)], ids=["tp1pp2", "tp2pp1"])
def test_verify_layouts(work: Path, hf_dir: Path, mcore_dir: Path, tp: int, pp: int) -> None:
    report = work / f"verify_tp{tp}pp{pp}.json"
    rc = main(["verify", "--hf-dir", str(hf_dir), "--mcore-dir", str(mcore_dir), "--tp", str(tp), "--pp", str(pp),
               "--report", str(report)])  # fmt: skip
    assert rc == 0
    diffs = json.loads(report.read_text())["max_abs_diff"]
    assert set(diffs) == {"text", "one_image", "two_images"}
    assert max(diffs.values()) <= TOL, diffs


def test_verify_fails_above_tol(hf_dir: Path, mcore_dir: Path, capsys) -> None:
    assert main(["verify", "--hf-dir", str(hf_dir), "--mcore-dir", str(mcore_dir), "--tol", "0"]) == 2
    assert "logits differ" in capsys.readouterr().err


def test_round_trip_bit_identical(work: Path, hf_dir: Path, mcore_dir: Path) -> None:
    out = work / "hf_back"
    assert main(["mcore-to-hf", "--mcore-dir", str(mcore_dir), "--out-dir", str(out), "--tp", "1", "--pp", "2",
                 "--buffer-mb", "0.25"]) == 0  # fmt: skip
    source, exported = _hf_tensors(hf_dir), _hf_tensors(out)
    assert sorted(exported) == sorted(source)
    different = [
        k for k in source if source[k].dtype != exported[k].dtype or not torch.equal(source[k], exported[k])
    ]
    assert not different
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(source)
    assert {f.name for f in out.glob("*.safetensors")} == set(index["weight_map"].values())
    assert len(set(index["weight_map"].values())) > 1  # several shards

    from transformers import AutoModelForImageTextToText

    from calibrl_mcore.make_tiny_model import load_processor

    model = AutoModelForImageTextToText.from_pretrained(out)
    assert torch.equal(model.state_dict()["lm_head.weight"], source["lm_head.weight"])
    assert load_processor(out).tokenizer is not None


def _edit_checkpoint(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    for file in dst.glob("*.safetensors"):
        state = load_file(file)
        edit(state, file.name)
        save_file(state, str(file), metadata={"format": "pt"})
    return dst


def _drop(state: dict, file: str) -> None:
    state.pop("model.layers.1.mlp.up_proj.weight", None)


def _extra(state: dict, file: str) -> None:
    if file.startswith("model-00001"):
        state["model.layers.7.mlp.up_proj.weight"] = torch.zeros(128, 64)


def _reshape(state: dict, file: str) -> None:
    if "model.layers.0.mlp.gate_proj.weight" in state:
        state["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(130, 64)


@pytest.mark.parametrize(
    ("case", "flags", "message"),
    [
        ("unsupported", ["--tp", "1"], "model_type='llama'"),
        ("tp_heads", ["--tp", "3"], "does not divide text_config.num_attention_heads=4"),
        ("tp_kv_groups", ["--tp", "4"], "does not divide text_config.num_key_value_heads=2"),
        ("pp_layers", ["--pp", "3"], "--pp=3 is more stages than the 2 decoder layers (text_config.num_hidden_layers=2)"),
        ("pp_split", ["--pp", "2", "--num-layers-in-first-pipeline-stage", "2"],
         "--num-layers-in-first-pipeline-stage=2 leave 0 of the 2 decoder layers to the other 1 of --pp=2 stages"),
        ("missing", [], "missing HF tensor 'model.layers.1.mlp.up_proj.weight'"),
        ("unexpected", [], "unexpected HF tensor 'model.layers.7.mlp.up_proj.weight'"),
        (
            "shape",
            [],
            "'model.layers.0.mlp.gate_proj.weight' has shape [130, 64], but config.json implies [128, 64]",
        ),
        ("exists", [], "exists: remove it or pass --overwrite"),
    ],
)
def test_bad_input(work: Path, hf_dir: Path, capsys, case: str, flags: list[str], message: str) -> None:
    src = work / f"bad_{case}"
    if case == "unsupported":
        shutil.copytree(hf_dir, src)
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
    elif case in ("missing", "unexpected", "shape"):
        _edit_checkpoint(hf_dir, src, {"missing": _drop, "unexpected": _extra, "shape": _reshape}[case])
    else:
        src = hf_dir
    out = work / f"out_{case}"
    if case == "exists":
        out.mkdir()
    rc = main(["hf-to-mcore", "--hf-dir", str(src), "--out-dir", str(out), *flags])
    assert rc != 0
    assert message in capsys.readouterr().err
    assert not out.with_name(out.name + ".tmp").exists()
    assert (not out.exists()) if case != "exists" else not any(out.iterdir())


def _verify(work: Path, hf: Path, mcore: Path, name: str, *flags: str) -> dict:
    report = work / f"{name}.json"
    assert main(["verify", "--hf-dir", str(hf), "--mcore-dir", str(mcore), "--report", str(report), *flags]) == 0
    result = json.loads(report.read_text())
    diffs = result["max_abs_diff"]
    assert set(diffs) == {"text", "one_image", "two_images"} and max(diffs.values()) <= TOL, diffs
    return result


def _assert_bit_identical(source_dir: Path, exported_dir: Path) -> None:
    source, exported = _hf_tensors(source_dir), _hf_tensors(exported_dir)
    assert sorted(exported) == sorted(source)
    assert all(torch.equal(source[k], exported[k]) and source[k].dtype == exported[k].dtype for k in source)


def test_uneven_pipeline_stages(work: Path) -> None:
    """`--pp 2` on a 3-layer model: no split given -> 1+2 (stage 0 also holds the vision tower); the checkpoint
    is verified at the other split (2+1) and exported at PP=1, bit-identical to the source."""
    hf, mcore, back = _tiny("qwen2_5_vl", work / "hf3", num_layers=3), work / "mcore3_pp2", work / "hf3_back"
    assert main(["hf-to-mcore", "--hf-dir", str(hf), "--out-dir", str(mcore), "--pp", "2", "--buffer-mb", "0.25"]) == 0
    meta = json.loads((mcore / "convert.json").read_text())
    assert (meta["num_layers_in_first_pipeline_stage"], meta["num_layers_in_last_pipeline_stage"]) == (1, None)
    result = _verify(work, hf, mcore, "verify3", "--pp", "2", "--num-layers-in-first-pipeline-stage", "2")
    assert result["stage_layers"] == [2, 1]
    assert main(["mcore-to-hf", "--mcore-dir", str(mcore), "--out-dir", str(back)]) == 0
    _assert_bit_identical(hf, back)


def test_internvl(work: Path) -> None:
    hf = _tiny("internvl", work / "internvl_hf", num_layers=3)
    mcore, back = work / "internvl_mcore", work / "internvl_back"
    assert main(["hf-to-mcore", "--hf-dir", str(hf), "--out-dir", str(mcore), "--buffer-mb", "0.25", "--pp", "2",
                 "--num-layers-in-last-pipeline-stage", "1"]) == 0  # fmt: skip
    assert _verify(work, hf, mcore, "internvl_verify", "--pp", "2")["stage_layers"] == [1, 2]
    assert main(["mcore-to-hf", "--mcore-dir", str(mcore), "--out-dir", str(back)]) == 0
    _assert_bit_identical(hf, back)
