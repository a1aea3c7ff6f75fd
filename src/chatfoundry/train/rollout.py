"""Responses sampled from a policy, as the RL stages share them: the prompts' chats, one sampled
response each, packed into tensors with the log-probabilities of every response token under the
sampling distribution, the policy's own and the frozen reference's, the critic's values (where
there is one) and the reward. PPO's update and its held-out evaluation (`eval/policy.py`) read them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from chatfoundry import adapters, checkpoint as ckpt
from chatfoundry.config import require
from chatfoundry.data import tasks
from chatfoundry.errors import UserError
from chatfoundry.generation import GenerationConfig, generate_batch, top_k_filter, top_p_filter
from chatfoundry.models.decoder import DecoderLM
from chatfoundry.models.heads import RewardModel
from chatfoundry.tokenizer import chat_stop_ids, encode_chat, special_id, tokenizer_hash
from chatfoundry.train.loop import pack


@dataclass
class RolloutConfig:
    batch_size: int = 64  # prompts, and so responses, per iteration
    max_new_tokens: int = 32  # tokens a response may take; one cut there loses no_eos_penalty
    # The policy's own distribution by default. Other values sample a warped distribution, and
    # then the ratio's log-probabilities are taken under that same warped distribution.
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    no_eos_penalty: float = 1.0  # subtracted from the score of a response cut at max_new_tokens
    pool: int = 2000  # train prompts to sample rollouts from (the world: families in SFT's proportions)

    def validate(self) -> None:
        for name in ("batch_size", "max_new_tokens", "pool"):
            require(getattr(self, name) > 0, f"rollout.{name}", f"must be > 0, got {getattr(self, name)}")
        require(self.temperature > 0, "rollout.temperature", f"must be > 0, got {self.temperature}")
        require(self.top_k >= 0, "rollout.top_k", f"must be >= 0 (0: off), got {self.top_k}")
        require(0 < self.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {self.top_p}")
        require(self.no_eos_penalty >= 0, "rollout.no_eos_penalty", f"must be >= 0, got {self.no_eos_penalty}")


# ---------------------------------------------------------------- a batch of responses as tensors


@dataclass
class Batch:
    """B responses to B prompts. Rows are prompt + response, right-padded to one width (so no
    attention mask is needed: causal attention never looks right). Response token t of row b
    sits at column start[b] + t and is predicted from column start[b] + t - 1. A `select`ed
    part is packed instead (`segments` set, `pos` into the flattened idx)."""

    idx: torch.Tensor  # (B, L) prompt + response token ids; packed: (lines, width)
    pos: torch.Tensor  # (B, R) column of the state before each response token (start - 1 + t); packed: in idx.flatten()
    tokens: torch.Tensor  # (B, R) response token ids (pad beyond each row's length)
    mask: torch.Tensor  # (B, R) float, 1 on real response tokens
    rm_idx: torch.Tensor  # (B, L') prompt + response content + <|end|>: the chat the RM reads
    rm_last: torch.Tensor  # (B,) the column of that <|end|>
    ended: torch.Tensor  # (B,) bool, the response stopped by itself
    segments: torch.Tensor | None = None  # packed: which row each column of idx belongs to

    def __len__(self) -> int:
        return self.tokens.shape[0]


def make_batch(prompts: list[list[int]], responses: list[list[int]], stop_ids: list[int], end_id: int,
               pad_id: int, device) -> Batch:
    R = max(len(r) for r in responses)
    rows = [p + r for p, r in zip(prompts, responses)]
    L = max(len(x) for x in rows)
    ended = [bool(r) and r[-1] in stop_ids for r in responses]
    # The RM reads the response as a finished chat turn: its content, then <|end|> (an <|eos|>
    # stop becomes <|end|>; a cut response gets one appended), as `scoring.encode_responses` does.
    rm_rows = [p + (r[:-1] if e else r) + [end_id] for p, r, e in zip(prompts, responses, ended)]
    Lr = max(len(x) for x in rm_rows)
    t = lambda x, dtype=torch.long: torch.tensor(x, dtype=dtype, device=device)  # noqa: E731
    # Past a response's end the position stays on the state before its last token: masked out,
    # and no column beyond what the row's real tokens need.
    pos = [[min(len(p) - 1 + j, len(x) - 2) for j in range(R)] for p, x in zip(prompts, rows)]
    return Batch(idx=t([x + [pad_id] * (L - len(x)) for x in rows]), pos=t(pos),
                 tokens=t([r + [pad_id] * (R - len(r)) for r in responses]),
                 mask=t([[1.0] * len(r) + [0.0] * (R - len(r)) for r in responses], torch.float32),
                 rm_idx=t([x + [pad_id] * (Lr - len(x)) for x in rm_rows]), rm_last=t([len(x) - 1 for x in rm_rows]),
                 ended=t(ended, torch.bool))


def select(batch: Batch, rows) -> Batch:
    """The rows' sub-batch for the policy and critic, packed: rows go first fit, longest first,
    into lines as wide as the longest, each row attending only to itself with its positions from
    0 (`segments`), so each gets what it would alone. Rows are short and their lengths vary, so
    padding them to one width wasted a quarter or more of every PPO step."""
    part = Batch(*(getattr(batch, f)[rows] for f in Batch.__dataclass_fields__ if f != "segments"))
    lengths = (part.pos.max(1).values + 1).tolist()  # the columns its states read (not the last token)
    idx, segments, starts = pack([part.idx[i, :n].tolist() for i, n in enumerate(lengths)], max(lengths), 0)
    part.pos = part.pos + torch.tensor(starts, device=part.pos.device)[:, None]
    part.idx, part.segments = idx.to(part.pos.device), segments.to(part.pos.device)
    return part


def warp(logits: torch.Tensor, cfg: RolloutConfig) -> torch.Tensor:
    """The logits of the distribution the rollout sampled from (temperature, top-k, top-p, in
    generation's order); the raw logits when those are off."""
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if cfg.top_k:
        logits = top_k_filter(logits, cfg.top_k)
    if cfg.top_p < 1.0:
        logits = top_p_filter(logits.reshape(-1, logits.shape[-1]), cfg.top_p).view_as(logits)
    return logits


def response_logits(model: DecoderLM, batch: Batch) -> torch.Tensor:
    """(N, V) the next-token logits before each real response token (N = batch.mask.sum(), row
    after row; `spread` puts per-token results back in (B, R)). The vocabulary projection and
    the softmaxes after it run on those positions only: most of a batch's R columns are padding
    (mean response ~11 tokens of 32), and the prompt's would be thrown away."""
    batch = batch if batch.segments is not None else select(batch, slice(None))
    h = model.hidden_states(batch.idx, segments=batch.segments).flatten(0, 1)[batch.pos[batch.mask.bool()]]
    return model.lm_head(h).float()


def spread(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,) values of the real response tokens -> (B, R), zero at padding (differentiable)."""
    return torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_scatter(mask.bool(), x)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def values_of(critic: RewardModel, batch: Batch) -> torch.Tensor:
    """(B, R) V(state before each response token): the critic's output at those positions."""
    batch = batch if batch.segments is not None else select(batch, slice(None))
    return critic(batch.idx, segments=batch.segments).flatten()[batch.pos]


# ---------------------------------------------------------------- rollouts


@dataclass
class Rollout:
    batch: Batch
    texts: list[str]
    logp: torch.Tensor  # (B, R) log pi_old under the sampled distribution: the ratio's denominator
    logp_raw: torch.Tensor  # (B, R) log pi_old, the model's own distribution (for the KL)
    logp_ref: torch.Tensor  # (B, R) log pi_ref
    values: torch.Tensor | None  # (B, R)
    scores: torch.Tensor  # (B,) the reward model's score (raw, before clip and penalty)
    entropy: torch.Tensor  # (B, R) the policy's entropy at each response token


@torch.no_grad()  # not inference_mode: the minibatches reuse these tensors under autograd
def rollout(policy: DecoderLM, ref: DecoderLM, critic: RewardModel | None, reward, tok,
            prompts: list[tasks.Prompt], cfg: RolloutConfig, seed: int, chunk: int,
            max_new_tokens: int | None = None) -> Rollout:
    """Sample one response per prompt and score everything in one batched pass per model.

    The forwards run in chunks of `chunk` rows on the full width: the same shapes the first
    epoch's minibatches use, so the first minibatch's ratio is exactly 1.
    """
    stop = chat_stop_ids(tok)
    prompt_ids = [encode_chat(tok, list(p.messages)) for p in prompts]
    room = policy.config.block_size - max(map(len, prompt_ids))  # prompt and response are scored in one window
    if room < 1:
        raise UserError(f"a prompt of {policy.config.block_size - room} tokens leaves no room for an answer in the "
                        f"model's block_size {policy.config.block_size}")
    gen = GenerationConfig(max_new_tokens=min(max_new_tokens or cfg.max_new_tokens, room), do_sample=True,
                           temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=cfg.top_p,
                           eos_token_id=stop, seed=seed)
    was_training = policy.training
    policy.eval()
    responses = generate_batch(policy, prompt_ids, gen).sequences
    device = policy.embed_tokens.weight.device
    batch = make_batch(prompt_ids, responses, stop, special_id(tok, "end"), special_id(tok, "pad") or 0, device)
    texts = tok.decode_batch(responses, skip_special_tokens=True)
    texts = [t.strip() for t in texts]
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("logp", "logp_raw", "logp_ref", "values", "entropy")}
    for start in range(0, len(batch), chunk):
        part = select(batch, slice(start, start + chunk))
        real = part.mask.bool()
        tokens = part.tokens[real]
        logits = response_logits(policy, part)
        raw = torch.log_softmax(logits, dim=-1)
        out["logp_raw"].append(spread(raw.gather(-1, tokens[:, None]).squeeze(-1), real))
        out["entropy"].append(spread(-(raw.exp() * raw).sum(-1), real))
        sampled = warp(logits, cfg)
        out["logp"].append(spread(token_logprobs(sampled, tokens), real) if sampled is not logits
                           else out["logp_raw"][-1])
        # The evaluation samples the reference itself: its log-probabilities are the policy's.
        ref_logp = out["logp_raw"][-1] if ref is policy else spread(token_logprobs(response_logits(ref, part), tokens),
                                                                    real)
        out["logp_ref"].append(ref_logp)
        if critic is not None:
            out["values"].append(values_of(critic, part))
    if reward is None:  # nothing to score by (an evaluation of a method trained without a reward)
        scores = torch.zeros(len(batch), device=device)
    elif isinstance(reward, RewardModel):
        scores = reward.rewards(batch.rm_idx, batch.rm_last)
    else:
        scores = torch.tensor(reward(prompts, texts), dtype=torch.float32, device=device)
    policy.train(was_training)
    cat = {k: torch.cat(v) * batch.mask if v else None for k, v in out.items()}
    return Rollout(batch, texts, cat["logp"], cat["logp_raw"], cat["logp_ref"], cat["values"], scores.float(),
                   cat["entropy"])


def load_chat_model(init: str, device, stage: str):
    """(model, tokenizer) of the chat checkpoint an RL stage starts from, checked for the chat tokens."""
    model, tok = ckpt.load_model(init, device)
    _check_chat(model, tok, init, stage)
    return model, tok


def _check_chat(model: DecoderLM, tok, init: str, stage: str) -> None:
    if not chat_stop_ids(tok) or special_id(tok, "end") is None:
        raise UserError(f"{init}: the tokenizer lacks the chat tokens <|end|> and <|eos|>; {stage} needs a chat model")
    if model.prompt is not None:  # rollouts score packed rows, and a soft prompt goes before one sequence only
        raise UserError(f"{init}: a prompt-tuned model; {stage} takes a plain checkpoint or a LoRA one")


def policy_and_reference(cfg, out: Path, resume: bool, device, stage: str):
    """(policy, frozen reference, tokenizer, base) of an RL stage whose config has `init`, `seed`,
    `peft` and `lora`. Full finetuning: the reference is the init checkpoint, the policy a copy of
    it or a resumed run's (same tokenizer); base is None. LoRA: the policy is the init with
    adapters (new, or a resumed run's), the reference that model with its adapters off, in the
    same weight tensors (one copy of the weights, not two); base is the checkpoint the saved
    adapter names."""
    if cfg.peft == "none":
        ref, tok = load_chat_model(cfg.init, device, stage)
        if not resume:
            return copy.deepcopy(ref).requires_grad_(True), ref.requires_grad_(False), tok, None
        policy, policy_tok = ckpt.load_model(out, device)
        if tokenizer_hash(policy_tok) != tokenizer_hash(tok):
            raise UserError(f"{out}: the policy's tokenizer differs from the reference's ({cfg.init})")
        return policy.requires_grad_(True), ref.requires_grad_(False), tok, None
    policy, tok, base = ckpt.load_adapted(cfg.init, out, resume, cfg.lora, cfg.seed, device)
    _check_chat(policy, tok, str(base), stage)
    return policy.to(device), adapters.base_of(policy), tok, base


def memory_mb(models, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """MiB held by the models' weights, each tensor once (a LoRA reference holds the policy's own),
    and by the optimizer's state (AdamW's two moments per trained weight)."""
    held = {t.data_ptr(): t.numel() * t.element_size() for m in models if isinstance(m, torch.nn.Module)
            for t in [*m.parameters(), *m.buffers()]}
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    return {"weights": round(sum(held.values()) / 2**20, 2), "optimizer": round(state / 2**20, 2)}


def resume_iterations(out, iterations: int, optimizer: torch.optim.Optimizer, order) -> dict:
    """A resumed RL run's trainer state, its optimizer and prompt order restored; "iteration" is
    where to go on (checked against the run's `iterations`)."""
    state = ckpt.load_trainer_state(out)
    require(iterations >= int(state["iteration"]), "iterations",
            f"{iterations} is below the checkpoint's iteration {state['iteration']}")
    optimizer.load_state_dict(state["optimizer"])
    order.set_state(state["order"])
    return state


def load_reward(spec: str, source: tasks.Source, tok, ref: DecoderLM, init: str, device):
    """The frozen reward `spec` names: a reward model (rm:PATH) checked against the policy's
    tokenizer and context, the source's verifier, or a Python function (a batch `tasks.Reward`)."""
    if spec == "verifier":
        return tasks.verifier_reward(source)
    if spec.startswith("python:"):
        return tasks.python_reward(spec)
    path = spec.removeprefix("rm:")
    reward, rm_tok = ckpt.load_reward_model(path, device)
    if tokenizer_hash(rm_tok) != tokenizer_hash(tok):
        raise UserError(f"{path}: the reward model's tokenizer differs from the policy's ({init}); "
                        "train the RM from this SFT model")
    if reward.config.block_size < ref.config.block_size:
        raise UserError(f"{path}: the reward model's context ({reward.config.block_size}) is shorter than "
                        f"the policy's ({ref.config.block_size})")
    return reward.requires_grad_(False)


def prompt_pool(source: tasks.Source, n: int, seed: int, tok, max_new_tokens: int, block: int) -> list[tasks.Prompt]:
    """Up to `n` train prompts whose chat and longest response fit the context (and the reward
    model's appended <|end|>)."""
    pool = [p for p in source.prompts("train", n, seed) if len(encode_chat(tok, list(p.messages))) + max_new_tokens < block]
    if not pool:
        raise UserError(f"rollout.max_new_tokens: {max_new_tokens} leaves no room for a prompt in the model's "
                        f"context of {block}")
    return pool
