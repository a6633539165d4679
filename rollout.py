"""rollout.py -- KV-cached batched sampling: one prefill per prompt (shared by its n samples), then
one fixed-shape decode step over a static cache, repeated -- replayed from a CUDA graph on GPU --
with per-row stopping. Returns the log-prob of every sampled token, which GRPO needs.

    python rollout.py --model smollm2-135m --data train.jsonl --n 4 --out profiles.jsonl
"""
from __future__ import annotations

import functools
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
    """One random stream per (prompt, sample): a row samples the same tokens whatever batch it is in,
    whichever rank runs it, and however prompts are chunked."""
    return (prompt_seed * 1_000_003 + sample * 7_919 + 12_345) % (2**63 - 1)


M32 = 0xFFFFFFFF


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) on int64 tensors holding values < 2**32. Each
    product is split into 16-bit halves so nothing overflows int64, on any device."""
    for shift, mul in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        x = x ^ (x >> shift)
        x = (x * (mul & 0xFFFF) + (((x * (mul >> 16)) & 0xFFFF) << 16)) & M32
    return x ^ (x >> 16)


def row_keys(seeds: list[int], device) -> torch.Tensor:
    """64-bit row seeds -> 32-bit hash keys [B] (int64)."""
    s = torch.tensor(seeds, dtype=torch.long, device=device)
    return mix32(mix32(s >> 32) ^ (s & M32))


def uniforms(keys: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Counter-based random numbers: u = hash(row key, step) in (0, 1), [B] fp32. No generator
    state, so a step needs no Python list of generators and can be replayed from a CUDA graph."""
    h = mix32(keys ^ mix32((step * 0x9E3779B9) & M32))
    return ((h >> 9).float() + 0.5) / 2**23                     # 23 bits + 0.5: exact in fp32, in (0, 1)


@torch.compiler.disable
def running_sum(probs):
    """cumsum, kept out of torch.compile: inductor (torch 2.11, H100) fails to generate its split
    scan over [64, 49152] ("list indices must be integers or slices, not NoneType"); eager, it is
    one kernel in the captured graph."""
    return probs.cumsum(-1)


def sample_next(logits, temperature, top_p, top_k, keys, step):
    """logits [B, V] fp32 -> (tokens [B], logprobs [B]). Inverse-CDF sampling with one counter-based
    uniform per row; log-probs are of softmax(logits / T) before top-k/top-p filtering (the
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
    cdf = running_sum(torch.softmax(filtered, -1))                               # [B, V]
    # the first token whose cdf reaches u * total (it has probability > 0: cdf rises there), i.e. the
    # number of tokens below it -- searchsorted's answer, as a sum that torch.compile fuses
    tokens = (cdf < (uniforms(keys, step) * cdf[:, -1])[:, None]).sum(-1)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)


def cpu_decode_layout(model: Transformer):
    """Store every linear weight [out, in] with transposed strides (same values, same shape): on CPU,
    MKL's matrix-vector product reads W in the nn.Linear layout at ~12 GB/s but the transposed one at
    ~20 GB/s (bench.py rollout, batch 1 and 32 both gain). Done once; in-place weight copies
    (train.sync_rollout_model) keep the layout; a tied head changes its embedding too (one tensor)."""
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear) and mod.weight.is_contiguous():
            mod.weight.data = mod.weight.data.t().contiguous().t()


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], *, n: int = 1, max_new_tokens: int = 256,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, stop: tuple[str, ...] = (),
             seed: int | list[int] | None = None, tokenizer=None, end_ids: set[int] | None = None,
             batch_size: int = 64, progress: bool = False, cuda_graphs: bool | None = None,
             compiled: bool | None = None) -> list[list[Sample]]:
    """Sample `n` continuations of every prompt (token id lists). Returns [prompt][sample].
    Prompts are sorted by length and cut into chunks of at most `batch_size` rows (n rows per prompt),
    so the cache is sized by each chunk's longest prompt + max_new_tokens. cuda_graphs (None: on
    when the model is on CUDA) replays captured decode steps; the graphs live on the model and
    stay valid while its weights are updated in place. compiled (None: with cuda_graphs) captures
    the torch.compile'd step (a compile per new shape, then automatic dynamic shapes)."""
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
    if model.lm_head.weight.device.type == "cpu":
        cpu_decode_layout(model)
    if cuda_graphs is None:
        cuda_graphs = model.lm_head.weight.is_cuda
    if compiled is None:
        compiled = cuda_graphs
    graphs = None
    if cuda_graphs:
        if not model.lm_head.weight.is_cuda:
            raise LettingoError("generate: cuda_graphs needs the model on CUDA")
        name = "decode_graphs_compiled" if compiled else "decode_graphs"
        if name not in model.__dict__:
            model.__dict__[name] = GraphedDecode(compiled=compiled)
        graphs = model.__dict__[name]
    out: list[list[Sample]] = [None] * len(prompts)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(prompts), desc="rollout", unit="prompt", file=sys.stderr)
    for c in range(0, len(order), per_chunk):
        idx = order[c:c + per_chunk]
        done = generate_chunk(model, [prompts[i] for i in idx], [seeds[i] for i in idx], n,
                              min(max_new_tokens, ctx - max(len(prompts[i]) for i in idx)),
                              temperature, top_p, top_k, stop, tokenizer, end_ids, graphs, compiled)
        for i, samples in zip(idx, done):
            out[i] = samples
        if bar:
            bar.update(len(idx))
    if bar:
        bar.close()
    return out


@dataclass
class DecodeState:
    """Everything one decode step reads and writes, on the device, in fixed shapes: B rows."""
    cache: KVCache
    logits: torch.Tensor        # [B, V] fp32: the next token's logits
    keys: torch.Tensor          # [B] int64: per-row random keys (row_keys)
    step: torch.Tensor          # [1] int64: tokens sampled so far
    tokens: torch.Tensor        # [B, max_new] sampled ids (a row's tail after its end is ignored)
    logprobs: torch.Tensor      # [B, max_new] fp32

    def rows(self, index: torch.Tensor) -> "DecodeState":
        return DecodeState(self.cache.rows(index), self.logits[index], self.keys[index], self.step.clone(),
                           self.tokens[index], self.logprobs[index])

    def load_(self, other: "DecodeState"):
        self.cache.load_(other.cache)
        for name in ("logits", "keys", "step", "tokens", "logprobs"):
            getattr(self, name).copy_(getattr(other, name))


def decode_step(model, st: DecodeState, temperature, top_p, top_k):
    """Sample one token per row, record it, and run the model on it: the same function runs eagerly
    (CPU) and is captured into a CUDA graph and replayed (GPU). No host sync: finished rows keep
    decoding (their tokens are ignored) until the host looks, every few steps."""
    tok, lp = sample_next(st.logits, temperature, top_p, top_k, st.keys, st.step)
    st.tokens.index_copy_(1, st.step, tok[:, None])
    st.logprobs.index_copy_(1, st.step, lp[:, None])
    st.logits.copy_(model(tok[:, None], cache=st.cache, last_only=True)[:, -1])
    st.step += 1


@functools.cache
def compiled_decode_step():
    """torch.compile(decode_step): the same function with its norms, rotary and sampling fused into
    fewer kernels. Captured in a CUDA graph it halved a 1-row SmolLM2-shaped step on an H100 (3.3 ->
    1.8 ms); on CPU it was slower than eager (bench.py rollout), so CPU decodes uncompiled unless
    asked. Compiled on first use for each new shape (~45 s there), then with automatic dynamic shapes."""
    return torch.compile(decode_step)


class GraphedDecode:
    """CUDA graphs of decode_step, one per (rows, cache length, sampling settings), replayed with
    one launch instead of ~1,000 kernel dispatches from Python (>95% of an eager step on an H100).
    The captured graph owns its DecodeState buffers; a chunk's state is copied in (`adopt`).
    compiled: capture compiled_decode_step() -- inside a graph each kernel still costs a few µs."""

    def __init__(self, keep: int = 16, compiled: bool = False):
        self.graphs, self.pool, self.keep = {}, None, keep     # the `keep` most recently used
        self.step = compiled_decode_step() if compiled else decode_step

    def first_call(self, model, st, settings):
        """A compiler failure (an inductor bug on some shape) costs speed, not the run: the
        uncompiled step is captured instead, and said so."""
        try:
            self.step(model, st, *settings)
        except Exception as e:
            if self.step is decode_step:
                raise
            print(f"rollout: torch.compile of the decode step failed ({type(e).__name__}: {str(e).strip()[-300:]}); "
                  "capturing the uncompiled step", file=sys.stderr, flush=True)
            self.step = decode_step
            self.step(model, st, *settings)

    def adopt(self, model, st: DecodeState, settings) -> tuple[DecodeState, "torch.cuda.CUDAGraph"]:
        key = (st.tokens.shape, st.cache.k.shape, settings)
        if key not in self.graphs:
            static = st.rows(torch.arange(len(st.keys), device=st.keys.device))    # own buffers
            self.pool = self.pool or torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):                     # warm-up outside the graph (allocator, kernels)
                self.first_call(model, static, settings)      # (compiles)
                self.step(model, static, *settings)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.step(model, static, *settings)
            self.graphs[key] = (static, graph)
            if len(self.graphs) > self.keep:
                self.graphs.pop(next(iter(self.graphs)))
        static, graph = self.graphs[key] = self.graphs.pop(key)       # most recent last
        static.load_(st)
        return static, graph


def bucket(n: int, graphs) -> int:
    """Rows a decode batch is padded to: exact on CPU; powers of two with graphs (few captures)."""
    return n if not graphs else 1 << (n - 1).bit_length()


def generate_chunk(model, prompts, seeds, n, max_new, temperature, top_p, top_k, stop, tokenizer, end_ids, graphs,
                   compiled=False):
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    P = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), P, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), P, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):                       # left padding: all prompts end at slot P-1
        tokens[i, P - len(p):] = torch.tensor(p, device=device)
        mask[i, P - len(p):] = True
    L = -(-(P + max_new) // 64) * 64                      # cache length rounded: fewer graph shapes
    cache = KVCache(model.cfg, len(prompts), L, dtype, device)
    logits = model(tokens, mask=mask, cache=cache, last_only=True)[:, -1]   # one prefill per prompt
    B = len(prompts) * n
    rows = list(range(B))                                 # result index per decode row (None: padding)
    rows += [None] * (bucket(B, graphs) - B)
    index = torch.tensor([min(r, B - 1) // n for r in range(len(rows))], device=device)   # the group shares
    st = DecodeState(cache.rows(index), logits.float()[index],                             # its prefill
                     row_keys([row_seed(seeds[r // n], r % n) for r in range(B)] + [0] * (len(rows) - B), device),
                     torch.zeros(1, dtype=torch.long, device=device),
                     torch.zeros(len(rows), max_new, dtype=torch.long, device=device),
                     torch.zeros(len(rows), max_new, dtype=torch.float32, device=device))
    settings = (temperature, top_p, top_k)
    graph, step_fn = None, compiled_decode_step() if compiled else decode_step
    if graphs:
        st, graph = graphs.adopt(model, st, settings)
    results = [Sample([], [], prompt_tokens=len(prompts[r // n])) for r in range(B)]
    window = max((len(s) for s in stop), default=0) + 8
    every = 8 if graphs else 1                            # host looks at the tokens every `every` steps
    step = seen = 0
    end_set = set(end_ids)
    while step < max_new:
        for _ in range(min(every, max_new - step)):
            if graph:
                graph.replay()
            else:
                step_fn(model, st, *settings)
            step += 1
        new_t, new_lp = st.tokens[:, seen:step].tolist(), st.logprobs[:, seen:step].tolist()   # one sync
        seen = step
        for j, r in enumerate(rows):
            if r is not None and extend(results[r], new_t[j], new_lp[j], end_set, stop, tokenizer, window):
                rows[j] = None                            # this row is done
        live = [j for j, r in enumerate(rows) if r is not None]
        if not live or step == max_new:
            break
        if bucket(len(live), graphs) <= len(rows) // 2:   # compact: copying the cache costs, so only
            keep = live + [live[0]] * (bucket(len(live), graphs) - len(live))    # when it halves the batch
            st = st.rows(torch.tensor(keep, device=device))
            rows = [rows[j] for j in live] + [None] * (len(keep) - len(live))
            if graphs:
                st, graph = graphs.adopt(model, st, settings)
    return [[finalize(results[i * n + j], tokenizer, stop) for j in range(n)] for i in range(len(prompts))]


def extend(res: Sample, toks, lps, end_ids, stop, tokenizer, window) -> bool:
    """Append new tokens to a row's result up to its end (an end token, or the token that completes
    a stop string). Returns True when the row has ended."""
    cut = next((i + 1 for i, t in enumerate(toks) if t in end_ids), len(toks))
    if stop and any(s in tokenizer.decode(res.tokens[-window:] + toks[:cut]) for s in stop):
        for t, lp in zip(toks[:cut], lps):                # rare: find the token that completes it
            res.tokens.append(t)
            res.logprobs.append(lp)
            if t in end_ids:
                break
            if any(s in tokenizer.decode(res.tokens[-window:]) for s in stop):   # may end inside a token
                res.finish = "stop"
                return True
    else:
        res.tokens += toks[:cut]
        res.logprobs += lps[:cut]
    if cut and toks[cut - 1] in end_ids:
        res.finish = "eos"
        return True
    return False


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
