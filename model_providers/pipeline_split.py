"""Decoder layers per pipeline stage: Megatron-Core's uneven first / last stages, checked up front.

Megatron-Core 0.16.1 splits the decoder over PP stages in one of two ways (`TransformerConfig`,
`get_num_layers_to_build`, `get_transformer_layer_offset`):
  * even: every stage holds num_layers / PP layers (PP must divide the layers);
  * uneven: `num_layers_in_first_pipeline_stage` and/or `num_layers_in_last_pipeline_stage` fix the first /
    last stage, and the stages in between share the remaining layers evenly. With PP = 2 setting one of the
    two fixes the other (the other stage counts as the "middle").
A VL model's first stage also runs the vision tower and its last stage the LM head and the loss, so moving
decoder layers off those stages balances the pipeline (`tools/scaling/pipeline_stages.py` chooses them).

Everything else follows from the TransformerConfig: Megatron builds each stage's layers, offsets their
global indices and writes them under global layer numbers in distributed checkpoints, so a checkpoint
saved at one split reloads at any other (or at PP = 1), and `hf_mapping.Placement` reads the same functions.
`PipelineSplit` only validates a split against a model's layer count with errors that name the setting
(Megatron's own checks accept, e.g., a middle stage with a negative layer count), computes the per-stage
layer counts the same way (tests/test_pipeline_split.py checks that against Megatron's functions), and
enumerates the valid splits for the planner and `calibrl convert`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FIRST, LAST = "num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage"
CONFIG_KEYS = (f"parallel.{FIRST}", f"parallel.{LAST}", "parallel.pipeline_model_parallel_size")
"""How the trainer's config names the two settings and the PP size (error messages name them so);
`calibrl convert` passes its flags instead."""


class PipelineSplitError(ValueError):
    """A split that does not fit the model's decoder layers / the PP size; the message names the setting."""


@dataclass(frozen=True)
class PipelineSplit:
    """Megatron's uneven-pipeline settings; None = that stage holds the middle stages' share."""

    first: int | None = None
    """`num_layers_in_first_pipeline_stage`: decoder layers on PP stage 0 (which also holds the vision tower)."""
    last: int | None = None
    """`num_layers_in_last_pipeline_stage`: decoder layers on the last PP stage (which also holds the LM head)."""

    @classmethod
    def from_section(cls, section: Any) -> PipelineSplit:
        """The split of a run config's `parallel` section (`calibrl_mcore.config.ParallelSection`)."""
        return cls(getattr(section, FIRST), getattr(section, LAST))

    @classmethod
    def from_stage_layers(cls, layers: list[int]) -> PipelineSplit:
        """The canonical split that gives these per-stage counts (even -> `PipelineSplit()`); not validated."""
        if len(set(layers)) == 1:
            return cls()
        if len(layers) == 2:
            return cls(first=layers[0])  # with PP = 2 the first stage's count fixes the last's
        middle = layers[1]
        return cls(layers[0] if layers[0] != middle else None, layers[-1] if layers[-1] != middle else None)

    @property
    def uneven(self) -> bool:
        return self.first is not None or self.last is not None

    def config_kwargs(self) -> dict[str, int | None]:
        """The TransformerConfig fields (decoder only: the vision towers are never pipelined)."""
        return {FIRST: self.first, LAST: self.last}

    def stage_layers(self, num_layers: int, pp: int, names: tuple[str, str, str] = CONFIG_KEYS) -> list[int]:
        """Decoder layers on each of the `pp` stages (Megatron's rule, see the module docstring).

        Raises `PipelineSplitError` naming `names` (first, last and the PP size as the caller's user spells
        them) when the split does not fit, with a split that does in the message.
        """
        first_name, last_name, pp_name = names
        for name, value in ((first_name, self.first), (last_name, self.last)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise PipelineSplitError(f"{name}={value!r}: must be an int >= 1 (or unset for an even split)")
        if pp < 1:
            raise PipelineSplitError(f"{pp_name}={pp}: must be >= 1")
        if pp == 1:
            if self.uneven:
                raise PipelineSplitError(f"{self._given(names)}: uneven stages need {pp_name} > 1; unset them for "
                                         "PP = 1")
            return [num_layers]
        layers = self._fit(num_layers, pp)
        if layers is None:
            raise PipelineSplitError(self._misfit(num_layers, pp, names))
        return layers

    def _fit(self, num_layers: int, pp: int) -> list[int] | None:
        """Per-stage layer counts, or None when the split does not fit (every stage needs >= 1 layer)."""
        fixed = [v for v in (self.first, self.last) if v is not None]
        middle_stages, rest = pp - len(fixed), num_layers - sum(fixed)
        fits = rest > 0 and rest % middle_stages == 0 if middle_stages else rest == 0
        if not fits:
            return None
        layers = [rest // middle_stages if middle_stages else 0] * pp
        if self.first is not None:
            layers[0] = self.first
        if self.last is not None:
            layers[-1] = self.last
        return layers

    def stage_ranges(self, num_layers: int, pp: int, names: tuple[str, str, str] = CONFIG_KEYS) -> list[tuple[int, int]]:
        """[start, end) global decoder-layer indices of each stage."""
        ranges, start = [], 0
        for count in self.stage_layers(num_layers, pp, names):
            ranges.append((start, start + count))
            start += count
        return ranges

    def describe(self, num_layers: int, pp: int) -> str:
        """'2+4+4+4+4+4+4+2' (layers per stage), for logs and reports."""
        return "+".join(map(str, self.stage_layers(num_layers, pp)))

    def _given(self, names: tuple[str, str, str]) -> str:
        return ", ".join(f"{n}={v}" for n, v in zip(names, (self.first, self.last)) if v is not None)

    def _misfit(self, num_layers: int, pp: int, names: tuple[str, str, str]) -> str:
        first_name, last_name, pp_name = names
        fixed = [v for v in (self.first, self.last) if v is not None]
        middle_stages, rest = pp - len(fixed), num_layers - sum(fixed)
        if pp > num_layers:
            return f"{pp_name}={pp} is more stages than the {num_layers} decoder layers"
        hint = balanced_split(num_layers, pp)
        hint_text = hint._given(names).replace(", ", " ")
        layers = "+".join(map(str, hint._fit(num_layers, pp)))
        fix = f"e.g. {hint_text} ({layers} layers)" if hint_text else "an even split (unset both)"
        if not self.uneven:
            what = f"{pp_name}={pp} does not divide the {num_layers} decoder layers"
            return f"{what}: set {first_name} / {last_name} for uneven stages, {fix}"
        given = self._given(names)
        if middle_stages == 0:
            what = f"{given} sum to {num_layers - rest}, but the model has {num_layers} decoder layers ({pp_name}={pp})"
        else:
            what = (f"{given} leave {rest} of the {num_layers} decoder layers to the other {middle_stages} of "
                    f"{pp_name}={pp} stages, which need the same number >= 1 each")
        return f"{what}; use {fix}"


def candidate_splits(num_layers: int, pp: int) -> list[PipelineSplit]:
    """Every valid split of `num_layers` over `pp` stages, once per distinct per-stage layout (canonical form),
    the even split (when PP divides the layers) first."""
    seen: dict[tuple[int, ...], PipelineSplit] = {}
    options = [None, *range(1, num_layers + 1)]
    for first in options if pp > 1 else [None]:
        for last in options if pp > 1 else [None]:
            layers = PipelineSplit(first, last)._fit(num_layers, pp)
            if layers is not None:
                seen.setdefault(tuple(layers), PipelineSplit.from_stage_layers(layers))
    return sorted(seen.values(), key=lambda s: (s.uneven, s.first or 0, s.last or 0))


def balanced_split(num_layers: int, pp: int) -> PipelineSplit:
    """The split with the fewest layers on its fullest stage, then the most on its emptiest (the even one when
    PP divides the layers);
    `PipelineSplit()` when no split fits (more stages than layers)."""
    splits = candidate_splits(num_layers, pp)
    if not splits:
        return PipelineSplit()
    return min(splits, key=lambda s: (max(s._fit(num_layers, pp)), -min(s._fit(num_layers, pp)), s.uneven))


EVEN = PipelineSplit()
"""Every stage holds num_layers / PP decoder layers (Megatron's default)."""
