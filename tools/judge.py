"""tools/judge.py -- fine-tune the judge (the frozen recommender of every other stage) to predict how a
user rates an item from the judge's own prompt, on judge users the writer never sees
(data/prepare.py --judge-users). An example is one context -- no profile, the raw history the writer
is shown, or the template profile -- followed by the user's next items, packed behind one copy of the
context; the loss is on the answer only, the way the judge answers (reward.LocalJudge, expect).

    python data/prepare.py movielens --raw DATA/ml-100k --out runs/ml100k --judge-users 300
    python tools/judge.py --data runs/ml100k/judge.jsonl --val-data runs/ml100k/val.jsonl --out runs/judge
    python tools/evaluate.py --data runs/ml100k/val.jsonl --judge runs/judge/ckpt-000100/model
OUT/ckpt-STEP/model is a Hugging Face folder: `--judge PATH` in every script and tools/serve.py.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lettingo import (ArgParser, LettingoError, add_config, cli, config_from, option,  # noqa: E402
                      output_folder, read_samples)
from reward import (ANSWERS, LocalJudge, answer_prompts, answer_tokens, eval_targets, metrics,  # noqa: E402
                    packed_answer_logits, sample_targets)
from tools.evaluate import CONTEXTS, ITEM_MEAN, baseline_predictions, context_messages  # noqa: E402
from train import (Dist, Policy, TrainConfig, TrainLoop, all_sum, apply_update,  # noqa: E402
                   lockstep_micro_batches, close_distributed, gather_objects, load_policy, resolve_start,
                   setup_distributed)

STARS = torch.arange(1.0, 6.0)                     # the answers "1".."5" as numbers


@dataclass
class JudgeTrainConfig(TrainConfig):
    """The judge's fine-tuning: which users, which contexts, which loss (the loop's settings: TrainConfig,
    its defaults here: DEFAULTS)."""
    data: str | None = option(None, "the judge users' samples (data/prepare.py --judge-users: judge.jsonl)",
                              kind=str)
    val_data: str | None = option(None, "validation samples (val.jsonl): the judge's MAE and GAUC in every "
                                  "context, before and after", kind=str)
    contexts: str = option("none,history,template", "what a sample's targets are shown with, one example "
                           "each: none makes the items' differences the judge's own knowledge (nothing in "
                           "its prompt gives them), history and template teach it to read a user")
    loss: str = option("ce", "ce: cross-entropy of the rating under the judge's answer distribution "
                       "(a half star splits its mass between the two stars); mse: squared error of the "
                       "expected rating, the judge's prediction", choices=("ce", "mse"))
    contexts_per_step: int = option(8, "examples (a context and its targets) per optimizer step", min=1)

    def __post_init__(self):
        super().__post_init__()
        unknown = [c for c in self.contexts.split(",") if c not in CONTEXTS]
        if unknown:
            raise LettingoError(f"--contexts: unknown {', '.join(unknown)} (of {', '.join(CONTEXTS)})")


# A judge's fine-tuning by default: a short run of a higher lr than a writer's, without weight decay.
DEFAULTS = JudgeTrainConfig(out="runs/judge", steps=100, lr=3e-5, weight_decay=0.0, warmup_steps=5,
                            eval_every=50, save_every=50, val_users=50, token_budget=2048)
# The learning recipe's judge (tools/learning.py --train-judge).
JUDGE = dataclasses.replace(DEFAULTS, steps=80, lr=5e-5)

# flags of TrainConfig that a judge's fine-tuning does not use (it is the judge: it asks none)
UNUSED = ("task", "reward", "judge", "judge_url", "judge_mode", "judge_token_budget", "judge_concurrency",
          "judge_timeout", "judge_retries", "temperature", "top_p", "max_new_tokens", "batch_size")


# ----------------------------------------------------------------------------- the loss

def judge_loss(logits, ratings, kind: str) -> torch.Tensor:
    """Per target, from the logits of the answer tokens "1".."5" [M, 5] and the true ratings [M]:
        ce:   -sum_k q_k log p_k, p = softmax over the five answers, q = the rating's mass on its
              nearest stars (4 -> q_4 = 1; 3.5 -> q_3 = q_4 = 1/2)
        mse:  (sum_k k p_k - y)^2, the expected rating's squared error
    -> [M]."""
    logp = torch.log_softmax(logits.float(), -1)                                   # [M, 5]
    if kind == "mse":
        return (logp.exp() @ STARS.to(logp.device) - ratings) ** 2
    low = ratings.floor().clamp(1, 5)
    frac = (ratings - low).unsqueeze(-1)                                          # [M, 1]
    stars = STARS.to(logp.device)
    q = (stars == low.unsqueeze(-1)) * (1 - frac) + (stars == (low + 1).unsqueeze(-1)) * frac
    return -(q * logp).sum(-1)


@dataclass
class Example:
    """One context with its targets: per target (the shared context, the rest of its prompt), rating."""
    pairs: list[tuple[list[int], list[int]]]
    ratings: list[float]


def make_example(tok, sample: dict, kind: str) -> Example:
    targets = sample_targets(sample)
    return Example(answer_prompts(tok, [context_messages(t, kind, "rating") for t in targets], "rating"),
                   [float(t["rating"]) for t in targets])


def judge_step(policy: Policy, batch: list[Example], answer_ids: list[int], cfg: JudgeTrainConfig,
               d: Dist) -> dict:
    """One optimizer step of
        loss = sum over the global batch's targets of judge_loss / the number of those targets
    Per micro-batch: contexts packed once with a branch per target -> the answer logits at each
    target's last prompt token -> its share of the loss -> backward."""
    t0 = time.time()
    seqs = [p for e in batch for p in e.pairs]                                    # [targets]
    ratings = torch.tensor([r for e in batch for r in e.ratings])
    n = all_sum({"targets": len(seqs)}, d.device)["targets"]
    sums = {"loss": 0.0, "abs_error": 0.0}
    for g in lockstep_micro_batches(policy.model, seqs, cfg.token_budget, d.device):
        logits = packed_answer_logits(policy.model, [seqs[i] for i in g], answer_ids)      # [len(g), 5]
        y = ratings[g].to(logits.device)
        expected = torch.softmax(logits.detach().float(), -1) @ STARS.to(logits.device)
        loss = judge_loss(logits, y, cfg.loss).sum() / n
        loss.backward()
        sums["loss"] += loss.item()
        sums["abs_error"] += (expected - y).abs().sum().item()
    sums = all_sum(sums, d.device)
    norm, ok = apply_update(policy, sums["loss"], cfg.grad_clip, d)
    return {"loss": sums["loss"], "train_MAE": sums["abs_error"] / max(n, 1), "grad_norm": norm,
            "skipped": not ok, "lr": policy.scheduler.get_last_lr()[0], "time": time.time() - t0}


def validate_judge(policy: Policy, val: list[dict], cfg: JudgeTrainConfig, d: Dist) -> dict:
    """The judge's MAE and GAUC on the validation users in every context (reward.CONTEXTS), the item
    mean's GAUC beside them: a judge that knows the items orders a user's items without any context,
    one that reads a profile does better with it, and answers differently with likes and dislikes
    swapped."""
    judge = LocalJudge(policy.rollout, policy.tok, "expect", cfg.token_budget)
    mine = eval_targets(val[d.rank::d.world])
    preds = {kind: judge.predict([context_messages(t, kind, "rating") for t in mine], "rating")
             for kind in CONTEXTS}
    parts = gather_objects((mine, preds))
    targets = [t for m, _ in parts for t in m]
    out = {}
    for kind in CONTEXTS:
        m = metrics("rating", [p for _, ps in parts for p in ps[kind]], targets, boot=0)
        out[f"val_{kind}_MAE"], out[f"val_{kind}_GAUC"] = m["MAE"][0], m.get("GAUC", (None,))[0]
    item_mean = baseline_predictions("rating", targets).get(ITEM_MEAN)
    if item_mean:
        out["val_item_mean_GAUC"] = metrics("rating", item_mean, targets, boot=0).get("GAUC", (None,))[0]
    return out


def run(cfg: JudgeTrainConfig):
    output_folder(cfg.out)
    if not cfg.data:
        raise LettingoError("--data is required: judge.jsonl from data/prepare.py --judge-users N")
    d = setup_distributed()
    torch.manual_seed(cfg.seed)
    samples = read_samples(cfg.data)
    val = read_samples(cfg.val_data)[:cfg.val_users or None] if cfg.val_data else []
    contexts = cfg.contexts.split(",")
    weights, ckpt = resolve_start(cfg.out, cfg.model, cfg.resume, cfg.lora_rank > 0)
    policy = load_policy(weights, cfg, d)
    answer_ids = answer_tokens(policy.tok, *ANSWERS["rating"])
    # example k: sample k // len(contexts) in context k % len(contexts), tokenized when a step takes it
    n_examples = len(samples) * len(contexts)
    with TrainLoop(cfg, d, policy, cfg.out, n_examples, cfg.contexts_per_step, ckpt) as loop:
        if d.main:
            print(f"judge: {len(samples)} samples of {len({s['user_id'] for s in samples})} judge users x "
                  f"{len(contexts)} contexts ({cfg.contexts}) = {n_examples} examples; {loop.total} steps "
                  f"of {cfg.contexts_per_step}, loss {cfg.loss}", flush=True)
        for step in loop.steps():
            if val and loop.validation_due(step):
                loop.log_validation(step, validate_judge(policy, val, cfg, d))
            if step == loop.total:
                break
            examples = [make_example(policy.tok, samples[k // len(contexts)], contexts[k % len(contexts)])
                        for k, _ in loop.examples(step)]
            loop.log_step(step, judge_step(policy, examples, answer_ids, cfg, d))


def parse_config(argv=None) -> JudgeTrainConfig:
    p = ArgParser(description="Fine-tune the judge on judge users the writer never sees "
                              "(data/prepare.py --judge-users).")
    add_config(p, JudgeTrainConfig, skip=UNUSED)
    p.set_defaults(**{k: v for k, v in dataclasses.asdict(DEFAULTS).items() if k not in UNUSED})
    return config_from(JudgeTrainConfig, p.parse_args(argv))


def main():
    run(parse_config())
    close_distributed()


if __name__ == "__main__":
    cli(main)
