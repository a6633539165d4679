"""reward.py -- task-driven rewards of profiles: a frozen recommender (the judge) predicts the
user's reaction to new items from the profile; the reward is how right it was. Also the metrics that
validation reports (MAE, GAUC, ...) and the code-written template profile.

    python reward.py --data runs/synth/test.jsonl --profiles profiles.jsonl   # each profile's reward
    python tools/evaluate.py --data runs/synth/test.jsonl --profiles profiles.jsonl   # against baselines
    python tools/serve.py --model smollm2-135m --port 8008      # the judge behind an OpenAI-compatible server
"""
from __future__ import annotations

import http.client
import json
import math
import os
import random
import statistics
import sys
import threading
import time
import urllib.parse
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from tqdm import tqdm

from lettingo import (DEFAULT_MODEL, ArgParser, LettingoError, add_config, chat_prompt, cli, config_from,
                      extract_tag, load_model, micro_batches, option, output_file, pack_row,
                      predictor_messages, profile_answer, read_jsonl, read_samples, release_freed_memory,
                      shares_prompts, split_shared_prefixes)
from rollout import Sampler, SamplingParams, cpu_decode_layout

LABELS = ("like", "neutral", "dislike")
ANSWERS = {"rating": ("<rating>", [str(k) for k in range(1, 6)]),    # task -> (forced prefix, answers)
           "sentiment": ("<sentiment>", LABELS)}
FORMAT_PENALTY = -1.0   # the public GRPO code's reward for a missing/unclosed profile tag
REWARDS = ("rating", "rank", "rating+rank")   # sample_reward's kinds


# ----------------------------------------------------------------------------- parsing and rewards

def parse_rating(text: str) -> float | None:
    """The last <rating>x</rating> (any case, any spaces) as a number in [1, 5], else None."""
    inner = extract_tag(text or "", "rating")
    try:
        value = float(inner)
    except (TypeError, ValueError):
        return None
    return value if 1.0 <= value <= 5.0 else None


def parse_sentiment(text: str) -> str | None:
    inner = (extract_tag(text or "", "sentiment") or "").lower()
    return inner if inner in LABELS else None


def task_reward(task: str, pred, sample) -> float:
    """rating: 1 - |pred - true| / 4 (the public code's); sentiment: 1 if the label is right (the paper's)."""
    if task == "rating":
        return 1.0 - abs(pred - sample["rating"]) / 4.0
    return float(pred == sample["label"])


# ----------------------------------------------------------------------------- judges
# One interface: predict(list of chat message lists, task) -> predictions (None = the judge failed).

@dataclass
class RewardConfig:
    """What a profile's reward is: the task, how the judge's predictions over a user's targets make
    one number, and the frozen recommender (the judge, make_judge) that rewards, validation and
    evaluation ask."""
    task: str = option("rating", "rating: 1 - |err|/4 (the public code); sentiment: correct = 1 (the paper)",
                       choices=("rating", "sentiment"))
    reward: str = option("rating", "a profile's reward from the judge's predictions over the user's reward "
                         "targets: rating = mean of 1 - |err|/4 (public code); rank = the fraction of "
                         "pairs of targets rated differently that the predictions order right, which no "
                         "level wins (needs --reward-targets >= 2 in data/prepare.py); rating+rank = "
                         "their mean", choices=REWARDS)
    judge: str = option(DEFAULT_MODEL, "local judge model (or the model name sent to --judge-url)")
    judge_url: str | None = option(None, "OpenAI-compatible judge server (recommended for big judges)",
                                   kind=str)
    judge_mode: str = option("expect", "expect: expected rating from the answer token's probabilities "
                             "(a server's top_logprobs); decode: greedy answer, parsed (the public code's)",
                             choices=("expect", "decode"))
    judge_token_budget: int = option(1024, "local judge: tokens per packed forward", min=64)
    judge_concurrency: int = option(64, "HTTP judge: requests in flight", min=1)
    judge_timeout: float = option(30.0, "HTTP judge: seconds per request", min=0.001)
    judge_retries: int = option(3, "HTTP judge: retries per request (exponential backoff)", min=0)

    def __post_init__(self):
        if self.reward != "rating" and self.task != "rating":
            raise LettingoError(f"--reward {self.reward} orders ratings: it needs --task rating")


class LocalJudge:
    """The frozen recommender in-process. mode="expect": one forward with the answer tag forced; the
    prediction is the expected rating (or the most likely label) under the next-token distribution
    over the valid answers. mode="decode": greedy decoding of a tagged answer, as the public code.
    Both compute what consecutive prompts share (a profile and the instruction, for each of its
    targets) once: packed as one prefix with a branch per target, micro-batched by a token budget."""

    def __init__(self, model, tokenizer, mode=RewardConfig.judge_mode,
                 token_budget=RewardConfig.judge_token_budget):
        if mode not in ("expect", "decode"):
            raise LettingoError(f"unknown judge mode {mode!r} (expect | decode)")
        self.model, self.tok, self.mode, self.token_budget = model, tokenizer, mode, token_budget
        self.sampler = Sampler(model) if mode == "decode" else None
        self.failures, self.bad_answers = 0, 0

    @torch.no_grad()
    def probabilities(self, messages, task):
        """[N, len(answers)] probabilities of the answers, renormalised over them."""
        prefix, answers = ANSWERS[task]
        pairs = answer_prompts(self.tok, messages, task)
        ids = answer_tokens(self.tok, prefix, answers)
        out = torch.empty(len(pairs), len(answers))
        for g in micro_batches(pairs, self.token_budget, shares_prompts(self.model)):
            release_freed_memory()
            out[g] = torch.softmax(packed_answer_logits(self.model, [pairs[i] for i in g], ids).cpu(), -1)
        return out

    def predict(self, messages, task):
        if self.mode == "expect":
            p = self.probabilities(messages, task)
            if task == "rating":
                return (p @ torch.arange(1.0, 6.0)).tolist()
            return [LABELS[i] for i in p.argmax(-1).tolist()]
        prompts = [chat_prompt(self.tok, m) for m in messages]
        shared = [len(head) for head, _ in split_shared_prefixes(prompts)]
        stop = ("</rating>",) if task == "rating" else ("</sentiment>",)
        outs = self.sampler.generate(prompts, SamplingParams(max_new_tokens=20, temperature=0, stop=stop),
                                     tokenizer=self.tok, shared=shared)
        parse = parse_rating if task == "rating" else parse_sentiment
        preds = [parse(o[0].text) for o in outs]
        self.bad_answers += sum(p is None for p in preds)   # no valid tag: no prediction, never a score
        return preds


def answer_tokens(tokenizer, prefix: str, answers) -> list[int]:
    """The token each answer starts with right after the forced prefix (checked to be distinct)."""
    base = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    ids = []
    for a in answers:
        full = tokenizer(prefix + a, add_special_tokens=False)["input_ids"]
        if full[:len(base)] != base:
            raise LettingoError(f"the judge's tokenizer merges {prefix!r} with the answer {a!r}")
        ids.append(full[len(base)])
    if len(set(ids)) != len(ids):
        raise LettingoError("the judge's tokenizer does not give each answer its own first token")
    return ids


def answer_prompts(tokenizer, messages, task) -> list[tuple[list[int], list[int]]]:
    """The judge's prompts, each ending in the forced answer tag, as (shared prefix, rest) pairs:
    consecutive prompts (one profile's targets) share their common beginning."""
    prefix = ANSWERS[task][0]
    return split_shared_prefixes([chat_prompt(tokenizer, m, answer_prefix=prefix) for m in messages])


def packed_answer_logits(model, pairs, answer_ids: list[int]) -> torch.Tensor:
    """[len(pairs), len(answer_ids)] logits of the answer tokens after each (prefix, rest) prompt,
    packed into one row with one copy of each shared prefix (training the judge and judging alike)."""
    device = model.lm_head.weight.device
    row = pack_row(pairs, shares_prompts(model), device)
    last = torch.tensor([start + n - 1 for _, start, n in row.spans], device=device)   # each prompt's last
    return model.answer_logits(row.tokens, last, torch.tensor(answer_ids, device=device), **row.inputs())


class JudgeFailure(Exception):
    pass


class HTTPJudge:
    """Any OpenAI-compatible /v1/chat/completions endpoint (vLLM, SGLang, llama.cpp, tools/serve.py).
    mode="expect": one token with the answer tag forced (`continue_final_message`) and its
    `top_logprobs`; the prediction is the expected rating (or the most likely label) under the
    probabilities of the answer tokens among them, renormalised -- the local expect judge's answer.
    When those tokens hold less than `min_mass` of the probability (a server that does not force the
    prefix), the greedy answer is parsed instead and counted in `fallbacks`. mode="decode": greedy
    answers, parsed (the public code's way). Requests run `concurrency` at a time over kept-alive
    connections, a group's first request (a profile's first target) before the others, so a
    prefix-caching server computes the shared prefix once. Each request is retried with exponential
    backoff; after the last retry the prediction is None (counted in `failures`), never a made-up score."""

    def __init__(self, url, model="judge", mode=RewardConfig.judge_mode, timeout=RewardConfig.judge_timeout,
                 retries=RewardConfig.judge_retries, concurrency=RewardConfig.judge_concurrency, backoff=0.5,
                 min_mass=0.5):
        if mode not in ("expect", "decode"):
            raise LettingoError(f"unknown judge mode {mode!r} (expect | decode)")
        base = url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/v1/chat/completions"
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise LettingoError(f"judge URL {url!r}: expected http(s)://host[:port][/v1]")
        self.parts = parts
        self.model, self.mode, self.timeout, self.retries = model, mode, timeout, retries
        self.concurrency, self.backoff, self.min_mass = concurrency, backoff, min_mass
        self.failures, self.retried, self.bad_answers, self.fallbacks = 0, 0, 0, 0
        self.mass_sum, self.mass_n = 0.0, 0              # the answer tokens' probability mass (expect)
        self.lock, self.local = threading.Lock(), threading.local()
        self.pool = ThreadPoolExecutor(concurrency)      # kept: its threads keep their connections

    def connection(self) -> http.client.HTTPConnection:
        """This thread's kept-alive connection to the server."""
        if getattr(self.local, "conn", None) is None:
            cls = http.client.HTTPSConnection if self.parts.scheme == "https" else http.client.HTTPConnection
            self.local.conn = cls(self.parts.hostname, self.parts.port, timeout=self.timeout)
            self.local.used = False
        return self.local.conn

    def drop(self):
        if getattr(self.local, "conn", None) is not None:
            self.local.conn.close()
            self.local.conn = None

    def exchange(self, data: bytes) -> tuple[int, bytes]:
        """One request on this thread's connection -> (status, body). A kept-alive connection that
        the server closed meanwhile (its idle timeout) is reopened once, at once: not a retry."""
        for reopened in (False, True):
            conn = self.connection()
            reused = self.local.used
            try:
                conn.request("POST", self.parts.path, data, {"Content-Type": "application/json"})
                r = conn.getresponse()
                payload = r.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.drop()
                if reopened or not reused:
                    raise
                continue
            self.local.used = True
            if r.will_close:                              # an HTTP/1.0 server: a new connection next time
                self.drop()
            return r.status, payload

    def post(self, body: dict, pick):
        """One chat completion -> pick(its first choice); retried (a reply `pick` cannot read counts as
        failed too), then JudgeFailure."""
        data, last = json.dumps({"model": self.model, **body}).encode(), None
        for attempt in range(self.retries + 1):
            if attempt:
                with self.lock:
                    self.retried += 1
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                status, payload = self.exchange(data)
                if status != 200:
                    raise ValueError(f"HTTP {status}: {payload[:200].decode(errors='replace')}")
                return pick(json.loads(payload)["choices"][0])
            except (http.client.HTTPException, OSError, ValueError, KeyError, IndexError, TypeError) as e:
                last = e
                self.drop()
        raise JudgeFailure(f"{self.url}: {type(last).__name__}: {last} (after {self.retries} retries)")

    def ask(self, messages, temperature=0.0, max_tokens=20) -> str:
        return self.post({"messages": messages, "temperature": temperature, "max_tokens": max_tokens},
                         lambda choice: choice["message"]["content"])

    @staticmethod
    def expect_request(messages, task) -> dict:
        return {"messages": messages + [{"role": "assistant", "content": ANSWERS[task][0]}],
                "continue_final_message": True, "add_generation_prompt": False,
                "max_tokens": 1, "temperature": 1.0, "logprobs": True, "top_logprobs": 20}

    def answer_probabilities(self, messages, task) -> tuple[list[float], float]:
        """The answers' probabilities as the first token after the forced tag, renormalised, and
        their total mass before that (0 when no answer token is among the top log-probs)."""
        answers = ANSWERS[task][1]
        top = self.post(self.expect_request(messages, task),
                        lambda choice: choice["logprobs"]["content"][0]["top_logprobs"])
        mass = [0.0] * len(answers)
        for t in top:
            k = answer_index(t["token"], answers)         # " 4", "4" and "4." are all the answer 4
            if k is not None:
                mass[k] += math.exp(t["logprob"])
        total = sum(mass)
        return [m / total if total else 0.0 for m in mass], total

    def one(self, messages, task):
        parse = parse_rating if task == "rating" else parse_sentiment
        try:
            if self.mode == "expect":
                p, mass = self.answer_probabilities(messages, task)
                with self.lock:
                    self.mass_sum, self.mass_n = self.mass_sum + mass, self.mass_n + 1
                if mass > 0 and mass >= self.min_mass:
                    return (sum((k + 1) * pk for k, pk in enumerate(p)) if task == "rating"
                            else LABELS[max(range(len(p)), key=p.__getitem__)])
                with self.lock:
                    self.fallbacks += 1
            answer = parse(self.ask(messages))
        except JudgeFailure as e:
            with self.lock:
                self.failures += 1
                if self.failures <= 3:
                    print(f"warning: judge failed: {e}", file=sys.stderr)
            return None
        if answer is None:
            with self.lock:
                self.bad_answers += 1
        return answer

    def predict(self, messages, task):
        texts = ["".join(m["content"] for m in ms) for ms in messages]
        common = [0] + [len(os.path.commonprefix(p)) for p in zip(texts, texts[1:])]   # with the previous
        # a group (a profile's targets) starts where the beginning shared with the previous prompt
        # shrinks: a group's first request goes before the others
        first, rest = [], []
        for i in range(len(messages)):
            starts_group = i == 0 or (i > 1 and common[i] < common[i - 1])
            (first if starts_group else rest).append(i)
        out = [None] * len(messages)
        for wave in (first, rest):                        # the rest find their prefix in the server's cache
            for i, p in zip(wave, self.pool.map(lambda i: self.one(messages[i], task), wave)):
                out[i] = p
        return out

    def probe(self):
        """One request now: an unreachable judge, or one without the log-probs expect needs, is an
        error before any work, not a run of failed steps."""
        msgs = [{"role": "user", "content": "Rate 1 to 5."}]
        try:
            if self.mode == "decode":
                self.ask(msgs, max_tokens=1)
                return
            choice = self.post(self.expect_request(msgs, "rating"), lambda choice: choice)
        except JudgeFailure as e:
            raise LettingoError(f"the judge at {self.url} does not answer: {e}")
        finally:
            self.retried = 0
        try:
            choice["logprobs"]["content"][0]["top_logprobs"][0]["logprob"]
        except (KeyError, IndexError, TypeError):
            raise LettingoError(f"the judge at {self.url} returns no top_logprobs, which --judge-mode expect "
                                f"needs; use --judge-mode decode (greedy answers, parsed)")


def answer_index(token: str, answers) -> int | None:
    """Which answer a returned token starts: a rating digit ("4", " 4", "4."), or a prefix of exactly
    one label ("dis", " like")."""
    t = token.strip().lower()
    if not t:
        return None
    if answers[0] == "1":
        return int(t[0]) - 1 if t[0] in "12345" and (len(t) == 1 or t[1] == ".") else None
    hits = [k for k, a in enumerate(answers) if a.startswith(t)]
    return hits[0] if len(hits) == 1 else None


def make_judge(cfg: RewardConfig, device=None, loaded: tuple | None = None):
    """cfg.judge_url: the server (probed once); else cfg.judge loaded here, or `loaded` (model,
    tokenizer): cfg.judge already in memory (train.load_judge)."""
    if cfg.judge_url:
        http_judge = HTTPJudge(cfg.judge_url, model=cfg.judge, mode=cfg.judge_mode, timeout=cfg.judge_timeout,
                               retries=cfg.judge_retries, concurrency=cfg.judge_concurrency)
        http_judge.probe()
        return http_judge
    model, tok = loaded or load_model(cfg.judge, device=device)
    model = cpu_decode_layout(model) if cfg.judge_mode == "decode" else model
    return LocalJudge(model, tok, cfg.judge_mode, cfg.judge_token_budget)


# ----------------------------------------------------------------------------- scoring profiles

@dataclass
class Scored:
    reward: float | None        # None: the judge failed -> leave the sample out, never score it
    prediction: object = None   # for the sample's own target
    status: str = "ok"          # ok | format (no complete profile tag) | judge_failed
    predictions: list | None = None   # for every target of the sample (sample_targets order)


def sample_targets(sample) -> list[dict]:
    """The sample, then one copy per extra target (prepare.py --reward-targets, --eval-targets): same
    user, same history, the next items instead of the target; none of them carries more_targets."""
    own = {k: v for k, v in sample.items() if k != "more_targets"}
    return [own] + [{**own, **t} for t in sample.get("more_targets", ())]


def sample_reward(kind: str, task: str, judged: list[tuple[dict, object]]) -> float:
    """A sample's reward from the judge's predictions for its targets [(target, prediction)]:
    rating = the mean task_reward; rank = user_gauc, the fraction of target pairs rated differently
    that the predictions order right (ties 1/2; 1/2 without such a pair), which no level wins;
    rating+rank = their mean."""
    rating = sum(task_reward(task, p, t) for t, p in judged) / len(judged)
    if kind == "rating":
        return rating
    rank = user_gauc([(p, t) for t, p in judged])
    rank = 0.5 if rank is None else rank
    return rank if kind == "rank" else (rating + rank) / 2


def target_rewards(samples, profiles, judge, task,
                   reward=RewardConfig.reward) -> list[tuple[float | None, object]]:
    """Ask the judge with profiles[i] (None = no profile) about every target of samples[i].
    -> per sample (sample_reward over its targets, predictions for its targets);
    (None, None) when the judge failed on any of them."""
    flat = [(i, t) for i, s in enumerate(samples) for t in sample_targets(s)]
    preds = judge.predict([predictor_messages(t, profiles[i], task) for i, t in flat], task) if flat else []
    per = defaultdict(list)                       # sample index -> [(target, prediction), ...]
    for (i, t), p in zip(flat, preds):
        per[i].append((t, p))
    out = []
    for i in range(len(samples)):
        if any(p is None for _, p in per[i]):
            out.append((None, None))
        else:
            out.append((sample_reward(reward, task, per[i]), [p for _, p in per[i]]))
    return out


def score_profiles(samples, texts, judge, task, reward=RewardConfig.reward) -> list[Scored]:
    """(sample, generated text) -> sample_reward over the sample's targets. Format failures get -1
    without asking the judge."""
    profiles = [extract_tag(t, "user_profile") for t in texts]
    ask = [i for i, p in enumerate(profiles) if p]
    judged = target_rewards([samples[i] for i in ask], [profiles[i] for i in ask], judge, task, reward)
    out = [Scored(FORMAT_PENALTY, None, "format") for _ in texts]
    for i, (value, preds) in zip(ask, judged):
        out[i] = (Scored(None, None, "judge_failed") if value is None
                  else Scored(value, preds[0], "ok", preds))
    return out


@dataclass
class JudgeRewards:
    """A GRPO step's rewards: each sampled profile (cut where the sampler stopped) scored by the
    judge over its user's targets (score_profiles); `progress`: a transient bar of targets judged."""
    judge: object
    task: str
    reward: str
    progress: bool = False

    def score(self, samples, outs) -> list[Scored]:
        texts = [profile_answer(o.text, o.finish) for o in outs]
        with tqdm(desc="judge", unit="target", file=sys.stderr, leave=False,
                  disable=not self.progress) as bar:
            return score_profiles(samples, texts, Counted(self.judge, bar), self.task, self.reward)


class Counted:
    """A judge that advances a progress bar by the targets it answers (asked 64 at a time)."""

    def __init__(self, judge, bar):
        self.judge, self.bar = judge, bar

    def predict(self, messages, task):
        out = []
        for i in range(0, len(messages), 64):
            out += self.judge.predict(messages[i:i + 64], task)
            self.bar.update(len(messages[i:i + 64]))
        return out


# ----------------------------------------------------------------------------- metrics (validation)

def eval_targets(samples) -> list[dict]:
    """Every target of every sample (prepare.py --eval-targets), a user's consecutively."""
    return [t for s in samples for t in sample_targets(s)]


def profile_predictions(samples, texts, judge, task):
    """Predictions with each generated profile, for metrics: a text without a complete profile tag
    carries no information, so the judge answers for it as if it had no profile.
    -> (predictions, scored): predictions[i] for every target of samples[i] (sample_targets order),
    None where the judge failed."""
    scored = score_profiles(samples, texts, judge, task)
    failed = [(i, t) for i, sc in enumerate(scored) if sc.status == "format"
              for t in sample_targets(samples[i])]
    fallback = judge.predict([predictor_messages(t, None, task) for _, t in failed], task) if failed else []
    preds = [sc.predictions or [None] * len(sample_targets(samples[i])) if sc.status != "format" else []
             for i, sc in enumerate(scored)]
    for (i, _), p in zip(failed, fallback):
        preds[i].append(p)
    return preds, scored


def metrics(task, preds, targets, boot=1000, seed=0) -> dict:
    """rating: MAE, RMSE, mean prediction, Pearson r over all predictions, and what a constant cannot
    win -- GAUC and Spearman within each user, like/neutral/dislike macro-F1 and balanced accuracy;
    sentiment: accuracy, macro-F1. Each with a bootstrap 95% interval over users (a user's targets
    are resampled together)."""
    users = by_user(preds, targets)
    if not users:
        return {"n": 0}
    flat = lambda us: [x for u in us for x in u]
    if task == "rating":
        label = lambda r: "like" if r >= 3.5 else "dislike" if r < 2.5 else "neutral"   # nearest star's
        fns = {"MAE": lambda us: statistics.fmean(abs(p - t["rating"]) for p, t in flat(us)),
               "RMSE": lambda us: math.sqrt(statistics.fmean((p - t["rating"]) ** 2 for p, t in flat(us))),
               # a judge can lower MAE by moving all its predictions towards the ratings' typical level
               # (no user content needed); r and the within-user metrics are what content buys
               "mean_pred": lambda us: statistics.fmean(p for p, _ in flat(us)),
               "r": lambda us: pearson([p for p, _ in flat(us)], [t["rating"] for _, t in flat(us)]),
               "GAUC": lambda us: mean_defined(user_gauc(u) for u in us),
               "Spearman": lambda us: mean_defined(user_spearman(u) for u in us),
               "macro_F1": lambda us: macro_f1([(label(p), t) for p, t in flat(us)]),
               "balanced_acc": lambda us: balanced_accuracy([(label(p), t) for p, t in flat(us)])}
    else:
        fns = {"accuracy": lambda us: statistics.fmean(p == t["label"] for p, t in flat(us)),
               "macro_F1": lambda us: macro_f1(flat(us)),
               "balanced_acc": lambda us: balanced_accuracy(flat(us))}
    groups, rng = list(users.values()), random.Random(seed)
    out = {"n": sum(map(len, groups)), "users": len(groups)}
    draws = [[groups[rng.randrange(len(groups))] for _ in groups] for _ in range(boot)]
    for name, fn in fns.items():
        value = fn(groups)
        if value is None:
            continue
        ds = sorted(d for d in map(fn, draws) if d is not None)
        out[name] = ((value, ds[int(0.025 * len(ds))], ds[int(0.975 * len(ds)) - 1]) if ds
                     else (value, None, None))
    return out


def by_user(preds, targets) -> dict:
    """{user: [(prediction, target), ...]} over the predictions that are not None."""
    users = defaultdict(list)
    for p, t in zip(preds, targets):
        if p is not None:
            users[t["user_id"]].append((p, t))
    return users


def mean_defined(xs):
    """Mean of the values that are not None (users without a pair of different ratings); None if none."""
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def user_gauc(pairs) -> float | None:
    """One user's [(prediction, target)]: the fraction of target pairs with different ratings that
    the predictions order the same way, a tie counting 1/2. None without such a pair."""
    right, n = 0.0, 0
    for (pa, ta), (pb, tb) in ((x, y) for k, x in enumerate(pairs) for y in pairs[k + 1:]):
        if ta["rating"] != tb["rating"]:
            n += 1
            d = (pa - pb) * (ta["rating"] - tb["rating"])
            right += 1.0 if d > 0 else 0.5 if d == 0 else 0.0
    return right / n if n else None


def ranks(xs):
    """1-based ranks, ties given their mean rank."""
    order = sorted(range(len(xs)), key=lambda k: xs[k])
    out, k = [0.0] * len(xs), 0
    while k < len(order):
        j = k
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[k]]:
            j += 1
        for m in range(k, j + 1):
            out[order[m]] = (k + j) / 2 + 1
        k = j + 1
    return out


def user_spearman(pairs) -> float | None:
    """Spearman correlation of one user's predictions and ratings (0 for constant predictions);
    None when the user's ratings are all equal."""
    ys = [t["rating"] for _, t in pairs]
    if len(set(ys)) < 2:
        return None
    return pearson(ranks([p for p, _ in pairs]), ranks(ys))


def balanced_accuracy(pairs):
    """Mean recall over the labels present in the truth: a constant label gets 1/(labels present)."""
    present = [c for c in LABELS if any(t["label"] == c for _, t in pairs)]
    return statistics.fmean(statistics.fmean(p == c for p, t in pairs if t["label"] == c) for c in present)


def pearson(x, y) -> float:
    """Correlation of two lists; 0.0 where either is constant (e.g. the global-mean baseline)."""
    if len(set(x)) < 2 or len(set(y)) < 2:
        return 0.0
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy)


def macro_f1(pairs):
    """Mean F1 over like / neutral / dislike of [(predicted label, target)]."""
    f1s = []
    for c in LABELS:
        tp = sum(p == c and s["label"] == c for p, s in pairs)
        fp = sum(p == c and s["label"] != c for p, s in pairs)
        fn = sum(p != c and s["label"] == c for p, s in pairs)
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(f1s) / len(f1s)


# ----------------------------------------------------------------------------- the no-LLM profile

STOPWORDS = set("the a an of and in on to for with from by at is it its this that my your our his her their "
                "you i we they he she be are was were as or not no vs new all one two three part edition "
                "volume vol "
                "book set pack series".split())


def template_profile(sample, kinds_shown="right") -> str:
    """The no-LLM bar a trained writer must reach: a profile written by code from exactly what the
    writer sees (the history it is shown and the average rating in its prompt). Generosity word +
    mean rating; liked / disliked kinds = genres (or categories) rated above / below the user's own
    mean, else the most frequent title words of high / low rated items. kinds_shown: "right",
    "swapped" (likes and dislikes exchanged) or "none" -- ablations that show what the judge reads."""
    hist = sample["history"]
    mean = sample.get("user_mean")
    if mean is None:
        mean = sum(h["rating"] for h in hist) / max(len(hist), 1)
    word = "A generous" if mean >= 4.0 else "A moderate" if mean >= 3.0 else "A harsh"
    kinds = defaultdict(list)                     # genre -> ratings of history items with it
    for h in hist:
        for g in (h.get("genres") or "").replace("|", ",").split(","):
            if g.strip():
                kinds[g.strip()].append(h["rating"])
    if not kinds:                                 # no genres: words of the titles stand in
        for h in hist:
            for w in {w.strip(".,:;!?()[]\"'").lower() for w in str(h["title"]).split()}:
                if len(w) > 2 and w not in STOPWORDS and not w.isdigit():
                    kinds[w].append(h["rating"])
        kinds = {k: v for k, v in kinds.items() if len(v) >= 2} or kinds
    ranked = sorted(kinds, key=lambda k: (-(sum(kinds[k]) / len(kinds[k]) - mean) * len(kinds[k]) ** 0.5,
                                          k))
    likes = [k for k in ranked if sum(kinds[k]) / len(kinds[k]) > mean][:2]
    dislikes = [k for k in reversed(ranked) if sum(kinds[k]) / len(kinds[k]) < mean][:2]
    text = f"{word} rater: average rating {mean:.1f} out of 5."
    if kinds_shown == "none":
        return text
    if kinds_shown == "swapped":
        likes, dislikes = dislikes, likes
    if likes:
        text += f" Likes {', '.join(likes)}."
    if dislikes:
        text += f" Dislikes {', '.join(dislikes)}."
    return text


# ----------------------------------------------------------------------------- python reward.py

def profile_texts(path, samples):
    """Generated texts per sample, matched by (user_id, item_id)."""
    rows = read_jsonl(path)
    by_key = {(r.get("user_id"), r.get("item_id")): r for r in rows}
    out = []
    for s in samples:
        r = by_key.get((s["user_id"], s["item_id"]))
        if r is None:
            raise LettingoError(f"{path}: no profile for user {s['user_id']} item {s['item_id']} "
                                f"(the file covers {len(by_key)} samples, --data has {len(samples)}; "
                                f"use --limit or matching files)")
        out.append([g["text"] for g in r["generations"]] if "generations" in r else [r["text"]])
    return out


@dataclass
class ScoreConfig(RewardConfig):
    """python reward.py: the reward of every profile in a rollout.py file, as GRPO would score it."""
    data: str = option(None, "samples JSONL (data/prepare.py) the profiles were written for", kind=str,
                       required=True)
    profiles: str = option(None, "profiles JSONL from rollout.py (matched by user_id, item_id)", kind=str,
                           required=True)
    out: str | None = option(None, "JSONL: each sample's profiles with their rewards", kind=str)


def score_file(cfg: ScoreConfig):
    samples = read_samples(cfg.data)
    texts = profile_texts(cfg.profiles, samples)           # [sample][profile]
    if cfg.out:
        output_file(cfg.out)
    flat = [(i, t) for i, ts in enumerate(texts) for t in ts]
    with tqdm(desc="judge", unit="target", file=sys.stderr) as bar:
        scored = score_profiles([samples[i] for i, _ in flat], [t for _, t in flat],
                                Counted(make_judge(cfg), bar), cfg.task, cfg.reward)
    rewards = [sc.reward for sc in scored if sc.reward is not None]
    status = defaultdict(int)
    for sc in scored:
        status[sc.status] += 1
    print(f"{len(scored)} profiles of {len(samples)} samples: mean {cfg.reward} reward "
          f"{sum(rewards) / max(len(rewards), 1):+.4f}, " + ", ".join(f"{k} {v}" for k, v in status.items()))
    if cfg.out:
        with open(cfg.out, "w") as f:
            for (i, text), sc in zip(flat, scored):
                f.write(json.dumps({"user_id": samples[i]["user_id"], "item_id": samples[i]["item_id"],
                                    "text": text, "reward": sc.reward, "status": sc.status,
                                    "predictions": sc.predictions}) + "\n")


def main():
    p = ArgParser(description="The reward of each written profile: a frozen recommender predicts the user's "
                              "ratings of its targets from it (tools/evaluate.py compares profiles with "
                              "baselines).")
    add_config(p, ScoreConfig)
    score_file(config_from(ScoreConfig, p.parse_args()))


if __name__ == "__main__":
    cli(main)
