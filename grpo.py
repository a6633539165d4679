"""grpo.py -- GRPO for the profile writer: sample a group of profiles per user, score each by how well
a frozen recommender predicts the user's next rating with it, push up the better-than-group ones.

    python grpo.py                                   # demo: SmolLM2 policy + judge, synthetic users
    torchrun --nproc_per_node=8 grpo.py --model /ckpt/Qwen3-8B --data runs/ml10m --judge-url http://judge:8008
    python grpo.py plot runs/grpo                    # reward and validation curves -> PNG
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import torch
import torch.distributed as dist

from lettingo import PROFILE_CLOSE, LettingoError, cli, load_model, profile_answer, profile_prompt, read_jsonl
from reward import make_judge, score_profiles
from rollout import generate
from train import (Logger, all_max, all_sum, apply_update, completion_logprobs, load_policy, load_trainer_state,
                   logprobs_no_grad, make_optimizer, resolve_start, save_checkpoint, setup_distributed, shard,
                   sync_rollout_model, synced_groups, validate, demo_data, compute_dtype, add_training_args)

# ----------------------------------------------------------------------------- the algorithm


def group_advantages(rewards: list[float | None], group_size: int, eps: float = 1e-6, std_scaling: bool = True):
    """A_i = (r_i - mean_g) / (std_g + eps) within each group of `group_size` consecutive samples
    (unbiased std, as verl). Samples the judge failed on (None) are left out of their group's
    statistics and get A = None (excluded, not zero-scored). A group with one valid sample gets
    mean 0, std 1 (verl). std_scaling=False is Dr. GRPO: A_i = r_i - mean_g.
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


def token_weights(lengths: list[int], mode: str, n_seqs: float, n_tokens: float, max_len: float) -> list[float]:
    """Per-sequence weight w of each of its tokens so that loss = sum_tokens w * L, with the
    normalisers taken over the *global* (all-rank) mini-batch:
      token-mean               sum L / total tokens
      seq-mean-token-mean      mean over sequences of each sequence's token mean (original GRPO)
      seq-mean-token-sum-norm  sum L / (sequences x longest response)  (Dr. GRPO)"""
    if mode == "token-mean":
        return [1.0 / n_tokens] * len(lengths)
    if mode == "seq-mean-token-mean":
        return [1.0 / (n * n_seqs) for n in lengths]
    if mode == "seq-mean-token-sum-norm":
        return [1.0 / (n_seqs * max_len)] * len(lengths)
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
            n_seqs, n_tok, max_len = all_sum(len(idx), d.device), all_sum(sum(lens), d.device), all_max(max(lens, default=1), d.device)
            if n_seqs == 0:
                continue
            w = token_weights(lens, args.loss_agg, n_seqs, max(n_tok, 1), max_len)
            groups = synced_groups([len(seqs[i][0]) + lens[k] for k, i in enumerate(idx)], args.token_budget, d.device)
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


def grpo_step(step, batch, global_idx, mini_batch, policy, rollout, ref, tok, scorer, optimizer, scheduler, args, d):
    t0 = time.time()
    sync_rollout_model(policy, rollout)
    prompts = [profile_prompt(tok, s) for s in batch]
    outs = generate(rollout, prompts, n=args.group_size, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_p=args.top_p, stop=(PROFILE_CLOSE,),
                    seed=[sample_seed(args.seed, step, i) for i in global_idx], tokenizer=tok,
                    batch_size=args.rollout_batch_size) if batch else []
    t1 = time.time()
    flat = [(s, p, o) for s, p, group in zip(batch, prompts, outs) for o in group]
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
    examples = [{"user_id": s["user_id"], "reward": sc.reward, "status": sc.status, "text": profile_answer(o.text, o.finish)}
                for (s, _, o), sc in zip(flat[:args.group_size], scored)]
    return row, examples


# ----------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(description="GRPO training of a profile writer against a frozen recommender judge. "
                                "No arguments: a ~10 minute CPU demo on SmolLM2 and synthetic users.")
    a = p.add_argument
    a("--model", default="smollm2-135m", help="policy to train: HF folder, .gguf or alias")
    a("--data", default=None, help="folder with train.jsonl/val.jsonl from data/prepare.py (default: demo synthetic)")
    a("--out", default="runs/grpo", help="run folder: checkpoints, metrics.jsonl, samples.jsonl")
    a("--task", default="rating", choices=["rating", "sentiment"])
    a("--judge", default="smollm2-135m", help="local judge model (or the model name sent to --judge-url)")
    a("--judge-url", default=None, help="OpenAI-compatible judge server (recommended for big judges)")
    a("--judge-mode", default="expect", choices=["expect", "decode"])
    a("--steps", type=int, default=100)
    a("--prompts-per-step", type=int, default=64, help="global batch of users per step (public code: 64)")
    a("--group-size", type=int, default=8, help="profiles sampled per user (public code: 8)")
    a("--mini-batches", type=int, default=2, help="optimizer steps per GRPO step (public code: 64 prompts / 32 = 2)")
    a("--ppo-epochs", type=int, default=1)
    a("--temperature", type=float, default=1.0)
    a("--top-p", type=float, default=1.0)
    a("--max-new-tokens", type=int, default=896, help="response budget (public code: 896)")
    a("--clip-low", type=float, default=0.2)
    a("--clip-high", type=float, default=0.2, help="DAPO clip-higher uses 0.28")
    a("--dual-clip", type=float, default=0.0, help="dual-clip constant c for A < 0 (0 = off; usual 3)")
    a("--kl-coef", type=float, default=0.001, help="k3 KL-to-reference loss weight; 0 loads no reference")
    a("--loss-agg", default="token-mean", choices=["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
    a("--no-std-scaling", action="store_true", help="Dr. GRPO advantages (no division by the group std)")
    a("--drop-zero-variance", action="store_true", help="DAPO dynamic sampling: drop groups with equal rewards")
    a("--rollout-batch-size", type=int, default=64, help="max rows decoded together")
    a("--eval-every", type=int, default=10)
    a("--val-users", type=int, default=64, help="validation users evaluated (0 = all in val.jsonl)")
    a("--sample-every", type=int, default=1, help="write sampled profiles to samples.jsonl every N steps")
    add_training_args(p, lr=1e-6, weight_decay=0.01, save_every=50)   # public code: lr 1e-6, wd 0.01
    return p.parse_args(argv)


DEMO = ["--data", "runs/demo-data", "--out", "runs/grpo-demo", "--steps", "12", "--prompts-per-step", "4",
        "--group-size", "4", "--mini-batches", "1", "--max-new-tokens", "64", "--lr", "1e-5", "--kl-coef", "0",
        "--eval-every", "6", "--val-users", "16", "--save-every", "12", "--token-budget", "4096", "--dtype", "bfloat16"]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "plot":
        return plot_run(argv[1] if len(argv) > 1 else "runs/grpo")
    run(parse_args(argv or DEMO), demo=not argv)


def run(args, demo=False, scorer=None):
    """The training loop. `scorer(samples, rollout Samples) -> [Scored]` defaults to the judge."""
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
    train = read_jsonl(os.path.join(args.data, "train.jsonl"))
    val = read_jsonl(os.path.join(args.data, "val.jsonl"))[:args.val_users or None]
    weights, ckpt = resolve_start(args.out, args.model, args.resume)
    dtype = compute_dtype(args.dtype, d.device)
    policy, rollout, tok = load_policy(weights, d, args.activation_checkpointing, dtype)
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
        row, examples = grpo_step(step, [train[i] for i in global_idx], global_idx, [k // (P // M) for k in mine],
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
    dist.barrier()  # no rank tears down gloo while another still talks to it
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- plot (no matplotlib needed)


def plot_run(run_dir):
    """reward_mean and format_rate per step and the validation metric as a PNG: a tiny rasteriser
    on numpy + zlib, so the plot needs nothing beyond the runtime requirements."""
    import numpy as np
    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    val = read_jsonl(os.path.join(run_dir, "validation.jsonl")) if os.path.isfile(os.path.join(run_dir, "validation.jsonl")) else []
    key = next((k for k in ("val_MAE", "val_accuracy") if val and k in val[0]), None)
    series = [(k, [(r["step"], r[k]) for r in rows if k in r], c) for k, c in (("reward_mean", (200, 40, 40)),
                                                                               ("format_rate", (40, 150, 40)))]
    if key:
        series.append((key, [(r["step"], r[key]) for r in val if r.get(key) is not None], (40, 40, 200)))
    W, H, pad = 640, 240 * len(series), 36
    img = np.full((H, W, 3), 255, np.uint8)
    for k, (name, pts, color) in enumerate(series):
        top = k * 240
        img[top + pad:top + 240 - pad, pad] = img[top + 240 - pad, pad:W - pad] = 0
        draw_text(img, f"{name} {min(p[1] for p in pts):.3f}..{max(p[1] for p in pts):.3f}" if pts else name, pad, top + 8)
        if len(pts) < 2:
            continue
        xs, ys = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)
        px = pad + (xs - xs.min()) / max(np.ptp(xs), 1e-9) * (W - 2 * pad - 1)
        py = top + 240 - pad - (ys - ys.min()) / max(np.ptp(ys), 1e-9) * (240 - 2 * pad - 1)
        for (x0, y0), (x1, y1) in zip(zip(px, py), zip(px[1:], py[1:])):
            n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
            for t in np.linspace(0, 1, n):
                x, y = int(round(x0 + t * (x1 - x0))), int(round(y0 + t * (y1 - y0)))
                img[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2] = color
    path = os.path.join(run_dir, "curves.png")
    write_png(path, img)
    print(f"wrote {path}")


FONT = {c: bits for c, bits in zip("0123456789.-_+ abcdefghijklmnopqrstuvwxyzAEMS", [
    "111101101101111", "010110010010111", "111001111100111", "111001111001111", "101101111001001", "111100111001111",
    "111100111101111", "111001001001001", "111101111101111", "111101111001111", "000000000000010", "000000111000000",
    "000000000000111", "000010111010000", "000000000000000", "000011101101011", "100111101101111", "000111100100111",
    "001111101101111", "000111111100111", "011100110100100", "000111101111001", "100111101101101", "010000010010010",
    "001000001101111", "100101110101101", "010010010010010", "000111111101101", "000110101101101", "000111101101111",
    "000111101111100", "000111101111001", "000111100100100", "000011010001110", "010111010010011", "000101101101111",
    "000101101101010", "000101101111111", "000101010101101", "000101101111001", "000111011110111", "111101111101101",
    "111100111100111", "101111111101101", "111100111001111"])}


def draw_text(img, text, x, y, scale=2):
    for ch in text:
        bits = FONT.get(ch, FONT[" "])
        for i, b in enumerate(bits):
            if b == "1":
                r, c = divmod(i, 3)
                img[y + r * scale:y + (r + 1) * scale, x + c * scale:x + (c + 1) * scale] = 0
        x += 4 * scale


def write_png(path, img):
    import struct
    import zlib
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))
    chunk = lambda tag, data: struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


if __name__ == "__main__":
    cli(main)
