"""rollout.py -- KV-cached batched sampling: one prefill per prompt (shared by its n samples), then
one fixed-shape decode step over a static cache, repeated -- replayed from a CUDA graph on GPU --
with per-row stopping. Each sampled token comes with its log-prob under the sampling distribution.

    python rollout.py --model smollm2-135m --data train.jsonl --n 4 --out profiles.jsonl
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from lettingo import (DEFAULT_MODEL, PROFILE_CLOSE, ArgParser, KVCache, LettingoError, Stopped, Transformer,
                      add_config, chat_prompt, check_samples, cli, config_from, extract_tag, load_model,
                      option, output_file, profile_answer, profile_prompt, read_jsonl)

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


def turn_end_id(tokenizer) -> int:
    """The token that ends an assistant turn in the tokenizer's chat template (<|im_end|> in ChatML,
    <|eot_id|> in Llama 3): what the writer emits after a complete profile, so what SFT and DPO train
    and score it with -- not any other end token the vocabulary has (SmolLM2's <|endoftext|>)."""
    mark = "lettingo-turn"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "a"},
                                          {"role": "assistant", "content": mark}], tokenize=False)
    after = tokenizer(text[text.rindex(mark) + len(mark):], add_special_tokens=False)["input_ids"]
    ends = end_token_ids(tokenizer)
    found = [t for t in after if t in ends]
    if found:
        return found[0]
    if tokenizer.eos_token_id is None:
        raise LettingoError("the tokenizer's chat template ends a turn with no known end token, "
                            "and it has no EOS")
    return tokenizer.eos_token_id


def prompt_seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of example `index` at training step `step` (exploration: step 0):
    independent of rank count and batch layout."""
    return (seed * 1_000_003 + step * 100_003 + index) % (2**62)


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


def uniforms(keys: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Counter-based random numbers: u = hash(row key, t) in (0, 1), [B] fp32, t = tokens sampled so
    far. No generator state, so a decode step needs no Python list of generators and can be replayed
    from a CUDA graph."""
    h = mix32(keys ^ mix32((t * 0x9E3779B9) & M32))
    return ((h >> 9).float() + 0.5) / 2**23                     # 23 bits + 0.5: exact in fp32, in (0, 1)


@torch.compiler.disable
def running_sum(probs):
    """cumsum, kept out of torch.compile: inductor fails to generate its split scan over a wide
    vocabulary ("list indices must be integers or slices, not NoneType"); eager, it is one kernel
    in the captured graph."""
    return probs.cumsum(-1)


def sample_next(logits, temperature, top_p, top_k, keys, t):
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
    tokens = (cdf < (uniforms(keys, t) * cdf[:, -1])[:, None]).sum(-1)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)


def cpu_decode_layout(model: Transformer) -> Transformer:
    """For a model that samples on CPU: every linear weight [out, in] stored with transposed strides
    (same values, same shape), the layout MKL's matrix-vector product reads fastest (bench.py
    rollout). Applied once where a sampling model is made; in-place weight copies
    (train.Policy.sync) keep it; a tied head changes its embedding too (one tensor)."""
    if model.lm_head.weight.device.type == "cpu":
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear) and mod.weight.is_contiguous():
                mod.weight.data = mod.weight.data.t().contiguous().t()
    return model


@dataclass
class SamplingParams:
    n: int = option(1, "samples per prompt; they share one prefill", min=1)
    max_new_tokens: int = option(896, "generation budget per sample (the profile budget everywhere)",
                                 source="public code's response length", min=1)
    temperature: float = option(1.0, "0 = greedy", min=0.0)
    top_p: float = option(1.0, "nucleus sampling mass (1 = off)", min=0.0)
    top_k: int = option(0, "keep the k most likely tokens (0 = off)", min=0)
    batch_size: int = option(64, "rows decoded together (prompts x n); the KV cache holds this many rows of "
                             "prompt + max_new_tokens", min=1)
    stop: tuple[str, ...] = ()             # a row ends right after the first of these strings


class Sampler:
    """Samples from one model and owns what sampling keeps between calls: the CUDA graphs of the
    decode step (on GPU), which stay valid while the model's weights are updated in place.
    cuda_graphs (None: on when the model is on CUDA) replays captured decode steps; compiled (None:
    with cuda_graphs) captures the torch.compile'd step (a compile per new shape, then automatic
    dynamic shapes). bucketed: decode batches padded to powers of two and read every 8 steps, as
    with graphs (on by itself only to test that path on CPU)."""

    def __init__(self, model: Transformer, cuda_graphs: bool | None = None, compiled: bool | None = None,
                 bucketed: bool = False):
        self.model = model
        cuda_graphs = model.lm_head.weight.is_cuda if cuda_graphs is None else cuda_graphs
        if cuda_graphs and not model.lm_head.weight.is_cuda:
            raise LettingoError("Sampler: cuda_graphs needs the model on CUDA")
        self.compiled = cuda_graphs if compiled is None else compiled
        self.graphs = GraphedDecode(compiled=self.compiled) if cuda_graphs else None
        self.bucketed = bucketed or cuda_graphs
        self.decode = compiled_decode_step() if self.compiled else decode_step

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, *,
                 seed: int | list[int] | None = None, tokenizer=None, end_ids: set[int] | None = None,
                 progress: bool = False,
                 shared: list[int] | None = None) -> list[list[Sample]]:
        """`params.n` continuations of every prompt (token id lists) -> [prompt][sample]. Prompts
        are sorted by length and cut into chunks of at most `params.batch_size` rows (n rows per prompt),
        so the cache is sized by each chunk's longest prompt + max_new_tokens. seed: one per prompt
        (a list), or the first of consecutive ones; a prompt samples the same tokens in any batch.
        shared: per prompt, how many of its first tokens it shares with other prompts (one profile's
        judge targets): a chunk prefills each distinct such prefix once."""
        ctx = self.model.cfg.max_position_embeddings
        check_prompts(prompts, ctx)
        if params.stop and tokenizer is None:
            raise LettingoError("generate: stop strings need the tokenizer")
        if end_ids is None:
            end_ids = end_token_ids(tokenizer) if tokenizer is not None else set()
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))           # follows torch.manual_seed
        seeds = (list(seed) if isinstance(seed, (list, tuple))
                 else [prompt_seed(seed, 0, i) for i in range(len(prompts))])    # as dpo.py explore's
        shared = shared or [0] * len(prompts)
        if len(shared) != len(prompts) or any(not 0 <= k < len(p) for k, p in zip(shared, prompts)):
            raise LettingoError("generate: `shared` needs one prefix length per prompt, shorter than it")
        # prompts with the same prefix next to each other, so they share a chunk
        order = sorted(range(len(prompts)),
                       key=lambda i: (shared[i], prompts[i][:shared[i]], len(prompts[i])))
        per_chunk = max(1, params.batch_size // params.n)
        out: list[list[Sample]] = [None] * len(prompts)
        bar = tqdm(desc="rollout", unit="tok", file=sys.stderr, disable=not progress, leave=False)
        for c in range(0, len(order), per_chunk):
            idx = order[c:c + per_chunk]
            max_new = min(params.max_new_tokens, ctx - max(len(prompts[i]) for i in idx))
            done = self.chunk([prompts[i] for i in idx], [seeds[i] for i in idx], params, max_new, tokenizer,
                              set(end_ids), [shared[i] for i in idx], bar)
            for i, samples in zip(idx, done):
                out[i] = samples
        bar.close()
        return out

    def rows(self, n: int) -> int:
        """Rows a decode batch is padded to: exact, or powers of two (few graph captures)."""
        return 1 << (n - 1).bit_length() if self.bucketed else n

    def prefill(self, prompts, shared, max_new) -> tuple[KVCache, torch.Tensor]:
        """Each distinct shared prefix once, then the rest of every prompt, into a KV cache with room
        for max_new more tokens. -> (cache [P rows], next-token logits [P, V] of each prompt)"""
        model = self.model
        device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
        heads = list(dict.fromkeys(tuple(p[:k]) for p, k in zip(prompts, shared)))   # distinct prefixes
        tails = [p[k:] for p, k in zip(prompts, shared)]
        Th, Tt = max(len(h) for h in heads), max(len(t) for t in tails)
        cache = KVCache(model.cfg, len(heads) if Th else len(prompts), -(-(Th + Tt + max_new) // 64) * 64,
                        dtype, device)
        if Th:             # [H, Th], each prefix once; its cache rows copied to the prompts that share it
            head_tokens, head_mask = left_pad([list(h) for h in heads], device)
            model(head_tokens, mask=head_mask, cache=cache, last_only=True)
            cache = cache.rows(torch.tensor([heads.index(tuple(p[:k])) for p, k in zip(prompts, shared)],
                                            device=device))
        tokens, mask = left_pad(tails, device)                                 # [P, Tt]: all end at Tt-1
        return cache, model(tokens, mask=mask, cache=cache, last_only=True)[:, -1]

    def chunk(self, prompts, seeds, params: SamplingParams,
              max_new, tokenizer, end_ids, shared, bar) -> list[list[Sample]]:
        """One batch: prefill, copy each prompt's cache to its n rows, decode until every row has
        ended, dropping finished rows from the batch whenever that halves it; `bar` (tqdm) counts the
        tokens kept."""
        model, n, stop = self.model, params.n, params.stop
        device = model.lm_head.weight.device
        cache, logits = self.prefill(prompts, shared, max_new)
        B = len(prompts) * n
        rows = list(range(B)) + [None] * (self.rows(B) - B)   # result index per decode row (None: padding)
        index = torch.tensor([min(r, B - 1) // n for r in range(len(rows))], device=device)   # row -> prompt
        st = DecodeState(cache.rows(index), logits.float()[index],
                         row_keys([row_seed(seeds[r // n], r % n) for r in range(B)] + [0] * (len(rows) - B),
                                  device),
                         torch.zeros(1, dtype=torch.long, device=device),
                         torch.zeros(len(rows), max_new, dtype=torch.long, device=device),
                         torch.zeros(len(rows), max_new, dtype=torch.float32, device=device))
        settings = (params.temperature, params.top_p, params.top_k)
        graph = None
        if self.graphs:
            st, graph = self.graphs.adopt(model, st, settings)
        results = [Sample([], [], prompt_tokens=len(prompts[r // n])) for r in range(B)]
        window = max((len(s) for s in stop), default=0) + 8
        every = 8 if self.bucketed else 1                 # the host reads the tokens every `every` steps
        t = seen = counted = 0                            # t: tokens sampled so far
        while t < max_new:
            for _ in range(min(every, max_new - t)):
                if graph:
                    graph.replay()
                else:
                    self.decode(model, st, *settings)
                t += 1
            new_t, new_lp = st.tokens[:, seen:t].tolist(), st.logprobs[:, seen:t].tolist()   # one sync
            seen = t
            for j, r in enumerate(rows):
                if r is not None and extend(results[r], new_t[j], new_lp[j], end_ids, stop, tokenizer,
                                            window):
                    rows[j] = None                        # this row is done
            kept = sum(len(s.tokens) for s in results)
            bar.update(kept - counted)
            counted = kept
            live = [j for j, r in enumerate(rows) if r is not None]
            if not live or t == max_new:
                break
            if self.rows(len(live)) <= len(rows) // 2:    # compact: copying the cache costs, so only
                keep = live + [live[0]] * (self.rows(len(live)) - len(live))     # when it halves the batch
                st = st.rows(torch.tensor(keep, device=device))
                rows = [rows[j] for j in live] + [None] * (len(keep) - len(live))
                if self.graphs:
                    st, graph = self.graphs.adopt(model, st, settings)
        return [[finalize(results[i * n + j], tokenizer, stop) for j in range(n)]
                for i in range(len(prompts))]


def generate(model: Transformer, prompts: list[list[int]], *, cuda_graphs: bool | None = None,
             compiled: bool | None = None, seed: int | list[int] | None = None, tokenizer=None,
             end_ids: set[int] | None = None, **params) -> list[list[Sample]]:
    """One-off sampling: Sampler(model).generate with SamplingParams(**params) (a caller that samples
    again keeps its Sampler)."""
    return Sampler(model, cuda_graphs, compiled).generate(prompts, SamplingParams(**params), seed=seed,
                                                          tokenizer=tokenizer, end_ids=end_ids)


def check_prompts(prompts: list[list[int]], ctx: int):
    if not prompts:
        raise LettingoError("generate: empty prompt list")
    if any(len(p) == 0 for p in prompts):
        raise LettingoError("generate: a prompt has no tokens")
    too_long = [i for i, p in enumerate(prompts) if len(p) >= ctx]
    if too_long:
        raise LettingoError(f"generate: prompt {too_long[0]} has {len(prompts[too_long[0]])} tokens, "
                            f"the model's context is {ctx} ({len(too_long)} prompts too long)")


def left_pad(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (tokens [B, T], mask [B, T] of real tokens), left padded: every prompt ends
    at the last position, where the next token is predicted."""
    T = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), T, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), T, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, T - len(p):] = torch.tensor(p, device=device)
        mask[i, T - len(p):] = True
    return tokens, mask


@dataclass
class DecodeState:
    """Everything one decode step reads and writes, on the device, in fixed shapes: B rows."""
    cache: KVCache
    logits: torch.Tensor        # [B, V] fp32: the next token's logits
    keys: torch.Tensor          # [B] int64: per-row random keys (row_keys)
    t: torch.Tensor             # [1] int64: tokens sampled so far (the decode counter)
    tokens: torch.Tensor        # [B, max_new] sampled ids (a row's tail after its end is ignored)
    logprobs: torch.Tensor      # [B, max_new] fp32

    def rows(self, index: torch.Tensor) -> "DecodeState":
        return DecodeState(self.cache.rows(index), self.logits[index], self.keys[index], self.t.clone(),
                           self.tokens[index], self.logprobs[index])

    def load_(self, other: "DecodeState"):
        self.cache.load_(other.cache)
        for name in ("logits", "keys", "t", "tokens", "logprobs"):
            getattr(self, name).copy_(getattr(other, name))


def decode_step(model, st: DecodeState, temperature, top_p, top_k):
    """Sample one token per row, record it, and run the model on it: the same function runs eagerly
    (CPU) and is captured into a CUDA graph and replayed (GPU). No host sync: finished rows keep
    decoding (their tokens are ignored) until the host looks, every few steps."""
    tok, lp = sample_next(st.logits, temperature, top_p, top_k, st.keys, st.t)
    st.tokens.index_copy_(1, st.t, tok[:, None])
    st.logprobs.index_copy_(1, st.t, lp[:, None])
    st.logits.copy_(model(tok[:, None], cache=st.cache, last_only=True)[:, -1])
    st.t += 1


@functools.cache
def compiled_decode_step():
    """torch.compile(decode_step): the same function with its norms, rotary and sampling fused into
    fewer kernels, which a CUDA graph replays with fewer launches (README: bench.py rollout on GPU);
    on CPU it is slower than eager, so CPU decodes uncompiled unless asked. Compiled on first use
    for each new shape, then with automatic dynamic shapes."""
    return torch.compile(decode_step)


class GraphedDecode:
    """CUDA graphs of decode_step, one per (rows, cache length, sampling settings), replayed with
    one launch instead of a kernel dispatch from Python per operation (most of an eager step's time).
    The captured graph owns its DecodeState buffers; a chunk's state is copied in (`adopt`).
    compiled: capture compiled_decode_step() -- inside a graph each kernel still costs a few µs."""

    def __init__(self, keep: int = 16, compiled: bool = False):
        self.graphs, self.pool, self.keep = {}, None, keep     # the `keep` most recently used
        self.decode = compiled_decode_step() if compiled else decode_step

    def first_call(self, model, st, settings):
        """A compiler failure (an inductor bug on some shape) costs speed, not the run: the
        uncompiled step is captured instead, and said so."""
        try:
            self.decode(model, st, *settings)
        except Exception as e:
            if self.decode is decode_step:
                raise
            print("rollout: torch.compile of the decode step failed "
                  f"({type(e).__name__}: {str(e).strip()[-300:]}); "
                  "capturing the uncompiled step", file=sys.stderr, flush=True)
            self.decode = decode_step
            self.decode(model, st, *settings)

    def adopt(self, model, st: DecodeState, settings) -> tuple[DecodeState, "torch.cuda.CUDAGraph"]:
        key = (st.tokens.shape, st.cache.k.shape, settings)
        if key not in self.graphs:
            static = st.rows(torch.arange(len(st.keys), device=st.keys.device))    # own buffers
            self.pool = self.pool or torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):                     # warm-up outside the graph (allocator, kernels)
                self.first_call(model, static, settings)      # (compiles)
                self.decode(model, static, *settings)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.decode(model, static, *settings)
            self.graphs[key] = (static, graph)
            if len(self.graphs) > self.keep:
                self.graphs.pop(next(iter(self.graphs)))
        static, graph = self.graphs[key] = self.graphs.pop(key)       # most recent last
        static.load_(st)
        return static, graph


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


@dataclass
class RolloutConfig(SamplingParams):
    """python rollout.py: every row of a JSONL file sampled, written as it finishes."""
    model: str = option(DEFAULT_MODEL, "HF folder, .gguf file or alias")
    data: str = option(None, "JSONL of LettinGo samples (data/prepare.py) or rows with `messages`", kind=str,
                       required=True)
    out: str = option(None, "output JSONL, one line per input row", kind=str, required=True)
    seed: int = option(0, "sampling seed; same seed, same output")
    limit: int = option(0, "only the first N rows (0 = all)", min=0)
    dtype: str | None = option(None, "weights dtype (none: bfloat16 on CUDA, float32 on CPU)", kind=str,
                               choices=("float32", "bfloat16", "float16"))
    device: str | None = option(None, "cpu or cuda (none: cuda when available)", kind=str)
    resume: bool = option(False, "keep the rows --out already holds (a stopped run's) and sample the rest")


def main():
    p = ArgParser(description="Sample user profiles (or any chat completions) with a KV-cached "
                              "batched sampler and write them as JSONL.")
    add_config(p, RolloutConfig, skip=("stop",))
    p.add_argument("--stop", action="append", default=None,
                   help="stop string, repeatable (none given: </user_profile>)")
    args = p.parse_args()
    sample_file(config_from(RolloutConfig, args, stop=tuple(args.stop or [PROFILE_CLOSE])))


def sample_file(cfg: RolloutConfig):
    """cfg.n samples of every row of cfg.data -> cfg.out, one line per row, in the rows' order."""
    output_file(cfg.out)
    done = complete_rows(cfg.out) if cfg.resume else 0
    rows = read_jsonl(cfg.data)[:cfg.limit or None]
    for i, r in enumerate(rows, 1):
        if "history" not in r and not isinstance(r.get("messages"), list):
            raise LettingoError(f"{cfg.data}: row {i} has neither `history` (a LettinGo sample) "
                                "nor `messages` (a chat)")
    if any("history" in r for r in rows):
        check_samples(rows, cfg.data)                    # LettinGo samples: all of them complete
    model, tok = load_model(cfg.model, dtype=getattr(torch, cfg.dtype) if cfg.dtype else None,
                            device=cfg.device)
    prompts = [prompt_of(r, tok) for r in rows]
    sampler, chunk = Sampler(cpu_decode_layout(model)), max(1, cfg.batch_size // cfg.n)
    t0, generated = time.time(), 0
    # written chunk by chunk, each prompt with its own seed: a stopped run keeps its rows, and
    # --resume samples the rest exactly as one uninterrupted run would have
    with open(cfg.out, "a" if done else "w") as f, tqdm(total=len(rows), initial=done, unit="prompt",
                                                       desc="rollout", file=sys.stderr) as bar:
        try:
            for start in range(done, len(rows), chunk):
                idx = range(start, min(start + chunk, len(rows)))
                outs = sampler.generate([prompts[i] for i in idx], cfg, tokenizer=tok,
                                        seed=[prompt_seed(cfg.seed, 0, i) for i in idx])
                for i, samples in zip(idx, outs):
                    f.write(json.dumps(profile_row(rows[i], prompts[i], samples, tok)) + "\n")
                    generated += sum(len(s.tokens) for s in samples)
                f.flush()
                bar.update(len(idx))
        except KeyboardInterrupt:
            raise Stopped(f"{complete_rows(cfg.out)} of {len(rows)} rows are in {cfg.out}: the same "
                          "command with --resume samples the rest") from None
    dt = time.time() - t0
    print(f"{len(rows) - done} prompts x {cfg.n} samples -> {cfg.out}: {dt:.1f}s, "
          f"{(len(rows) - done) / dt:.2f} prompts/s, {generated / dt:.1f} generated tokens/s")


def profile_row(row: dict, prompt: list[int], samples: list[Sample], tok) -> dict:
    """One output line: the row's ids, its prompt, and each sample's text (a writer's whole answer)."""
    texts = [profile_answer(s.text, s.finish) if "history" in row else s.text for s in samples]
    return {"user_id": row.get("user_id"), "item_id": row.get("item_id"), "prompt": tok.decode(prompt),
            "prompt_tokens": len(prompt),
            "generations": [{"text": t, "profile": extract_tag(t, "user_profile"), "tokens": len(s.tokens),
                             "finish": s.finish} for t, s in zip(texts, samples)]}


def complete_rows(path: str) -> int:
    """The rows a stopped run wrote (0 when the file does not exist); a last line cut short by a
    kill is removed, so the rows appended next start on a line of their own."""
    if not os.path.isfile(path):
        return 0
    with open(path, "rb") as f:
        data = f.read()
    keep = data[:data.rfind(b"\n") + 1]
    if len(keep) != len(data):
        with open(path, "wb") as f:
            f.write(keep)
    return keep.count(b"\n")


if __name__ == "__main__":
    cli(main)
