"""rollout.py -- KV-cached batched sampling: one prefill per prompt (shared by its n samples), then a
decode loop over a static cache with per-row stopping. Returns the log-prob of every sampled token,
which GRPO needs.

    python rollout.py --model smollm2-135m --data train.jsonl --n 4 --out profiles.jsonl
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

import torch

from lettingo import (ArgParser, KVCache, LettingoError, at_least, output_file, check_samples, Transformer, chat_prompt, cli, extract_tag, load_model,
                      profile_answer, profile_prompt, read_jsonl)

END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>")


@dataclass
class Sample:
    tokens: list[int]                      # generated ids (including the final EOS, if any)
    logprobs: list[float]                  # log p(token) under the tempered, unfiltered distribution
    finish: str = "length"                 # "eos" | "stop" | "length"
    text: str = ""                         # decoded (up to and including a stop string)
    prompt_tokens: int = 0


def end_token_ids(tokenizer) -> set[int]:
    """EOS plus the chat end-of-turn tokens this tokenizer knows."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    return ids | {vocab[t] for t in END_TOKENS if t in vocab}


def row_seed(prompt_seed: int, sample: int) -> int:
    """One RNG stream per (prompt, sample): a row samples the same tokens whatever batch it is in,
    whichever rank runs it, and however prompts are chunked."""
    return (prompt_seed * 1_000_003 + sample * 7_919 + 12_345) % (2**63 - 1)


def sample_next(logits, temperature, top_p, top_k, generators):
    """logits [B, V] fp32 -> (tokens [B], logprobs [B]). Sampling uses the Gumbel-max trick with
    per-row generators; log-probs are of softmax(logits / T) before top-k/top-p filtering (the
    distribution the trainer differentiates)."""
    if temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1)
    logits = logits / temperature
    logp = torch.log_softmax(logits, -1)
    filtered = logits
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if top_p < 1.0:
        probs, order = torch.sort(torch.softmax(filtered, -1), dim=-1, descending=True)
        drop = probs.cumsum(-1) - probs > top_p          # keep the smallest set reaching top_p
        filtered = filtered.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    u = torch.stack([torch.rand(logits.shape[-1], generator=g, device=logits.device) for g in generators])
    tokens = (filtered - torch.log(-torch.log(u.clamp_min(1e-20)))).argmax(-1)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], *, n: int = 1, max_new_tokens: int = 256,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, stop: tuple[str, ...] = (),
             seed: int | list[int] | None = None, tokenizer=None, end_ids: set[int] | None = None,
             batch_size: int = 64, progress: bool = False) -> list[list[Sample]]:
    """Sample `n` continuations of every prompt (token id lists). Returns [prompt][sample].
    Prompts are sorted by length and cut into chunks of at most `batch_size` rows (n rows per prompt),
    so the cache is sized by each chunk's longest prompt + max_new_tokens."""
    if not prompts:
        raise LettingoError("generate: empty prompt list")
    if any(len(p) == 0 for p in prompts):
        raise LettingoError("generate: a prompt has no tokens")
    ctx = model.cfg.max_position_embeddings
    too_long = [i for i, p in enumerate(prompts) if len(p) >= ctx]
    if too_long:
        raise LettingoError(f"generate: prompt {too_long[0]} has {len(prompts[too_long[0]])} tokens, "
                            f"the model's context is {ctx} ({len(too_long)} prompts too long)")
    if stop and tokenizer is None:
        raise LettingoError("generate: stop strings need the tokenizer")
    if end_ids is None:
        end_ids = end_token_ids(tokenizer) if tokenizer is not None else set()
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()))           # follows torch.manual_seed
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed + i for i in range(len(prompts))]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    per_chunk = max(1, batch_size // n)
    out: list[list[Sample]] = [None] * len(prompts)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(prompts), desc="rollout", unit="prompt", file=sys.stderr)
    for c in range(0, len(order), per_chunk):
        idx = order[c:c + per_chunk]
        done = generate_chunk(model, [prompts[i] for i in idx], [seeds[i] for i in idx], n,
                              min(max_new_tokens, ctx - max(len(prompts[i]) for i in idx)),
                              temperature, top_p, top_k, stop, tokenizer, end_ids)
        for i, samples in zip(idx, done):
            out[i] = samples
        if bar:
            bar.update(len(idx))
    if bar:
        bar.close()
    return out


def generate_chunk(model, prompts, seeds, n, max_new, temperature, top_p, top_k, stop, tokenizer, end_ids):
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    lens = torch.tensor([len(p) for p in prompts], device=device)
    P, B = int(lens.max()), len(prompts) * n
    tokens = torch.zeros(len(prompts), P, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), P, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):                       # left padding: all prompts end at slot P-1
        tokens[i, P - len(p):] = torch.tensor(p, device=device)
        mask[i, P - len(p):] = True
    cache = KVCache(model.cfg, len(prompts), P + max_new, dtype, device)
    logits = model(tokens, mask=mask, cache=cache, last_only=True)[:, -1]   # one prefill per prompt
    if n > 1:                                             # the group shares it: copy rows n times
        cache, logits, lens = cache.repeat_interleave(n), logits.repeat_interleave(n, 0), lens.repeat_interleave(n)
    gens = [torch.Generator(device=device).manual_seed(row_seed(s, j)) for s in seeds for j in range(n)]
    results = [Sample([], [], prompt_tokens=int(lens[r])) for r in range(B)]
    rows, live = list(range(B)), [True] * B               # result index / still sampling, per cache row
    stop_window = max((len(s) for s in stop), default=0) + 8
    for step in range(max_new):
        nxt, lp = sample_next(logits, temperature, top_p, top_k, [gens[r] for r in rows])
        for j, (t, l) in enumerate(zip(nxt.tolist(), lp.tolist())):
            if not live[j]:
                continue
            res = results[rows[j]]
            res.tokens.append(t)
            res.logprobs.append(l)
            if t in end_ids:
                res.finish = "eos"
            elif stop and any(s in tokenizer.decode(res.tokens[-stop_window:]) for s in stop):
                res.finish = "stop"                       # the string may end inside this token
            else:
                continue
            live[j] = False
        n_live = sum(live)
        if n_live == 0 or step == max_new - 1:
            break                                         # every row is done: stop early
        if n_live <= len(rows) // 2:                      # compact once half the rows are done:
            keep = torch.tensor(live, device=device)      # copying the cache costs, so not every step
            cache, nxt, lens = cache.select(keep), nxt[keep], lens[keep]
            rows, live = [r for r, l in zip(rows, live) if l], [True] * n_live
        logits = model(nxt[:, None], cache=cache, positions=(lens + step)[:, None], last_only=True)[:, -1]
    return [[finalize(results[i * n + j], tokenizer, stop) for j in range(n)] for i in range(len(prompts))]


def finalize(res: Sample, tokenizer, stop) -> Sample:
    if tokenizer is not None:
        body = res.tokens[:-1] if res.finish == "eos" else res.tokens
        res.text = tokenizer.decode(body, skip_special_tokens=False)
        if res.finish == "stop":                          # cut right after the first stop string
            cut = min(res.text.find(s) + len(s) for s in stop if s in res.text)
            res.text = res.text[:cut]
    return res


def prompt_of(row: dict, tokenizer) -> list[int]:
    """A LettinGo sample (has `history`) gets the profile-writer prompt; else its `messages`."""
    if "history" in row:
        return profile_prompt(tokenizer, row)
    if isinstance(row.get("messages"), list):
        return chat_prompt(tokenizer, row["messages"])
    raise LettingoError("a row has neither `history` (a LettinGo sample) nor `messages` (a chat)")


def main():
    p = ArgParser(description="Sample user profiles (or any chat completions) with a KV-cached "
                                "batched sampler and write them as JSONL.")
    p.add_argument("--model", default="smollm2-135m", help="HF folder, .gguf file or alias")
    p.add_argument("--data", required=True, help="JSONL of LettinGo samples (data/prepare.py) or rows with `messages`")
    p.add_argument("--out", required=True, help="output JSONL, one line per input row")
    p.add_argument("--n", type=at_least(1), default=1, help="samples per prompt; they share one prefill")
    p.add_argument("--max-new-tokens", type=at_least(1), default=256, help="generation budget per sample")
    p.add_argument("--temperature", type=at_least(0.0, float), default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=at_least(0.0, float), default=1.0, help="nucleus sampling mass (1.0 = off)")
    p.add_argument("--top-k", type=at_least(0), default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--stop", action="append", default=None,
                   help="stop string, repeatable (none given: </user_profile>)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; same seed, same output")
    p.add_argument("--batch-size", type=at_least(1), default=32, help="max rows decoded together (prompts x n)")
    p.add_argument("--limit", type=at_least(0), default=0, help="only the first N rows (0 = all)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (none: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--device", default=None, help="cpu or cuda (none: cuda when available)")
    args = p.parse_args()
    output_file(args.out)
    rows = read_jsonl(args.data)[:args.limit or None]
    for i, r in enumerate(rows, 1):
        if "history" in r:
            check_samples(rows, args.data)   # LettinGo samples: all of them complete
            break
        if not isinstance(r.get("messages"), list):
            raise LettingoError(f"{args.data}: row {i} has neither `history` (a LettinGo sample) nor `messages` (a chat)")
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype) if args.dtype else None, device=args.device)
    stop = tuple(args.stop or ["</user_profile>"])
    prompts = [prompt_of(r, tok) for r in rows]
    t0 = time.time()
    outs = generate(model, prompts, n=args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, top_k=args.top_k, stop=stop, seed=args.seed, tokenizer=tok,
                    batch_size=args.batch_size, progress=True)
    dt = time.time() - t0
    with open(args.out, "w") as f:
        for row, prompt, samples in zip(rows, prompts, outs):
            f.write(json.dumps({
                "user_id": row.get("user_id"), "item_id": row.get("item_id"),
                "prompt": tok.decode(prompt), "prompt_tokens": len(prompt),
                "generations": [{"text": text, "profile": extract_tag(text, "user_profile"), "tokens": len(s.tokens),
                                 "finish": s.finish} for s in samples
                                for text in [profile_answer(s.text, s.finish) if "history" in row else s.text]]}) + "\n")
    gen = sum(len(s.tokens) for ss in outs for s in ss)
    print(f"{len(rows)} prompts x {args.n} samples -> {args.out}: {dt:.1f}s, "
          f"{len(rows) / dt:.2f} prompts/s, {gen / dt:.1f} generated tokens/s")


if __name__ == "__main__":
    cli(main)
