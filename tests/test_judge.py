"""tools/judge.py: the judge's fine-tuning loss against transformers' logits and the formula by hand;
a fine-tuned tiny judge loads wherever a judge is taken (make_judge, tools/evaluate.py, tools/serve.py)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run, tiny_run_folder

from lettingo import chat_prompt, load_model
from reward import ANSWERS, HTTPJudge, RewardConfig, answer_tokens, make_judge, packed_answer_logits
from tools.evaluate import context_messages
from tools.judge import judge_loss, make_example

H = lambda t, g, r: {"item_id": t, "title": t, "genres": g, "rating": r, "timestamp": 1}
SAMPLE = {"user_id": "u", "item_id": "i1", "title": "Heat (1995)", "description": "Genres: Action",
          "rating": 4.0, "user_mean": 3.2, "history": [H("Toy Story", "Comedy", 5), H("Alien", "Horror", 1)],
          "recent": [], "more_targets": [{"item_id": "i2", "title": "Toy Story 2", "description": "",
                                          "rating": 3.5},
                                         {"item_id": "i3", "title": "Romance (1990)", "rating": 1.0}]}


def reference_answer_logprobs(hf, tok, sample, kind):
    """Each target's prompt alone through transformers: log-softmax over the five answer tokens
    after the forced '<rating>'. -> [targets, 5]"""
    ids = answer_tokens(tok, *ANSWERS["rating"])
    out = []
    for t in [sample] + [{**sample, **m} for m in sample["more_targets"]]:
        prompt = chat_prompt(tok, context_messages(t, kind, "rating"), answer_prefix="<rating>")
        with torch.no_grad():
            logits = hf(torch.tensor([prompt])).logits[0, -1, ids].double()
        out.append(torch.log_softmax(logits, -1))
    return out


@pytest.mark.parametrize("kind", ["none", "history", "template"])
def test_judge_loss_against_transformers_and_the_formula_by_hand(tiny, kind):
    folder, hf = tiny
    model, tok = load_model(folder, device="cpu")
    example = make_example(tok, SAMPLE, kind)
    assert example.ratings == [4.0, 3.5, 1.0] and len(example.pairs) == 3
    logits = packed_answer_logits(model, example.pairs, answer_tokens(tok, *ANSWERS["rating"]))   # [3, 5]
    ratings = torch.tensor(example.ratings)
    ce, mse = judge_loss(logits, ratings, "ce"), judge_loss(logits, ratings, "mse")
    ref = reference_answer_logprobs(hf, tok, SAMPLE, kind)
    # cross-entropy: a whole star takes all the mass, a half star splits it between its two stars
    want_ce = [-ref[0][3], -(0.5 * ref[1][2] + 0.5 * ref[1][3]), -ref[2][0]]
    want_mse = [(sum((k + 1) * math.exp(lp[k]) for k in range(5)) - y) ** 2
                for lp, y in zip(ref, example.ratings)]
    assert max(abs(a - float(b)) for a, b in zip(ce.tolist(), want_ce)) < 1e-4
    assert max(abs(a - b) for a, b in zip(mse.tolist(), want_mse)) < 1e-4
    # the gradient reaches the weights through the packed forward
    ce.sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_a_fine_tuned_judge_logs_the_loss_by_hand_and_loads_everywhere(tmp_path):
    d = tiny_run_folder(tmp_path, 40)
    run("data/prepare.py", "synthetic", "--users", 40, "--out", d / "data", "--test-users", 4,
        "--val-users", 4, "--profile-history", 3, "--judge-users", 6, "--judge-contexts", 1,
        "--judge-targets", 2, check=True)
    out = d / "judge"
    r = run("tools/judge.py", "--model", d / "model", "--data", d / "data" / "judge.jsonl", "--val-data",
            d / "data" / "val.jsonl", "--out", out, "--steps", 2, "--contexts-per-step", 3, "--lr", 0.0,
            "--eval-every", 2, "--save-every", 2, timeout=600, check=True)
    assert "validation after" in r.stdout and "none GAUC" in r.stdout
    # step 0's loss is the mean cross-entropy of its examples' targets (lr 0: the weights stay the start)
    from train import step_examples
    samples = [json.loads(x) for x in open(d / "data" / "judge.jsonl")]
    contexts = ["none", "history", "template"]
    from train import Dist, rank_positions
    picked = step_examples(0, 0, 3, len(samples) * 3, rank_positions(3, 1, Dist(0, 1, torch.device("cpu"))))
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(d / "model").eval()
    tok = load_model(str(d / "model"), device="cpu")[1]
    losses = []
    for k, _ in picked:
        s = samples[k // 3]
        lps = reference_answer_logprobs(hf, tok, s, contexts[k % 3])
        losses += [-float(lp[int(t["rating"]) - 1]) for lp, t in zip(lps, [s] + s["more_targets"])]
    logged = json.loads(open(out / "metrics.jsonl").readline())
    assert logged["step"] == 0 and logged["loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-4)
    path = str(out / "ckpt-000002" / "model")
    judge = make_judge(RewardConfig(judge=path))          # grpo.py, dpo.py evaluate, validation: --judge PATH
    assert len(judge.predict([context_messages(s, "template", "rating") for s in samples[:2]], "rating")) == 2
    r = run("tools/evaluate.py", "--data", d / "data" / "test.jsonl", "--judge", path, "--limit", 2,
            timeout=300)
    assert r.returncode == 0 and "template, likes/dislikes swapped" in r.stdout, r.stderr[-2000:]
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "serve.py"), "--model", path,
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "serving" in proc.stdout.readline()
        http = HTTPJudge(f"http://127.0.0.1:{port}", mode="expect", timeout=30, retries=1)
        assert http.failures == 0 and len(http.predict([context_messages(samples[0], "none", "rating")],
                                                        "rating")) == 1
    finally:
        proc.terminate()
        proc.wait(10)
