"""tools/learning.py is a long job, so a flag it passes that a stage's CLI does not take would
surface an hour in. Here every stage command of the recipe goes through that CLI's own parser
(grpo.py, dpo.py: the config it gives is checked) or runs until it needs a model (rollout.py) or to
the end (data/prepare.py)."""
import os

import pytest
from conftest import run

import dpo
import grpo
from tools import judge, learning


def recipe(tmp_path, *flags):
    args = learning.parse_args(["--dataset", "synthetic", "--out", str(tmp_path / "run"), *flags])
    return {st.name: st for st in learning.recipe(args, args.out)}


def config(stage):
    """The config a stage's command line gives, through its CLI's own parser."""
    if stage.script == "grpo.py":
        return grpo.parse_config(stage.argv)
    if stage.script == "tools/judge.py":
        return judge.parse_config(stage.argv)
    return dpo.parse_config(stage.argv)[1]


@pytest.mark.parametrize("flags", [[], ["--dpo-start", "warm"],
                                   ["--train-judge", "--judge-users", "40", "--profile-history", "30"],
                                   ["--no-explore-template", "--no-dpo", "--grpo-kl", "0.1"]])
def test_every_stage_command_is_accepted_by_its_cli(tmp_path, flags):
    stages = recipe(tmp_path, *flags)
    assert ("DPO: pairs" in stages) == ("--no-dpo" not in flags)
    for name, st in stages.items():
        if st.script in ("grpo.py", "dpo.py", "tools/judge.py"):
            config(st)                                   # raises SystemExit on an unknown or invalid flag
        elif st.script == "rollout.py":                  # runs until it loads the model, which does not exist
            argv = [("/nonexistent/model" if a == st.argv[st.argv.index("--model") + 1] else a)
                    for a in st.argv]
            r = run(st.script, *argv, timeout=120)
            assert r.returncode != 0 and "/nonexistent/model" in r.stderr, (name, r.stderr[-500:])
        else:                                            # data/prepare.py runs for real (synthetic users)
            r = run(st.script, *st.argv, timeout=120)
            assert r.returncode == 0, (name, r.stderr[-1000:])


def test_stages_run_the_presets(tmp_path):
    """The GRPO and DPO stages are the presets grpo.LEARNING / dpo.LEARNING with the recipe's paths."""
    stages = recipe(tmp_path)
    g = config(stages["GRPO from the warm start"])
    assert ((g.steps, g.prompts_per_step, g.group_size, g.temperature, g.lr, g.kl_coef)
            == (30, 8, 8, 0.8, 1e-5, 0.0))
    assert g.model.endswith(os.path.join("explore-base", "sft", "ckpt-000016", "model"))
    sft = config(stages["warm start: SFT on the best explored profiles"])
    assert (sft.lr, sft.steps, sft.task, sft.val_users) == (2e-5, 16, "rating", 100)


def test_template_explorer_is_the_default_and_can_be_left_out(tmp_path):
    models = lambda stages: next(config(st).models for name, st in stages.items()
                                 if name.startswith("explore: "))
    assert models(recipe(tmp_path)) == "smollm2-135m,template"
    assert models(recipe(tmp_path, "--no-explore-template")) == "smollm2-135m"
    prep = recipe(tmp_path)["prepare data"].argv
    assert prep[prep.index("--val-users") + 1] == "100"


def test_dpo_pairs_stage_takes_the_margin_flag(tmp_path):
    assert config(recipe(tmp_path, "--dpo-min-margin", "0.03")["DPO: pairs"]).min_margin == 0.03


def test_reward_and_rpo_flags_reach_their_stages_and_every_writer_writes_val_profiles(tmp_path):
    stages = recipe(tmp_path, "--grpo-reward", "rating+rank", "--dpo-rpo-alpha", "0.5")
    assert config(stages["GRPO from the warm start"]).reward == "rating+rank"
    assert config(stages["DPO from the base writer"]).rpo_alpha == 0.5
    assert ({n for n in stages if n.startswith("val profiles: ")}
            == {f"val profiles: {w}" for w in ("base", "warm", "grpo", "dpo")})


def test_dpo_start_picks_the_model_and_the_explored_profiles(tmp_path):
    out = lambda st: os.path.basename(config(st).out)
    base = recipe(tmp_path)             # the paper: the base writer on the first exploration's pairs
    assert "DPO: explore with the warm start" not in base
    train = base["DPO from the base writer"]
    assert config(train).model == "smollm2-135m" and out(train) == out(base["DPO: pairs"]) == "explore-base"
    warm = recipe(tmp_path, "--dpo-start", "warm")           # the warm start explores again
    train = warm["DPO from the warm start"]
    assert config(train).model.endswith(os.path.join("explore-base", "sft", "ckpt-000016", "model"))
    assert (out(train) == out(warm["DPO: pairs"]) == out(warm["DPO: explore with the warm start"])
            == "explore-warm")


def test_the_judge_flags_reach_every_stage(tmp_path):
    stages = recipe(tmp_path, "--judge-url", "http://judge:8008", "--judge", "big", "--judge-mode", "decode")
    configs = [config(st) for st in stages.values() if st.script in ("grpo.py", "dpo.py")]
    assert len(configs) >= 5
    assert {(c.judge_url, c.judge, c.judge_mode) for c in configs} == {("http://judge:8008", "big", "decode")}


def test_a_trained_judge_is_the_judge_of_every_later_stage(tmp_path):
    stages = recipe(tmp_path, "--train-judge", "--judge-users", "50", "--judge-steps", "7")
    names = list(stages)
    assert names[:2] == ["prepare data", "fine-tune the judge"]
    prep, tuned = stages["prepare data"].argv, config(stages["fine-tune the judge"])
    assert prep[prep.index("--judge-users") + 1] == "50"
    assert tuned.steps == 7 and tuned.data.endswith(os.path.join("data", "judge.jsonl"))
    path = stages["fine-tune the judge"].done
    assert path.endswith(os.path.join("judge", "ckpt-000007", "model"))
    configs = [config(st) for st in stages.values() if st.script in ("grpo.py", "dpo.py")]
    assert len(configs) >= 5 and {c.judge for c in configs} == {path}
    assert "--judge-users" not in recipe(tmp_path)["prepare data"].argv    # the zero-shot judge: no split
