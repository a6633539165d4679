"""dpo.py -- the LettinGo paper's pipeline: explore many profiles per user, score each on the
downstream task, pair better with worse profiles of the same user, align the writer with DPO.

    python dpo.py                                    # the demo (DEMO): every stage
                                                       on SmolLM2 + synthetic users
    D=runs/ml/train.jsonl
    python dpo.py explore  --data $D --models smollm2-135m,http://gpu:8000 --out runs/dpo
    python dpo.py evaluate --data $D --out runs/dpo  # the judge's reward of every explored profile
    python dpo.py pairs    --data $D --out runs/dpo  # (--task sentiment in every stage: the paper's task)
    torchrun --nproc_per_node=8 dpo.py train --data $D --out runs/dpo --model /ckpt/Llama-3-8B-Instruct
    python dpo.py sft --data $D --out runs/dpo       # warm start: fine-tune on each user's best explored
                                                       profile
explore, evaluate and pairs (and DPO's reference log-probs) are skipped when their output exists and
was made from the same inputs; train and sft train (--resume continues a stopped run).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lettingo import (PROFILE_CLOSE, PROFILE_OPEN, ArgParser, LettingoError, add_config, cli, config_from,
                      load_model, option, output_folder, profile_answer, profile_messages, profile_prompt,
                      read_jsonl, read_samples)
from reward import HTTPJudge, make_judge, score_profiles, target_rewards, template_profile
from rollout import Sampler, SamplingParams, cpu_decode_layout, prompt_seed, turn_end_id
from train import (Dist, Policy, TrainConfig, TrainLoop, all_sum, apply_update, lockstep_micro_batches,
                   close_distributed, completion_logprobs, compute_dtype, demo_data, gather_objects,
                   load_judge, load_policy, logprobs_no_grad, resolve_start, setup_distributed, validate)

STAGES = ("explore", "evaluate", "pairs", "train", "sft")


@dataclass
class DPOConfig(TrainConfig):
    """The pipeline's settings: exploration, scoring, pairs, and DPO / SFT training."""
    out: str = option("runs/dpo", "folder for profiles, scores, pairs and the training runs")
    data: str | None = option(None, "training samples JSONL (data/prepare.py's train.jsonl)", kind=str)
    val_data: str | None = option(None, "validation samples JSONL for the before/after metric", kind=str)
    models: str | None = option(None, "explore: comma-separated generators (paths, aliases, http:// URLs, or "
                                "'template': the code-written profile, one per user); none: --model",
                                kind=str)
    remote_model: str = option("default", "model name sent to http:// generators")
    remote_timeout: float = option(120.0, "explore: seconds per request to an http:// generator (a whole "
                                   "profile, where a judge answers one token)", min=0.001)
    explore_users: int = option(0, "explore: first N training samples (0 = all)", min=0)
    explore_n: int = option(10, "explore: profiles per user per generator", source="paper", min=1)
    min_margin: float = option(0.125, "rating pairs: least reward gap (0.125 = half a star of the rating "
                               "reward)", min=0.0)
    max_pairs_per_user: int = option(10, "pairs per user at most (a seeded sample; widest margins first for "
                                     "rating)", min=1)
    sft_min_gain: float = option(0.0, "sft: keep a user's best profile if it beats no profile by more")
    pairs: str | None = option(None, "train: a pairs JSONL (none: OUT/pairs-TASK[-REWARD].jsonl)", kind=str)
    beta: float = option(0.1, "DPO temperature beta (common default; the paper does not report it)", min=1e-9)
    loss_type: str = option("sigmoid", "sigmoid = DPO; ipo = IPO on length-normalised log-probs (TRL); "
                            "ipo-sum = IPO on summed log-probs", source="TRL loss_type",
                            choices=("sigmoid", "ipo", "ipo-sum"))
    label_smoothing: float = option(0.0, "conservative DPO epsilon", min=0.0)
    rpo_alpha: float = option(0.0, "weight of the chosen profiles' token-mean NLL added to the mean pair "
                              "loss, so DPO keeps raising the text it prefers (TRL's rpo_alpha, RPO; "
                              "0 = plain DPO; TRL suggests 1.0)", min=0.0)
    pairs_per_step: int = option(8, "pairs (or sft profiles) per optimizer step", min=1)


# The named presets: the demo, and the learning recipe's stages (tools/learning.py).
DEMO = DPOConfig(data="runs/demo-data/train.jsonl", val_data="runs/demo-data/val.jsonl", out="runs/dpo-demo",
                 explore_users=24, explore_n=4, max_new_tokens=64, batch_size=32, lr=1e-5, weight_decay=0.0,
                 pairs_per_step=4, steps=6, eval_every=6, val_users=16, token_budget=4096, save_every=3,
                 activation_checkpointing=True)
LEARNING = DPOConfig(explore_users=128, explore_n=6, temperature=0.7, top_p=0.9, max_new_tokens=96,
                     batch_size=32, min_margin=0.02, max_pairs_per_user=4, lr=5e-6, weight_decay=0.0,
                     beta=0.1, steps=30, pairs_per_step=8, eval_every=15, save_every=30, dtype="bfloat16",
                     token_budget=4096, val_users=100)
LEARNING_SFT = dataclasses.replace(LEARNING, lr=2e-5, steps=16, eval_every=16, save_every=16)


# ----------------------------------------------------------------------------- the loss

def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, chosen_len=None, rejected_len=None):
    """Per pair, from summed response log-probs:
        delta = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))
        sigmoid (DPO):  -(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta)
                        (eps = 0: plain DPO)
        ipo:            (delta - 1 / (2 beta))^2 with every log-prob divided by its response length first
                        (TRL's IPO, as the IPO paper uses it: a long response cannot dominate delta)
        ipo-sum:        the same on summed log-probs (the original implementation)
    Returns (loss, implicit chosen reward, implicit rejected reward), rewards = beta (log pi - log ref)."""
    if loss_type == "ipo":
        if chosen_len is None or rejected_len is None:
            raise LettingoError("dpo_loss: loss 'ipo' needs the response lengths")
        pi_chosen, ref_chosen = pi_chosen / chosen_len, ref_chosen / chosen_len
        pi_rejected, ref_rejected = pi_rejected / rejected_len, ref_rejected / rejected_len
    delta = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
    if loss_type == "sigmoid":
        loss = (-(1 - label_smoothing) * F.logsigmoid(beta * delta)
                - label_smoothing * F.logsigmoid(-beta * delta))
    elif loss_type in ("ipo", "ipo-sum"):
        loss = (delta - 1 / (2 * beta)) ** 2
    else:
        raise LettingoError(f"unknown --loss-type {loss_type!r} (sigmoid | ipo | ipo-sum)")
    return loss, beta * (pi_chosen - ref_chosen).detach(), beta * (pi_rejected - ref_rejected).detach()



# ----------------------------------------------------------------------------- pairs

def make_pairs(scored_profiles, task: str, min_margin: float, max_per_user: int, seed: int = 0):
    """scored_profiles: rows with user_id, item_id, text, reward_<task>. Pairs never cross users.
    sentiment (the paper): every (correct, incorrect) pair. rating: every pair whose rewards differ
    by >= min_margin, better one chosen. At most max_per_user pairs per user (a seeded sample,
    widest margins first for rating). -> (pairs, number of users that gave no pair)."""
    by_user = defaultdict(list)
    for r in scored_profiles:
        if r.get(f"reward_{task}") is not None:        # judge failures carry no preference
            by_user[(r["user_id"], r["item_id"])].append(r)
    rng, pairs, empty = random.Random(seed), [], 0
    for key in sorted(by_user):
        rows = by_user[key]
        cand = []
        for i, a in enumerate(rows):
            for b in rows[i + 1:]:
                ra, rb = a[f"reward_{task}"], b[f"reward_{task}"]
                good = (ra > rb and ra >= 1.0 and rb < 1.0) or (rb > ra and rb >= 1.0 and ra < 1.0) \
                    if task == "sentiment" else abs(ra - rb) >= min_margin
                if good:
                    w, l = (a, b) if ra > rb else (b, a)
                    cand.append({"user_id": key[0], "item_id": key[1], "chosen": w["text"],
                                 "rejected": l["text"], "margin": abs(ra - rb),
                                 "chosen_model": w.get("model"), "rejected_model": l.get("model")})
        if not cand:
            empty += 1
            continue
        rng.shuffle(cand)
        if task == "rating":
            cand.sort(key=lambda p: -p["margin"])
        pairs += cand[:max_per_user]
    return pairs, empty


def best_profiles(scored_profiles, task: str, min_gain: float):
    """Rejection sampling (the paper's SFT ablation): per user, the best-scored complete profile,
    kept only if it beats the judge's no-profile reward on that user by more than `min_gain`."""
    best = {}
    for r in scored_profiles:
        rew, bare = r.get(f"reward_{task}"), r.get(f"no_profile_reward_{task}")
        if r.get(f"status_{task}") != "ok" or rew is None or bare is None or rew <= bare + min_gain:
            continue
        key = (r["user_id"], r["item_id"])
        if key not in best or rew > best[key]["reward"]:
            best[key] = {"user_id": key[0], "item_id": key[1], "chosen": r["text"], "reward": rew,
                         "gain": rew - bare}
    return [best[k] for k in sorted(best, key=str)]



# ----------------------------------------------------------------------------- stages

def explore(cfg: DPOConfig, d: Dist):
    """cfg.explore_n profiles per training user from each generator (local model, OpenAI-compatible URL, or
    'template': code as one more explorer, reward.template_profile, one profile per user)."""
    out = os.path.join(cfg.out, "profiles.jsonl")
    models = cfg.models or cfg.model
    fp = fingerprint("explore", cfg.data, models, cfg.explore_n, cfg.explore_users, cfg.temperature,
                     cfg.top_p, cfg.max_new_tokens, cfg.seed,
                     profile_messages({"history": [], "user_mean": 3.0}))   # the prompt wording too
    if up_to_date(out, fp):
        return print(f"explore: {out} is up to date, skipped") if d.main else None
    samples = read_samples(cfg.data)[:cfg.explore_users or None]
    mine = list(range(d.rank, len(samples), d.world))
    rows = []
    for m in models.split(","):
        t0 = time.time()
        if m == "template":
            texts = [[f"{PROFILE_OPEN}{template_profile(samples[i])}{PROFILE_CLOSE}"] for i in mine]
        elif m.startswith(("http://", "https://")):
            texts = remote_profiles(m, [samples[i] for i in mine], cfg)
        else:
            model, tok = load_model(m, device=d.device)
            params = SamplingParams(n=cfg.explore_n, max_new_tokens=cfg.max_new_tokens,
                                    temperature=cfg.temperature, top_p=cfg.top_p, batch_size=cfg.batch_size,
                                    stop=(PROFILE_CLOSE,))
            outs = Sampler(cpu_decode_layout(model)).generate(
                [profile_prompt(tok, samples[i]) for i in mine], params,
                seed=[prompt_seed(cfg.seed, 0, i) for i in mine], tokenizer=tok, progress=d.main)
            texts = [[profile_answer(o.text, o.finish) for o in group] for group in outs]
            del model
        for i, group in zip(mine, texts):
            rows += [{"user_id": samples[i]["user_id"], "item_id": samples[i]["item_id"],
                      "model": m, "k": k, "text": t}
                     for k, t in enumerate(group)]
        print(f"explore: rank {d.rank}: {m}: {sum(map(len, texts))} profiles for {len(mine)} users "
              f"in {time.time() - t0:.0f}s")
    rows = gather_rows(rows)
    if d.main:
        finish_stage(out, rows, fp)


def remote_profiles(url, samples, cfg: DPOConfig):
    judge = HTTPJudge(url, model=cfg.remote_model, timeout=cfg.remote_timeout)
    texts = []
    for s in samples:
        group = []
        for _ in range(cfg.explore_n):
            try:  # the remote model writes the whole answer, tags included
                group.append(judge.ask(profile_messages(s), temperature=cfg.temperature,
                                       max_tokens=cfg.max_new_tokens))
            except Exception as e:  # a failed call is no profile at all, not a bad one
                print(f"warning: {url}: {e}", file=sys.stderr)
        texts.append(group)
    return texts


def gather_rows(rows):
    return sorted((r for p in gather_objects(rows) for r in p),
                  key=lambda r: (str(r["user_id"]), str(r["item_id"]), r["model"], r["k"]))


def scored_by(cfg: DPOConfig) -> str:
    """The name of the scores, pairs and SFT picks of a task and reward: rating, rating-rank, sentiment..."""
    return cfg.task + reward_suffix(cfg)


def reward_suffix(cfg: DPOConfig) -> str:
    """What a non-default --reward adds to the names of a stage's outputs ('' for rating): runs on
    different rewards share an --out folder without overwriting each other."""
    return "" if cfg.reward == "rating" else f"-{cfg.reward}"


def evaluate(cfg: DPOConfig, d: Dist):
    """The task reward of every profile on its user's targets, next to the reward the judge earns
    there with no profile at all (what a profile must beat to carry information)."""
    src, out = (os.path.join(cfg.out, "profiles.jsonl"),
                os.path.join(cfg.out, f"scores-{scored_by(cfg)}.jsonl"))
    fp = fingerprint("evaluate", src, cfg.data, cfg.judge, cfg.judge_url, cfg.judge_mode, scored_by(cfg))
    if up_to_date(out, fp):
        return print(f"evaluate: {out} is up to date, skipped") if d.main else None
    samples = {(s["user_id"], s["item_id"]): s for s in read_samples(cfg.data)}
    rows = read_jsonl(src)[d.rank::d.world]
    judge = make_judge(cfg, device=d.device)
    task = cfg.task
    scored = score_profiles([samples[(r["user_id"], r["item_id"])] for r in rows], [r["text"] for r in rows],
                            judge, task, cfg.reward)
    keys = sorted({(r["user_id"], r["item_id"]) for r in rows})
    bare = dict(zip(keys, (reward for reward, _ in target_rewards([samples[k] for k in keys],
                                                                  [None] * len(keys), judge, task,
                                                                  cfg.reward))))
    for r, sc in zip(rows, scored):
        r[f"reward_{task}"], r[f"status_{task}"] = sc.reward, sc.status
        r[f"no_profile_reward_{task}"] = bare[(r["user_id"], r["item_id"])]
    rows = gather_rows(rows)
    if d.main:
        finish_stage(out, rows, fp)
        ok = [r[f"reward_{task}"] for r in rows if r[f"reward_{task}"] is not None]
        better = sum(r[f"reward_{task}"] is not None and r[f"no_profile_reward_{task}"] is not None
                     and r[f"reward_{task}"] > r[f"no_profile_reward_{task}"] for r in rows)
        print(f"evaluate: {task}: mean reward {sum(ok) / max(len(ok), 1):+.3f} over {len(ok)} profiles, "
              f"format failures {sum(r[f'status_{task}'] == 'format' for r in rows)}, "
              f"judge failures {sum(r[f'status_{task}'] == 'judge_failed' for r in rows)}, "
              f"better than no profile {better}")


def build_pairs(cfg: DPOConfig, d: Dist):
    src, out = (os.path.join(cfg.out, f"scores-{scored_by(cfg)}.jsonl"),
                os.path.join(cfg.out, f"pairs-{scored_by(cfg)}.jsonl"))
    fp = fingerprint("pairs", src, cfg.task, cfg.min_margin, cfg.max_pairs_per_user, cfg.seed)
    if up_to_date(out, fp):
        return print(f"pairs: {out} is up to date, skipped") if d.main else None
    pairs, empty = make_pairs(read_jsonl(src), cfg.task, cfg.min_margin, cfg.max_pairs_per_user, cfg.seed)
    if d.main:
        finish_stage(out, pairs, fp)
        print(f"pairs: {len(pairs)} pairs from {len({p['user_id'] for p in pairs})} users; "
              f"{empty} users gave none (all their profiles scored alike)")


# ----------------------------------------------------------------------------- stages
# A stage's output is reused when it exists and was made from the same inputs (files by size,
# mtime and path; everything else by value), and is written atomically.

def fingerprint(*parts) -> str:
    """Inputs of a stage: files by size+mtime+path, everything else by value."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, str) and os.path.isfile(p):
            st = os.stat(p)
            p = f"{os.path.abspath(p)}:{st.st_size}:{st.st_mtime_ns}"
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def up_to_date(out_file, fp) -> bool:
    meta = out_file + ".inputs"
    if not (os.path.isfile(out_file) and os.path.isfile(meta)):
        return False
    with open(meta) as f:
        return f.read() == fp


def finish_stage(out_file, rows, fp):
    """Write the stage's rows (JSONL) under a temp name, rename, then record its inputs."""
    tmp = out_file + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, out_file)
    with open(out_file + ".inputs", "w") as f:
        f.write(fp)


# ----------------------------------------------------------------------------- train

def response_ids(tok, text, end_id):
    """A response is the text after the forced opening tag. A complete profile is followed by the
    end-of-turn token; a truncated one is not (appending it would teach "do not stop")."""
    body = text[len(PROFILE_OPEN):] if text.startswith(PROFILE_OPEN) else text
    return tok(body, add_special_tokens=False)["input_ids"] + ([end_id] if PROFILE_CLOSE in body else [])


def tokenize_pair(tok, sample, pair, end_id):
    """(prompt ids, chosen ids, rejected ids)."""
    return (profile_prompt(tok, sample), response_ids(tok, pair["chosen"], end_id),
            response_ids(tok, pair["rejected"], end_id))


def reference_logprobs(pairs_file, model_path, samples, cfg: DPOConfig, d: Dist):
    """Summed log-probs of chosen and rejected under the starting model, computed once and stored
    beside the pairs (pairs-*.ref.jsonl); training never runs the reference model."""
    out = pairs_file.replace(".jsonl", ".ref.jsonl")
    fp = fingerprint("ref", pairs_file, model_path, cfg.dtype, "turn end")
    if up_to_date(out, fp):
        return read_jsonl(out), False
    # in the dtype the policy computes in (TRL's way), so the implicit rewards start at 0
    ref, tok = load_model(model_path, dtype=compute_dtype(cfg.dtype, d.device), device=d.device)
    ref.attention = cfg.attention
    end = turn_end_id(tok)
    rows = read_jsonl(pairs_file)
    mine = rows[d.rank::d.world]
    seqs = []
    for p in mine:
        prompt, c, r = tokenize_pair(tok, samples[(p["user_id"], p["item_id"])], p, end)
        seqs += [(prompt, c), (prompt, r)]
    lps = [lp.sum().item() for lp in logprobs_no_grad(ref, seqs, cfg.token_budget, d.device)]
    for k, p in enumerate(mine):
        p["ref_chosen"], p["ref_rejected"] = lps[2 * k], lps[2 * k + 1]
    rows = [r for part in gather_objects(mine) for r in part]
    if d.main:
        finish_stage(out, rows, fp)
    dist.barrier()
    return read_jsonl(out), True


def dpo_step(policy: Policy, batch, pairs, cfg: DPOConfig, d: Dist) -> dict:
    """One optimizer step of
        loss = mean over the global batch's pairs of dpo_loss
               + rpo_alpha * (- sum of the chosen responses' token log-probs / their token count)
    (TRL's rpo_alpha: its NLL is a token mean over the chosen responses). Per micro-batch: chosen and
    rejected packed behind one prompt copy -> summed log-probs -> its share of the loss -> backward."""
    t0 = time.time()
    size = all_sum({"pairs": len(batch), "chosen_tokens": sum(len(c) for _, c, _ in batch)}, d.device)
    names = ("pref_accuracy", "reward_margin", "chosen_reward", "logp_chosen", "logp_rejected")
    sums = dict.fromkeys(("loss", *names, "nll_chosen"), 0.0)
    for g in lockstep_micro_batches(policy.model, batch, cfg.token_budget, d.device):
        seqs = [(batch[i][0], batch[i][j]) for i in g for j in (1, 2)]                   # [2 * pairs]
        lps = [x.logprobs.sum() for x in completion_logprobs(policy.model, seqs, d.device)]
        pc, pr = torch.stack(lps[0::2]), torch.stack(lps[1::2])                           # [pairs]
        ref_chosen = torch.tensor([pairs[i]["ref_chosen"] for i in g], device=pc.device)
        ref_rejected = torch.tensor([pairs[i]["ref_rejected"] for i in g], device=pc.device)
        chosen_len = torch.tensor([float(len(batch[i][1])) for i in g], device=pc.device)
        rejected_len = torch.tensor([float(len(batch[i][2])) for i in g], device=pc.device)
        losses, cr, rj = dpo_loss(pc, pr, ref_chosen, ref_rejected, cfg.beta, cfg.loss_type,
                                  cfg.label_smoothing, chosen_len, rejected_len)
        nll = -pc.sum() / max(size["chosen_tokens"], 1)
        loss = losses.sum() / size["pairs"] + cfg.rpo_alpha * nll
        loss.backward()
        for k, v in (("loss", loss.item()), ("pref_accuracy", (cr > rj).sum().item()),
                     ("reward_margin", (cr - rj).sum().item()), ("chosen_reward", cr.sum().item()),
                     ("logp_chosen", pc.sum().item()), ("logp_rejected", pr.sum().item()),
                     ("nll_chosen", nll.item())):
            sums[k] += v
    sums = all_sum(sums, d.device)
    norm, ok = apply_update(policy, sums["loss"], cfg.grad_clip, d)
    return {"loss": sums["loss"], **{k: sums[k] / max(size["pairs"], 1) for k in names},
            "nll_chosen": sums["nll_chosen"], "grad_norm": norm, "skipped": not ok,
            "lr": policy.scheduler.get_last_lr()[0], "time": time.time() - t0}


def sft_step(policy: Policy, batch, cfg: DPOConfig, d: Dist) -> dict:
    """One optimizer step of token-mean negative log-likelihood over the global batch."""
    t0 = time.time()
    n_tok = all_sum({"tokens": sum(len(c) for _, c in batch)}, d.device)["tokens"]
    total = 0.0
    for g in lockstep_micro_batches(policy.model, batch, cfg.token_budget, d.device):
        lps = completion_logprobs(policy.model, [batch[i] for i in g], d.device)
        nll = -sum(x.logprobs.sum() for x in lps) / max(n_tok, 1)
        nll.backward()
        total += nll.item()
    total = all_sum({"loss": total}, d.device)["loss"]
    norm, ok = apply_update(policy, total, cfg.grad_clip, d)
    return {"nll": total, "grad_norm": norm, "skipped": not ok, "lr": policy.scheduler.get_last_lr()[0],
            "time": time.time() - t0}


def train(cfg: DPOConfig, d: Dist):
    """DPO on the pairs, from cfg.model (which is also the reference)."""
    pairs_file = cfg.pairs or os.path.join(cfg.out, f"pairs-{scored_by(cfg)}.jsonl")
    samples = {(s["user_id"], s["item_id"]): s for s in read_samples(cfg.data)}
    pairs, computed = reference_logprobs(pairs_file, cfg.model, samples, cfg, d)
    if not pairs:
        raise LettingoError(f"{pairs_file}: no pairs to train on")
    note = (f"reference log-probs {'computed once now' if computed else 'loaded'} from "
            f"{pairs_file.replace('.jsonl', '.ref.jsonl')}")
    train_on(cfg, d, "dpo", os.path.join(cfg.out, "train" + reward_suffix(cfg)), pairs, samples, note)


def sft(cfg: DPOConfig, d: Dist):
    """Warm start by rejection sampling (the paper's SFT ablation): fine-tune cfg.model on each user's
    best explored profile that beats no profile (OUT/sft-TASK[-REWARD].jsonl), token-mean NLL."""
    src, out = (os.path.join(cfg.out, f"scores-{scored_by(cfg)}.jsonl"),
                os.path.join(cfg.out, f"sft-{scored_by(cfg)}.jsonl"))
    fp = fingerprint("sft", src, cfg.task, cfg.sft_min_gain)
    if not up_to_date(out, fp):
        picks = best_profiles(read_jsonl(src), cfg.task, cfg.sft_min_gain)
        if d.main:
            finish_stage(out, picks, fp)
            print(f"sft: {len(picks)} users kept (best profile beats no profile by > {cfg.sft_min_gain}), "
                  f"mean reward gain {sum(p['gain'] for p in picks) / max(len(picks), 1):+.3f}")
        dist.barrier()
    picks = read_jsonl(out) if os.path.getsize(out) else []
    if not picks:
        raise LettingoError(f"{out}: no explored profile beats no profile; explore more (--explore-n, "
                            "--explore-users)")
    samples = {(s["user_id"], s["item_id"]): s for s in read_samples(cfg.data)}
    train_on(cfg, d, "sft", os.path.join(cfg.out, "sft" + reward_suffix(cfg)), picks, samples,
             f"{len(picks)} best profiles")


def train_on(cfg: DPOConfig, d: Dist, kind: str, run_dir, examples, samples, note):
    """The DPO (kind "dpo", examples: pairs) or SFT ("sft", examples: each user's best profile) loop,
    from cfg.model; validation when cfg.val_data is given."""
    weights, ckpt = resolve_start(run_dir, cfg.model, cfg.resume, cfg.lora_rank > 0)
    policy = load_policy(weights, cfg, d)
    end = turn_end_id(policy.tok)
    sample_of = [samples[(e["user_id"], e["item_id"])] for e in examples]
    data = ([tokenize_pair(policy.tok, s, e, end) for s, e in zip(sample_of, examples)] if kind == "dpo" else
            [(profile_prompt(policy.tok, s), response_ids(policy.tok, e["chosen"], end))
             for s, e in zip(sample_of, examples)])
    judge = load_judge(cfg, policy, d) if cfg.val_data else None
    val = read_samples(cfg.val_data)[:cfg.val_users or None] if cfg.val_data else []
    with TrainLoop(cfg, d, policy, run_dir, len(examples), cfg.pairs_per_step, ckpt) as loop:
        if d.main:
            print(f"{os.path.basename(run_dir)}: {len(examples)} examples, "
                  f"{loop.total} steps of {cfg.pairs_per_step}; {note}")
        for step in loop.steps():
            if judge and loop.validation_due(step):
                policy.sync()                             # a rollout copy takes the trained weights
                loop.log_validation(step, validate(policy.sampler, policy.tok, judge, val, cfg.task,
                                                   cfg.max_new_tokens, cfg.batch_size, d))
            if step == loop.total:
                break
            batch = [i for i, _ in loop.examples(step)]
            if kind == "dpo":
                row = dpo_step(policy, [data[i] for i in batch], [examples[i] for i in batch], cfg, d)
            else:
                row = sft_step(policy, [data[i] for i in batch], cfg, d)
            loop.log_step(step, row)


# ----------------------------------------------------------------------------- main

def parse_config(argv) -> tuple[str, DPOConfig]:
    """The stage and the flags on top of the class' defaults -- or, without --data, on top of the
    demo's (DEMO)."""
    p = ArgParser(description="LettinGo's explore -> evaluate -> pairs -> DPO pipeline. "
                              "Without --data: the demo (dpo.DEMO), every stage on SmolLM2 and "
                              "synthetic users, with any flags given on top (python dpo.py --steps 2).")
    p.add_argument("stage", nargs="?", default="all", choices=("all",) + STAGES,
                   help="all = explore, evaluate, pairs, train (the paper); "
                        "sft = warm start on the best explored profiles")
    add_config(p, DPOConfig)
    if p.parse_args(argv).data is None:
        p.set_defaults(**dataclasses.asdict(DEMO))
    args = p.parse_args(argv)
    return args.stage, config_from(DPOConfig, args)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    stage, cfg = parse_config(argv)
    output_folder(cfg.out)
    d = setup_distributed()
    torch.manual_seed(cfg.seed)
    if cfg.data == DEMO.data and d.main:
        demo_data(os.path.dirname(cfg.data))
    dist.barrier()
    if not cfg.data:
        raise LettingoError("--data is required (training samples from data/prepare.py)")
    os.makedirs(cfg.out, exist_ok=True)
    run = {"explore": explore, "evaluate": evaluate, "pairs": build_pairs, "train": train, "sft": sft}
    for name in STAGES:
        if stage == name or (stage == "all" and name != "sft"):
            run[name](cfg, d)              # a stage's models are freed when it returns
            dist.barrier()
    close_distributed()


if __name__ == "__main__":
    cli(main)
