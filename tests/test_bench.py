"""bench.py learning is a ~95-minute job, so a flag it passes that a stage's CLI does not take would
surface an hour in. Here every stage command of the recipe goes through that CLI's own argument
parser (grpo.py, dpo.py) or runs until it needs a model (rollout.py) or to the end (prepare.py)."""
import os
import subprocess
import sys

import pytest

import bench
import dpo
import grpo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recipe(tmp_path, *flags):
    args = bench.parse_args(["learning", "--dataset", "synthetic", "--out", str(tmp_path / "run"), *flags])
    return {name: cmd for name, cmd, _ in bench.learning_recipe(args, args.out)}


@pytest.mark.parametrize("flags", [[], ["--dpo-start", "warm"], ["--no-explore-template", "--no-dpo", "--grpo-kl", "0.1"]])
def test_every_stage_command_is_accepted_by_its_cli(tmp_path, flags):
    stages = recipe(tmp_path, *flags)
    assert ("DPO: pairs" in stages) == ("--no-dpo" not in flags)
    for name, cmd in stages.items():
        script, argv = os.path.relpath(cmd[1], ROOT), cmd[2:]
        if script == "grpo.py":
            grpo.parse_args(argv)                        # raises SystemExit on an unknown or invalid flag
        elif script == "dpo.py":
            dpo.parse_args(argv)
        elif script == "rollout.py":                     # runs until it loads the model, which does not exist
            argv[argv.index("--model") + 1] = "/nonexistent/model"
            r = subprocess.run([sys.executable, cmd[1], *argv], capture_output=True, text=True, cwd=ROOT, timeout=120)
            assert r.returncode != 0 and "/nonexistent/model" in r.stderr, (name, r.stderr[-500:])
        else:                                            # data/prepare.py runs for real (synthetic users)
            r = subprocess.run([sys.executable, *cmd[1:]], capture_output=True, text=True, cwd=ROOT, timeout=120)
            assert r.returncode == 0, (name, r.stderr[-1000:])


def test_template_explorer_is_the_default_and_can_be_left_out(tmp_path):
    models = lambda stages: next(cmd[cmd.index("--models") + 1] for name, cmd in stages.items() if name.startswith("explore: "))
    assert models(recipe(tmp_path)) == "smollm2-135m,template"
    assert models(recipe(tmp_path, "--no-explore-template")) == "smollm2-135m"
    prep = recipe(tmp_path)["prepare data"]
    assert prep[prep.index("--val-users") + 1] == "100"


def test_dpo_pairs_stage_takes_the_margin_flag(tmp_path):
    cmd = recipe(tmp_path, "--dpo-min-margin", "0.03")["DPO: pairs"]
    assert cmd[cmd.index("--min-margin") + 1] == "0.03"


def test_dpo_start_picks_the_model_and_the_explored_profiles(tmp_path):
    out = lambda cmd: os.path.basename(cmd[cmd.index("--out") + 1])
    base = recipe(tmp_path)                                  # the paper: the base writer on the first exploration's pairs
    assert "DPO: explore with the warm start" not in base
    train = base["DPO from the base writer"]
    assert train[train.index("--model") + 1] == "smollm2-135m" and out(train) == out(base["DPO: pairs"]) == "explore-base"
    warm = recipe(tmp_path, "--dpo-start", "warm")           # runs 2-9: the warm start explores again
    train = warm["DPO from the warm start"]
    assert train[train.index("--model") + 1].endswith(os.path.join("explore-base", "sft", "ckpt-000016", "model"))
    assert out(train) == out(warm["DPO: pairs"]) == out(warm["DPO: explore with the warm start"]) == "explore-warm"
