"""tools/evaluate.py -- what a set of profiles is worth next to what needs no profile writer: the
judge's metrics with each set of written profiles beside no profile, the raw history, the template
profile, the oracle (synthetic data) and the no-LLM baselines (global, user and item means, item kNN),
with bootstrap intervals over users, within-user GAUC / Spearman and a calibrated MAE.

    python tools/evaluate.py --data runs/synth/test.jsonl --profiles profiles.jsonl --judge smollm2-135m
    python tools/serve.py --model smollm2-135m --port 8008      # the judge behind an OpenAI-compatible server
"""
from __future__ import annotations

import json
import os
import random
import statistics
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass

from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lettingo import (ArgParser, LettingoError, add_config, cli, config_from, extract_tag,  # noqa: E402
                      format_interactions, option, output_file, predictor_messages, read_samples)
from reward import (Counted, HTTPJudge, RewardConfig, by_user, eval_targets, make_judge,  # noqa: E402
                    metrics, profile_predictions, profile_texts, sample_targets, template_profile, user_gauc)


@dataclass
class EvalConfig(RewardConfig):
    """python tools/evaluate.py: the conditions judged on one set of samples."""
    data: str = option(None, "samples JSONL from data/prepare.py (e.g. DIR/test.jsonl)", kind=str,
                       required=True)
    profiles: tuple[str, ...] = ()      # profiles JSONL files from rollout.py (matched by user_id, item_id)
    val_data: str | None = option(None, "validation samples (DIR/val.jsonl): each condition's predictions "
                                  "there fit the affine map a + b * prediction of its calibrated MAE",
                                  kind=str)
    val_profiles: tuple[str, ...] = ()  # with val_data: the same writers' profiles of the validation users
    limit: int = option(0, "only the first N samples (and validation samples)", min=0)
    out: str | None = option(None, "per-target predictions JSONL", kind=str)


def affine_fit(preds, targets) -> tuple[float, float] | None:
    """(a, b) of the least-squares fit rating ~ a + b * prediction over the predictions that are not
    None (b = 0 when they are constant; None without any): a condition's level and scale, fitted on
    validation users so that a calibrated MAE on test users no longer rewards the level the judge
    happens to answer at. (A constant maps to the validation mean, not the median MAE would pick.)"""
    xy = [(p, t["rating"]) for p, t in zip(preds, targets) if p is not None]
    if not xy:
        return None
    mx, my = statistics.fmean(x for x, _ in xy), statistics.fmean(y for _, y in xy)
    var = sum((x - mx) ** 2 for x, _ in xy)
    b = sum((x - mx) * (y - my) for x, y in xy) / var if var > 0 else 0.0
    return my - b * mx, b


def paired_difference(err_a, err_b, boot=1000, seed=0):
    """mean(err_a) - mean(err_b) over the same samples, with a paired bootstrap 95% interval
    (users resampled once for both conditions). For MAE errors, > 0 means b is better."""
    pairs = [(a, b) for a, b in zip(err_a, err_b) if a is not None and b is not None]
    if not pairs:
        return None
    diff = [a - b for a, b in pairs]
    rng = random.Random(seed)
    draws = sorted(sum(diff[rng.randrange(len(diff))] for _ in diff) / len(diff) for _ in range(boot))
    return sum(diff) / len(diff), draws[int(0.025 * boot)], draws[int(0.975 * boot) - 1]


def sample_errors(task, preds, samples):
    """Per-sample error: |pred - rating| (rating) or 1 - correct (sentiment); None where no prediction."""
    if task == "rating":
        return [None if p is None else abs(p - s["rating"]) for p, s in zip(preds, samples)]
    return [None if p is None else float(p != s["label"]) for p, s in zip(preds, samples)]


ITEM_MEAN, ITEM_KNN = "item mean (no LLM)", "item kNN of the history (no LLM)"


def baseline_predictions(task, samples):
    """No LLM at all: the global mean and median (majority label) of all history ratings, the
    user's own mean, and the item's mean over the training users (prepare.py's item_mean; the global
    mean for an item none of them rated). The median is the constant with the lowest MAE: on skewed
    ratings it shows how much of an MAE is the level of the predictions rather than anything known
    about the user; the user mean orders no user's items (GAUC 1/2), the item mean does."""
    hist = [h for s in samples for h in s["history"] + s.get("recent", [])]
    if task == "rating":
        g = sum(h["rating"] for h in hist) / max(1, len(hist))
        med = statistics.median(h["rating"] for h in hist) if hist else g
        return {"global mean (no LLM)": [g] * len(samples), "global median (no LLM)": [med] * len(samples),
                "user mean (no LLM)": [s["user_mean"] for s in samples],
                **({ITEM_MEAN: [g if s["item_mean"] is None else s["item_mean"] for s in samples]}
                   if all("item_mean" in s for s in samples) else {}),
                # the shown history read by collaborative filtering (prepare.py's ItemKNN)
                **({ITEM_KNN: [g if s["item_knn"] is None else s["item_knn"]
                                                         for s in samples]}
                   if all("item_knn" in s for s in samples) else {})}
    # prepare.py's default thresholds
    lab = lambda r: "like" if r >= 4 else "dislike" if r <= 2 else "neutral"
    glob = Counter(lab(h["rating"]) for h in hist).most_common(1)[0][0]
    user = [Counter(lab(h["rating"]) for h in s["history"] + s.get("recent", [])).most_common(1)[0][0]
            if s["history"] else glob for s in samples]
    return {"majority label (no LLM)": [glob] * len(samples), "user's majority label (no LLM)": user}


@dataclass
class Condition:
    """One row of a results table: predictions for targets[idx[k]], with the profile's status
    (ok | format | judge_failed) when the row judges written profiles."""
    preds: list
    idx: list[int]
    status: list[str] | None = None
    words: float | None = None


NO_PROFILE = "no profile"
# what the judge is shown besides the item: the contexts that tell whether it reads a profile
CONTEXTS = {"none": NO_PROFILE, "history": "raw history", "template": "template profile (code, no LLM)",
            "swapped": "template, likes/dislikes swapped"}


def context_messages(target, kind: str, task: str) -> list[dict]:
    """The judge's prompt for a target with one of CONTEXTS: no profile, the raw history the writer is
    shown, the template profile, or the template with likes and dislikes exchanged (what a judge that
    reads the profile must answer differently to)."""
    if kind == "history":
        return predictor_messages(target, None, task, format_interactions(target["history"]))
    if kind in ("template", "swapped"):
        return predictor_messages(target, template_profile(target, "right" if kind == "template" else kind),
                                  task)
    if kind == "none":
        return predictor_messages(target, None, task)
    raise LettingoError(f"unknown context {kind!r} ({' | '.join(CONTEXTS)})")


def judge_conditions(samples, judge, task, profiles: dict | None = None) -> dict[str, Condition]:
    """Every condition of an evaluation on every target of the samples (eval_targets): no-LLM
    baselines, no profile, raw history, the template profile, the oracle profile (synthetic data),
    and each set of written profiles ({name: [[text, ...] per sample]}, each asked about all of its
    sample's targets; an unclosed profile is judged as no profile)."""
    targets = eval_targets(samples)
    first = [0]                                    # sample i's targets: targets[first[i]:first[i + 1]]
    for s in samples:
        first.append(first[-1] + len(sample_targets(s)))
    n = len(targets)
    rows = {name: Condition(preds, list(range(n)))
            for name, preds in baseline_predictions(task, targets).items()}
    if judge is None:                              # the no-LLM rows only
        return rows
    conditions = {name: [context_messages(t, kind, task) for t in targets] for kind, name in CONTEXTS.items()}
    if all(t.get("oracle_profile") for t in targets):
        conditions["oracle profile"] = [predictor_messages(t, t["oracle_profile"], task) for t in targets]
    flats = {name: [(i, t) for i, ts in enumerate(texts) for t in ts]
             for name, texts in (profiles or {}).items()}
    total = n * len(conditions) + sum(first[i + 1] - first[i] for f in flats.values() for i, _ in f)
    bar = tqdm(total=total, desc="judge", unit="target", file=sys.stderr)
    judge = Counted(judge, bar)
    for name, msgs in conditions.items():
        rows[name] = Condition(judge.predict(msgs, task), list(range(n)))
        bar.write(f"judged: {name} ({n} targets)", file=sys.stderr)
    for name, flat in flats.items():
        preds, scored = profile_predictions([samples[i] for i, _ in flat], [t for _, t in flat], judge,
                                            task)
        ok = [extract_tag(t, "user_profile") for (_, t), sc in zip(flat, scored) if sc.status != "format"]
        span = lambda i: range(first[i], first[i + 1])
        rows[name] = Condition([p for ps in preds for p in ps], [k for i, _ in flat for k in span(i)],
                               [sc.status for (i, _), sc in zip(flat, scored) for _ in span(i)],
                               sum(len(p.split()) for p in ok) / max(len(ok), 1))
        bar.write(f"judged: {name} ({len(flat)} profiles)", file=sys.stderr)
    bar.close()
    return rows


def per_user(values, targets) -> dict:
    """{user: mean of its values} over the values that are not None."""
    users = defaultdict(list)
    for v, t in zip(values, targets):
        if v is not None:
            users[t["user_id"]].append(v)
    return {u: sum(v) / len(v) for u, v in users.items()}


def user_gaucs(preds, targets) -> dict:
    """{user: GAUC} for the users with a pair of targets rated differently."""
    gaucs = ((u, user_gauc(ps)) for u, ps in by_user(preds, targets).items())
    return {u: g for u, g in gaucs if g is not None}


def row_targets(c: Condition, targets) -> list[dict]:
    """The target of each of a row's predictions. A row with several profiles per sample (rollout.py
    --n 4) files each profile's targets under its own user id (user, k), so that GAUC and Spearman
    compare items within one profile (by_person averages a user's profiles again)."""
    if len(set(c.idx)) == len(c.idx):
        return [targets[i] for i in c.idx]
    drawn = defaultdict(int)
    out = []
    for i in c.idx:
        out.append({**targets[i], "user_id": (targets[i]["user_id"], drawn[i])})
        drawn[i] += 1
    return out


def by_person(values: dict) -> dict:
    """{user or (user, profile k): value} -> {user: the mean over its profiles}."""
    people = defaultdict(list)
    for key, v in values.items():
        people[key[0] if isinstance(key, tuple) else key].append(v)
    return {u: sum(vs) / len(vs) for u, vs in people.items()}


def paired(a: dict, b: dict, boot=1000, seed=0):
    """paired_difference of two {user: value} over the users both have."""
    common = [u for u in a if u in b]
    return paired_difference([a[u] for u in common], [b[u] for u in common], boot, seed)


def calibrations(samples, rows: dict[str, Condition]) -> dict[str, tuple[float, float]]:
    """{condition: affine_fit of its predictions} on these (validation) samples' targets, for the
    conditions with any prediction."""
    targets = eval_targets(samples)
    fits = {name: affine_fit(c.preds, [targets[i] for i in c.idx]) for name, c in rows.items()}
    return {name: fit for name, fit in fits.items() if fit is not None}


def summarize(task, samples, rows: dict[str, Condition], compare: list[tuple[str, str]] = (),
              calibration: dict[str, tuple[float, float]] | None = None) -> dict:
    """Metrics of every row over eval_targets(samples); for profile rows also the format rate and the
    metric on the targets whose profile closed next to no-profile on those same targets; paired
    differences over users for `compare` ((a, b): a - b, of the user's mean error -- > 0 means b is
    better -- and of its GAUC under "paired_GAUC" -- < 0 means b is better) and for every profile row
    against no profile; for the rows in `calibration` ({name: (a, b)} from validation users) the
    calibrated MAE, of a + b * prediction."""
    targets = eval_targets(samples)
    tg = {name: row_targets(c, targets) for name, c in rows.items()}
    err = {name: by_person(per_user(sample_errors(task, c.preds, tg[name]), tg[name]))
           for name, c in rows.items() if len(set(c.idx)) == len(targets)}       # every target: pairable
    gauc = ({name: by_person(user_gaucs(rows[name].preds, tg[name])) for name in err} if task == "rating"
            else {})
    out = {"task": task, "n_samples": len(samples), "n_targets": len(targets), "rows": {}, "paired": {},
           "paired_GAUC": {}}
    if task == "rating":
        out["truth_mean"] = sum(t["rating"] for t in targets) / max(len(targets), 1)
    for name, c in rows.items():
        r = {"all": metrics(task, c.preds, tg[name])}
        if name in (calibration or {}) and task == "rating":
            a, b = calibration[name]
            cal = metrics(task, [None if p is None else a + b * p for p in c.preds], tg[name])
            if "MAE" in cal:                                  # not when every prediction failed
                r["all"]["calibrated_MAE"], r["calibration"] = cal["MAE"], (a, b)
        if c.status is not None:
            closed = [k for k, st in enumerate(c.status) if st == "ok"]
            r["format_rate"] = len(closed) / max(len(c.status), 1)
            r["words"] = c.words
            r["closed"] = metrics(task, [c.preds[k] for k in closed], [tg[name][k] for k in closed])
            r["no_profile_on_closed"] = metrics(task, [rows[NO_PROFILE].preds[c.idx[k]] for k in closed],
                                                [tg[name][k] for k in closed])
        out["rows"][name] = r
    pairs = [(NO_PROFILE, name) for name in err if name != NO_PROFILE] + list(compare)
    for a, b in pairs:
        if a in err and b in err:
            out["paired"][f"{a} -> {b}"] = paired(err[a], err[b])
            if gauc:
                out["paired_GAUC"][f"{a} -> {b}"] = paired(gauc[a], gauc[b])
    return out


def print_summary(summary):
    task = summary["task"]
    names = ("MAE", "RMSE") if task == "rating" else ("accuracy", "macro_F1")
    cell = lambda m, n: (f"{m[n][0]:>7.3f} [{m[n][1]:.3f},{m[n][2]:.3f}]" if n in m and m[n][1] is not None
                         else f"{m[n][0]:>7.3f}{'':14}" if n in m else f"{'-':>21}")
    level = task == "rating"        # the judge's mean prediction and its correlation with the truth
    print(f"\n{'condition':<44}" + "".join(f"{n:>22}" for n in names)
          + (f"{'pred':>6}" if level else "")
          + f"{'closed':>8}{'words':>6}" + f"{'on closed: ' + names[0]:>24}{'no profile there':>22}")
    for name, r in summary["rows"].items():
        m = r["all"]
        line = f"{name[:44]:<44}" + "".join(f" {cell(m, n)}" for n in names)
        if level:
            line += f"{m['mean_pred'][0]:>6.2f}" if "mean_pred" in m else f"{'-':>6}"
        if "format_rate" in r:
            line += (f"{r['format_rate']:>8.0%}{r['words']:>6.0f} {cell(r['closed'], names[0]):>23} "
                     f"{cell(r['no_profile_on_closed'], names[0]):>21}")
        print(line)
    ranking = (("calibrated_MAE",) * any("calibration" in r for r in summary["rows"].values())
               + ("GAUC", "Spearman", "r", "macro_F1", "balanced_acc") if level else ("balanced_acc",))
    print(f"\n{'what a constant cannot win':<44}" + "".join(f"{n:>22}" for n in ranking))
    for name, r in summary["rows"].items():
        # undefined (-) where no user has two differently rated targets or predictions are constant
        print(f"{name[:44]:<44}" + "".join(f" {cell(r['all'], n) if r['all'].get(n, (0,))[0] else '-':>21}"
                                          for n in ranking))
    print(f"({summary['n_samples']} users, {summary['n_targets']} targets; "
          f"[95% bootstrap interval over users]; "
          f"closed = format rate (profile tag closed); "
          f"an unclosed profile is judged as no profile"
          + (f"; pred = mean prediction (true ratings' mean {summary['truth_mean']:.2f}), "
             + ("calibrated_MAE of a + b * prediction, a and b fitted on the validation users' predictions "
                "of the same condition; " if "calibrated_MAE" in ranking else "")
             + "r = Pearson over all predictions, GAUC / Spearman within each user (constant: 1/2 / 0), "
             "macro-F1 / balanced accuracy of the nearest star's like/neutral/dislike"
             if level else "") + ")")
    for key, what in (("paired", "MAE" if task == "rating" else "error rate"), ("paired_GAUC", "GAUC")):
        if summary.get(key):
            better = "b better" if key == "paired" else "b worse"
            print(f"\npaired differences of {what} per user (a -> b: a minus b, > 0 = {better}) "
                  f"[95% paired bootstrap]")
            for k, v in summary[key].items():
                print(f"  {k:<70} {v[0]:+.3f} [{v[1]:+.3f},{v[2]:+.3f}]" if v else f"  {k:<70} -")


def evaluate(cfg: EvalConfig) -> dict:
    """Every condition judged on cfg.data's targets, printed as tables; the summary."""
    samples = read_samples(cfg.data)[:cfg.limit or None]
    if cfg.out:
        output_file(cfg.out)
    # checked before judging
    profiles = {f"profiles: {path}": profile_texts(path, samples) for path in cfg.profiles}
    if cfg.val_data and cfg.task != "rating":
        raise LettingoError("--val-data fits the calibrated MAE of ratings: it needs --task rating")
    if cfg.val_profiles and not cfg.val_data:
        raise LettingoError("--val-profiles needs --val-data (the samples they were written for)")
    if cfg.val_data and len(cfg.val_profiles) != len(profiles):
        raise LettingoError(f"--val-profiles: one file per --profiles file ({len(profiles)}), in the same "
                            f"order, got {len(cfg.val_profiles)}")
    val = read_samples(cfg.val_data)[:cfg.limit or None] if cfg.val_data else []
    val_profiles = {name: profile_texts(path, val) for name, path in zip(profiles, cfg.val_profiles)}
    if cfg.judge == "none" and (profiles or cfg.judge_url):
        raise LettingoError("--judge none gives the no-LLM rows only: it judges no --profiles")
    judge = None if cfg.judge == "none" else make_judge(cfg)
    # the affine calibration of every condition, fitted on the validation users' predictions
    calibration = calibrations(val, judge_conditions(val, judge, cfg.task, val_profiles)) if val else None
    rows = judge_conditions(samples, judge, cfg.task, profiles)
    names = list(profiles)
    headroom = [(ITEM_MEAN, ITEM_KNN)] if ITEM_KNN in rows else []    # what reading the history can add
    summary = summarize(cfg.task, samples, rows, compare=[(names[0], b) for b in names[1:]] + headroom,
                        calibration=calibration)
    print_summary(summary)
    if cfg.out:
        with open(cfg.out, "w") as f:
            for i, t in enumerate(eval_targets(samples)):
                preds = {k: [c.preds[j] for j, x in enumerate(c.idx) if x == i] for k, c in rows.items()}
                f.write(json.dumps({"user_id": t["user_id"], "item_id": t["item_id"],
                                    "truth": t["rating"] if cfg.task == "rating" else t["label"],
                                    **{k: v[0] if len(v) == 1 else v for k, v in preds.items()}}) + "\n")
    if judge is None:
        return summary
    print(f"judge failures: {judge.failures}, unparseable answers: {judge.bad_answers}"
          + (f", retries: {judge.retried}, fallbacks to decode: {judge.fallbacks}"
             + (f", answer tokens' mean mass: {judge.mass_sum / judge.mass_n:.3f}" if judge.mass_n else "")
             if isinstance(judge, HTTPJudge) else ""))
    if judge.failures and judge.failures >= len(samples):
        raise LettingoError(f"the judge failed on every request ({judge.failures}); "
                            f"is {cfg.judge_url} reachable?")
    return summary


def main():
    p = ArgParser(description="Judge user profiles by how well a frozen recommender predicts with them, "
                              "next to baselines that need no profile writer.")
    add_config(p, EvalConfig, skip=("profiles", "val_profiles", "reward"))
    p.add_argument("--profiles", nargs="+", default=[],
                   help="profiles JSONL file(s) from rollout.py (matched by user_id, item_id); "
                        "--judge none: only the rows without an LLM")
    p.add_argument("--val-profiles", nargs="+", default=[],
                   help="with --val-data: the same writers' profiles of the validation users, one file per "
                        "--profiles file, in its order")
    args = p.parse_args()
    evaluate(config_from(EvalConfig, args, profiles=tuple(args.profiles),
                         val_profiles=tuple(args.val_profiles)))


if __name__ == "__main__":
    cli(main)
