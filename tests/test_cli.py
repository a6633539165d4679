"""Every CLI on bad input: a non-zero exit with one `error:` line, no traceback, and -- for argument
errors -- before any model loads (the model named here does not exist, so loading it would say so)."""
import json
import socket

import pytest
from conftest import run

NOMODEL = "/nonexistent/model"


def assert_clear_error(r, *words):
    assert r.returncode != 0, r.stdout[-500:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    r = run("data/prepare.py", "synthetic", "--users", "30", "--out", d / "data", "--test-users", "4",
            "--val-users", "2")
    assert r.returncode == 0, r.stderr
    (d / "profiles.jsonl").write_text(json.dumps({"user_id": "u", "item_id": "i",
                                                  "generations": [{"text": "x"}]}) + "\n")
    (d / "nohistory.jsonl").write_text(json.dumps({"user_id": "u", "item_id": "i", "title": "t",
                                                   "rating": 3}) + "\n")
    return d


@pytest.mark.parametrize("argv,words", [
    (["rollout.py", "--data", "D/data/test.jsonl", "--out", "D/o.jsonl", "--limit", "-1", "--model", NOMODEL],
     ["--limit"]),
    (["rollout.py", "--data", "D/data/test.jsonl", "--out", "D/o.jsonl", "--temperature", "-1",
      "--model", NOMODEL], ["--temperature"]),
    (["rollout.py", "--data", "D/data/test.jsonl", "--out", "D/o.jsonl", "--n", "0", "--model", NOMODEL],
     ["--n"]),
    (["rollout.py", "--data", "D/data/test.jsonl", "--out", "D/data", "--model", NOMODEL], ["is a folder"]),
    (["rollout.py", "--data", "D/profiles.jsonl", "--out", "D/o.jsonl", "--model", NOMODEL], ["neither"]),
    (["tools/evaluate.py", "--data", "D/profiles.jsonl", "--judge", NOMODEL], ["profiles file"]),
    (["tools/evaluate.py", "--data", "D/nohistory.jsonl", "--judge", NOMODEL], ["lacks", "history"]),
    (["tools/evaluate.py", "--data", "D/data/test.jsonl", "--judge-token-budget", "0", "--judge", NOMODEL],
     ["--judge-token-budget"]),
    (["tools/evaluate.py", "--data", "D/data/test.jsonl", "--profiles", "D/profiles.jsonl",
      "--judge", NOMODEL],
     ["no profile for user"]),
    (["tools/evaluate.py", "--data", "D/data/test.jsonl", "--val-data", "D/data/val.jsonl",
      "--task", "sentiment", "--judge", NOMODEL], ["--val-data", "--task rating"]),
    (["tools/evaluate.py", "--data", "D/data/test.jsonl", "--judge-url", "http://127.0.0.1:9",
      "--judge-retries", "0"],
     ["does not answer"]),
    (["tools/serve.py", "--port", "-1", "--model", NOMODEL], ["--port"]),
    (["grpo.py", "--group-size", "0", "--model", NOMODEL], ["--group-size"]),
    (["grpo.py", "--reward", "rank", "--task", "sentiment", "--model", NOMODEL],
     ["--reward rank", "--task rating"]),
    (["dpo.py", "evaluate", "--reward", "rating+rank", "--task", "sentiment", "--data", "D/data/train.jsonl",
      "--model", NOMODEL],
     ["--reward rating+rank"]),
    (["grpo.py", "--eval-every", "0", "--model", NOMODEL], ["--eval-every"]),
    (["grpo.py", "--max-new-tokens", "0", "--model", NOMODEL], ["--max-new-tokens"]),
    (["grpo.py", "--steps", "-1", "--model", NOMODEL], ["--steps"]),
    (["grpo.py", "--attention", "varlen", "--data", "D/data", "--model", NOMODEL],
     ["--attention varlen cannot run here"]),
    (["grpo.py", "--data", "D/data", "--out", "D/profiles.jsonl", "--model", NOMODEL],
     ["exists and is not a folder"]),
    (["dpo.py", "explore", "--data", "D/data/train.jsonl", "--out", "D/profiles.jsonl", "--model", NOMODEL],
     ["exists and is not a folder"]),
    (["dpo.py", "--explore-n", "0"], ["--explore-n"]),
    (["tools/learning.py", "--raw", "D/data", "--dpo-n", "0"], ["--dpo-n"]),
    (["tools/learning.py", "--raw", "D/data", "--dpo-min-margin", "-0.1"], ["--dpo-min-margin"]),
    (["tools/learning.py", "--raw", "D/data", "--dpo-start", "sft"], ["--dpo-start"]),
    (["dpo.py", "train", "--data", "D/profiles.jsonl", "--out", "D/dpo", "--model", NOMODEL],
     ["profiles file"]),
    (["data/prepare.py", "synthetic", "--users", "-5", "--out", "D/s"], ["--users"]),
    (["data/prepare.py", "synthetic", "--test-users", "-1", "--out", "D/s"], ["--test-users"]),
    (["data/prepare.py", "synthetic", "--out", "D/profiles.jsonl"], ["exists and is not a folder"]),
    (["lettingo.py", "D/fake.gguf"], ["cannot read the model", "GGUF"]),
    (["lettingo.py", "D/badcfg"], ["cannot read the model", "JSON"]),
    (["lettingo.py", "D/cut"], ["cannot read the model"]),
    (["lettingo.py", "D/run"], ["a training run's folder", "run/ckpt-000002/model"]),
    (["dpo.py", "train", "--data", "D/data", "--out", "D/dpo", "--model", NOMODEL],
     ["a folder", "train.jsonl"]),
    (["data/prepare.py", "movielens", "--raw", "D/data/train.jsonl", "--out", "D/s"], ["a file", "folder"]),
    (["reward.py"], ["--data", "--profiles"]),
    (["lettingo.py", "D/run/ckpt-000002"], ["a training run's folder", "ckpt-000002/model"]),
])
def test_bad_input_is_one_clear_line(data, argv, words):
    (data / "fake.gguf").write_text("not a gguf file")
    (data / "badcfg").mkdir(exist_ok=True)
    (data / "badcfg" / "config.json").write_text("{not json")
    if not (data / "cut").exists():                        # a real checkpoint with its weights file cut short
        from conftest import make_model
        make_model(str(data / "cut"))
        w = data / "cut" / "model.safetensors"
        w.write_bytes(w.read_bytes()[:len(w.read_bytes()) // 2])
    for step in (1, 2):                                    # a run folder passed where a model goes
        (data / "run" / f"ckpt-00000{step}" / "model").mkdir(parents=True, exist_ok=True)
        (data / "run" / f"ckpt-00000{step}" / "model" / "config.json").write_text("{}")
    (data / "run" / "config.json").write_text(json.dumps({"lr": 1e-6}))
    assert_clear_error(run(*[a.replace("D/", f"{data}/") for a in argv]), *words)


def test_a_file_that_is_not_jsonl_is_a_few_lines_not_one_per_line(tmp_path):
    bad = tmp_path / "u.data"
    bad.write_text("".join(f"{u}\t{u % 7}\t4\t88125{u}\n" for u in range(1000)))
    r = run("rollout.py", "--data", bad, "--out", tmp_path / "o.jsonl", "--model", NOMODEL)
    lines = [x for x in (r.stdout + r.stderr).splitlines() if x.strip()]
    assert r.returncode != 0 and len(lines) <= 5
    assert lines[-1].startswith("error:") and "not JSONL" in lines[-1]


def test_the_demos_take_flags_on_top_of_their_presets():
    import dpo
    import grpo
    assert grpo.parse_config(["--steps", "1"]) == grpo.dataclasses.replace(grpo.DEMO, steps=1)
    assert grpo.parse_config(["--resume"]).resume and grpo.parse_config([]) == grpo.DEMO
    assert dpo.parse_config(["--steps", "2"]) == ("all", dpo.dataclasses.replace(dpo.DEMO, steps=2))
    given = grpo.parse_config(["--data", "runs/x"])           # with --data: the class' defaults
    assert given.steps == grpo.GRPOConfig().steps and given.out == grpo.GRPOConfig().out


def test_serve_port_in_use_fails_before_loading():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = run("tools/serve.py", "--port", s.getsockname()[1], "--model", NOMODEL)
    assert_clear_error(r, "cannot listen")                 # the port, not the missing model: checked first


def test_plot_usage():
    r = run("tools/plot.py", "--help")
    assert r.returncode == 0 and "RUN_DIR" in r.stdout and "curves.png" in r.stdout, r.stderr
    assert_clear_error(run("tools/plot.py", "/nonexistent/run"), "no metrics.jsonl")


def test_each_setting_has_one_default():
    """A setting shared by several commands is one field of one config class (RewardConfig,
    SamplingParams, TrainConfig, ...) that the others inherit or refer to; no config class declares a
    field of its base again with another default (the run folder `out` excepted: each command has its
    own), and every command line's flags come from these classes."""
    import dataclasses
    import dpo
    import grpo
    import reward
    import rollout
    import train
    from data import prepare
    from tools import evaluate, judge, learning
    configs = [reward.RewardConfig, reward.ScoreConfig, rollout.SamplingParams, rollout.RolloutConfig,
               train.TrainConfig, grpo.GRPOConfig, dpo.DPOConfig, evaluate.EvalConfig, judge.JudgeTrainConfig,
               prepare.PrepareConfig, learning.LearningConfig]
    for cls in configs:
        own = cls.__dict__.get("__annotations__", {})
        for base in cls.__mro__[1:]:
            if dataclasses.is_dataclass(base):
                again = sorted(set(own) & {f.name for f in dataclasses.fields(base)} - {"out"})
                assert not again, f"{cls.__name__} declares {again} of {base.__name__} again"
    # the same name means the same default wherever two unrelated configs both have it
    defaults = {}
    for cls in configs:
        for f in dataclasses.fields(cls):
            if f.name != "out" and f.default is not dataclasses.MISSING and f.default is not None:
                defaults.setdefault(f.name, {})[cls.__name__] = f.default
    mixed = {name: by for name, by in defaults.items() if len(set(map(repr, by.values()))) > 1}
    # the recipe's flags are its presets' values (grpo.LEARNING, ...), which differ from the classes'
    mixed = {name: by for name, by in mixed.items() if set(by) - {"LearningConfig"} and
             len({repr(v) for k, v in by.items() if k != "LearningConfig"}) > 1}
    assert not mixed, mixed
