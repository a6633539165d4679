"""train.py -- the training machinery grpo.py and dpo.py share: distributed set-up, FSDP2 wrapping,
packed log-prob forwards, the guarded optimizer step, atomic checkpoints with exact resume, logging.

Runs alike as `python x.py` (one process) and `torchrun --nproc_per_node=N x.py`: a single process
still forms a 1-rank process group, so both go through the same FSDP code path.
"""
from __future__ import annotations

import gc
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from lettingo import (ATTENTION, PROFILE_CLOSE, TREE_BACKENDS, ArgParser, LettingoError, Transformer, at_least, attention_backend, cli, load_model, predictor_messages,
                      profile_answer, profile_prompt, read_jsonl, save_model)
from reward import metrics, profile_predictions, template_profile
from rollout import generate


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


def all_sum(x: float | int, device) -> float:
    t = torch.tensor(float(x), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def all_max(x: float | int, device) -> float:
    t = torch.tensor(float(x), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def gather_objects(obj):
    """Every rank's object, in rank order, on every rank."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def compute_dtype(name: str, device) -> torch.dtype:
    """--dtype auto: bf16 on GPU, fp32 on CPU (where bf16 is ~2x faster but optional)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def shard(model: Transformer, dtype: torch.dtype) -> Transformer:
    """FSDP2: one unit per block, then the root (embeddings, final norm, head). Master weights stay
    fp32; forward/backward run in `dtype`, gradients are reduced in fp32. Gradients are summed across
    ranks (divide factor 1): every loss here is already normalised by global counts."""
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    for m in model.modules():
        if hasattr(m, "set_gradient_divide_factor"):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no pre-multiplied sum
    return model


def load_policy(path, d: Dist, checkpointing=False, dtype=torch.float32, attention="auto"):
    """The trainable policy (fp32 master weights, sharded) and a plain `dtype` copy for rollouts.
    `attention` (see lettingo.attention_backend) is checked before anything loads and logged."""
    kernel = attention_backend(attention, d.device, dtype)
    if d.main:
        print(f"attention: {kernel} (--attention {attention}; prompts shared within groups: "
              f"{'yes' if kernel in TREE_BACKENDS else 'no'})", flush=True)
    model, tok = load_model(path, dtype=torch.float32, device=d.device)
    model.checkpointing, model.attention = checkpointing, attention
    rollout, _ = load_model(path, dtype=dtype, device=d.device)
    return shard(model, dtype).train(), rollout, tok


@torch.no_grad()
def sync_rollout_model(policy, rollout):
    """Copy the sharded policy into the plain rollout model: one all-gather per tensor per step, so
    sampling runs with no FSDP hooks and no collective per decoded token (at the cost of one full
    copy of the weights per rank, as verl's colocated inference engine)."""
    dst = dict(rollout.named_parameters())
    for name, p in policy.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        dst[name].copy_(full)


# ----------------------------------------------------------------------------- packed log-probs

def shares_prompts(model) -> bool:
    """Whether packed forwards keep one prompt copy per group: unless the model's attention is
    forced to a kernel without a tree mask (flash, varlen)."""
    return model.attention in TREE_BACKENDS + ("auto",)


def micro_batches(seqs, token_budget: int, share_prompts: bool) -> list[list[int]]:
    """Indices of `seqs` [(prompt, completion, ...)] grouped greedily (in order) so that each group's
    packed row (completion_logprobs' layout) stays within the token budget. With share_prompts a
    prompt is packed once for consecutive items that complete it (a GRPO group, a DPO pair), so a
    micro-batch holds ~2.5x more sequences of a group of 8 with 300-token prompts."""
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


def completion_logprobs(model, seqs: list[tuple[list[int], list[int]]], device, temperature=1.0, entropy=False,
                        share_prompts: bool | None = None):
    """The one log-prob function: log p(completion token | prompt, earlier completion tokens) for
    each (prompt, completion) pair, all packed into one row without padding. Completions of the
    same prompt (a GRPO group, a DPO pair) share one copy of it (`share_prompts`): the prompt is
    computed once and each completion attends to it and to itself only. Default: share unless the
    model's attention is forced to a kernel without a tree mask (flash, varlen: then every
    sequence carries its own prompt).
    Returns a list of [len(completion)] tensors (and entropies when asked)."""
    if share_prompts is None:
        share_prompts = shares_prompts(model)
    groups: dict = {}
    for i, (p, _) in enumerate(seqs):
        groups.setdefault(tuple(p) if share_prompts else i, []).append(i)
    tokens, doc, branch, pos, index, ids, spans = [], [], [], [], [], [], [None] * len(seqs)
    for d, members in enumerate(groups.values()):
        prompt = seqs[members[0]][0]
        last = len(tokens) + len(prompt) - 1                 # predicts every completion's first token
        tokens += prompt
        doc += [d] * len(prompt)
        branch += [0] * len(prompt)
        pos += range(len(prompt))
        for b, i in enumerate(members, 1):
            comp, start = seqs[i][1], len(tokens)
            tokens += comp
            doc += [d] * len(comp)
            branch += [b] * len(comp)
            pos += range(len(prompt), len(prompt) + len(comp))
            spans[i] = (len(ids), len(comp))
            index += [last] + list(range(start, start + len(comp) - 1))   # token j is predicted at j-1
            ids += comp
    t = lambda x: torch.tensor([x], device=device)
    out = model(t(tokens), doc_ids=t(doc), branch_ids=t(branch) if share_prompts else None, positions=t(pos),
                targets=(torch.tensor(index, device=device), torch.tensor(ids, device=device)),
                temperature=temperature, entropy=entropy)
    lp, ent = out if entropy else (out, None)
    pieces = [lp[s:s + n] for s, n in spans]                 # [M] -> per sequence
    return (pieces, [ent[s:s + n] for s, n in spans]) if entropy else pieces


def synced_groups(model, seqs, budget, device):
    """Micro-batches, padded with empty ones so every rank runs the same number of forwards (FSDP
    issues collectives per forward/backward: unequal counts would deadlock)."""
    groups = micro_batches(seqs, budget, shares_prompts(model))
    return groups + [[] for _ in range(int(all_max(len(groups), device)) - len(groups))]


@torch.no_grad()
def logprobs_no_grad(model, seqs, budget, device, temperature=1.0):
    out = []
    for g in synced_groups(model, seqs, budget, device):
        batch = [seqs[i] for i in g] or [([0], [0])]                  # an empty group still runs
        lps = completion_logprobs(model, batch, device, temperature)
        out += lps[:len(g)]
    return out


def validate(rollout, tok, judge, val, args, d):
    """Greedy profiles for the validation users, judged: the task metric on all users, on the users
    whose profile closed, and -- to separate content from format -- no profile on those same users."""
    mine = val[d.rank::d.world]
    texts, preds, bare, templ, status = [], [], [], [], []
    if mine:
        outs = generate(rollout, [profile_prompt(tok, s) for s in mine], max_new_tokens=args.max_new_tokens,
                        temperature=0, stop=(PROFILE_CLOSE,), tokenizer=tok, batch_size=args.rollout_batch_size,
                        progress=d.main)
        texts = [profile_answer(o[0].text, o[0].finish) for o in outs]
        preds, scored = profile_predictions(mine, texts, judge, args.task)
        status = [sc.status for sc in scored]
        bare = judge.predict([predictor_messages(s, None, args.task) for s in mine], args.task)
        templ = judge.predict([predictor_messages(s, template_profile(s), args.task) for s in mine], args.task)
    rows = [r for part in gather_objects(list(zip(mine, preds, bare, templ, status))) for r in part]  # (sample, ours, none, template, status)
    closed = [r for r in rows if r[4] == "ok"]
    key = "MAE" if args.task == "rating" else "accuracy"
    value = lambda rs, k: metrics(args.task, [r[k] for r in rs], [r[0] for r in rs], boot=0).get(key, (None,))[0]
    return {"val_" + key: value(rows, 1), "val_format_rate": len(closed) / max(len(rows), 1),
            f"val_{key}_closed": value(closed, 1), f"val_no_profile_{key}_closed": value(closed, 2),
            f"val_no_profile_{key}": value(rows, 2), f"val_template_{key}": value(rows, 3),
            "val_judge_failures": sum(r[4] == "judge_failed" for r in rows)}, texts[:2]


# ----------------------------------------------------------------------------- the guarded step

def apply_update(model, optimizer, scheduler, max_norm: float, loss_sum: float) -> tuple[float, bool]:
    """Clip and step -- unless the loss or the global gradient norm is not finite: then the
    gradients are dropped and nothing is applied (returns applied=False)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
    ok = bool(torch.isfinite(torch.tensor([norm, loss_sum])).all())
    if ok:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, ok


def make_optimizer(model, lr, weight_decay, warmup_steps=0):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (warmup_steps + 1)))
    return opt, sched


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(run_dir, step, model, tokenizer, optimizer, scheduler, state: dict, d: Dist, keep=2):
    """run_dir/ckpt-STEP/{model (HF folder), trainer.pt}. Written under a temp name and renamed, so a
    run killed mid-write leaves the previous checkpoint as the latest complete one."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    osd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rng = gather_objects({"torch": torch.get_rng_state(), "python": random.getstate(),
                          "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None})
    if d.main:
        final = os.path.join(run_dir, f"ckpt-{step:06d}")
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(model, tokenizer, os.path.join(tmp, "model"), state_dict=full)
        torch.save({"step": step, "optimizer": osd, "scheduler": scheduler.state_dict(), "rng": rng, "state": state},
                   os.path.join(tmp, "trainer.pt"))
        os.replace(tmp, final)
        for old in sorted(checkpoints(run_dir))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def checkpoints(run_dir):
    if not os.path.isdir(run_dir):
        return []
    return [os.path.join(run_dir, n) for n in os.listdir(run_dir)
            if n.startswith("ckpt-") and not n.endswith(".tmp") and os.path.isfile(os.path.join(run_dir, n, "trainer.pt"))]


def latest_checkpoint(run_dir) -> str | None:
    found = sorted(checkpoints(run_dir))
    return found[-1] if found else None


def load_trainer_state(ckpt, model, optimizer, scheduler, d: Dist) -> dict:
    """Optimizer, scheduler and RNG states of a checkpoint (the weights come from ckpt/model)."""
    blob = torch.load(os.path.join(ckpt, "trainer.pt"), map_location="cpu", weights_only=False)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=blob["optimizer"],
                             options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(blob["scheduler"])
    rng = blob["rng"][d.rank] if d.rank < len(blob["rng"]) else blob["rng"][0]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return blob["state"] | {"step": blob["step"]}


def resolve_start(run_dir, model_path, resume: bool) -> tuple[str, str | None]:
    """-> (weights to load, checkpoint to resume from or None)."""
    if not resume:
        return model_path, None
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise LettingoError(f"--resume: no complete checkpoint in {run_dir}")
    return os.path.join(ckpt, "model"), ckpt


def demo_data(folder):
    """Synthetic users for the no-argument demos (made once)."""
    if not os.path.isfile(os.path.join(folder, "train.jsonl")):
        here = os.path.dirname(os.path.abspath(__file__))
        subprocess.run([sys.executable, os.path.join(here, "data", "prepare.py"), "synthetic", "--users", "300",
                        "--out", folder, "--test-users", "60", "--val-users", "30", "--profile-history", "6"], check=True)


def add_training_args(parser, lr, weight_decay, save_every):
    """The flags every training loop here takes (optimizer, memory, dtype, checkpoints, logging)."""
    a = parser.add_argument
    a("--lr", type=at_least(0.0, float), default=lr, help="AdamW learning rate (constant after warm-up)")
    a("--weight-decay", type=at_least(0.0, float), default=weight_decay, help="AdamW weight decay")
    a("--warmup-steps", type=at_least(0), default=0, help="linear lr warm-up, then constant")
    a("--grad-clip", type=at_least(0.0, float), default=1.0, help="global grad-norm clip")
    a("--token-budget", type=at_least(16), default=8192, help="max tokens per packed training micro-batch")
    a("--activation-checkpointing", action="store_true")
    a("--attention", default="auto", choices=ATTENTION, help="packed training attention kernel (auto: FlexAttention "
      "on CUDA, SDPA on CPU; flash/varlen have no tree mask, so each sequence then keeps its own prompt copy)")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
      help="compute dtype of training and rollouts (fp32 master weights); auto = bf16 on GPU, fp32 on CPU")
    a("--save-every", type=at_least(1), default=save_every, help="checkpoint every N steps (and at the end)")
    a("--seed", type=int, default=0, help="data order and sampling seed")
    a("--resume", action="store_true", help="continue from the latest complete checkpoint")
    a("--wandb", default=None, metavar="PROJECT", help="also log to Weights & Biases (when installed)")


# ----------------------------------------------------------------------------- logging

class Logger:
    """metrics.jsonl + a concise console line (rank 0 only); wandb when asked for and installed."""

    def __init__(self, run_dir, d: Dist, wandb_project=None, config=None):
        self.main, self.run_dir = d.main, run_dir
        self.wandb = None
        if self.main:
            os.makedirs(run_dir, exist_ok=True)
            if wandb_project:
                try:
                    import wandb
                    self.wandb = wandb.init(project=wandb_project, config=config, dir=run_dir)
                except ImportError:
                    print("warning: --wandb given but wandb is not installed; logging to metrics.jsonl only", file=sys.stderr)

    def log(self, row: dict, line: str | None = None, file="metrics.jsonl"):
        if not self.main:
            return
        row = {"time": round(time.time(), 3), **row}
        with open(os.path.join(self.run_dir, file), "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb and file == "metrics.jsonl":
            self.wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row.get("step"))
        if line:
            print(line, flush=True)


# ----------------------------------------------------------------------------- curves


def plot_curves(run_dir, panels, title):
    """One figure per run from metrics.jsonl / validation.jsonl. panels: [(panel title, [(file, key,
    label, style)])]; style "band:KEY" draws KEY as a +- band; "stack" stacks the series as areas.
    matplotlib is optional: a clear error says how to get it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LettingoError("plotting needs matplotlib: pip install matplotlib")
    files = {}
    for f in ("metrics.jsonl", "validation.jsonl"):
        path = os.path.join(run_dir, f)
        files[f] = read_jsonl(path) if os.path.isfile(path) else []
    if not files["metrics.jsonl"]:
        raise LettingoError(f"{run_dir}: no metrics.jsonl to plot")
    cols = 3
    fig, axes = plt.subplots((len(panels) + cols - 1) // cols, cols, figsize=(5 * cols, 3.2 * ((len(panels) + cols - 1) // cols)),
                             squeeze=False)
    for ax, (name, series) in zip(axes.flat, panels):
        stack = []
        for f, key, label, style in series:
            pts = [(r["step"], r[key], r) for r in files[f] if r.get(key) is not None]
            if not pts:
                continue
            x, y = [p[0] for p in pts], [p[1] for p in pts]
            if style == "stack":
                stack.append((x, y, label))
                continue
            ax.plot(x, y, style if style and not style.startswith("band:") else "-", label=label, marker="o" if len(x) < 12 else None)
            if style and style.startswith("band:"):
                sd = [p[2].get(style[5:], 0.0) for p in pts]
                ax.fill_between(x, [a - b for a, b in zip(y, sd)], [a + b for a, b in zip(y, sd)], alpha=0.2)
        if stack:
            ax.stackplot(stack[0][0], *[s[1] for s in stack], labels=[s[2] for s in stack], alpha=0.7)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{title}: {run_dir}", fontsize=11)
    fig.tight_layout()
    path = os.path.join(run_dir, "curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def validation_panel(run_dir):
    """The plot panel of what validate() logs: the metric on all users, on closed-profile users,
    and the no-profile / template lines."""
    path = os.path.join(run_dir, "validation.jsonl")
    rows = read_jsonl(path) if os.path.isfile(path) else []
    key, v = ("accuracy" if rows and "val_accuracy" in rows[0] else "MAE"), "validation.jsonl"
    return (f"validation {key}", [(v, f"val_{key}", "all users", "-"), (v, f"val_{key}_closed", "users whose profile closed", "-"),
                                  (v, f"val_no_profile_{key}_closed", "no profile, same users", "--"),
                                  (v, f"val_no_profile_{key}", "no profile, all users", ":"),
                                  (v, f"val_template_{key}", "template profile (code)", ":")])


def plot_command(argv, plot_run, what):
    """`python x.py plot RUN_DIR` for grpo.py and dpo.py."""
    p = ArgParser(prog=f"{os.path.basename(sys.argv[0])} plot", description="Draw RUN_DIR/curves.png (needs matplotlib).")
    p.add_argument("run_dir", metavar="RUN_DIR", help=what)
    return plot_run(p.parse_args(argv).run_dir)


def main():
    p = ArgParser(description="List the complete checkpoints of a run folder (grpo.py / dpo.py).")
    p.add_argument("run_dir", help="e.g. runs/grpo or runs/dpo/train")
    args = p.parse_args()
    found = sorted(checkpoints(args.run_dir))
    if not found:
        raise LettingoError(f"{args.run_dir}: no complete checkpoint")
    for c in found:
        step = torch.load(os.path.join(c, "trainer.pt"), map_location="cpu", weights_only=False)["step"]
        print(f"{c}  step {step}  model: {os.path.join(c, 'model')}")


if __name__ == "__main__":
    cli(main)
