"""dpo.py -- the LettinGo paper's pipeline: explore many profiles per user, score each on the
downstream task, pair better with worse profiles of the same user, align the writer with DPO.

    python dpo.py                                    # all stages: SmolLM2 + synthetic users (~2.5 min on 2 CPU cores)
    python dpo.py explore  --data runs/ml/train.jsonl --models smollm2-135m,http://gpu:8000 --out runs/dpo
    python dpo.py evaluate --out runs/dpo            # reward.py scores for both tasks
    python dpo.py pairs    --out runs/dpo --task sentiment
    torchrun --nproc_per_node=8 dpo.py train --out runs/dpo --model /ckpt/Llama-3-8B-Instruct
    python dpo.py sft --out runs/dpo --task rating   # warm start: fine-tune on each user's best explored profile
    python dpo.py plot runs/dpo/train                # curves -> runs/dpo/train/curves.png
Each stage writes into --out and is skipped when its output exists and was made from the same inputs.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lettingo import (PROFILE_CLOSE, PROFILE_OPEN, ArgParser, LettingoError, at_least, cli, load_model, predictor_messages, profile_answer,
                      output_folder, profile_messages, profile_prompt, read_jsonl, read_samples)
from reward import HTTPJudge, make_judge, score_profiles, target_rewards, template_profile
from rollout import end_token_ids, generate
from train import (Logger, add_training_args, all_sum, apply_update, completion_logprobs, demo_data, gather_objects, load_policy,
                   compute_dtype, load_trainer_state, logprobs_no_grad, make_optimizer, resolve_start, save_checkpoint, setup_distributed,
                   sync_rollout_model, synced_groups, validate, plot_curves, close_distributed, plot_command,
                   validation_panel)

# ----------------------------------------------------------------------------- the loss


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta=0.1, loss_type="sigmoid", label_smoothing=0.0,
             chosen_len=None, rejected_len=None):
    """Per pair, from summed response log-probs:
        delta = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))
        sigmoid (DPO):  -(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta)   (eps = 0: plain DPO)
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
        loss = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    elif loss_type in ("ipo", "ipo-sum"):
        loss = (delta - 1 / (2 * beta)) ** 2
    else:
        raise LettingoError(f"unknown --loss {loss_type!r} (sigmoid | ipo | ipo-sum)")
    return loss, beta * (pi_chosen - ref_chosen).detach(), beta * (pi_rejected - ref_rejected).detach()


# ----------------------------------------------------------------------------- pairs


def make_pairs(scored_profiles, task, min_margin=0.1, max_per_user=10, seed=0):
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
                good = (ra > rb and ra >= 1.0 and rb < 1.0) or (rb > ra and rb >= 1.0 and ra < 1.0) if task == "sentiment" \
                    else abs(ra - rb) >= min_margin
                if good:
                    w, l = (a, b) if ra > rb else (b, a)
                    cand.append({"user_id": key[0], "item_id": key[1], "chosen": w["text"], "rejected": l["text"],
                                 "margin": abs(ra - rb), "chosen_model": w.get("model"), "rejected_model": l.get("model")})
        if not cand:
            empty += 1
            continue
        rng.shuffle(cand)
        if task == "rating":
            cand.sort(key=lambda p: -p["margin"])
        pairs += cand[:max_per_user]
    return pairs, empty


# ----------------------------------------------------------------------------- stages


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
    return os.path.isfile(out_file) and os.path.isfile(meta) and open(meta).read() == fp


def finish_stage(out_file, rows, fp):
    tmp = out_file + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, out_file)
    with open(out_file + ".inputs", "w") as f:
        f.write(fp)


def explore(args, d):
    """N profiles per training user from each generator (local model or OpenAI-compatible URL)."""
    out = os.path.join(args.out, "profiles.jsonl")
    fp = fingerprint("explore", args.data, args.models, args.n, args.users, args.temperature, args.top_p, args.max_new_tokens,
                     args.seed, profile_messages({"history": [], "user_mean": 3.0}))   # the prompt wording is an input too
    if up_to_date(out, fp):
        return print(f"explore: {out} is up to date, skipped") if d.main else None
    samples = read_samples(args.data)[:args.users or None]
    mine = list(range(d.rank, len(samples), d.world))
    rows = []
    for m in args.models.split(","):
        t0 = time.time()
        if m == "template":  # code as one more explorer: reward.template_profile, one profile per user
            texts = [[f"{PROFILE_OPEN}{template_profile(samples[i])}{PROFILE_CLOSE}"] for i in mine]
        elif m.startswith(("http://", "https://")):  # a remote model: n chat completions per user
            texts = remote_profiles(m, [samples[i] for i in mine], args)
        else:
            model, tok = load_model(m, device=d.device)
            outs = generate(model, [profile_prompt(tok, samples[i]) for i in mine], n=args.n,
                            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, stop=(PROFILE_CLOSE,),
                            seed=[args.seed * 1_000_003 + i for i in mine], tokenizer=tok, batch_size=args.batch_size,
                            progress=d.main)
            texts = [[profile_answer(o.text, o.finish) for o in group] for group in outs]
            del model
        for i, group in zip(mine, texts):
            rows += [{"user_id": samples[i]["user_id"], "item_id": samples[i]["item_id"], "model": m, "k": k, "text": t}
                     for k, t in enumerate(group)]
        print(f"explore: rank {d.rank}: {m}: {sum(map(len, texts))} profiles for {len(mine)} users in {time.time() - t0:.0f}s")
    rows = gather_rows(rows)
    if d.main:
        finish_stage(out, rows, fp)


def remote_profiles(url, samples, args):
    judge = HTTPJudge(url, model=args.remote_model, timeout=120, retries=3)
    texts = []
    for s in samples:
        group = []
        for _ in range(args.n):
            try:  # the remote model writes the whole answer, tags included
                group.append(judge.ask(profile_messages(s), temperature=args.temperature, max_tokens=args.max_new_tokens))
            except Exception as e:  # a failed call is no profile at all, not a bad one
                print(f"warning: {url}: {e}", file=sys.stderr)
        texts.append(group)
    return texts


def gather_rows(rows):
    return sorted((r for p in gather_objects(rows) for r in p), key=lambda r: (str(r["user_id"]), str(r["item_id"]), r["model"], r["k"]))


def evaluate(args, d):
    """The --task reward of every profile on its user's target, next to the reward the judge earns
    there with no profile at all (what a profile must beat to carry information)."""
    src, out = os.path.join(args.out, "profiles.jsonl"), os.path.join(args.out, f"scores-{args.task}.jsonl")
    fp = fingerprint("evaluate", src, args.data, args.judge, args.judge_url, args.judge_mode, args.task)
    if up_to_date(out, fp):
        return print(f"evaluate: {out} is up to date, skipped") if d.main else None
    samples = {(s["user_id"], s["item_id"]): s for s in read_samples(args.data)}
    rows = read_jsonl(src)[d.rank::d.world]
    judge = make_judge(args.judge, args.judge_url, args.judge_mode, device=d.device)
    task = args.task
    scored = score_profiles([samples[(r["user_id"], r["item_id"])] for r in rows], [r["text"] for r in rows], judge, task)
    keys = sorted({(r["user_id"], r["item_id"]) for r in rows})
    bare = target_rewards([samples[k] for k in keys], [None] * len(keys), judge, task)
    bare = {k: reward for k, (reward, _) in zip(keys, bare)}
    for r, sc in zip(rows, scored):
        r[f"reward_{task}"], r[f"status_{task}"] = sc.reward, sc.status
        r[f"no_profile_reward_{task}"] = bare[(r["user_id"], r["item_id"])]
    rows = gather_rows(rows)
    if d.main:
        finish_stage(out, rows, fp)
        ok = [r[f"reward_{task}"] for r in rows if r[f"reward_{task}"] is not None]
        print(f"evaluate: {task}: mean reward {sum(ok) / max(len(ok), 1):+.3f} over {len(ok)} profiles, "
              f"format failures {sum(r[f'status_{task}'] == 'format' for r in rows)}, "
              f"judge failures {sum(r[f'status_{task}'] == 'judge_failed' for r in rows)}, "
              f"better than no profile {sum(r[f'reward_{task}'] is not None and r[f'no_profile_reward_{task}'] is not None and r[f'reward_{task}'] > r[f'no_profile_reward_{task}'] for r in rows)}")


def best_profiles(scored_profiles, task, min_gain=0.0):
    """Rejection sampling (the paper's SFT ablation): per user, the best-scored complete profile,
    kept only if it beats the judge's no-profile reward on that user by more than `min_gain`."""
    best = {}
    for r in scored_profiles:
        rew, bare = r.get(f"reward_{task}"), r.get(f"no_profile_reward_{task}")
        if r.get(f"status_{task}") != "ok" or rew is None or bare is None or rew <= bare + min_gain:
            continue
        key = (r["user_id"], r["item_id"])
        if key not in best or rew > best[key]["reward"]:
            best[key] = {"user_id": key[0], "item_id": key[1], "chosen": r["text"], "reward": rew, "gain": rew - bare}
    return [best[k] for k in sorted(best, key=str)]


def build_pairs(args, d):
    src, out = os.path.join(args.out, f"scores-{args.task}.jsonl"), os.path.join(args.out, f"pairs-{args.task}.jsonl")
    fp = fingerprint("pairs", src, args.task, args.min_margin, args.max_pairs_per_user, args.seed)
    if up_to_date(out, fp):
        return print(f"pairs: {out} is up to date, skipped") if d.main else None
    pairs, empty = make_pairs(read_jsonl(src), args.task, args.min_margin, args.max_pairs_per_user, args.seed)
    if d.main:
        finish_stage(out, pairs, fp)
        print(f"pairs: {len(pairs)} pairs from {len({p['user_id'] for p in pairs})} users; {empty} users gave none "
              f"(all their profiles scored alike)")


# ----------------------------------------------------------------------------- train


def response_ids(tok, text, end_id):
    """A response is the text after the forced opening tag. A complete profile is followed by the
    end-of-turn token; a truncated one is not (appending it would teach "do not stop")."""
    body = text[len(PROFILE_OPEN):] if text.startswith(PROFILE_OPEN) else text
    return tok(body, add_special_tokens=False)["input_ids"] + ([end_id] if PROFILE_CLOSE in body else [])


def tokenize_pair(tok, sample, pair, end_id):
    """(prompt ids, chosen ids, rejected ids)."""
    return profile_prompt(tok, sample), response_ids(tok, pair["chosen"], end_id), response_ids(tok, pair["rejected"], end_id)


def reference_logprobs(pairs_file, model_path, samples, args, d):
    """Summed log-probs of chosen and rejected under the starting model, computed once and stored
    beside the pairs (pairs-*.ref.jsonl); training never runs the reference model."""
    out = pairs_file.replace(".jsonl", ".ref.jsonl")
    fp = fingerprint("ref", pairs_file, model_path)
    if up_to_date(out, fp):
        return read_jsonl(out), False
    ref, tok = load_model(model_path, dtype=torch.float32, device=d.device)
    end = min(end_token_ids(tok))
    rows = read_jsonl(pairs_file)
    mine = rows[d.rank::d.world]
    seqs = []
    for p in mine:
        prompt, c, r = tokenize_pair(tok, samples[(p["user_id"], p["item_id"])], p, end)
        seqs += [(prompt, c), (prompt, r)]
    lps = [lp.sum().item() for lp in logprobs_no_grad(ref, seqs, args.token_budget, d.device)]
    for k, p in enumerate(mine):
        p["ref_chosen"], p["ref_rejected"] = lps[2 * k], lps[2 * k + 1]
    rows = [r for part in gather_objects(mine) for r in part]
    if d.main:
        finish_stage(out, rows, fp)
    dist.barrier()
    return read_jsonl(out), True


def train(args, d):
    """DPO on the pairs, from --model (which is also the reference)."""
    pairs_file = args.pairs or os.path.join(args.out, f"pairs-{args.task}.jsonl")
    samples = {(s["user_id"], s["item_id"]): s for s in read_samples(args.data)}
    pairs, computed = reference_logprobs(pairs_file, args.model, samples, args, d)
    if not pairs:
        raise LettingoError(f"{pairs_file}: no pairs to train on")
    note = f"reference log-probs {'computed once now' if computed else 'loaded'} from {pairs_file.replace('.jsonl', '.ref.jsonl')}"
    fit(args, d, os.path.join(args.out, "train"), pairs, lambda tok, end: [
        tokenize_pair(tok, samples[(p["user_id"], p["item_id"])], p, end) for p in pairs], dpo_step, note)


def sft(args, d):
    """Warm start by rejection sampling (the paper's SFT ablation): fine-tune --model on each user's
    best explored profile that beats no profile (OUT/sft-TASK.jsonl), token-mean NLL."""
    src, out = os.path.join(args.out, f"scores-{args.task}.jsonl"), os.path.join(args.out, f"sft-{args.task}.jsonl")
    fp = fingerprint("sft", src, args.task, args.sft_min_gain)
    if not up_to_date(out, fp):
        picks = best_profiles(read_jsonl(src), args.task, args.sft_min_gain)
        if d.main:
            finish_stage(out, picks, fp)
            print(f"sft: {len(picks)} users kept (best profile beats no profile by > {args.sft_min_gain}), "
                  f"mean reward gain {sum(p['gain'] for p in picks) / max(len(picks), 1):+.3f}")
        dist.barrier()
    picks = read_jsonl(out) if os.path.getsize(out) else []
    if not picks:
        raise LettingoError(f"{out}: no explored profile beats no profile; explore more (--n, --users)")
    samples = {(s["user_id"], s["item_id"]): s for s in read_samples(args.data)}
    fit(args, d, os.path.join(args.out, "sft"), picks, lambda tok, end: [
        (profile_prompt(tok, samples[(p["user_id"], p["item_id"])]), response_ids(tok, p["chosen"], end)) for p in picks],
        sft_step, f"{len(picks)} best profiles")


def fit(args, d, run_dir, examples, tokenize, step_fn, note):
    """The training loop both stages share: --pairs-per-step examples per optimizer step, data
    position = step (exact resume), validation every --eval-every steps, atomic checkpoints."""
    weights, ckpt = resolve_start(run_dir, args.model, args.resume)
    policy, rollout, tok = load_policy(weights, d, args.activation_checkpointing, compute_dtype(args.dtype, d.device),
                                    args.attention)
    data = tokenize(tok, min(end_token_ids(tok)))
    optimizer, scheduler = make_optimizer(policy, args.lr, args.weight_decay, args.warmup_steps)
    start = load_trainer_state(ckpt, policy, optimizer, scheduler, d)["step"] if ckpt else 0
    log = Logger(run_dir, d, args.wandb, vars(args))
    judge = make_judge(args.judge, args.judge_url, args.judge_mode, device=d.device) if args.val_data else None
    val = read_samples(args.val_data)[:args.val_users or None] if args.val_data else []
    steps = args.steps or max(1, args.epochs * len(examples) // args.pairs_per_step)
    if args.pairs_per_step % d.world:
        raise LettingoError(f"--pairs-per-step {args.pairs_per_step} must divide evenly over {d.world} ranks")
    if d.main:
        print(f"{os.path.basename(run_dir)}: {len(examples)} examples, {steps} steps of {args.pairs_per_step}; {note}")
    per = args.pairs_per_step // d.world
    first_val = last_val = None
    for step in range(start, steps + 1):
        if judge and (step % args.eval_every == 0 or step == steps):
            sync_rollout_model(policy, rollout)
            last_val, _ = validate(rollout, tok, judge, val, args, d)
            first_val = first_val or last_val
            log.log({"step": step, **last_val}, f"step {step:>4} | validation {json.dumps(last_val)}", file="validation.jsonl")
        if step == steps:
            break
        pos = step * args.pairs_per_step
        perm = random.Random(args.seed * 7_919 + pos // len(examples)).sample(range(len(examples)), len(examples))
        idx = [perm[(pos + k) % len(examples)] for k in range(d.rank * per, (d.rank + 1) * per)]
        row = {"step": step, **step_fn(policy, optimizer, scheduler, [data[i] for i in idx], [examples[i] for i in idx], args, d)}
        log.log(row, f"step {step:>4} | " + " | ".join(f"{k} {v:.4g}" for k, v in row.items()
                                                       if k not in ("step", "skipped", "lr")) + (" | SKIPPED" if row["skipped"] else ""))
        if (step + 1) % args.save_every == 0 or step + 1 == steps:
            save_checkpoint(run_dir, step + 1, policy, tok, optimizer, scheduler, {"args": vars(args)}, d)
    if d.main and first_val:
        print(f"validation before: {json.dumps(first_val)}\nvalidation after:  {json.dumps(last_val)}")


def sft_step(policy, optimizer, scheduler, batch, picks, args, d):
    """One optimizer step of token-mean negative log-likelihood over the global batch."""
    t0 = time.time()
    n_tok = all_sum(sum(len(c) for _, c in batch), d.device)
    groups = synced_groups(policy, batch, args.token_budget, d.device)
    total = 0.0
    for gi, g in enumerate(groups):
        policy.set_requires_gradient_sync(gi == len(groups) - 1)
        part = [batch[i] for i in g] or [([0], [0])]
        lps = completion_logprobs(policy, part, d.device)
        loss = -sum(lp.sum() for lp in lps) / max(n_tok, 1) * (1.0 if g else 0.0)
        loss.backward()
        total += loss.item()
    total = all_sum(total, d.device)
    norm, ok = apply_update(policy, optimizer, scheduler, args.grad_clip, total)
    return {"nll": total, "grad_norm": norm, "skipped": not ok, "lr": scheduler.get_last_lr()[0], "time": time.time() - t0}


def dpo_step(policy, optimizer, scheduler, batch, pairs, args, d):
    """One optimizer step: chosen and rejected packed together, loss averaged over the global batch."""
    t0 = time.time()
    n_global = all_sum(len(batch), d.device)
    seqs = [s for prompt, c, r in batch for s in ((prompt, c), (prompt, r))]          # [2 * pairs]
    groups = synced_groups(policy, batch, args.token_budget, d.device)                 # (prompt, chosen, rejected)
    sums = torch.zeros(6, dtype=torch.float64)   # loss, accuracy, margin, chosen reward, logp chosen, logp rejected
    for gi, g in enumerate(groups):
        policy.set_requires_gradient_sync(gi == len(groups) - 1)
        part = [seqs[2 * i + j] for i in g for j in (0, 1)] or [([0], [0]), ([0], [0])]
        lps = [x.sum() for x in completion_logprobs(policy, part, d.device)]
        pc, pr = torch.stack(lps[0::2]), torch.stack(lps[1::2])                           # [pairs in group]
        if not g:
            (pc.sum() * 0.0).backward()                                                   # keeps FSDP in step
            continue
        rc = torch.tensor([pairs[i]["ref_chosen"] for i in g], device=pc.device)
        rr = torch.tensor([pairs[i]["ref_rejected"] for i in g], device=pc.device)
        lc = torch.tensor([float(len(batch[i][1])) for i in g], device=pc.device)
        lr_ = torch.tensor([float(len(batch[i][2])) for i in g], device=pc.device)
        loss, cr, rj = dpo_loss(pc, pr, rc, rr, args.beta, args.loss, args.label_smoothing, lc, lr_)
        (loss.sum() / n_global).backward()
        sums += torch.tensor([loss.sum().item(), (cr > rj).sum().item(), (cr - rj).sum().item(), cr.sum().item(),
                              pc.sum().item(), pr.sum().item()], dtype=torch.float64)
    tot = [all_sum(x, d.device) / max(n_global, 1) for x in sums.tolist()]
    norm, ok = apply_update(policy, optimizer, scheduler, args.grad_clip, tot[0])
    return {"loss": tot[0], "pref_accuracy": tot[1], "reward_margin": tot[2], "chosen_reward": tot[3],
            "logp_chosen": tot[4], "logp_rejected": tot[5], "grad_norm": norm, "skipped": not ok,
            "lr": scheduler.get_last_lr()[0], "time": time.time() - t0}


# ----------------------------------------------------------------------------- curves


def plot_run(run_dir):
    """RUN/curves.png for a DPO (OUT/train) or SFT (OUT/sft) run: loss, preference accuracy,
    margins, log-probs, validation (all users, closed-profile users, no-profile / template lines)."""
    m, v = "metrics.jsonl", "validation.jsonl"
    return plot_curves(run_dir, [
        ("loss", [(m, "loss", "DPO loss", "-"), (m, "nll", "SFT NLL per token", "-")]),
        ("preference accuracy", [(m, "pref_accuracy", "implicit reward chosen > rejected", "-")]),
        ("implicit reward", [(m, "reward_margin", "margin (chosen - rejected)", "-"), (m, "chosen_reward", "chosen", "--")]),
        ("summed log-probs", [(m, "logp_chosen", "chosen", "-"), (m, "logp_rejected", "rejected", "-")]),
        validation_panel(run_dir),
        ("validation format rate", [(v, "val_format_rate", "profile closed", "-")]),
        ("gradient norm", [(m, "grad_norm", "before clipping", "-")]),
    ], "DPO" if os.path.basename(os.path.normpath(run_dir)) != "sft" else "SFT warm start")


# ----------------------------------------------------------------------------- main


def parse_args(argv):
    p = ArgParser(description="LettinGo's explore -> evaluate -> pairs -> DPO pipeline. "
                                "No arguments: every stage on SmolLM2 and synthetic users (~2.5 min on 2 CPU cores, see README).")
    p.add_argument("stage", nargs="?", default="all", choices=["all", "explore", "evaluate", "pairs", "train", "sft"],
                   help="all = explore, evaluate, pairs, train (the paper); sft = warm start on the best explored profiles")
    a = p.add_argument
    a("--data", default=None, help="training samples JSONL (data/prepare.py train.jsonl)")
    a("--val-data", default=None, help="validation samples JSONL for the before/after metric")
    a("--out", default="runs/dpo", help="folder for profiles, scores, pairs and the training run")
    a("--model", default="smollm2-135m", help="the profile writer to align (and the DPO reference)")
    a("--models", default=None, help="explore: comma-separated generators (paths, aliases, http:// URLs, or 'template': the "
      "code-written template profile, one per user); default --model")
    a("--remote-model", default="default", help="model name sent to http:// generators")
    a("--users", type=at_least(0), default=0, help="explore: first N training samples (0 = all)")
    a("--n", type=at_least(1), default=10, help="explore: profiles per user per generator (paper: 10)")
    a("--temperature", type=at_least(0.0, float), default=1.0, help="explore: sampling temperature (paper: 1.0)")
    a("--top-p", type=at_least(0.0, float), default=1.0, help="explore: nucleus sampling (1 = off)")
    a("--max-new-tokens", type=at_least(1), default=256, help="profile budget (explore, validation)")
    a("--batch-size", type=at_least(1), default=32, help="rows decoded together")
    a("--judge", default="smollm2-135m", help="local judge model (or the model name sent to --judge-url)")
    a("--judge-url", default=None, help="OpenAI-compatible judge server")
    a("--judge-mode", default="expect", choices=["expect", "decode"], help="local judge: expected rating or greedy answer")
    a("--task", default="sentiment", choices=["sentiment", "rating"], help="pairs: which task's outcome (paper: sentiment)")
    a("--min-margin", type=at_least(0.0, float), default=0.125, help="rating pairs: min reward gap (0.125 = half a star)")
    a("--max-pairs-per-user", type=at_least(1), default=10, help="cap per user (a seeded sample; widest margins first for rating)")
    a("--sft-min-gain", type=float, default=0.0, help="sft: keep a user's best profile if its reward beats no profile by more")
    a("--pairs", default=None, help="train: a pairs JSONL")
    a("--beta", type=at_least(1e-9, float), default=0.1, help="DPO temperature beta (common default 0.1; the paper does not report it)")
    a("--loss", default="sigmoid", choices=["sigmoid", "ipo", "ipo-sum"],
      help="sigmoid = DPO; ipo = IPO on length-normalised log-probs (TRL); ipo-sum = IPO on summed log-probs")
    a("--label-smoothing", type=at_least(0.0, float), default=0.0, help="conservative DPO epsilon")
    a("--epochs", type=at_least(1), default=1, help="passes over the pairs (when --steps is 0)")
    a("--steps", type=at_least(0), default=0, help="optimizer steps (0 = --epochs over the pairs)")
    a("--pairs-per-step", type=at_least(1), default=8, help="pairs (or sft profiles) per optimizer step")
    a("--eval-every", type=at_least(1), default=20, help="validate every N steps (and at the end)")
    a("--val-users", type=at_least(0), default=64, help="validation users (0 = all in --val-data)")
    add_training_args(p, lr=1e-6, weight_decay=0.0, save_every=50)
    args = p.parse_args(argv)
    args.models = args.models or args.model
    args.rollout_batch_size = args.batch_size   # what validate() expects
    return args


DEMO = ["all", "--data", "runs/demo-data/train.jsonl", "--val-data", "runs/demo-data/val.jsonl", "--out", "runs/dpo-demo",
        "--users", "24", "--n", "4", "--max-new-tokens", "64", "--task", "rating", "--lr", "1e-5", "--pairs-per-step", "4",
        "--steps", "6", "--eval-every", "6", "--val-users", "16", "--token-budget", "4096"]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "plot":
        return plot_command(argv[1:], plot_run, "a DPO or SFT run folder (OUT/train, OUT/sft)")
    args = parse_args(argv or DEMO)
    output_folder(args.out)
    d = setup_distributed()
    torch.manual_seed(args.seed)
    if not argv and d.main:
        demo_data(os.path.dirname(args.data))
    dist.barrier()
    if not args.data:
        raise LettingoError("--data is required (training samples from data/prepare.py)")
    os.makedirs(args.out, exist_ok=True)
    stages = {"explore": explore, "evaluate": evaluate, "pairs": build_pairs, "train": train, "sft": sft}
    for name, fn in stages.items():
        if args.stage == name or (args.stage == "all" and name != "sft"):
            fn(args, d)              # a stage's models are freed when it returns
            dist.barrier()
    close_distributed()


if __name__ == "__main__":
    cli(main)
