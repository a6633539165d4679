"""grpo.py -- GRPO for the profile writer: sample a group of profiles per user, score each by how well
a frozen recommender predicts the user's next rating with it, push up the better-than-group ones.

    python grpo.py                                   # demo: SmolLM2 policy + judge, synthetic users
    torchrun --nproc_per_node=8 grpo.py --model /ckpt/Qwen3-8B --data runs/ml10m --judge-url http://judge:8008
    python grpo.py plot runs/grpo                    # training and validation curves -> runs/grpo/curves.png
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time

import torch
import torch.distributed as dist

from lettingo import (PROFILE_CLOSE, ArgParser, LettingoError, at_least, cli, load_model, profile_answer, profile_prompt,
                      output_folder, read_jsonl, read_samples)
from reward import make_judge, score_profiles
from rollout import generate
from train import (Logger, all_sum, apply_update, completion_logprobs, load_policy, load_trainer_state,
                   logprobs_no_grad, make_optimizer, resolve_start, save_checkpoint, setup_distributed, shard,
                   sync_rollout_model, synced_groups, validate, demo_data, compute_dtype, add_training_args, close_distributed, plot_command,
                   plot_curves, validation_panel)

# ----------------------------------------------------------------------------- the algorithm


def group_advantages(rewards: list[float | None], group_size: int, eps: float = 1e-6, std_scaling: bool = True):
    """A_i = (r_i - mean_g) / (std_g + eps) within each group of `group_size` consecutive samples
    (unbiased std, as verl). Samples the judge failed on (None) are left out of their group's
    statistics and get A = None (excluded, not zero-scored). A group with one valid sample gets
    mean 0, std 1 (verl's rule), i.e. A = r / (1 + eps): its raw reward, not 0. std_scaling=False
    is Dr. GRPO: A_i = r_i - mean_g.
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
        a = (r - mean) / (std + eps) if std_scaling else r - mean
        for i, v in zip(idx, a.tolist()):
            adv[i] = v
    return adv, flat_groups


def clipped_policy_loss(logp, old_logp, adv, clip_low=0.2, clip_high=0.2, dual_clip: float | None = None):
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


def token_weights(lengths: list[int], mode: str, n_seqs: float, n_tokens: float, budget: float) -> list[float]:
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


# ----------------------------------------------------------------------------- one step


def update(policy, ref, optimizer, scheduler, items, args, d):
    """PPO epochs over mini-batches of (prompt, completion, advantage) items; returns stats."""
    seqs = [(it["prompt"], it["tokens"]) for it in items]
    on_policy = args.mini_batches == 1 and args.ppo_epochs == 1
    old = None if on_policy else logprobs_no_grad(policy, seqs, args.token_budget, d.device, args.temperature)
    refs = logprobs_no_grad(ref, seqs, args.token_budget, d.device, args.temperature) if ref is not None else None
    stats = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "entropy": 0.0, "grad_norm": 0.0,
             "skipped": 0, "updates": 0}
    for _ in range(args.ppo_epochs):
        for mb in range(args.mini_batches):
            idx = [i for i, it in enumerate(items) if it["mb"] == mb]
            lens = [len(items[i]["tokens"]) for i in idx]
            n_seqs, n_tok = all_sum(len(idx), d.device), all_sum(sum(lens), d.device)
            if n_seqs == 0:
                continue
            w = token_weights(lens, args.loss_agg, n_seqs, max(n_tok, 1), args.max_new_tokens)
            groups = synced_groups(policy, [seqs[i] for i in idx], args.token_budget, d.device)
            sums = torch.zeros(5, dtype=torch.float64)           # loss, pg, kl, clipped tokens, entropy sum
            for gi, g in enumerate(groups):
                policy.set_requires_gradient_sync(gi == len(groups) - 1)   # reduce once per mini-batch
                sel = [idx[k] for k in g]
                batch = [seqs[i] for i in sel] or [([0], [0])]
                lps, ents = completion_logprobs(policy, batch, d.device, args.temperature, entropy=True)
                loss = lps[0].sum() * 0.0                          # keeps the graph alive for empty groups
                for j, i in enumerate(sel):
                    lp = lps[j]
                    a = torch.full_like(lp, items[i]["adv"])
                    old_lp = lp.detach() if old is None else old[i]
                    pg, clipped = clipped_policy_loss(lp, old_lp, a, args.clip_low, args.clip_high, args.dual_clip or None)
                    per_tok = pg
                    if refs is not None:
                        kl = kl_k3(lp, refs[i])
                        per_tok = pg + args.kl_coef * kl
                        sums[2] += (kl.detach() * w[g[j]]).sum().item()
                    loss = loss + (per_tok * w[g[j]]).sum()
                    sums[1] += (pg.detach() * w[g[j]]).sum().item()
                    sums[3] += clipped.sum().item()
                    sums[4] += ents[j].sum().item()
                loss.backward()
                sums[0] += loss.item()
            loss_sum = all_sum(sums[0].item(), d.device)
            norm, ok = apply_update(policy, optimizer, scheduler, args.grad_clip, loss_sum)
            stats["skipped"] += not ok
            stats["updates"] += 1
            stats["grad_norm"] = norm
            stats["loss"] += loss_sum
            stats["pg_loss"] += all_sum(sums[1].item(), d.device)
            stats["kl"] += all_sum(sums[2].item(), d.device)
            stats["clip_frac"] += all_sum(sums[3].item(), d.device) / max(n_tok, 1)
            stats["entropy"] += all_sum(sums[4].item(), d.device) / max(n_tok, 1)
            if not ok:
                print(f"warning: rank {d.rank}: non-finite loss or gradient (loss {loss_sum}, grad norm {norm}): "
                      "update skipped", file=sys.stderr)
    u = max(stats["updates"], 1)
    return {k: (v / u if k in ("loss", "pg_loss", "kl", "clip_frac", "entropy") else v) for k, v in stats.items()}


def sample_seed(seed, step, index):
    """Sampling seed of one prompt at one step: independent of rank count and batch layout."""
    return (seed * 1_000_003 + step * 100_003 + index) % (2**62)


def grpo_step(step, samples, prompts, seeds, mini_batch, policy, rollout, ref, tok, scorer, optimizer, scheduler, args, d,
              stop=(PROFILE_CLOSE,), end_ids=None):
    """One GRPO step on this rank's share: sample args.group_size completions of each prompt (token
    ids; seeds[i] makes prompt i's samples reproducible), score them with
    scorer(samples, rollout Samples) -> [Scored], group advantages, PPO update."""
    t0 = time.time()
    sync_rollout_model(policy, rollout)
    outs = generate(rollout, prompts, n=args.group_size, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, stop=stop, end_ids=end_ids, seed=seeds, tokenizer=tok,
                    batch_size=args.rollout_batch_size) if prompts else []
    t1 = time.time()
    flat = [(s, p, o) for s, p, group in zip(samples, prompts, outs) for o in group]     # [prompts * group]
    scored = scorer([s for s, _, _ in flat], [o for _, _, o in flat]) if flat else []
    t2 = time.time()
    adv, flat_groups = group_advantages([sc.reward for sc in scored], args.group_size, std_scaling=not args.no_std_scaling)
    items = []
    for k, ((s, p, o), a) in enumerate(zip(flat, adv)):
        if a is None:
            continue                                               # the judge failed: left out
        g = k // args.group_size
        if args.drop_zero_variance and all(adv[j] in (None, 0.0) for j in range(g * args.group_size, (g + 1) * args.group_size)):
            continue
        items.append({"prompt": p, "tokens": o.tokens, "adv": a, "mb": mini_batch[k // args.group_size]})
    st = update(policy, ref, optimizer, scheduler, items, args, d)
    t3 = time.time()
    valid = [sc.reward for sc in scored if sc.reward is not None]
    tot = lambda x: all_sum(x, d.device)
    n_all, n_valid = tot(len(scored)), tot(len(valid))
    r_sum, r_sq = tot(sum(valid)), tot(sum(v * v for v in valid))
    mean = r_sum / max(n_valid, 1)
    gen_tokens = tot(sum(len(o.tokens) for _, _, o in flat))
    row = {"step": step, "reward_mean": mean, "reward_std": math.sqrt(max(r_sq / max(n_valid, 1) - mean * mean, 0.0)),
           "format_rate": 1 - tot(sum(sc.status == "format" for sc in scored)) / max(n_all, 1),
           "judge_failures": tot(sum(sc.status == "judge_failed" for sc in scored)),
           "zero_variance_groups": tot(flat_groups), "trained_samples": tot(len(items)),
           "response_length": gen_tokens / max(n_all, 1), **st, "lr": scheduler.get_last_lr()[0],
           "time_rollout": t1 - t0, "time_reward": t2 - t1, "time_update": t3 - t2,
           "rollout_tokens_per_s": gen_tokens / max(t1 - t0, 1e-9)}
    examples = [{"user_id": s.get("user_id"), "reward": sc.reward, "status": sc.status, "text": o.text, "finish": o.finish}
                for (s, _, o), sc in zip(flat[:args.group_size], scored)]
    return row, examples


# ----------------------------------------------------------------------------- main


def parse_args(argv):
    p = ArgParser(description="GRPO training of a profile writer against a frozen recommender judge. "
                                "No arguments: the CPU demo on SmolLM2 and synthetic users (~3.5 min on 2 cores, see README).")
    a = p.add_argument
    a("--model", default="smollm2-135m", help="policy to train: HF folder, .gguf or alias")
    a("--data", default=None, help="folder with train.jsonl/val.jsonl from data/prepare.py")
    a("--out", default="runs/grpo", help="run folder: checkpoints, metrics.jsonl, samples.jsonl")
    a("--task", default="rating", choices=["rating", "sentiment"], help="reward: rating (1 - |err|/4) or sentiment (correct = 1)")
    a("--judge", default="smollm2-135m", help="local judge model (or the model name sent to --judge-url)")
    a("--judge-url", default=None, help="OpenAI-compatible judge server (recommended for big judges)")
    a("--judge-mode", default="expect", choices=["expect", "decode"], help="local judge: expected rating or greedy answer")
    a("--steps", type=at_least(1), default=100, help="GRPO steps")
    a("--prompts-per-step", type=at_least(1), default=64, help="global batch of users per step (public code: 64)")
    a("--group-size", type=at_least(1), default=8, help="profiles sampled per user (public code: 8)")
    a("--mini-batches", type=at_least(1), default=2, help="optimizer steps per GRPO step (public code: 64 prompts / 32 = 2)")
    a("--ppo-epochs", type=at_least(1), default=1, help="passes over each step's samples")
    a("--temperature", type=at_least(0.0, float), default=1.0, help="rollout temperature (public code: 1.0)")
    a("--top-p", type=at_least(0.0, float), default=1.0, help="rollout nucleus sampling (1 = off)")
    a("--max-new-tokens", type=at_least(1), default=896, help="response budget (public code: 896)")
    a("--clip-low", type=at_least(0.0, float), default=0.2, help="PPO clip: ratio >= 1 - clip_low")
    a("--clip-high", type=at_least(0.0, float), default=0.2, help="DAPO clip-higher uses 0.28")
    a("--dual-clip", type=at_least(0.0, float), default=0.0, help="dual-clip constant c for A < 0 (0 = off; usual 3)")
    a("--kl-coef", type=at_least(0.0, float), default=0.001, help="k3 KL-to-reference loss weight; 0 loads no reference")
    a("--loss-agg", default="token-mean", choices=["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"],
      help="loss normaliser: tokens (verl/public code), per-sequence means (GRPO paper), sequences x budget (Dr. GRPO)")
    a("--no-std-scaling", action="store_true", help="Dr. GRPO advantages (no division by the group std)")
    a("--drop-zero-variance", action="store_true", help="DAPO dynamic sampling: drop groups with equal rewards")
    a("--rollout-batch-size", type=at_least(1), default=64, help="max rows decoded together")
    a("--eval-every", type=at_least(1), default=10, help="validate every N steps (and at the end)")
    a("--val-users", type=at_least(0), default=64, help="validation users evaluated (0 = all in val.jsonl)")
    a("--sample-every", type=at_least(1), default=1, help="write sampled profiles to samples.jsonl every N steps")
    add_training_args(p, lr=1e-6, weight_decay=0.01, save_every=50)   # public code: lr 1e-6, wd 0.01
    return p.parse_args(argv)


DEMO = ["--data", "runs/demo-data", "--out", "runs/grpo-demo", "--steps", "12", "--prompts-per-step", "4",
        "--group-size", "4", "--mini-batches", "1", "--max-new-tokens", "64", "--lr", "1e-5", "--kl-coef", "0",
        "--eval-every", "6", "--val-users", "16", "--save-every", "12", "--token-budget", "4096", "--dtype", "bfloat16"]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "plot":
        return plot_command(argv[1:], plot_run, "a GRPO run folder")
    run(parse_args(argv or DEMO), demo=not argv)
    close_distributed()


def run(args, demo=False, scorer=None):
    """The training loop. `scorer(samples, rollout Samples) -> [Scored]` defaults to the judge."""
    output_folder(args.out)
    d = setup_distributed()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    if args.prompts_per_step % (d.world * args.mini_batches):
        raise LettingoError(f"--prompts-per-step {args.prompts_per_step} must split evenly into --mini-batches "
                            f"{args.mini_batches} x {d.world} ranks")
    if demo and d.main:
        demo_data(args.data)
    if args.data is None:
        raise LettingoError("--data DIR is required (a folder from data/prepare.py)")
    dist.barrier()
    train = read_samples(os.path.join(args.data, "train.jsonl"))
    val = read_samples(os.path.join(args.data, "val.jsonl"))[:args.val_users or None]
    weights, ckpt = resolve_start(args.out, args.model, args.resume)
    dtype = compute_dtype(args.dtype, d.device)
    policy, rollout, tok = load_policy(weights, d, args.activation_checkpointing, dtype, args.attention)
    ref = None
    if args.kl_coef > 0:  # the reference is the starting model, also when resuming
        ref = shard(load_model(args.model, dtype=torch.float32, device=d.device)[0], dtype).eval()
        for p_ in ref.parameters():
            p_.requires_grad_(False)
    judge = make_judge(args.judge, args.judge_url, args.judge_mode, device=d.device)
    if scorer is None:
        scorer = lambda samples, outs: score_profiles(samples, [profile_answer(o.text, o.finish) for o in outs], judge, args.task)
    optimizer, scheduler = make_optimizer(policy, args.lr, args.weight_decay, args.warmup_steps)
    start = 0
    if ckpt:
        start = load_trainer_state(ckpt, policy, optimizer, scheduler, d)["step"]
        if d.main:
            print(f"resumed from {ckpt} at step {start}")
    log = Logger(args.out, d, args.wandb, vars(args))
    if d.main:
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
    # global mini-batch k = prompts [k*P/M, (k+1)*P/M) of the step; each rank takes an equal slice
    # of every mini-batch, so the updates are the same whatever the number of ranks
    P, M = args.prompts_per_step, args.mini_batches
    mine = [k for k in range(P) if (k % (P // M)) // (P // (M * d.world)) == d.rank]
    order = lambda epoch: random.Random(args.seed * 7_919 + epoch).sample(range(len(train)), len(train))
    first_val = None
    for step in range(start, args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            sync_rollout_model(policy, rollout)
            v, ex = validate(rollout, tok, judge, val, args, d)
            first_val = first_val or v
            log.log({"step": step, **v}, f"step {step:>4} | validation {json.dumps(v)}", file="validation.jsonl")
        if step == args.steps:
            break
        # the data position is the step: global batch `step` = slice of the epoch's permutation
        pos = step * args.prompts_per_step
        perm = order(pos // len(train))
        global_idx = [perm[(pos + k) % len(train)] for k in mine]
        batch = [train[i] for i in global_idx]
        row, examples = grpo_step(step, batch, [profile_prompt(tok, s) for s in batch],
                                  [sample_seed(args.seed, step, i) for i in global_idx], [k // (P // M) for k in mine],
                                  policy, rollout, ref, tok, scorer, optimizer, scheduler, args, d)
        log.log(row, f"step {step:>4} | reward {row['reward_mean']:+.3f} ± {row['reward_std']:.3f} | format "
                     f"{row['format_rate']:.0%} | kl {row['kl']:.4f} | clip {row['clip_frac']:.3f} | grad {row['grad_norm']:.3f}"
                     f" | len {row['response_length']:.0f} | {row['time_rollout']:.0f}+{row['time_reward']:.0f}+"
                     f"{row['time_update']:.0f}s" + (" | SKIPPED" if row["skipped"] else ""))
        if step % args.sample_every == 0:
            log.log({"step": step, "samples": examples}, file="samples.jsonl")
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save_checkpoint(args.out, step + 1, policy, tok, optimizer, scheduler, {"args": vars(args)}, d)
    if d.main and first_val:
        print(f"validation before: {json.dumps(first_val)}\nvalidation after:  {json.dumps(v)}")


# ----------------------------------------------------------------------------- curves


def plot_run(run_dir):
    """RUN/curves.png: training reward, format, validation (all users, closed-profile users, with the
    no-profile and template lines), KL, entropy, clipping, response length, time per step."""
    m, v = "metrics.jsonl", "validation.jsonl"
    return plot_curves(run_dir, [
        ("training reward (mean +- std)", [(m, "reward_mean", "reward", "band:reward_std")]),
        ("format rate (profile closed)", [(m, "format_rate", "training samples", "-"), (v, "val_format_rate", "validation (greedy)", "-")]),
        validation_panel(run_dir),
        ("KL to reference (k3)", [(m, "kl", "kl", "-")]),
        ("entropy (per token)", [(m, "entropy", "entropy", "-")]),
        ("clip fraction", [(m, "clip_frac", "clipped tokens", "-")]),
        ("response length (tokens)", [(m, "response_length", "mean", "-")]),
        ("time per step (s)", [(m, "time_rollout", "rollout", "stack"), (m, "time_reward", "reward", "stack"),
                               (m, "time_update", "update", "stack")]),
        ("gradient norm", [(m, "grad_norm", "before clipping", "-")]),
    ], "GRPO")


if __name__ == "__main__":
    cli(main)
