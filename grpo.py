"""grpo.py -- GRPO for the profile writer: sample a group of profiles per user, score each by how well
a frozen recommender predicts the user's ratings with it, push up the better-than-group ones.

    python grpo.py                                   # the demo (DEMO): SmolLM2 policy + judge,
                                                       synthetic users
    torchrun --nproc_per_node=8 grpo.py --model /ckpt/Qwen3-8B --data runs/ml10m --judge-url http://judge:8008
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lettingo import (PROFILE_CLOSE, ArgParser, LettingoError, add_config, cli, config_from, option,
                      output_folder, profile_prompt, read_samples)
from reward import JudgeRewards
from rollout import SamplingParams, prompt_seed
from train import (Dist, Policy, TrainConfig, TrainLoop, all_sum, apply_update, lockstep_micro_batches,
                   close_distributed, completion_logprobs, demo_data, load_judge, load_policy,
                   load_reference, logprobs_no_grad, rank_positions, resolve_start, setup_distributed,
                   validate)


@dataclass
class GRPOConfig(TrainConfig):
    """GRPO's settings; defaults are the public LettinGo GRPO code's (verl) where it has one."""
    out: str = option("runs/grpo", "run folder: checkpoints, metrics.jsonl, samples.jsonl")
    data: str | None = option(None, "folder with train.jsonl / val.jsonl from data/prepare.py", kind=str)
    prompts_per_step: int = option(64, "global batch of users per step", source="public code", min=1)
    group_size: int = option(8, "profiles sampled per user", source="public code", min=1)
    mini_batches: int = option(2, "mini-batches per GRPO step, one optimizer step each (per PPO epoch)",
                               source="public code: 64 users / 32", min=1)
    ppo_epochs: int = option(1, "passes over each step's samples", source="public code", min=1)
    clip_low: float = option(0.2, "PPO clip: ratio >= 1 - clip_low", source="public code", min=0.0)
    clip_high: float = option(0.2, "PPO clip: ratio <= 1 + clip_high (DAPO's clip-higher: 0.28)",
                              source="public code", min=0.0)
    dual_clip: float = option(0.0, "dual-clip constant c for A < 0 (0 = off; usual 3)", min=0.0)
    kl_coef: float = option(0.001, "k3 KL-to-reference loss weight; 0 loads no reference",
                            source="public code", min=0.0)
    loss_agg: str = option("token-mean", "loss normaliser: tokens (verl, public code), "
                           "per-sequence means (GRPO paper), sequences x budget (Dr. GRPO)",
                           choices=("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"))
    scale_rewards: str = option("group", "advantage scale: group = / the group's std (GRPO); batch = / the "
                                "std of the step's whole batch (TRL's remedy for near-flat groups); none = "
                                "Dr. GRPO (r - group mean)", source="TRL scale_rewards",
                                choices=("group", "batch", "none"))
    importance_sampling_level: str = option("token", "token: PPO's ratio per token; sequence: GSPO's ratio "
                                            "per profile, exp(mean_t (logp_t - old_t)), clipped the same "
                                            "way (GSPO's paper: clip 3e-4 / 4e-4)",
                                            source="TRL importance_sampling_level",
                                            choices=("token", "sequence"))
    rollout_correction: str = option("none", "the sampler-trainer mismatch, rho_t = exp(old_t - sampler_t): "
                                     "token-tis multiplies each token's policy loss by min(rho_t, cap); "
                                     "seq-mask leaves out a profile whose exp(mean_t log rho_t) is outside "
                                     "[1/cap, cap] (verl's geometric mean; TRL's sequence_mask uses the "
                                     "product of the ratios)",
                                     source="TRL vllm_importance_sampling_correction, "
                                            "verl rollout_correction",
                                     choices=("none", "token-tis", "seq-mask"))
    rollout_correction_cap: float = option(2.0, "cap C of --rollout-correction",
                                           source="verl's TIS threshold (TRL: 3.0)", min=1.0)
    truncated: str = option("penalty", "a profile that ran out of tokens: penalty = the format penalty "
                            "(public code); mask = left out of the loss and of its group's statistics",
                            source="mask: TRL mask_truncated_completions", choices=("penalty", "mask"))
    drop_zero_variance: bool = option(False, "DAPO dynamic sampling: drop groups whose advantages are all 0 "
                                      "or None (valid rewards all equal; a group with one valid reward "
                                      "is kept)")
    sample_every: int = option(1, "write sampled profiles to samples.jsonl every N steps", min=1)
    judge_down_steps: int = option(3, "stop after this many steps in a row in which the judge failed on more "
                                   "than half of the closed profiles (such steps apply no update; --resume "
                                   "continues)", min=1)


# The named presets: how the demo and the learning recipe differ from the public code's values.
DEMO = GRPOConfig(data="runs/demo-data", out="runs/grpo-demo", steps=12, prompts_per_step=4, group_size=4,
                  mini_batches=1, max_new_tokens=64, lr=3e-4, kl_coef=0.0, eval_every=6, val_users=16,
                  save_every=6, token_budget=768, activation_checkpointing=True, lora_rank=16,
                  lora_alpha=32.0)
# dtype auto: fp32 on CPU, where bf16 may lack kernels; checkpointing: on CPU it costs ~no time, halves
# memory; LoRA (rank 16, alpha 32; lr 30x full fine-tuning's 1e-5: at 10x the first 5 steps learned little)
# and one group per micro-batch (token budget 768) keep the demo under 2.5 GB: no gradients or Adam
# moments of the base, whose weights the judge shares
LEARNING = GRPOConfig(steps=30, prompts_per_step=8, group_size=8, mini_batches=1, temperature=0.8, lr=1e-5,
                      kl_coef=0.0, eval_every=10, save_every=30, max_new_tokens=96, token_budget=4096,
                      dtype="bfloat16", val_users=100, activation_checkpointing=True)   # tools/learning.py


# ----------------------------------------------------------------------------- the algorithm


def group_advantages(rewards: list[float | None], group_size: int, eps: float = 1e-6, scale: str = "group",
                     batch_std: float | None = None):
    """A_i = (r_i - mean_g) / (std_g + eps) within each group of `group_size` consecutive samples
    (unbiased std, as verl). Samples left out (None: the judge failed, or a masked truncation) are
    left out of their group's statistics and get A = None (excluded, not zero-scored). A group with
    one valid sample gets mean 0, std 1 (verl's rule), i.e. A = r / (1 + eps): its raw reward, not 0.
    scale "batch" divides by `batch_std` (the std of the whole batch's valid rewards) instead of the
    group's; "none" is Dr. GRPO: A_i = r_i - mean_g.
    Returns (advantages, number of groups whose valid rewards are all equal)."""
    adv, flat_groups = [None] * len(rewards), 0
    for g in range(0, len(rewards), group_size):
        idx = [i for i in range(g, g + group_size) if rewards[i] is not None]
        if not idx:
            continue
        r = torch.tensor([rewards[i] for i in idx], dtype=torch.float64)
        if len(idx) == 1:
            mean, std = torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
        else:
            mean, std = r.mean(), r.std()
            flat_groups += bool((r == r[0]).all())
        if scale == "group":
            a = (r - mean) / (std + eps)
        elif scale == "batch":
            a = (r - mean) / (batch_std + eps)
        else:
            a = r - mean
        for i, v in zip(idx, a.tolist()):
            adv[i] = v
    return adv, flat_groups


def clipped_policy_loss(logp, old_logp, adv, clip_low: float, clip_high: float,
                        dual_clip: float | None = None):
    """PPO's clipped surrogate per token: ratio = exp(logp - logp_old) (log-ratio clamped to +-20),
    L = max(-A ratio, -A clip(ratio, 1 - clip_low, 1 + clip_high)); with dual clip c (for A < 0)
    L = min(L, -A c). Returns (L, clipped) where clipped marks tokens whose gradient is cut."""
    ratio = torch.exp((logp - old_logp).clamp(-20.0, 20.0))
    unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    was_clipped = clipped > unclipped
    if dual_clip:
        lower = -adv * dual_clip
        dual = (adv < 0) & (loss > lower)
        loss = torch.where(adv < 0, torch.minimum(loss, lower), loss)
        was_clipped = was_clipped | dual
    return loss, was_clipped


def kl_k3(logp, ref_logp):
    """Schulman's k3 estimator of KL(pi || ref) per token, clamped as verl's low_var_kl:
    d = clamp(ref - logp, -20, 20); kl = clamp(exp(d) - d - 1, -10, 10)."""
    d = (ref_logp - logp).clamp(-20.0, 20.0)
    return (torch.exp(d) - d - 1.0).clamp(-10.0, 10.0)


def token_weights(lengths: list[int], mode: str, n_seqs: float, n_tokens: float,
                  budget: float) -> list[float]:
    """Per-sequence weight w of each of its tokens so that loss = sum_tokens w * L, with the
    normalisers taken over the *global* (all-rank) mini-batch:
      token-mean               sum L / total tokens
      seq-mean-token-mean      mean over sequences of each sequence's token mean (original GRPO)
      seq-mean-token-sum-norm  sum L / (sequences x generation budget)  (Dr. GRPO; TRL's dr_grpo and verl
                               divide by the constant max response length, not by the longest response of
                               the batch, so the scale does not change from step to step)"""
    if mode == "token-mean":
        return [1.0 / n_tokens] * len(lengths)
    if mode == "seq-mean-token-mean":
        return [1.0 / (n * n_seqs) for n in lengths]
    if mode == "seq-mean-token-sum-norm":
        return [1.0 / (n_seqs * budget)] * len(lengths)
    raise LettingoError(f"unknown --loss-agg {mode!r}")


def rollout_weights(old, sampler, mode: str, cap: float) -> torch.Tensor:
    """The sampler-trainer mismatch correction of one profile's policy loss, from the tokens' log
    ratios log rho_t = old_t - sampler_t (the trainer's log-prob before the update minus the one the
    sampler recorded; clamped to +-20):
      none       1
      token-tis  min(rho_t, cap)                                  (truncated importance sampling)
      seq-mask   1 if exp(mean_t log rho_t) lies in [1/cap, cap], else 0 for the whole profile
    [T] -> [T] weights, no gradient (TRL token_truncate / sequence_mask, verl rollout_correction)."""
    log_rho = (old - sampler).detach().clamp(-20.0, 20.0)
    if mode == "token-tis":
        return log_rho.exp().clamp(max=cap)
    if mode == "seq-mask":
        inside = 1.0 / cap <= log_rho.mean().exp().item() <= cap
        return torch.full_like(log_rho, float(inside))
    return torch.ones_like(log_rho)


def mismatch(old, sampler) -> dict[str, float]:
    """How far the trainer's log-probs before the update are from the sampler's, summed over the
    tokens: d = old - sampler; the k3 estimate of KL(sampler || trainer), exp(d) - d - 1; the tokens
    whose ratio exp(d) is outside [0.5, 2]."""
    d = (old - sampler).detach().double().clamp(-20.0, 20.0)      # float64: e^d - d - 1 ~ d^2 / 2 is tiny
    ratio = d.exp()
    return {"mismatch_diff": d.sum().item(), "mismatch_kl": (ratio - d - 1.0).sum().item(),
            "mismatch_out": ((ratio < 0.5) | (ratio > 2.0)).sum().item()}


# ----------------------------------------------------------------------------- one step

@dataclass
class Episode:
    """One sampled completion, ready for the update."""
    prompt: list[int]
    tokens: list[int]
    advantage: float
    mini_batch: int
    sampler_logprobs: torch.Tensor | None = None  # [len(tokens)] as the sampler recorded them
    old_logprobs: torch.Tensor | None = None     # [len(tokens)] under the policy before this step's update
    ref_logprobs: torch.Tensor | None = None     # [len(tokens)] under the reference


def grpo_loss(policy, episodes: list[Episode], weights: list[float], cfg: GRPOConfig, device):
    """The objective of one micro-batch: sum over its episodes' tokens t of
        w * (c_t * clipped_policy_loss(logp_t, old_t, A, clip_low, clip_high)
             + kl_coef * kl_k3(logp_t, ref_t)),
    w from token_weights (the loss aggregation), c_t from rollout_weights (1 without a correction);
    GSPO (importance_sampling_level sequence) gives every token the profile's mean log-prob and old
    log-prob, so its ratio is the sequence's. -> (loss, metrics summed over the tokens)."""
    out = completion_logprobs(policy, [(e.prompt, e.tokens) for e in episodes], device, cfg.temperature,
                              with_entropy=True)
    loss, m = 0.0, dict.fromkeys(("pg_loss", "kl", "clipped", "entropy", "mismatch_diff", "mismatch_kl",
                                  "mismatch_out"), 0.0)
    for e, w, lp in zip(episodes, weights, out):
        logp = lp.logprobs                                                     # [len(tokens)]
        old = logp.detach() if e.old_logprobs is None else e.old_logprobs      # on-policy: ratio 1
        ratio_logp, ratio_old = logp, old
        if cfg.importance_sampling_level == "sequence":     # GSPO: exp(mean_t logp_t - mean_t old_t)
            ratio_logp, ratio_old = logp.mean().expand_as(logp), old.mean().expand_as(old)
        pg, clipped = clipped_policy_loss(ratio_logp, ratio_old, torch.full_like(logp, e.advantage),
                                          cfg.clip_low, cfg.clip_high, cfg.dual_clip or None)
        if e.sampler_logprobs is not None:
            pg = pg * rollout_weights(old, e.sampler_logprobs, cfg.rollout_correction,
                                      cfg.rollout_correction_cap)
            for k, v in mismatch(old, e.sampler_logprobs).items():
                m[k] += v
        per_token = pg
        if e.ref_logprobs is not None:
            kl = kl_k3(logp, e.ref_logprobs)
            per_token = pg + cfg.kl_coef * kl
            m["kl"] += (kl.detach() * w).sum().item()
        loss = loss + (per_token * w).sum()
        m["pg_loss"] += (pg.detach() * w).sum().item()
        m["clipped"] += clipped.sum().item()
        m["entropy"] += lp.entropy.sum().item()
    return loss, m


def update(policy: Policy, ref, episodes: list[Episode], cfg: GRPOConfig, d: Dist) -> dict:
    """PPO epochs over mini-batches: per mini-batch, micro-batches -> log-probs -> grpo_loss ->
    backward, then one guarded optimizer step. -> loss, pg_loss, kl, clip_frac, entropy averaged over
    the optimizer steps; grad_norm of the last one; skipped and updates counted."""
    seqs = [(e.prompt, e.tokens) for e in episodes]
    if cfg.mini_batches > 1 or cfg.ppo_epochs > 1:      # later optimizer steps are off-policy
        for e, lp in zip(episodes, logprobs_no_grad(policy.model, seqs, cfg.token_budget, d.device,
                                                    cfg.temperature)):
            e.old_logprobs = lp
    if ref is not None:
        for e, lp in zip(episodes, logprobs_no_grad(ref, seqs, cfg.token_budget, d.device, cfg.temperature)):
            e.ref_logprobs = lp
    stats = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "entropy": 0.0, "grad_norm": 0.0,
             "skipped": 0, "updates": 0}
    mis, mis_tokens = dict.fromkeys(("mismatch_diff", "mismatch_kl", "mismatch_out"), 0.0), 0
    for _ in range(cfg.ppo_epochs):
        for mb in range(cfg.mini_batches):
            part = [e for e in episodes if e.mini_batch == mb]
            lens = [len(e.tokens) for e in part]
            size = all_sum({"sequences": len(part), "tokens": sum(lens)}, d.device)    # global mini-batch
            if size["sequences"] == 0:
                continue
            w = token_weights(lens, cfg.loss_agg, size["sequences"], max(size["tokens"], 1),
                              cfg.max_new_tokens)
            sums = dict.fromkeys(("loss", "pg_loss", "kl", "clipped", "entropy", *mis), 0.0)
            for g in lockstep_micro_batches(policy.model, [(e.prompt, e.tokens) for e in part],
                                            cfg.token_budget, d.device, progress=d.main):
                loss, m = grpo_loss(policy.model, [part[k] for k in g], [w[k] for k in g], cfg, d.device)
                loss.backward()
                for k, v in {"loss": loss.item(), **m}.items():
                    sums[k] += v
            sums = all_sum(sums, d.device)
            norm, ok = apply_update(policy, sums["loss"], cfg.grad_clip, d)
            for k, v in (("loss", sums["loss"]), ("pg_loss", sums["pg_loss"]), ("kl", sums["kl"]),
                         ("clip_frac", sums["clipped"] / max(size["tokens"], 1)),
                         ("entropy", sums["entropy"] / max(size["tokens"], 1)), ("skipped", not ok),
                         ("updates", 1)):
                stats[k] += v
            stats["grad_norm"] = norm
            mis = {k: v + sums[k] for k, v in mis.items()}
            mis_tokens += size["tokens"]
    u = max(stats["updates"], 1)
    return {**{k: v / u if k in ("loss", "pg_loss", "kl", "clip_frac", "entropy") else v
               for k, v in stats.items()},
            **{k: v / max(mis_tokens, 1) for k, v in mis.items()}}      # per token: the mean, the rate


@dataclass
class Prompt:
    """One user of a step: the sample, the writer's prompt, its sampling seed and its mini-batch."""
    sample: dict
    ids: list[int]
    seed: int
    mini_batch: int


def grpo_step(policy: Policy, ref, prompts: list[Prompt], rewards, cfg: GRPOConfig, d: Dist,
              stop=(PROFILE_CLOSE,), end_ids=None) -> tuple[dict, list[dict]]:
    """One GRPO step on this rank's share: sample cfg.group_size completions per prompt, score them
    with rewards.score(samples, rollout Samples) -> [Scored], group advantages, update.
    -> (metrics, the first group's samples)."""
    t0 = time.time()
    policy.sync()
    params = SamplingParams(n=cfg.group_size, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            top_p=cfg.top_p, batch_size=cfg.batch_size, stop=tuple(stop))
    outs = policy.sampler.generate([p.ids for p in prompts], params, seed=[p.seed for p in prompts],
                                   tokenizer=policy.tok, end_ids=end_ids, progress=d.main) if prompts else []
    t1 = time.time()
    flat = [(p, o) for p, group in zip(prompts, outs) for o in group]                 # [prompts * group]
    scored = rewards.score([p.sample for p, _ in flat], [o for _, o in flat]) if flat else []
    t2 = time.time()
    rewards = advantage_rewards(scored, [o for _, o in flat], cfg.truncated)
    kept = [r for r in rewards if r is not None]
    batch_std = global_std(kept, d) if cfg.scale_rewards == "batch" else None
    adv, flat_groups = group_advantages(rewards, cfg.group_size, scale=cfg.scale_rewards, batch_std=batch_std)
    G = cfg.group_size
    episodes = []
    for k, ((p, o), a) in enumerate(zip(flat, adv)):
        group = adv[k - k % G:k - k % G + G]
        if a is None or (cfg.drop_zero_variance and all(x in (None, 0.0) for x in group)):
            continue                        # no reward, or (DAPO) a group without signal
        episodes.append(Episode(p.ids, o.tokens, a, p.mini_batch, torch.tensor(o.logprobs, device=d.device)))
    valid = [sc.reward for sc in scored if sc.reward is not None]
    totals = all_sum({"all": len(scored), "valid": len(valid), "r": sum(valid),
                      "r2": sum(v * v for v in valid), "format": sum(sc.status == "format" for sc in scored),
                      "judge_failed": sum(sc.status == "judge_failed" for sc in scored), "flat": flat_groups,
                      "trained": len(episodes), "tokens": sum(len(o.tokens) for _, o in flat)}, d.device)
    # a judge that fails is not trained on: the unclosed profiles' -1 alone would teach only the tag
    judge_down = totals["judge_failed"] > (totals["all"] - totals["format"]) / 2
    st = NO_UPDATE if judge_down else update(policy, ref, episodes, cfg, d)
    t3 = time.time()
    mean = totals["r"] / max(totals["valid"], 1)
    spread = math.sqrt(max(totals["r2"] / max(totals["valid"], 1) - mean * mean, 0.0))
    formatted = 1 - totals["format"] / max(totals["all"], 1)
    row = {"reward_mean": mean, "reward_std": spread, "format_rate": formatted,
           "judge_failures": totals["judge_failed"],
           "zero_variance_groups": totals["flat"], "trained_samples": totals["trained"],
           "response_length": totals["tokens"] / max(totals["all"], 1), **st, "judge_down": judge_down,
           "lr": policy.scheduler.get_last_lr()[0],
           "time_rollout": t1 - t0, "time_reward": t2 - t1, "time_update": t3 - t2,
           "rollout_tokens_per_s": totals["tokens"] / max(t1 - t0, 1e-9)}
    examples = [{"user_id": p.sample.get("user_id"), "reward": sc.reward, "status": sc.status, "text": o.text,
                 "finish": o.finish} for (p, o), sc in zip(flat[:G], scored)]
    return row, examples


def advantage_rewards(scored, outs, truncated: str) -> list[float | None]:
    """The rewards the group advantages come from: None (left out of the group and of the loss) where
    the judge failed, and with truncated="mask" where the profile ran out of tokens (TRL's
    mask_truncated_completions); "penalty" keeps the format penalty it was scored with."""
    return [None if truncated == "mask" and o.finish == "length" else sc.reward
            for sc, o in zip(scored, outs)]


def global_std(values: list[float], d: Dist) -> float:
    """The unbiased std of `values` over every rank's share (--scale-rewards batch)."""
    s = all_sum({"n": len(values), "sum": sum(values), "sq": sum(v * v for v in values)}, d.device)
    mean = s["sum"] / max(s["n"], 1)
    return math.sqrt(max(s["sq"] - s["n"] * mean * mean, 0.0) / max(s["n"] - 1, 1))


NO_UPDATE = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "entropy": 0.0, "grad_norm": 0.0,
             "skipped": 1, "updates": 0, "mismatch_diff": 0.0, "mismatch_kl": 0.0, "mismatch_out": 0.0}


def describe(row: dict) -> str:
    return (f"reward {row['reward_mean']:+.3f} ± {row['reward_std']:.3f} | format {row['format_rate']:.0%} | "
            f"kl {row['kl']:.4f} | clip {row['clip_frac']:.3f} | grad {row['grad_norm']:.3f} | "
            f"len {row['response_length']:.0f} | mismatch {row['mismatch_kl']:.1e} | "
            f"{row['time_rollout']:.0f}+{row['time_reward']:.0f}+{row['time_update']:.0f}s")


# ----------------------------------------------------------------------------- the run

def run(cfg: GRPOConfig, rewards=None):
    """GRPO from cfg.model on cfg.data: the loop, step by step. `rewards` (an object whose
    score(samples, rollout Samples) -> [Scored]) defaults to the judge's reward of each profile."""
    output_folder(cfg.out)
    d = setup_distributed()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    rank_positions(cfg.prompts_per_step, cfg.mini_batches, d)     # a batch that cannot split fails now
    if cfg.data is None:
        raise LettingoError("--data DIR is required (a folder from data/prepare.py)")
    dist.barrier()
    train = read_samples(os.path.join(cfg.data, "train.jsonl"))
    val = read_samples(os.path.join(cfg.data, "val.jsonl"))[:cfg.val_users or None]
    weights, ckpt = resolve_start(cfg.out, cfg.model, cfg.resume, cfg.lora_rank > 0)
    policy = load_policy(weights, cfg, d)
    ref = load_reference(cfg.model, cfg, d, policy) if cfg.kl_coef > 0 else None   # the start, also resuming
    judge = load_judge(cfg, policy, d)
    rewards = rewards or JudgeRewards(judge, cfg.task, cfg.reward, progress=d.main)
    judge_down = []                                       # the steps in a row whose judge failed
    with TrainLoop(cfg, d, policy, cfg.out, len(train), cfg.prompts_per_step, ckpt, cfg.mini_batches) as loop:
        for step in loop.steps():
            if loop.validation_due(step):
                policy.sync()                             # a rollout copy takes the trained weights
                loop.log_validation(step, validate(policy.sampler, policy.tok, judge, val, cfg.task,
                                                   cfg.max_new_tokens, cfg.batch_size, d))
            if step == loop.total:
                break
            prompts = [Prompt(train[i], profile_prompt(policy.tok, train[i]), prompt_seed(cfg.seed, step, i),
                              mb) for i, mb in loop.examples(step)]
            row, examples = grpo_step(policy, ref, prompts, rewards, cfg, d)
            judge_down = judge_down + [step] if row["judge_down"] else []
            check_judge(judge_down, row, cfg, d)
            loop.log_step(step, row, describe(row), examples if step % cfg.sample_every == 0 else None)


def check_judge(judge_down: list[int], row: dict, cfg: GRPOConfig, d: Dist):
    """A judge that failed on most profiles of a step: a warning; cfg.judge_down_steps such steps in
    a row stop the run (nothing is trained on them) with the command that continues it."""
    if judge_down and d.main:
        print(f"warning: step {judge_down[-1]}: the judge failed on {row['judge_failures']:.0f} profiles, "
              f"more than half of the closed ones: no update ({len(judge_down)} such steps in a row)",
              file=sys.stderr)
    if len(judge_down) >= cfg.judge_down_steps:
        raise LettingoError(f"the judge {cfg.judge_url or cfg.judge} failed on most profiles in steps "
                            f"{judge_down[0]}-{judge_down[-1]}: stopped without training on them; the last "
                            f"checkpoint is in {cfg.out}: rerun with --resume once the judge answers")


def parse_config(argv) -> GRPOConfig:
    """The flags on top of the class' defaults -- or, without --data, on top of the demo's (DEMO)."""
    p = ArgParser(description="GRPO training of a profile writer against a frozen recommender judge. "
                              "Without --data: the demo (grpo.DEMO) on SmolLM2 and synthetic users, "
                              "with any flags given on top (python grpo.py --steps 2, --resume).")
    add_config(p, GRPOConfig)
    if "--no-std-scaling" in argv:
        p.error("--no-std-scaling is now --scale-rewards none (Dr. GRPO)")
    if p.parse_args(argv).data is None:
        p.set_defaults(**dataclasses.asdict(DEMO))
    return config_from(GRPOConfig, p.parse_args(argv))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_config(argv)
    if cfg.data == DEMO.data and setup_distributed().main:
        demo_data(cfg.data)
    run(cfg)
    close_distributed()


if __name__ == "__main__":
    cli(main)
