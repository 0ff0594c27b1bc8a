"""HF side of hf-to-mcore: the checkpoint's headers first (names, shapes, checks), then one tensor at a time."""

from __future__ import annotations

from pathlib import Path

from calibrl_mcore.convert.stage import ConvertError, Stage


class HFCheckpoint:
    """Names (canonical), shapes and files of an HF checkpoint's tensors, from the headers only."""

    def __init__(self, path: Path, mapping) -> None:
        from safetensors import safe_open

        self.path, self.where, self.shapes = path, {}, {}
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(file, framework="pt") as f:
                for raw in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    name = mapping.canonical_hf_name(raw)
                    if name in self.where:
                        raise ConvertError(
                            f"HF tensor {raw!r} is in {self.where[name][0].name} and {file.name}"
                        )
                    self.where[name], self.shapes[name] = (file, raw), tuple(f.get_slice(raw).get_shape())
        if not self.where:
            raise ConvertError(f"--hf-dir {path}: no *.safetensors files")

    def read(self, name: str):
        from safetensors import safe_open

        file, raw = self.where[name]
        with safe_open(file, framework="pt") as f:  # opened per tensor: no file mapping outlives its read
            return f.get_tensor(raw)


def expected_hf_tensors(stage: Stage) -> dict[str, tuple[tuple[int, ...] | None, str]]:
    """HF name -> (shape, Megatron name) that this stage reads: the inverse map run on meta tensors."""
    from model_providers.hf_mapping import megatron_to_hf

    expected: dict = {}
    for name, param in stage.model.named_parameters():
        rule, layer = stage.mapping.match_megatron(name)
        if not rule.export:  # a copy that is read but never written back (the tied output layer)
            expected.update(
                {h: (None, name) for h in stage.placement.hf_names(rule, layer) if h not in expected}
            )
            continue
        shards = [{name: param}] * stage.placement.tp_size  # meta tensors: only shapes flow through
        expected.update(
            {h: (tuple(t.shape), name) for h, t in megatron_to_hf(shards, stage.mapping, stage.placement)}
        )
    return expected


def check_hf_tensors(ckpt: HFCheckpoint, stage: Stage) -> None:
    """Missing / unexpected / wrongly shaped HF tensors over all stages (the same verdict on every rank)."""
    import torch.distributed as dist

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, expected_hf_tensors(stage))
    expected = {n: v for part in gathered for n, v in part.items() if v[0] is not None}
    expected.update({n: v for part in gathered for n, v in part.items() if n not in expected})

    def ignored(name: str) -> bool:  # e.g. lm_head.weight of a tied model
        try:
            return not stage.mapping.match_hf(name)
        except KeyError:
            return False

    disk = {
        n: ckpt.where[n][1] if n in ckpt.where else stage.mapping.checkpoint_hf_name(n)
        for n in {*ckpt.where, *expected}
    }
    problems = [
        f"missing HF tensor {disk[n]!r} (for Megatron {m!r})"
        for n, (_, m) in sorted(expected.items())
        if n not in ckpt.shapes
    ]
    problems += [
        f"unexpected HF tensor {disk[n]!r} (no rule reads it, or config.json has fewer layers)"
        for n in sorted(ckpt.shapes)
        if n not in expected and not ignored(n)
    ]
    problems += [f"HF tensor {disk[n]!r} has shape {list(ckpt.shapes[n])}, but config.json implies {list(s)} "
                 f"(for Megatron {m!r})" for n, (s, m) in sorted(expected.items())
                 if n in ckpt.shapes and s is not None and ckpt.shapes[n] != s]  # fmt: skip
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ConvertError(f"--hf-dir {ckpt.path} does not match its config.json:\n  " + "\n  ".join(problems[:20])
                           + f"{more}\nFix: use the config.json that belongs to these weights (sizes, layer "
                           "count, tie_word_embeddings), or re-download the checkpoint.")  # fmt: skip


def convert_param(stage: Stage, ckpt: HFCheckpoint, name: str, dtype):
    """One Megatron tensor (this rank's TP slice) from its HF tensor(s), read on demand."""
    from model_providers.hf_mapping import hf_to_megatron

    rule, layer = stage.mapping.match_megatron(name)
    hf_names = stage.placement.hf_names(rule, layer)
    plain_copy = rule.fusion.num_parts == rule.hf_chunks == 1
    if plain_copy and (rule.tp_axis is None or stage.placement.tp_size == 1):
        return ckpt.read(hf_names[0]).to(
            dtype
        )  # skip the converter's slice clone (2x the peak for this tensor)
    state = hf_to_megatron(((n, ckpt.read(n)) for n in hf_names), stage.mapping, stage.placement)
    return state[name].to(dtype)
