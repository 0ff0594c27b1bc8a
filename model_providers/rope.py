"""Qwen2.5-VL multimodal RoPE (M-RoPE) position ids: a reproduction of transformers' `get_rope_index`.

Every token gets three position ids (temporal, height, width). Text tokens use the same running index on
all three axes; the tokens of one image/video occupy a (t, h, w) grid (after the 2x2 spatial merge) that
starts at the running index, and the text after it resumes at `start + max(h, w)` (transformers 5.x rule:
the temporal extent of videos does not advance the index). The result feeds Megatron's
`MultimodalRotaryEmbedding` (GPTModel with `position_embedding_type="mrope"`) as `position_ids [3, b, s]`.

The trainer computes these once per sample on the data path, so the Megatron model never needs the HF
model; `tests/test_qwen2_5_vl_provider.py` checks equality with transformers.
"""

from __future__ import annotations

import torch

TEXT, IMAGE, VIDEO = 0, 1, 2


def _token_types(input_ids: torch.Tensor, image_token_id: int, video_token_id: int | None) -> torch.Tensor:
    """[s] long: 0 text, 1 image placeholder, 2 video placeholder."""
    types = torch.zeros_like(input_ids)
    types[input_ids == image_token_id] = IMAGE
    if video_token_id is not None:
        types[input_ids == video_token_id] = VIDEO
    return types


def _sample_positions(
    types: torch.Tensor,
    grids: dict[int, list[torch.Tensor]],
    spatial_merge_size: int,
    video_intervals: list[float],
) -> torch.Tensor:
    """Positions [3, n] of one unpadded sample. Consumes grids (and video intervals) in order."""
    n = types.numel()
    positions = torch.empty(3, n, dtype=torch.long)
    # Runs of equal token type: boundaries where the type changes.
    change = torch.ones(n, dtype=torch.bool)
    change[1:] = types[1:] != types[:-1]
    starts = torch.nonzero(change).flatten().tolist() + [n]
    cursor = 0  # running text index
    for begin, end in zip(starts[:-1], starts[1:]):
        kind = int(types[begin])
        if kind == TEXT:
            positions[:, begin:end] = torch.arange(cursor, cursor + end - begin)  # broadcast over 3 axes
            cursor += end - begin
            continue
        if not grids[kind]:
            raise ValueError(
                f"more {'image' if kind == IMAGE else 'video'} placeholder runs than grids given"
            )
        t, h, w = (int(x) for x in grids[kind].pop(0))
        h, w = h // spatial_merge_size, w // spatial_merge_size
        if t * h * w != end - begin:
            raise ValueError(
                f"placeholder run of {end - begin} tokens at {begin} does not match grid t*h*w={t}*{h}*{w}"
            )
        interval = video_intervals.pop(0) if kind == VIDEO else 1.0
        # [t, h, w] grids of each axis' index, flattened in (t, h, w) row-major order like the tokens.
        t_idx = (torch.arange(t) * interval).long().view(t, 1, 1).expand(t, h, w)
        h_idx = torch.arange(h).view(1, h, 1).expand(t, h, w)
        w_idx = torch.arange(w).view(1, 1, w).expand(t, h, w)
        positions[:, begin:end] = torch.stack([t_idx, h_idx, w_idx]).reshape(3, -1) + cursor
        cursor += max(h, w)
    return positions


def get_rope_index(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    spatial_merge_size: int,
    image_token_id: int,
    vision_start_token_id: int | None = None,
    video_grid_thw: torch.Tensor | None = None,
    video_token_id: int | None = None,
    second_per_grid_ts: torch.Tensor | list[float] | None = None,
    tokens_per_second: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE position ids for a (possibly padded) batch.

    Args:
        input_ids: [b, s] with image/video placeholders already expanded (one token per merged patch).
        image_grid_thw / video_grid_thw: [n, 3] patch grids (before the spatial merge), in order of
            appearance over the batch (sample 0's images first), as the image processor returns them.
        attention_mask: [b, s], 1 = real token. Padded slots get position 0 and are skipped when counting.
        vision_start_token_id: if given, every placeholder run must follow this token (a cheap check that
            the prompt was built with the chat template).
        second_per_grid_ts / tokens_per_second: temporal spacing of video frames (videos only).

    Returns:
        position_ids [3, b, s] (long) and rope deltas [b, 1]: max position + 1 - number of real tokens,
        which continues the positions during decoding (`position = len + delta`).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [b, s], got shape {tuple(input_ids.shape)}")
    batch, seq = input_ids.shape
    device = input_ids.device
    ids_cpu = input_ids.detach().cpu()
    mask_cpu = None if attention_mask is None else attention_mask.detach().cpu().bool()
    grids: dict[int, list[torch.Tensor]] = {
        IMAGE: list(image_grid_thw.cpu()) if image_grid_thw is not None else [],
        VIDEO: list(video_grid_thw.cpu()) if video_grid_thw is not None else [],
    }
    n_videos = len(grids[VIDEO])
    if second_per_grid_ts is None:
        second_per_grid_ts = [1.0] * n_videos
    video_intervals = [float(x) * tokens_per_second for x in second_per_grid_ts]

    position_ids = torch.zeros(3, batch, seq, dtype=torch.long)
    deltas = torch.zeros(batch, 1, dtype=torch.long)
    for b in range(batch):
        ids = ids_cpu[b] if mask_cpu is None else ids_cpu[b][mask_cpu[b]]
        types = _token_types(ids, image_token_id, video_token_id)
        if vision_start_token_id is not None:
            _check_vision_start(ids, types, vision_start_token_id)
        pos = _sample_positions(types, grids, spatial_merge_size, video_intervals)
        if mask_cpu is None:
            position_ids[:, b] = pos
        else:
            position_ids[:, b, mask_cpu[b]] = pos
        deltas[b] = (pos.max() + 1 - ids.numel()) if ids.numel() else 0
    left = len(grids[IMAGE]) + len(grids[VIDEO])
    if left:
        raise ValueError(f"{left} image/video grids were given but have no placeholder tokens in input_ids")
    return position_ids.to(device), deltas.to(device)


def _check_vision_start(ids: torch.Tensor, types: torch.Tensor, vision_start_token_id: int) -> None:
    """Each placeholder run must be preceded by <|vision_start|>."""
    run_start = types.ne(TEXT) & torch.cat([torch.tensor([True]), types[:-1].eq(TEXT)])
    starts = torch.nonzero(run_start).flatten()
    bad = [int(i) for i in starts if i == 0 or int(ids[i - 1]) != vision_start_token_id]
    if bad:
        raise ValueError(
            f"placeholder runs at {bad} are not preceded by vision_start ({vision_start_token_id})"
        )
