"""tools/learning.py -- the learning recipe end to end: prepare the data, explore profiles with the
base writer (and the code-written template), score them, warm-start the writer on the best ones
(SFT), train it with GRPO, align the base writer with DPO on pairs of the same explored profiles,
then judge every writer's greedy profiles on held-out test users next to the no-LLM baselines.

    python tools/learning.py --raw DATA/ml-100k --out runs/learning
Each stage is a plain command of grpo.py / dpo.py / rollout.py / data/prepare.py (printed, logged to
OUT/logs), built from the presets grpo.LEARNING, dpo.LEARNING and dpo.LEARNING_SFT; a stage whose
output exists is skipped, so rerunning the command continues a stopped run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
import dpo  # noqa: E402
import grpo  # noqa: E402
from data.prepare import PrepareConfig  # noqa: E402
from lettingo import (DEFAULT_MODEL, PROFILE_CLOSE, PROFILE_OPEN, ArgParser, LettingoError,  # noqa: E402
                      add_config, cli, config_from, option, read_jsonl)
from reward import REWARDS, RewardConfig, make_judge, profile_texts, template_profile  # noqa: E402
from tools.evaluate import calibrations, judge_conditions, print_summary, summarize  # noqa: E402
from tools.judge import JUDGE  # noqa: E402

BASE = DEFAULT_MODEL                          # the untrained writer: explorer, DPO's start, a test row
DPO_START = {"base": "base writer", "warm": "warm start"}


@dataclass
class Stage:
    name: str
    script: str           # relative to the repository
    argv: list[str]
    done: str             # the file whose existence marks the stage done

    def command(self) -> list[str]:
        return [sys.executable, os.path.join(HERE, self.script), *self.argv]


def to_argv(cfg, base=None) -> list[str]:
    """The flags that give `cfg` from the defaults of `base` (default: the class' own defaults),
    so a preset can be run, and rerun by hand, as a plain command line."""
    base = base if base is not None else type(cfg)()
    argv = []
    for f in dataclasses.fields(cfg):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if value == getattr(base, f.name):
            continue
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    return argv


def recipe(args, out) -> list[Stage]:
    """The stages, in order."""
    data = os.path.join(out, "data")
    tr, va, te = (os.path.join(data, f"{s}.jsonl") for s in ("train", "val", "test"))
    eb, ew = os.path.join(out, "explore-base"), os.path.join(out, "explore-warm")
    warm = os.path.join(eb, "sft", f"ckpt-{args.sft_steps:06d}", "model")
    grpo_model = os.path.join(out, "grpo", f"ckpt-{args.grpo_steps:06d}", "model")
    # DPO from the base writer (the paper) trains on pairs of the first exploration; from the warm
    # start it explores again with the warm start, since its pairs must be of what that writer writes
    dpo_dir = eb if args.dpo_start == "base" else ew
    dpo_model = os.path.join(dpo_dir, "train", f"ckpt-{args.dpo_steps:06d}", "model")
    judging = dict(judge=judge_of(args), judge_url=args.judge_url, judge_mode=args.judge_mode)
    run = lambda preset, **kw: to_argv(dataclasses.replace(preset, max_new_tokens=args.max_new_tokens,
                                                           **judging, **kw))
    stage = lambda stage, **kw: [stage] + run(dpo.LEARNING, data=tr, **kw)
    explorers = BASE + (",template" if args.explore_template else "")     # code as a second explorer
    written = lambda split, model, name: Stage(
        f"{split} profiles: {name}", "rollout.py",
        ["--model", model, "--data", os.path.join(data, f"{split}.jsonl"), "--temperature", "0",
         "--max-new-tokens", str(args.max_new_tokens), "--dtype", "bfloat16",
         "--out", os.path.join(out, f"{split}-{name}.jsonl")], os.path.join(out, f"{split}-{name}.jsonl"))
    stages = [Stage("prepare data", "data/prepare.py", prepare_argv(args, data), te)]
    stages += judge_stage(args, data)
    stages += [
        Stage("explore: " + explorers.replace(",", " + "), "dpo.py",
              stage("explore", out=eb, models=explorers, explore_users=args.explore_users,
                    explore_n=args.explore_n),
              f"{eb}/profiles.jsonl"),
        Stage("evaluate explored profiles", "dpo.py", stage("evaluate", out=eb), f"{eb}/scores-rating.jsonl"),
        Stage("warm start: SFT on the best explored profiles", "dpo.py",
              ["sft"] + run(dpo.LEARNING_SFT, data=tr, out=eb, val_data=va, steps=args.sft_steps,
                            eval_every=args.sft_steps, save_every=args.sft_steps, val_users=args.val_users),
              warm),
        Stage("GRPO from the warm start", "grpo.py",
              run(grpo.LEARNING, model=warm, data=data, out=os.path.join(out, "grpo"), steps=args.grpo_steps,
                  lr=args.grpo_lr, kl_coef=args.grpo_kl, seed=args.grpo_seed, reward=args.grpo_reward,
                  eval_every=args.grpo_steps // 3,
                  save_every=args.grpo_steps, val_users=args.val_users), grpo_model)]
    if not args.no_dpo:
        if args.dpo_start == "warm":
            stages += [Stage("DPO: explore with the warm start", "dpo.py",
                             stage("explore", out=ew, models=warm, explore_users=args.dpo_users,
                                   explore_n=args.dpo_n, temperature=args.dpo_temperature),
                             f"{ew}/profiles.jsonl"),
                       Stage("DPO: evaluate", "dpo.py", stage("evaluate", out=ew),
                             f"{ew}/scores-rating.jsonl")]
        stages += [Stage("DPO: pairs", "dpo.py", stage("pairs", out=dpo_dir, min_margin=args.dpo_min_margin),
                         os.path.join(dpo_dir, "pairs-rating.jsonl")),
                   Stage(f"DPO from the {DPO_START[args.dpo_start]}", "dpo.py",
                         stage("train", out=dpo_dir, model=BASE if args.dpo_start == "base" else warm,
                               val_data=va, steps=args.dpo_steps, eval_every=args.dpo_steps // 2,
                               rpo_alpha=args.dpo_rpo_alpha,
                               save_every=args.dpo_steps, val_users=args.val_users), dpo_model)]
    writers = [(BASE, "base"), (warm, "warm"), (grpo_model, "grpo")] + (
        [] if args.no_dpo else [(dpo_model, "dpo")])
    # the validation users' profiles fit each writer's calibration (reward.affine_fit)
    return stages + [written(split, m, name) for split in ("test", "val") for m, name in writers]


def prepare_argv(args, data) -> list[str]:
    """data/prepare.py's command line for the recipe's data."""
    return [args.dataset, "--out", data, "--test-users", str(args.test_users),
            "--val-users", str(args.val_users), "--reward-targets", str(args.reward_targets),
            "--eval-targets", str(args.eval_targets), "--profile-history", str(args.profile_history),
            "--recent", str(args.recent)] + (
            ["--judge-users", str(args.judge_users)] if args.train_judge else []) + (
            ["--raw", args.raw] if args.raw else []) + (["--meta", args.meta] if args.meta else [])


def judge_stage(args, data) -> list[Stage]:
    """--train-judge: fine-tune the judge on judge users the writer never sees; every later stage uses it."""
    if not args.train_judge:
        return []
    return [Stage("fine-tune the judge", "tools/judge.py", to_argv(dataclasses.replace(
        JUDGE, data=os.path.join(data, "judge.jsonl"), val_data=os.path.join(data, "val.jsonl"),
        out=os.path.join(args.out, "judge"), steps=args.judge_steps, eval_every=args.judge_steps,
        save_every=args.judge_steps, val_users=args.val_users)), judge_of(args))]


def judge_of(args) -> str:
    """The judge of every stage after the data: the fine-tuned one (--train-judge), or --judge."""
    if args.train_judge:
        return os.path.join(args.out, "judge", f"ckpt-{args.judge_steps:06d}", "model")
    return args.judge


def run_recipe(args):
    """Prepare -> explore -> warm start -> GRPO and DPO -> judge every condition on the test users."""
    out = args.out
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    times = {}
    for k, st in enumerate(recipe(args, out)):
        if os.path.exists(st.done):
            print(f"[{k}] {st.name}: done ({st.done})", flush=True)
            continue
        log = os.path.join(out, "logs", f"{k:02d}.log")
        print(f"[{k}] {st.name}: {' '.join(st.command())}\n     log: {log}", flush=True)
        t0 = time.time()
        with open(log, "w") as f:
            rc = subprocess.run(st.command(), stdout=f, stderr=subprocess.STDOUT, cwd=HERE).returncode
        times[st.name] = time.time() - t0
        print(f"     {times[st.name] / 60:.1f} min", flush=True)
        if rc != 0 or not os.path.exists(st.done):
            raise SystemExit(f"error: stage '{st.name}' failed (exit {rc}); see {log}")
    names = {"base": "base writer (untrained)", "warm": "warm start (SFT on best explored)",
             "grpo": "GRPO (from the warm start)",
             **({} if args.no_dpo else {"dpo": f"DPO (from the {DPO_START[args.dpo_start]})"})}

    def conditions(split):
        samples = read_jsonl(os.path.join(out, "data", f"{split}.jsonl"))
        profiles = {names[k]: profile_texts(os.path.join(out, f"{split}-{k}.jsonl"), samples) for k in names}
        profiles["template without genres"] = [[f"{PROFILE_OPEN}{template_profile(s, 'none')}{PROFILE_CLOSE}"]
                                               for s in samples]                # what the judge reads
        return samples, judge_conditions(samples, judge, "rating", profiles)
    judge = make_judge(RewardConfig(judge=judge_of(args), judge_url=args.judge_url,
                                    judge_mode=args.judge_mode))
    calibration = calibrations(*conditions("val"))
    test, rows = conditions("test")
    pairs = [("base", "warm"), ("warm", "grpo"), ("warm", "dpo"), ("base", "grpo"), ("base", "dpo")]
    summary = summarize("rating", test, rows, compare=(
        [(names[a], names[b]) for a, b in pairs if b in names] +
        [("template profile (code, no LLM)", names[k]) for k in ("grpo", "dpo") if k in names] +
        [("template profile (code, no LLM)", "template without genres"),
         ("template profile (code, no LLM)", "template, likes/dislikes swapped")]), calibration=calibration)
    summary["stage_minutes"] = {k: round(v / 60, 2) for k, v in times.items()}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print_summary(summary)
    print_closing_lines(summary, names, args)


def print_closing_lines(summary, names, args):
    """The recipe's three closing lines: MAE with the paired gains, within-user ordering, calibrated MAE."""
    mae = lambda n: f"{summary['rows'][n]['all']['MAE'][0]:.3f}"
    ci = lambda a, b: "[{1:+.3f},{2:+.3f}]".format(*summary["paired"][f"{a} -> {b}"])
    dpo = "" if args.no_dpo else f" dpo={mae(names['dpo'])}"
    # over DPO's own start
    dpo_ci = "" if args.no_dpo else f" dpo_gain_ci={ci(names[args.dpo_start], names['dpo'])}"
    print(f"learning base={mae(names['base'])} grpo={mae(names['grpo'])}{dpo} "
          f"template={mae('template profile (code, no LLM)')} no_profile={mae('no profile')} "
          f"user_mean={mae('user mean (no LLM)')} "
          f"global_median={mae('global median (no LLM)')} "
          f"grpo_gain_ci={ci(names['warm'], names['grpo'])}{dpo_ci} "
          f"start={mae(names['warm'])} start_gain_ci={ci(names['base'], names['warm'])}")
    # within-user ordering, which no constant wins (1/2); the CI is of GRPO minus the template
    gauc = lambda n: f"{summary['rows'][n]['all']['GAUC'][0]:.3f}"
    d, lo, hi = summary["paired_GAUC"][f"template profile (code, no LLM) -> {names['grpo']}"]
    print(f"ranking grpo_gauc={gauc(names['grpo'])} template_gauc={gauc('template profile (code, no LLM)')} "
          f"item_mean_gauc={gauc('item mean (no LLM)')} no_profile_gauc={gauc('no profile')} "
          + ("" if args.no_dpo else f"dpo_gauc={gauc(names['dpo'])} ")
          + f"grpo_minus_template_gauc_ci=[{-hi:+.3f},{-lo:+.3f}] item_mean={mae('item mean (no LLM)')}")
    # MAE after each condition's affine map fitted on the validation users: level no longer counts
    cal = lambda n: f"{summary['rows'][n]['all']['calibrated_MAE'][0]:.3f}"
    print(f"calibrated grpo={cal(names['grpo'])} " + ("" if args.no_dpo else f"dpo={cal(names['dpo'])} ")
          + f"start={cal(names['warm'])} base={cal(names['base'])} "
          f"template={cal('template profile (code, no LLM)')} no_profile={cal('no profile')} "
          f"item_mean={cal('item mean (no LLM)')} user_mean={cal('user mean (no LLM)')} "
          f"global_median={cal('global median (no LLM)')}")



@dataclass
class LearningConfig:
    """The recipe's own settings; a default that a stage also has is that stage's preset value
    (grpo.LEARNING, dpo.LEARNING, dpo.LEARNING_SFT, tools/judge.JUDGE, data/prepare.PrepareConfig)."""
    dataset: str = option("movielens", "data/prepare.py's reader", choices=("movielens", "amazon", "yelp",
                                                                             "synthetic"))
    raw: str | None = option(None, "the dataset as data/prepare.py reads it (folder or file)", kind=str)
    meta: str | None = option(None, "amazon: metadata file", kind=str)
    out: str = option("runs/learning", "run folder (stages found done there are skipped)")
    judge: str = option(grpo.LEARNING.judge, "the judge of every stage and of the test users: a local model, "
                        "or the name sent to --judge-url")
    judge_url: str | None = option(None, "an OpenAI-compatible judge server (vLLM, SGLang, tools/serve.py) "
                                   "for every stage", kind=str)
    judge_mode: str = option(grpo.LEARNING.judge_mode, "expect: expected rating (a server must return "
                             "top_logprobs); decode: greedy answer, parsed", choices=("expect", "decode"))
    train_judge: bool = option(False, "fine-tune the judge first (tools/judge.py) on --judge-users training "
                               "users the writer never sees; every later stage and the test judging use it")
    judge_users: int = option(300, "--train-judge: training users kept for the judge", min=1)
    judge_steps: int = option(JUDGE.steps, "--train-judge: the judge's steps", min=1)
    profile_history: int = option(PrepareConfig.profile_history, "interactions the profile is written from "
                                  "(data/prepare.py; the paper: 30)", min=1)
    recent: int = option(PrepareConfig.recent, "most recent interactions shown raw to the judge "
                         "(data/prepare.py; the paper: 10)", min=0)
    test_users: int = option(100, "held-out users every writer is judged on", min=1)
    val_users: int = option(dpo.LEARNING.val_users, "the only users settings are chosen on", min=1)
    max_new_tokens: int = option(dpo.LEARNING.max_new_tokens, "profile budget of every stage", min=1)
    reward_targets: int = option(4, "training rewards average the judge over this many next items of the "
                                 "user (data/prepare.py --reward-targets)", min=1)
    eval_targets: int = option(PrepareConfig.eval_targets, "validation and test users are judged on this "
                               "many of their last items (1: one target each)", min=1)
    explore_users: int = option(dpo.LEARNING.explore_users, "training users the base writer explores", min=1)
    explore_n: int = option(dpo.LEARNING.explore_n, "profiles explored per user", min=1)
    explore_template: bool = option(True, "the template profile (code) joins the explored profiles: the warm "
                                    "start then fine-tunes on whichever scores best per user")
    sft_steps: int = option(dpo.LEARNING_SFT.steps, "warm start (SFT) steps", min=1)
    grpo_steps: int = option(grpo.LEARNING.steps, "GRPO steps (validated every third)", min=3)
    grpo_lr: float = option(grpo.LEARNING.lr, "GRPO learning rate", min=0.0)
    grpo_kl: float = option(grpo.LEARNING.kl_coef, "GRPO's k3 KL-to-the-warm-start weight (0: no reference "
                            "model)", min=0.0)
    grpo_seed: int = option(grpo.LEARNING.seed, "GRPO's data order and sampling seed")
    grpo_reward: str = option(grpo.LEARNING.reward, "GRPO's reward (grpo.py --reward)", choices=REWARDS)
    dpo_start: str = option("base", "DPO's start, and the start its gain is measured over: base = the paper "
                            "(the base writer, on pairs of the first exploration); warm = the warm start, on "
                            "pairs of a second exploration by it", choices=tuple(sorted(DPO_START)))
    dpo_users: int = option(96, "--dpo-start warm: users the warm start explores", min=1)
    dpo_n: int = option(4, "--dpo-start warm: profiles explored per user", min=1)
    dpo_temperature: float = option(0.8, "--dpo-start warm: exploration temperature", min=0.0)
    dpo_min_margin: float = option(dpo.LEARNING.min_margin, "DPO: a pair's least reward gap (1 star = 0.25)",
                                   min=0.0)
    dpo_steps: int = option(dpo.LEARNING.steps, "DPO steps (validated every half)", min=2)
    dpo_rpo_alpha: float = option(dpo.LEARNING.rpo_alpha, "DPO: weight of the chosen profiles' NLL "
                                  "(dpo.py --rpo-alpha; 0 = plain DPO)", min=0.0)
    no_dpo: bool = option(False, "the GRPO branch only (about half the time)")


def parse_args(argv=None) -> LearningConfig:
    p = ArgParser(description="The learning recipe: prepare -> explore -> warm start -> GRPO / DPO -> "
                              "judged on held-out test users.")
    add_config(p, LearningConfig)
    return config_from(LearningConfig, p.parse_args(argv))


def main():
    args = parse_args()
    if not args.raw and args.dataset != "synthetic":
        raise LettingoError("--raw DATASET is required (or --dataset synthetic)")
    if args.train_judge and args.judge_url:
        raise LettingoError("--train-judge fine-tunes a local judge: serve it (tools/serve.py --model "
                            "OUT/judge/ckpt-STEP/model) and pass --judge-url in a second run, or drop "
                            "--judge-url")
    run_recipe(args)


if __name__ == "__main__":
    cli(main)
