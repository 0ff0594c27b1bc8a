"""Rank 0's side of a step: prompts -> rollout server -> rewarded rows (+ the expert row of each group).

Rows carry token ids and image references, not pixels: each DP replica encodes its own (`data_plane.py`).

The processor that renders prompts here is the checkpoint's own, so the prompt token ids the trainer
uses are the ones the server generated from (checked per sample against the server's prompt length).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from calibrl_mcore.algo.dapo import overlong_penalty
from calibrl_mcore.config import AlgoConfig, RewardsConfig, RolloutConfig
from calibrl_mcore.data.images import ImageRef, PILImagePipeline
from calibrl_mcore.data.schema import Example
from calibrl_mcore.data.template import as_expert_response, build_messages
from calibrl_mcore.data.vision_inputs import PromptTokenizer, VisionPromptEncoder
from calibrl_mcore.rewards import acc_x_fmt_reward, compute_reward
from calibrl_mcore.stats import pass_at_k, pass_at_k_values
from calibrl_mcore.trainer.batch import Row
from rollout.client import RolloutClient, RolloutRequestError
from rollout.engines.prompts import load_processor

log = logging.getLogger(__name__)


class RolloutFailure(RuntimeError):
    """The rollout servers could not serve the step (after the client's own retries)."""


EVAL_STEP = -1
"""The `step` of `rollout_seed` for evaluation samples: no training step uses it, and every evaluation of a
run draws the same uniforms, so checkpoints (and arms of a paired study) are compared on equal terms."""


def rollout_seed(train_seed: int, step: int, round_index: int) -> int:
    """The sampling seed of a step's `round_index`-th rollout batch (dynamic-sampling refills are rounds ≥ 1).

    A hash, so that runs with different `train.seed` share no step's draws (an affine mix of the three would
    map seed s, step k onto seed s', step k'). 31 bits: every engine's seed field holds it.
    """
    key = f"calibrl-rollout/{train_seed}/{step}/{round_index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & 0x7FFFFFFF


@dataclass
class PromptInputs:
    text: str  # chat-templated prompt
    images: list  # PIL images
    prompt_ids: list[int]
    pixel_values: torch.Tensor | None  # None from `prompt_tokens` (the replicas encode the pixels)
    image_grid_thw: torch.Tensor | None
    refs: tuple[ImageRef, ...] = ()  # the example's images by reference, for the replicas


class PromptEncoder:
    """The checkpoint's processor: examples -> prompt token ids + pixel values; expert text -> ids.

    The data plane splits the work: the driver calls `prompt_tokens` (token ids from the images' sizes, no
    pixel work) and each DP replica `encode` for its own rows. `prompt` does both, as one process would.
    `image_backend`: "processor" = the HF processor does the images (CPU); "pil" | "dali" | "auto" =
    `calibrl_mcore.data.vision_inputs` does them (DALI on the GPU; "pil" equals the processor bit for bit)."""

    def __init__(self, model_path: str, image_backend: str = "processor") -> None:
        self.processor = load_processor(model_path)
        self.vision = None  # "processor": the processor's own image path
        if image_backend != "processor":
            self.vision = VisionPromptEncoder(self.processor, image_backend)
        self.prompts = PromptTokenizer(self.processor)
        tok = self.tokenizer = self.processor.tokenizer
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        self.eos_id = im_end if isinstance(im_end, int) and im_end != tok.unk_token_id else tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        # Vision placeholder tokens a (young) policy may sample: inside a response they would be taken
        # for image slots by the trainer's forward, so responses are cut before the first one.
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(model_path)
        names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                 "image_token_index")
        self.forbidden_ids = {int(getattr(hf, n)) for n in names if isinstance(getattr(hf, n, None), int)}

    def prompt_tokens(self, example: Example) -> PromptInputs:
        """The driver's part: chat text, decoded images (for the rollout server), prompt token ids and the
        image grid planned from the images' sizes; no pixel preprocessing."""
        images = example.load_images()
        text = self.processor.apply_chat_template(build_messages(example), add_generation_prompt=True,
                                                  tokenize=False)
        prompt_ids, planned = self.prompts(text, [(im.height, im.width) for im in images])
        return PromptInputs(text=text, images=images, prompt_ids=prompt_ids, pixel_values=None,
                            image_grid_thw=planned.get("image_grid_thw"), refs=tuple(example.images))

    def encode(self, text: str, refs: Sequence[ImageRef], images: Sequence | None = None) -> dict:
        """A replica's part: `input_ids` (list), `pixel_values`, `image_grid_thw` (Qwen) of one prompt,
        through the configured image path; `images` are the decoded `refs` when the caller has them."""
        if self.vision is not None and self.vision.backend == "dali":  # DALI decodes the encoded bytes on the GPU
            enc = self.vision(text, list(refs))
        elif self.vision is not None:
            enc = self.vision(text, images if images is not None else PILImagePipeline()(refs))
        else:
            images = images if images is not None else PILImagePipeline()(refs)
            enc = dict(self.processor(text=[text], images=list(images) or None, return_tensors="pt"))
            enc["input_ids"] = enc["input_ids"][0].tolist()
        # Rows are kept on the host until collated: keep their tensors on the CPU.
        return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in enc.items()}

    def prompt(self, example: Example) -> PromptInputs:
        """Both parts in one process (tests, tools): token ids and pixel values."""
        inp = self.prompt_tokens(example)
        enc = self.encode(inp.text, inp.refs, inp.images)
        return dataclasses.replace(inp, prompt_ids=enc["input_ids"], pixel_values=enc.get("pixel_values"),
                                   image_grid_thw=enc.get("image_grid_thw"))

    def expert(self, example: Example) -> tuple[str, list[int]]:
        """The (first) expert response text and its token ids, ending with the end-of-turn token."""
        return self.experts(example, 1)[0]

    def experts(self, example: Example, limit: int) -> list[tuple[str, list[int]]]:
        """Up to `limit` expert responses (text, token ids + end-of-turn) of an example."""
        if not example.experts:
            raise ValueError(f"example {example.uid!r} has no expert solution")
        out = []
        for solution in example.experts[:limit]:
            text = as_expert_response(solution, example.answer)
            out.append((text, self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos_id]))
        return out


class RolloutStage:
    """Turns examples into rows with the help of a rollout client (one per trainer, on rank 0)."""

    def __init__(self, cfg: RolloutConfig, algo: AlgoConfig, model_path: str, client: RolloutClient,
                 image_backend: str = "processor", *, rewards: RewardsConfig | None = None,
                 train_seed: int = 0) -> None:
        self.cfg, self.algo, self.client = cfg, algo, client
        client.check_servers()  # a server without the routes fails here, not with a 404 mid-run
        self.rewards = rewards or RewardsConfig()
        self.train_seed = train_seed
        self.encoder = PromptEncoder(model_path, image_backend)
        self.pad_id = self.encoder.pad_id

    def _generate(self, prompts: list[dict], params: dict, seed: int | None = None) -> list:
        try:
            return self.client.generate(prompts, params, seed=seed)
        except (RolloutRequestError, OSError) as exc:
            raise RolloutFailure(str(exc)) from exc

    def collect(self, step: int, examples: Sequence[Example], first_group_id: int,
                round_index: int = 0) -> tuple[list[Row], dict]:
        """G samples per example + one expert row per group, rewarded. Group ids: first_group_id + k.
        `round_index`: the step's n-th batch (dynamic sampling refills), which gets its own sampling seed."""
        t0 = time.perf_counter()
        inputs = [self.encoder.prompt_tokens(ex) for ex in examples]
        params = {
            "max_new_tokens": self.cfg.max_new_tokens,
            "temperature": self.cfg.temperature,
            "top_p": self.cfg.top_p,
            "top_k": self.cfg.top_k,
            "n": self.cfg.n_samples,
        }
        # The seed travels as one `sampling_seed` per sample (rollout/client.py: SGLang has no `seed`).
        seed = rollout_seed(self.train_seed, step, round_index)
        samples = self._generate([{"text": p.text, "image_data": p.images} for p in inputs], params, seed)
        rollout_s = time.perf_counter() - t0
        rows: list[Row] = []
        gen_tokens = n_cut = overlong = 0
        for s in samples:
            ex, inp = examples[s.prompt_index], inputs[s.prompt_index]
            if s.prompt_tokens and s.prompt_tokens != len(inp.prompt_ids):
                raise RuntimeError(
                    f"prompt of {ex.uid!r}: server tokenised {s.prompt_tokens} tokens, trainer "
                    f"{len(inp.prompt_ids)}: server and trainer must load the same processor"
                )
            ids, logprobs, text, finish = s.output_ids, s.logprobs, s.text, s.finish_reason
            cut = next((j for j, t in enumerate(ids) if t in self.encoder.forbidden_ids), None)
            if cut is not None:
                ids, logprobs, finish = ids[:cut], logprobs[:cut], "vision_token"
                text = self.encoder.tokenizer.decode(ids, skip_special_tokens=True)
                n_cut += 1
            r = self._reward(text, ex.answer)
            if self.algo.overlong_buffer > 0:  # DAPO's soft overlong punishment, added to the reward
                penalty = float(overlong_penalty(torch.tensor([len(s.output_ids)]), self.cfg.max_new_tokens,
                                                 self.algo.overlong_buffer, self.algo.overlong_penalty)[0])
                r = dataclasses.replace(r, reward=r.reward + penalty)
                overlong += penalty < 0
            gen_tokens += len(s.output_ids)
            rows.append(self._row(ex, inp, first_group_id + s.prompt_index, False, ids, r,
                                  logprobs=logprobs, finish=finish, text=text))
        for k, (ex, inp) in enumerate(zip(examples, inputs)):
            for j, (expert, ids) in enumerate(self.encoder.experts(ex, self.algo.num_experts)):
                r = self._reward(expert, ex.answer)
                row = self._row(ex, inp, first_group_id + k, True, ids, r, text=expert)
                row.extras["expert_index"] = j
                rows.append(row)
        metrics = {
            "rollout/time_s": rollout_s,
            "rollout/tokens_per_s": gen_tokens / max(rollout_s, 1e-9),
            "rollout/response_len": gen_tokens / max(len(samples), 1),
            "rollout/truncated_frac": sum(s.finish_reason == "length" for s in samples) / max(len(samples), 1),
            "rollout/cut_at_vision_token_frac": n_cut / max(len(samples), 1),
            "rollout/overlong_penalised_frac": overlong / max(len(samples), 1),
            "rollout/weight_version": float(samples[0].weight_version or 0) if samples else 0.0,
            "expert/failed_verifier_frac": (sum(r.acc < 1 for r in rows if r.is_expert)
                                            / max(sum(r.is_expert for r in rows), 1)),
        }
        return rows, metrics

    def _reward(self, text: str, answer: str):
        return compute_reward(text, answer, format_weight=self.algo.format_weight,
                              gate_on_format=self.rewards.gate_on_format)

    def _row(self, ex: Example, inp: PromptInputs, group_id: int, is_expert: bool, response_ids: list[int],
             reward, *, logprobs=None, finish: str = "", text: str = "") -> Row:
        if not math.isfinite(reward.reward):
            raise ValueError(f"non-finite reward {reward.reward} for a sample of {ex.uid!r} (group {group_id})")
        return Row(
            uid=ex.uid, group_id=group_id, is_expert=is_expert, prompt_ids=inp.prompt_ids,
            response_ids=list(response_ids), image_grid_thw=inp.image_grid_thw, images=inp.refs,
            prompt_text=inp.text,
            rollout_logprobs=list(logprobs) if logprobs else None, reward=float(reward.reward),
            acc=float(reward.acc), fmt=float(reward.fmt), finish_reason=finish, text=text,
        )

    def evaluate(self, examples: Sequence[Example], samples: int = 0) -> dict[str, float]:
        """Greedy, n = 1, reward acc × fmt (the paper's validation protocol); with `samples` > 0 also that many
        samples per prompt at the training temperature, scored the same way, as eval/pass@k."""
        if not examples:
            return {}
        inputs = [self.encoder.prompt_tokens(ex) for ex in examples]
        prompts = [{"text": p.text, "image_data": p.images} for p in inputs]
        greedy = self._generate(prompts, {"max_new_tokens": self.cfg.max_new_tokens, "temperature": 0.0, "n": 1})
        scores = [acc_x_fmt_reward(s.text, examples[s.prompt_index].answer) for s in greedy]
        n = max(len(scores), 1)
        metrics = {
            "eval/accuracy": sum(r.reward for r in scores) / n,
            "eval/acc": sum(r.acc for r in scores) / n,
            "eval/format": sum(r.fmt for r in scores) / n,
            "eval/n": float(len(scores)),
        }
        if samples > 0:
            params = {"max_new_tokens": self.cfg.max_new_tokens, "temperature": self.cfg.temperature,
                      "top_p": self.cfg.top_p, "top_k": self.cfg.top_k, "n": samples}
            right = [0] * len(examples)
            for s in self._generate(prompts, params, rollout_seed(self.train_seed, EVAL_STEP, 0)):
                right[s.prompt_index] += int(acc_x_fmt_reward(s.text, examples[s.prompt_index].answer).reward > 0)
            for k in pass_at_k_values(samples):
                metrics[f"eval/pass@{k}"] = sum(pass_at_k(samples, c, k) for c in right) / len(right)
        return metrics
