"""train.py -- the machinery GRPO, DPO and SFT share: the training config, distributed set-up,
FSDP2 wrapping, packed log-prob forwards, micro-batches in FSDP lockstep, the guarded optimizer
step, the bookkeeping every training loop shares (`TrainLoop`), validation, atomic checkpoints with
exact resume, logging.

Runs alike as `python x.py` (one process) and `torchrun --nproc_per_node=N x.py`: a single process
still forms a 1-rank process group, so both go through the same FSDP code path.

    python train.py RUN_DIR        # the complete checkpoints of a run folder
"""
from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from tqdm import tqdm

from lettingo import (ATTENTION, DEFAULT_MODEL, PROFILE_CLOSE, TREE_BACKENDS, ArgParser, LettingoError,
                      Stopped, TokenLogprobs, Transformer, attention_backend, cli, load_model, micro_batches,
                      option, pack_row, predictor_messages, profile_answer, profile_prompt,
                      release_freed_memory, rope_frequencies, save_model, shares_prompts)
from reward import (RewardConfig, eval_targets, make_judge, metrics, profile_predictions, sample_targets,
                    template_profile)
from rollout import Sampler, SamplingParams, cpu_decode_layout


@dataclass
class TrainConfig(RewardConfig):
    """What every training run here takes: the model, the run folder, the loop, the optimizer,
    memory and kernels, the writer's sampling budget, and the reward (RewardConfig: task, reward,
    the judge that rewards and validation ask)."""
    model: str = option(DEFAULT_MODEL, "the model to train: HF folder, .gguf or alias")
    out: str = option("runs/train", "run folder: checkpoints, metrics.jsonl, validation.jsonl")
    steps: int = option(0, "training steps (0 = --epochs over the training examples); a GRPO step is a "
                        "rollout and its update (mini_batches x ppo_epochs optimizer steps), a DPO or SFT "
                        "step one optimizer step", min=0)
    epochs: int = option(1, "passes over the training examples (users, pairs) when --steps is 0", min=1)
    eval_every: int = option(10, "validate every N steps (and at the end)", min=1)
    val_users: int = option(64, "validation users evaluated (0 = all)", min=0)
    save_every: int = option(50, "checkpoint every N steps (and at the end)", min=1)
    keep: int = option(2, "checkpoints kept: the newest whole, older ones the weights alone (no optimizer "
                       "state, which is 2x the weights)", min=1)
    seed: int = option(0, "data order and sampling seed")
    resume: bool = option(False, "continue from the latest complete checkpoint")
    lr: float = option(1e-6, "AdamW learning rate (constant after warm-up)", source="public GRPO code",
                       min=0.0)
    weight_decay: float = option(0.01, "AdamW weight decay", source="public GRPO code", min=0.0)
    warmup_steps: int = option(0, "linear lr warm-up over this many optimizer steps, then constant", min=0)
    grad_clip: float = option(1.0, "global grad-norm clip", source="public GRPO code", min=0.0)
    token_budget: int = option(8192, "max tokens per packed training micro-batch (and per no-grad "
                               "log-prob pass)", min=16)
    activation_checkpointing: bool = option(False, "recompute each block in backward (less memory)")
    lora_rank: int = option(0, "LoRA: train only a rank-r update W + (alpha / r) B A of every linear layer "
                            "in the blocks, the base weights frozen (0 = full fine-tuning)",
                            source="verl lora_rank, peft LoraConfig.r", min=0)
    lora_alpha: float = option(16.0, "LoRA scale numerator alpha", source="verl lora_alpha", min=0.0)
    attention: str = option("auto", "packed training attention kernel (auto: FlexAttention on CUDA, SDPA on "
                            "CPU; flash/varlen have no tree mask, so each sequence keeps its own "
                            "prompt copy)",
                            choices=ATTENTION)
    dtype: str = option("auto", "compute dtype of training and rollouts (fp32 master weights); "
                        "auto = bf16 on GPU, fp32 on CPU", choices=("auto", "float32", "bfloat16"))
    wandb: str | None = option(None, "also log to this Weights & Biases project (when installed)", kind=str)
    temperature: float = option(1.0, "sampling temperature of rollouts and exploration; GRPO's training, "
                                "old-policy and reference log-probs divide the logits by it too",
                                source="public GRPO code; the paper's exploration", min=0.0)
    top_p: float = option(1.0, "nucleus sampling of rollouts and exploration (1 = off)", min=0.0)
    max_new_tokens: int = option(SamplingParams.max_new_tokens, "profile budget (sampling and validation)",
                                 source="rollout.SamplingParams", min=1)
    batch_size: int = option(SamplingParams.batch_size, "rows decoded together (rollouts, exploration, "
                             "validation)", source="rollout.SamplingParams", min=1)


# ----------------------------------------------------------------------------- distributed

@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self):
        return self.rank == 0


def setup_distributed() -> Dist:
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if "RANK" in os.environ:                    # under torchrun
            dist.init_process_group("nccl" if cuda else "gloo")
        else:  # plain `python x.py`: a 1-rank group with an in-process store (no port to race for)
            dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    return Dist(dist.get_rank(), dist.get_world_size(), device)


def close_distributed():
    """End of a successful run, called after the function that trained has returned. FSDP modules
    sit in reference cycles that hold the process group; left to the interpreter's exit, gloo's
    worker threads are torn down during finalization and abort the process ("terminate called
    without an active exception", exit -6) after a run that trained fine. So: collect them now,
    then destroy the group on every rank together."""
    gc.collect()
    if dist.is_initialized():
        dist.barrier()             # no rank tears down the group while another still talks to it
        dist.destroy_process_group()
    gc.collect()


def all_sum(values: dict[str, float], device) -> dict[str, float]:
    """Sum a dict of numbers over all ranks, in one all-reduce."""
    t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, t.tolist()))


def all_max(x: float | int, device) -> float:
    t = torch.tensor(float(x), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def gather_objects(obj):
    """Every rank's object, in rank order, on every rank."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- the policy

def compute_dtype(name: str, device) -> torch.dtype:
    """--dtype auto: bf16 on GPU, fp32 on CPU (where bf16 is optional)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def sharded(world: int, dtype: torch.dtype) -> bool:
    """Whether FSDP has work: several ranks, or a compute dtype other than the fp32 master weights.
    One fp32 process trains the plain model: FSDP there would only copy every weight before each
    use (the root's embedding for the whole forward and backward)."""
    return world > 1 or dtype != torch.float32


def shard(model: Transformer, dtype: torch.dtype) -> Transformer:
    """FSDP2: one unit per block, then the root (embeddings, final norm, head). Master weights stay
    fp32; forward/backward run in `dtype`, gradients are reduced in fp32. Gradients are summed across
    ranks (divide factor 1): every loss here is already normalised by global counts."""
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    for method in ("logprobs", "answer_logits"):      # the root's weights are gathered for them too
        register_fsdp_forward_method(model, method)
    for m in model.modules():
        if hasattr(m, "set_gradient_divide_factor"):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no pre-multiplied sum
    return model


class LoRALinear(torch.nn.Module):
    """y = x W^T + b + (alpha / r) (x A^T) B^T: the base W, b frozen (same tensors, same names as the
    checkpoint's), A [r, in] and B [out, r] trained. A is drawn as peft's (Kaiming-uniform), B starts
    at 0, so training starts from the base model exactly (Hu et al. 2021, LoRA)."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.weight, self.bias, self.scale = base.weight, base.bias, alpha / rank
        a = torch.empty(rank, base.in_features, dtype=base.weight.dtype)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A = torch.nn.Parameter(a.to(base.weight.device))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype,
                                                     device=base.weight.device))

    def forward(self, x):
        update = F.linear(F.linear(x, self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + update * self.scale


LORA_KEYS = (".lora_A", ".lora_B")


def add_lora(model: Transformer, rank: int, alpha: float, seed: int) -> Transformer:
    """Freeze every weight and put a LoRA update on each linear layer of the blocks (attention and
    MLP: all of them, as LoRA matches full fine-tuning best that way -- Schulman et al. 2025, "LoRA
    Without Regret"); embeddings, norms and the head stay frozen. A's draw is seeded by `seed`."""
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, LoRALinear(child, rank, alpha, generator))
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A (possibly FSDP-sharded) tensor whole; in one process, the same storage."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def merged_weight(params: dict, name: str, scale: float) -> torch.Tensor:
    """params[name] (a weight by its checkpoint name) whole; a LoRA layer's merged: W + scale B A."""
    w = full_tensor(params[name])
    stem = name.removesuffix(".weight")
    if stem + ".lora_A" in params:
        w = w + scale * (full_tensor(params[stem + ".lora_B"]) @ full_tensor(params[stem + ".lora_A"]))
    return w


class MergedWeights(Mapping):
    """A LoRA model's weights by their checkpoint names, each merged (W + scale B A, merged_weight)
    when it is read: lettingo.save_model writes them one at a time, never all merged at once."""

    def __init__(self, state: dict, scale: float):
        self.state, self.scale = state, scale
        self.names = [k for k in state if not k.endswith(LORA_KEYS)]

    def __getitem__(self, name):
        return merged_weight(self.state, name, self.scale)

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)


def frozen_base(model: Transformer, attention: str) -> Transformer:
    """A plain model over a one-process LoRA policy's frozen weights -- the same tensors, no copy: the
    starting model, for a judge or KL reference that is that model."""
    with torch.device("meta"):
        base = Transformer(model.cfg)
    weights = {name: full_tensor(p) for name, p in model.named_parameters() if not name.endswith(LORA_KEYS)}
    base.load_state_dict(weights, strict=False, assign=True)   # strict=False: a tied head is not listed
    base.tie()
    base.inv_freq = rope_frequencies(model.cfg).to(model.lm_head.weight.device)
    base.attention = attention
    return base.requires_grad_(False).eval()


@dataclass
class Policy:
    """The model being trained (fp32 master weights, sharded where `sharded` says; with LoRA only the
    adapters train), the model that samples (a plain `dtype` copy when the policy is sharded or cast,
    else the policy itself), its sampler, the tokenizer, the optimizer and its schedule. `start`: the
    weights it was loaded from; `base`: with LoRA in one unsharded process, those weights as a plain
    model sharing the frozen tensors (see frozen_base), else None."""
    model: Transformer
    rollout: Transformer
    sampler: Sampler
    tok: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    start: str = ""
    lora_scale: float = 0.0
    base: Transformer | None = None

    @torch.no_grad()
    def sync(self):
        """Copy the sharded policy into the rollout copy (LoRA merged into its weights): one all-gather
        per tensor per step, so sampling runs with no FSDP hooks and no collective per decoded token
        (at the cost of one full copy of the weights per rank, as verl's colocated inference engine).
        A policy that samples itself has nothing to copy."""
        release_freed_memory()                          # sampling follows: the update's leftovers go
        if self.rollout is self.model:
            return
        params = dict(self.model.named_parameters())
        for name, p in self.rollout.named_parameters():
            if params[name].requires_grad or name.removesuffix(".weight") + ".lora_A" in params:
                p.copy_(merged_weight(params, name, self.lora_scale))   # a frozen base weight: loaded equal


def load_policy(path: str, cfg: TrainConfig, d: Dist) -> Policy:
    """The policy from `path`, set up as `cfg` says. `cfg.attention` (see lettingo.attention_backend)
    is checked before anything loads, and logged."""
    dtype = compute_dtype(cfg.dtype, d.device)
    kernel = attention_backend(cfg.attention, d.device, dtype)
    if d.main:
        print(f"attention: {kernel} (--attention {cfg.attention}; prompts shared within groups: "
              f"{'yes' if kernel in TREE_BACKENDS else 'no'})", flush=True)
    model, tok = load_model(path, dtype=torch.float32, device=d.device)
    model.checkpointing, model.attention = cfg.activation_checkpointing, cfg.attention
    split = sharded(d.world, dtype)
    # sharded or cast: sampling reads a plain `dtype` copy (Policy.sync); else the policy samples itself
    rollout = cpu_decode_layout(load_model(path, dtype=dtype, device=d.device)[0] if split else model)
    if cfg.lora_rank:
        add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.seed)
    model = (shard(model, dtype) if split else model).train()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
                                  eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                  lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1)))
    return Policy(model, rollout, Sampler(rollout), tok, optimizer, scheduler, path,
                  cfg.lora_alpha / cfg.lora_rank if cfg.lora_rank else 0.0,
                  frozen_base(model, cfg.attention) if cfg.lora_rank and not split else None)


def load_judge(cfg: TrainConfig, policy: Policy, d: Dist):
    """The judge (reward.make_judge); a local judge that is the model a LoRA policy started from, in
    one unsharded process, judges with the policy's frozen weights (one copy of the model less)."""
    if policy.base is not None and not cfg.judge_url and cfg.judge == policy.start:
        return make_judge(cfg, d.device, loaded=(policy.base, policy.tok))
    return make_judge(cfg, d.device)


def load_reference(path: str, cfg: TrainConfig, d: Dist, policy: Policy | None = None) -> Transformer:
    """A frozen copy of the starting model (KL reference), sharded like the policy; a LoRA policy's
    own frozen weights when they are that model (one unsharded process: Policy.base)."""
    if policy is not None and policy.base is not None and path == policy.start:
        return policy.base
    ref = load_model(path, dtype=torch.float32, device=d.device)[0]
    ref.attention = cfg.attention                          # the policy's kernel, and its packing
    dtype = compute_dtype(cfg.dtype, d.device)
    ref = shard(ref, dtype) if sharded(d.world, dtype) else ref
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


# ----------------------------------------------------------------------------- packed log-probs

def completion_logprobs(model, seqs: list[tuple[list[int], list[int]]], device, temperature=1.0,
                        with_entropy=False, share_prompts: bool | None = None) -> list[TokenLogprobs]:
    """The one log-prob function: log p(completion token | prompt, earlier completion tokens) for
    each (prompt, completion) pair, all packed into one row without padding. Completions of the
    same prompt (a GRPO group, a DPO pair) share one copy of it (`share_prompts`): the prompt is
    computed once and each completion attends to it and to itself only. Default: share unless the
    model's attention is forced to a kernel without a tree mask (flash, varlen: then every
    sequence carries its own prompt). -> per sequence, [len(completion)] log-probs (and entropies)."""
    if share_prompts is None:
        share_prompts = shares_prompts(model)
    row = pack_row(seqs, share_prompts, device)
    # completion token j is predicted at position j - 1; its first token, at its prompt's last
    index = []
    for last, start, n in row.spans:
        if n:
            index += [last, *range(start, start + n - 1)]
    ids = [t for _, comp in seqs for t in comp]
    out = model.logprobs(row.tokens, torch.tensor(index, device=device), torch.tensor(ids, device=device),
                         **row.inputs(), temperature=temperature, with_entropy=with_entropy)
    offsets = [0]
    for _, comp in seqs:
        offsets.append(offsets[-1] + len(comp))
    return [TokenLogprobs(out.logprobs[s:e], out.entropy[s:e] if with_entropy else None)
            for s, e in zip(offsets, offsets[1:])]                # [M] -> per sequence


def synced_groups(model, seqs, budget, device) -> list[list[int]]:
    """Micro-batches, padded with empty ones so every rank runs the same number of forwards (FSDP
    issues collectives per forward/backward: unequal counts would deadlock)."""
    groups = micro_batches(seqs, budget, shares_prompts(model))
    return groups + [[] for _ in range(int(all_max(len(groups), device)) - len(groups))]


def lockstep_micro_batches(model, seqs, budget: int, device, progress=False):
    """The micro-batches of `seqs` (each a list of indices, packed within the token budget), one at
    a time, for the caller's forward and backward: gradients are reduced once, on the last one, and
    a rank with fewer micro-batches runs empty ones here (a forward and backward with zero loss), so
    that all ranks stay in lockstep (FSDP). `progress`: a transient bar of micro-batches."""
    groups = synced_groups(model, seqs, budget, device)
    for k, g in enumerate(tqdm(groups, desc="update", unit="micro-batch", file=sys.stderr, leave=False,
                               disable=not progress)):
        if isinstance(model, FSDPModule):              # one unsharded process has nothing to reduce
            model.set_requires_gradient_sync(k == len(groups) - 1)
        release_freed_memory()
        if g:
            yield g
        else:
            (completion_logprobs(model, [([0], [0])], device)[0].logprobs.sum() * 0.0).backward()


@torch.no_grad()
def logprobs_no_grad(model, seqs, budget, device, temperature=1.0) -> list[torch.Tensor]:
    """Per (prompt, completion), the completion's log-probs under `model` (old policy, reference)."""
    out = []
    for g in synced_groups(model, seqs, budget, device):
        release_freed_memory()
        # empty: lockstep
        lps = completion_logprobs(model, [seqs[i] for i in g] or [([0], [0])], device, temperature)
        out += [x.logprobs for x in lps[:len(g)]]
    return out


# ----------------------------------------------------------------------------- the guarded step

def apply_update(policy: Policy, loss_sum: float, max_norm: float, d: Dist) -> tuple[float, bool]:
    """Clip and step -- unless the loss or the global gradient norm is not finite: then the
    gradients are dropped and nothing is applied (returns applied=False)."""
    params = [p for p in policy.model.parameters() if p.grad is not None]
    # each gradient's norm summed in row-major order, one copy at a time: a policy that samples itself keeps
    # the decode layout (cpu_decode_layout), and a sum's last bits follow the order it reads memory in
    norms = [torch._foreach_norm([p.grad.contiguous()])[0] for p in params]
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    norm = full_tensor(total).item()
    ok = bool(torch.isfinite(torch.tensor([norm, loss_sum])).all())
    if ok:
        policy.optimizer.step()
        policy.scheduler.step()
    else:
        print(f"warning: rank {d.rank}: non-finite loss or gradient (loss {loss_sum}, grad norm {norm}): "
              "update skipped", file=sys.stderr)
    policy.optimizer.zero_grad(set_to_none=True)
    return norm, ok


# ----------------------------------------------------------------------------- the training loop

def rank_positions(per_step: int, mini_batches: int, d: Dist) -> list[tuple[int, int]]:
    """This rank's share of a step's `per_step` examples: (position in the step, mini-batch). Global
    mini-batch m = positions [m*P/M, (m+1)*P/M); each rank takes an equal slice of every mini-batch,
    so the updates are the same whatever the number of ranks."""
    P, M = per_step, mini_batches
    if P % (M * d.world):
        raise LettingoError(f"{P} examples per step must split evenly into "
                            f"{M} mini-batch(es) x {d.world} ranks")
    per_mb, per_rank = P // M, P // (M * d.world)       # examples in a mini-batch, a rank's share of it
    mine = []
    for k in range(P):
        mini_batch, within = divmod(k, per_mb)
        if within // per_rank == d.rank:
            mine.append((k, mini_batch))
    return mine


def training_steps(steps: int, epochs: int, n_examples: int, per_step: int) -> int:
    """`steps`, or when it is 0 the steps that show every example `epochs` times (a step that ends
    an epoch takes the first examples of the next one, step_examples)."""
    return steps or max(1, math.ceil(epochs * n_examples / per_step))


def step_examples(seed: int, step: int, per_step: int, n: int, positions) -> list[tuple[int, int]]:
    """The data position is the step: step s takes positions [s*P, (s+1)*P) of the stream that
    concatenates one seeded permutation per epoch, so every epoch shows each example once and a
    resumed run sees exactly the examples it would have seen.
    -> (example index, mini-batch) for this rank's positions."""
    out, perms = [], {}
    for k, mb in positions:
        epoch, offset = divmod(step * per_step + k, n)       # a step may end one epoch and start the next
        if epoch not in perms:
            perms[epoch] = random.Random(seed * 7_919 + epoch).sample(range(n), n)
        out.append((perms[epoch][offset], mb))
    return out


class TrainLoop:
    """The bookkeeping every training loop here shares (GRPO, DPO, SFT, the judge), so that the loop
    itself reads top to bottom in the algorithm's own file:

        with TrainLoop(cfg, d, policy, run_dir, n_examples, per_step, ckpt) as loop:
            for step in loop.steps():                  # from the resumed step to loop.total, inclusive
                if loop.validation_due(step):          # every cfg.eval_every steps and at the end
                    policy.sync()                      # a rollout copy takes the trained weights
                    loop.log_validation(step, validate(...))
                if step == loop.total:
                    break                              # the end: validated, nothing left to train
                batch = loop.examples(step)            # this rank's [(example index, mini-batch)]
                row = the algorithm's step on batch
                loop.log_step(step, row)               # and a checkpoint when one is due

    `ckpt` resumes (weights already loaded from it) with the optimizer, schedule and RNG states;
    Ctrl-C inside the block stops with one line naming the checkpoint to resume from; leaving the
    block prints the first and last validation."""

    def __init__(self, cfg: TrainConfig, d: Dist, policy: Policy, run_dir: str, n_examples: int,
                 per_step: int, ckpt: str | None = None, mini_batches: int = 1):
        self.cfg, self.d, self.policy, self.run_dir = cfg, d, policy, run_dir
        self.n_examples, self.per_step = n_examples, per_step
        self.total = training_steps(cfg.steps, cfg.epochs, n_examples, per_step)
        self.start = load_trainer_state(ckpt, policy, d)["step"] if ckpt else 0
        if ckpt and d.main:
            print(f"resumed from {ckpt} at step {self.start}")
        self.log = Logger(run_dir, d, cfg.wandb, dataclasses.asdict(cfg), self.start)
        if d.main:
            with open(os.path.join(run_dir, "config.json"), "w") as f:
                json.dump(dataclasses.asdict(cfg), f, indent=2)
        self.positions = rank_positions(per_step, mini_batches, d)
        self.step, self.first, self.last = self.start, None, None

    def __enter__(self) -> "TrainLoop":
        return self

    def steps(self):
        for self.step in range(self.start, self.total + 1):
            yield self.step

    def validation_due(self, step: int) -> bool:
        return step % self.cfg.eval_every == 0 or step == self.total

    def log_validation(self, step: int, row: dict):
        self.first, self.last = self.first or row, row
        self.log.log({"step": step, **row}, f"step {step:>4} | validation {describe_validation(row)}",
                     file="validation.jsonl")

    def examples(self, step: int) -> list[tuple[int, int]]:
        return step_examples(self.cfg.seed, step, self.per_step, self.n_examples, self.positions)

    def log_step(self, step: int, row: dict, line: str | None = None, samples: list | None = None):
        """The step's metrics (console `line`, default: every value), its samples, and a checkpoint
        every cfg.save_every steps and after the last one."""
        row = {"step": step, **row}
        line = line or " | ".join(f"{k} {v:.4g}" for k, v in row.items()
                                  if k not in ("step", "skipped", "lr"))
        self.log.log(row, f"step {step:>4} | {line}" + (" | SKIPPED" if row["skipped"] else ""))
        if samples is not None:
            self.log.log({"step": step, "samples": samples}, file="samples.jsonl")
        if (step + 1) % self.cfg.save_every == 0 or step + 1 == self.total:
            save_checkpoint(self.run_dir, step + 1, self.policy, {"config": dataclasses.asdict(self.cfg)},
                            self.d, self.cfg.keep)

    def __exit__(self, kind, error, trace):
        if kind is KeyboardInterrupt:
            ckpt = latest_checkpoint(self.run_dir)
            raise Stopped(f"in step {self.step}; " + (
                f"the last checkpoint is {ckpt}: the same command with --resume continues from it" if ckpt
                else "no checkpoint yet: the same command starts again")) from None
        if kind is None and self.d.main and self.first:
            print(f"validation before: {describe_validation(self.first)}")
            print(f"validation after:  {describe_validation(self.last)}")


def describe_validation(row: dict) -> str:
    """A validation row for the console: rates in %, values to 4 digits, "-" where none (the full
    numbers go to validation.jsonl)."""
    shown = []
    for key, value in row.items():
        name = key.removeprefix("val_").replace("_", " ")
        if value is None:
            text = "-"
        elif key.endswith("_rate"):
            text = f"{value:.0%}"
        elif isinstance(value, float):
            text = f"{value:.4g}"
        else:
            text = str(value)
        shown.append(f"{name} {text}")
    return " | ".join(shown)


@dataclass
class Judged:
    """One validation target of sample `sample` (its index in the validation list): the judge's
    prediction with the written profile, with no profile and with the template profile, and the
    written profile's status (ok | format | judge_failed)."""
    sample: int
    target: dict
    profile: object
    no_profile: object
    template: object
    status: str


def validate(sampler: Sampler, tok, judge, val: list[dict], task: str, max_new_tokens: int, batch_size: int,
             d: Dist) -> dict:
    """Greedy profiles for the validation users, judged on every target of each (prepare.py
    --eval-targets): the task metric on all users, on the users whose profile closed, and -- to
    separate content from format -- no profile on those same users; for ratings also the within-user
    ordering (GAUC), which no level of the predictions wins."""
    mine, rows = val[d.rank::d.world], []
    if mine:
        outs = sampler.generate([profile_prompt(tok, s) for s in mine],
                                SamplingParams(max_new_tokens=max_new_tokens, temperature=0,
                                               batch_size=batch_size, stop=(PROFILE_CLOSE,)),
                                tokenizer=tok, progress=d.main)
        preds, scored = profile_predictions(mine, [profile_answer(o[0].text, o[0].finish) for o in outs],
                                            judge, task)
        per_sample = [sample_targets(s) for s in mine]
        targets = eval_targets(mine)                               # a sample's targets consecutively
        bare = judge.predict([predictor_messages(t, None, task) for t in targets], task)
        templ = judge.predict([predictor_messages(t, template_profile(t), task) for t in targets], task)
        status = [sc.status for sc, ts in zip(scored, per_sample) for _ in ts]
        index = [d.rank + k * d.world for k, ts in enumerate(per_sample) for _ in ts]      # in `val`
        rows = [Judged(*r) for r in zip(index, targets, [p for ps in preds for p in ps], bare, templ, status)]
    rows = [r for part in gather_objects(rows) for r in part]
    closed = [r for r in rows if r.status == "ok"]
    key = "MAE" if task == "rating" else "accuracy"
    out = {"val_" + key: judged_metric(task, rows, "profile", key),
           "val_format_rate": users_in(closed) / max(users_in(rows), 1),
           f"val_{key}_closed": judged_metric(task, closed, "profile", key),
           f"val_no_profile_{key}_closed": judged_metric(task, closed, "no_profile", key),
           f"val_no_profile_{key}": judged_metric(task, rows, "no_profile", key),
           f"val_template_{key}": judged_metric(task, rows, "template", key),
           "val_judge_failures": users_in([r for r in rows if r.status == "judge_failed"])}
    if task == "rating" and len(rows) > users_in(rows):        # GAUC needs samples with two targets
        out |= {"val_GAUC": judged_metric(task, rows, "profile", "GAUC"),
                "val_no_profile_GAUC": judged_metric(task, rows, "no_profile", "GAUC"),
                "val_template_GAUC": judged_metric(task, rows, "template", "GAUC")}
    return out


def judged_metric(task: str, rows: list[Judged], context: str, name: str) -> float | None:
    """The metric `name` (reward.metrics) of the judge's predictions in `context` (profile,
    no_profile or template) over `rows`; None where it is undefined."""
    m = metrics(task, [getattr(r, context) for r in rows], [r.target for r in rows], boot=0)
    return m.get(name, (None,))[0]


def users_in(rows: list[Judged]) -> int:
    return len({r.sample for r in rows})


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(run_dir, step, policy: Policy, state: dict, d: Dist, keep=2):
    """run_dir/ckpt-STEP/{model (HF folder; LoRA merged in), trainer.pt (with LoRA, the adapters too)}.
    Written under a temp name and renamed, so a run killed mid-write leaves the previous checkpoint
    as the latest complete one. Of the `keep` newest, only the newest keeps the optimizer state
    (resume reads the newest); older ones go."""
    release_freed_memory()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(policy.model, options=options)
    adapters = {k: full[k] for k in full if k.endswith(LORA_KEYS)} if policy.lora_scale else None
    weights = MergedWeights(full, policy.lora_scale)
    osd = get_optimizer_state_dict(policy.model, policy.optimizer, options=options)
    rng = gather_objects({"torch": torch.get_rng_state(), "python": random.getstate(),
                          "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None})
    if d.main:
        final = os.path.join(run_dir, f"ckpt-{step:06d}")
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(policy.model, policy.tok, os.path.join(tmp, "model"), state_dict=weights)
        torch.save({"step": step, "optimizer": osd, "scheduler": policy.scheduler.state_dict(), "rng": rng,
                    "adapters": adapters, "state": state}, os.path.join(tmp, "trainer.pt"))
        shutil.rmtree(final, ignore_errors=True)        # the same step written again (a resumed run)
        os.replace(tmp, final)
        older = [c for c in sorted(checkpoints(run_dir)) if c != final]
        for old in older[:max(len(older) - keep + 1, 0)]:
            shutil.rmtree(old, ignore_errors=True)
        for old in older[max(len(older) - keep + 1, 0):]:
            drop_optimizer_state(old)
    dist.barrier()


def drop_optimizer_state(ckpt):
    """Rewrite ckpt/trainer.pt without the optimizer state (atomically: a temp file renamed)."""
    path = os.path.join(ckpt, "trainer.pt")
    blob = torch.load(path, map_location="cpu", weights_only=False)
    if "optimizer" in blob:
        del blob["optimizer"]
        torch.save(blob, path + ".tmp")
        os.replace(path + ".tmp", path)


def checkpoints(run_dir) -> list[str]:
    if not os.path.isdir(run_dir):
        return []
    return [os.path.join(run_dir, n) for n in os.listdir(run_dir)
            if n.startswith("ckpt-") and not n.endswith(".tmp")
               and os.path.isfile(os.path.join(run_dir, n, "trainer.pt"))]


def latest_checkpoint(run_dir) -> str | None:
    found = sorted(checkpoints(run_dir))
    return found[-1] if found else None


def load_trainer_state(ckpt, policy: Policy, d: Dist) -> dict:
    """Optimizer, scheduler and RNG states of a checkpoint (the weights come from ckpt/model; with
    LoRA, the base from --model and the adapters from here)."""
    blob = torch.load(os.path.join(ckpt, "trainer.pt"), map_location="cpu", weights_only=False)
    if "optimizer" not in blob:
        raise LettingoError(f"{ckpt} holds the weights only (its optimizer state went when a newer "
                            f"checkpoint was written): it starts a run as --model {ckpt}/model, not a resume")
    if (blob.get("adapters") is None) != (not policy.lora_scale):
        trained = "with" if blob.get("adapters") else "without"
        raise LettingoError(f"{ckpt} was trained {trained} LoRA: resume it with the same --lora-rank")
    if policy.lora_scale:
        set_model_state_dict(policy.model, blob["adapters"],
                             options=StateDictOptions(full_state_dict=True, strict=False))
    set_optimizer_state_dict(policy.model, policy.optimizer, optim_state_dict=blob["optimizer"],
                             options=StateDictOptions(full_state_dict=True))
    policy.scheduler.load_state_dict(blob["scheduler"])
    rng = blob["rng"][d.rank] if d.rank < len(blob["rng"]) else blob["rng"][0]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return blob["state"] | {"step": blob["step"]}


def resolve_start(run_dir, model_path, resume: bool, lora: bool = False) -> tuple[str, str | None]:
    """-> (weights to load, checkpoint to resume from or None). A LoRA run resumes from its base,
    `model_path`, and the checkpoint's adapters (load_trainer_state)."""
    if not resume:
        if checkpoints(run_dir) or os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
            raise LettingoError(f"--out {run_dir} holds a run already: --resume continues it, another --out "
                                "starts a new one")
        return model_path, None
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise LettingoError(f"--resume: no complete checkpoint in {run_dir}")
    return (model_path if lora else os.path.join(ckpt, "model")), ckpt


def demo_data(folder):
    """Synthetic users for the no-argument demos (made once)."""
    if not os.path.isfile(os.path.join(folder, "train.jsonl")):
        here = os.path.dirname(os.path.abspath(__file__))
        subprocess.run([sys.executable, os.path.join(here, "data", "prepare.py"), "synthetic",
                        "--users", "300", "--out", folder, "--test-users", "60", "--val-users", "30",
                        "--profile-history", "6", "--eval-targets", "1"], check=True)   # validation: one


# ----------------------------------------------------------------------------- logging

class Logger:
    """metrics.jsonl + a concise console line (rank 0 only); wandb when asked for and installed."""

    def __init__(self, run_dir, d: Dist, wandb_project=None, config=None, start=0):
        self.main, self.run_dir = d.main, run_dir
        self.wandb = None
        if self.main:
            os.makedirs(run_dir, exist_ok=True)
            for name in ("metrics.jsonl", "validation.jsonl", "samples.jsonl"):
                self.forget_from(os.path.join(run_dir, name), start)
            if wandb_project:
                try:
                    import wandb
                    self.wandb = wandb.init(project=wandb_project, config=config, dir=run_dir)
                except ImportError:
                    print("warning: --wandb given but wandb is not installed; logging to metrics.jsonl only",
                          file=sys.stderr)

    @staticmethod
    def forget_from(path, start: int):
        """A resumed run redoes the steps from `start` on: their rows from before are dropped."""
        if not os.path.isfile(path):
            return
        with open(path) as f:
            keep = [line for line in f if json.loads(line).get("step", -1) < start]
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)

    def log(self, row: dict, line: str | None = None, file="metrics.jsonl"):
        if not self.main:
            return
        row = {"time": round(time.time(), 3), **row}
        with open(os.path.join(self.run_dir, file), "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb and file == "metrics.jsonl":
            self.wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))},
                           step=row.get("step"))
        if line:
            print(line, flush=True)


def main():
    p = ArgParser(description="List the complete checkpoints of a run folder (grpo.py / dpo.py).")
    p.add_argument("run_dir", help="e.g. runs/grpo or runs/dpo/train")
    run_dir = p.parse_args().run_dir
    found = sorted(checkpoints(run_dir))
    if not found:
        raise LettingoError(f"{run_dir}: no complete checkpoint")
    for c in found:
        step = torch.load(os.path.join(c, "trainer.pt"), map_location="cpu", weights_only=False)["step"]
        print(f"{c}  step {step}  model: {os.path.join(c, 'model')}")


if __name__ == "__main__":
    cli(main)
