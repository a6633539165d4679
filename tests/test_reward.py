"""reward.py: parsing, rewards and metrics by hand, expect mode vs brute force, HTTP judge vs the real server
and a fault-injecting one."""
import inspect
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch
from conftest import ROOT, JSONHandler, start_server

from lettingo import LettingoError, chat_prompt, load_model, predictor_messages
from reward import (
    FORMAT_PENALTY,
    HTTPJudge,
    LocalJudge,
    RewardConfig,
    make_judge,
    metrics,
    parse_rating,
    parse_sentiment,
    score_profiles,
    task_reward,
)
from tools.evaluate import baseline_predictions
from rollout import SamplingParams

SAMPLE = {"user_id": "1", "item_id": "9", "title": "Heat (1995)", "description": "Genres: Action",
          "rating": 2.0, "label": "dislike", "history": [{"title": "Up (2009)", "rating": 5.0}], "recent": [],
          "user_mean": 5.0}


def test_parsing_edge_cases():
    assert parse_rating("<rating>4.50</rating>") == 4.5
    assert parse_rating("<RATING> 4.5 </rating>") == 4.5
    assert parse_rating("<rating>2</rating> then <rating>3.25</rating>") == 3.25      # the last complete tag
    assert parse_rating("<rating>4.5") is None                                          # no closing tag
    assert parse_rating("<rating>7.0</rating>") is None and parse_rating("<rating>0.5</rating>") is None
    assert parse_rating("<rating>four</rating>") is None and parse_rating("") is None
    assert parse_sentiment("<sentiment> Like </sentiment>") == "like"
    assert parse_sentiment("<sentiment>love</sentiment>") is None


def test_rewards_by_hand():
    assert task_reward("rating", 3.0, SAMPLE) == pytest.approx(1 - 1 / 4)
    assert task_reward("rating", 5.0, SAMPLE) == pytest.approx(1 - 3 / 4)
    assert (task_reward("sentiment", "dislike", SAMPLE) == 1.0
            and task_reward("sentiment", "like", SAMPLE) == 0.0)

    class Fixed:  # a judge that always answers 4 (or fails for one profile)
        def __init__(self):
            self.asked = 0

        def predict(self, messages, task):
            self.asked += len(messages)
            return [None if "FAIL" in m[0]["content"] else 4.0 for m in messages]

    j = Fixed()
    texts = ["<user_profile>likes action</user_profile>", "<user_profile>unclosed", "no tag at all",
             "<user_profile>a</user_profile><user_profile>FAIL</user_profile>"]
    out = score_profiles([SAMPLE] * 4, texts, j, "rating")
    assert out[0].reward == pytest.approx(0.5) and out[0].status == "ok"
    assert out[1].reward == out[2].reward == FORMAT_PENALTY and out[1].status == "format"
    assert out[3].reward is None and out[3].status == "judge_failed"   # never scored as a bad profile
    assert j.asked == 2                                                # format failures never reach the judge


def test_reward_averages_over_the_extra_targets():
    class ByTitle:  # answers 4 for "Heat", 1 for anything else; fails on "Bad"
        def predict(self, messages, task):
            text = [m[-1]["content"] for m in messages]
            return [None if "Bad (" in t else 4.0 if "Heat (" in t else 1.0 for t in text]

    more = dict(SAMPLE, more_targets=[
        {"item_id": "7", "title": "Jaws (1975)", "description": "", "rating": 5.0, "label": "like"},
        {"item_id": "8", "title": "Big (1988)", "description": "", "rating": 1.0, "label": "dislike"}])
    out = score_profiles([more, SAMPLE], ["<user_profile>p</user_profile>"] * 2, ByTitle(), "rating")
    # |4-2|, |1-5|, |1-1| -> rewards 0.5, 0, 1 -> mean 0.5; the prediction is the sample's own target's
    assert out[0].reward == pytest.approx((0.5 + 0.0 + 1.0) / 3) and out[0].prediction == 4.0
    assert out[1].reward == pytest.approx(0.5)
    bad = dict(more, more_targets=more["more_targets"] + [{"item_id": "6", "title": "Bad (2000)",
                                                           "rating": 3.0}])
    assert (score_profiles([bad], ["<user_profile>p</user_profile>"], ByTitle(), "rating")[0].status
            == "judge_failed")


def test_metrics_by_hand():
    ss = [dict(SAMPLE, rating=r, label=l)
          for r, l in ((1.0, "dislike"), (4.0, "like"), (3.0, "neutral"), (5.0, "like"))]
    m = metrics("rating", [2.0, 4.0, None, 3.0], ss, boot=200)
    assert m["n"] == 3 and m["MAE"][0] == pytest.approx(1.0) and m["RMSE"][0] == pytest.approx((5 / 3) ** 0.5)
    # preds (2, 4, 3) vs truth (1, 4, 5): dx = (-1, 1, 0), dy = (-7, 2, 5) / 3 -> r = 3 / sqrt(2 * 26 / 3)
    assert m["mean_pred"][0] == pytest.approx(3.0) and m["r"][0] == pytest.approx(3 / (2 * 26 / 3) ** 0.5)
    assert metrics("rating", [3.0, 3.0, 3.0], ss[:3], boot=0)["r"][0] == 0.0     # constant prediction: no r
    m = metrics("sentiment", ["dislike", "like", "like", "neutral"], ss, boot=200)
    # like: tp1 fp1 fn1 -> .5; dislike: 1.0; neutral: tp0 -> 0
    assert m["accuracy"][0] == 0.5 and m["macro_F1"][0] == pytest.approx((0.5 + 1.0 + 0.0) / 3)


def users_targets(table):
    """{user: [(rating, prediction), ...]} -> (predictions, targets) as summarize flattens them."""
    lab = lambda r: "like" if r >= 4 else "dislike" if r <= 2 else "neutral"
    flat = [(p, dict(SAMPLE, user_id=u, item_id=str(k), rating=r, label=lab(r)))
            for u, rows in table.items() for k, (r, p) in enumerate(rows)]
    return [p for p, _ in flat], [t for _, t in flat]


def test_ranking_metrics_by_hand():
    preds, targets = users_targets({
        "A": [(5, 4.5), (3, 3.0), (1, 2.0)],    # every pair ordered right: GAUC 1, Spearman 1
        "B": [(4, 2.0), (2, 4.0)],               # reversed: 0, -1
        "C": [(3, 1.0), (3, 5.0)],               # no pair with different ratings: left out
        "D": [(5, 3.0), (4, 3.0), (1, 2.0)]})    # (5,4) tied -> 1/2, the others right: 5/6
    m = metrics("rating", preds, targets, boot=300)
    assert m["users"] == 4 and m["n"] == 10
    assert m["GAUC"][0] == pytest.approx((1 + 0 + 5 / 6) / 3)
    # D: prediction ranks (2.5, 2.5, 1) vs rating ranks (3, 2, 1): 1.5 / sqrt(1.5 * 2)
    assert m["Spearman"][0] == pytest.approx((1 - 1 + 1.5 / 3 ** 0.5) / 3)
    assert m["GAUC"][1] <= m["GAUC"][0] <= m["GAUC"][2]
    # nearest star's label: A like/neutral/dislike right; B both wrong; C: dislike (3 -> neutral), like;
    # D: neutral, neutral, dislike -> truth like, like, dislike. Per label (tp, fp, fn):
    # like (1, 2, 3), neutral (1, 2, 2), dislike (2, 2, 1); recall like 1/4, neutral 1/3, dislike 2/3
    f1 = lambda tp, fp, fn: 2 * tp / (2 * tp + fp + fn)
    assert m["macro_F1"][0] == pytest.approx((f1(1, 2, 3) + f1(1, 2, 2) + f1(2, 2, 1)) / 3)
    assert m["balanced_acc"][0] == pytest.approx((1 / 4 + 1 / 3 + 2 / 3) / 3)
    const = metrics("rating", [3.7] * len(preds), targets, boot=0)    # a constant: ties everywhere
    assert const["GAUC"][0] == 0.5 and const["Spearman"][0] == 0.0
    assert const["balanced_acc"][0] == pytest.approx(1 / 3)
    user_mean = baseline_predictions("rating", [dict(t, user_mean=len(t["user_id"]) + ord(t["user_id"]))
                                                for t in targets])["user mean (no LLM)"]
    assert metrics("rating", user_mean, targets, boot=0)["GAUC"][0] == 0.5    # constant within users


def test_rank_reward_by_hand():
    """A profile asked about 4 targets rated 5, 4, 4, 1: the judge's predictions (4, 3, 3.5, 2) order
    all 5 pairs rated differently right (5 > 4 twice, 5 > 1, 4 > 1 twice; 4 = 4 is no pair) -> 1;
    (2, 3, 3.5, 4) orders all 5 wrong -> 0; a constant ties them -> 1/2."""
    ratings = (5.0, 4.0, 4.0, 1.0)
    sample = dict(SAMPLE, item_id="0", title="Film#0", rating=ratings[0],
                  more_targets=[dict(item_id=str(k), title=f"Film#{k}", rating=r)
                                for k, r in enumerate(ratings) if k])

    class ByTitle:
        def __init__(self, preds):
            self.preds = preds

        def predict(self, messages, task):
            return [self.preds[int(m[-1]["content"].split("Film#")[1][0])] for m in messages]

    texts = ["<user_profile>p</user_profile>"]
    right, wrong, level = (4.0, 3.0, 3.5, 2.0), (2.0, 3.0, 3.5, 4.0), (3.0,) * 4
    rating = lambda preds: sum(1 - abs(p - r) / 4 for p, r in zip(preds, ratings)) / 4
    for preds, rank in ((right, 1.0), (wrong, 0.0), (level, 0.5)):
        assert score_profiles([sample], texts, ByTitle(preds), "rating", "rank")[0].reward == rank
        mixed = score_profiles([sample], texts, ByTitle(preds), "rating", "rating+rank")[0].reward
        assert mixed == pytest.approx((rating(preds) + rank) / 2)
    one = dict(sample, more_targets=[])                 # no pair: 1/2 for every profile
    assert score_profiles([one], texts, ByTitle(right), "rating", "rank")[0].reward == 0.5


TARGETS = [dict(SAMPLE, item_id=str(k), title=f"Film {k} " * (k % 3 + 1)) for k in range(4)]


def judge_messages(task, users=3):
    """Each user's profile asked about 4 targets: the layout target_rewards sends, and the no-profile
    prompts of all of them -- consecutive prompts that share a prefix."""
    msgs = [predictor_messages(t, f"user {u} likes dramas and comedies", task) for u in range(users)
            for t in TARGETS]
    return msgs + [predictor_messages(t, None, task) for t in TARGETS]


def brute_force_expect(model, tok, msgs, task):
    """Each prompt alone, one full forward: the expected rating (or label) under the answers' first tokens."""
    prefix = "<rating>" if task == "rating" else "<sentiment>"
    answers = ["1", "2", "3", "4", "5"] if task == "rating" else ["like", "neutral", "dislike"]
    base = tok(prefix, add_special_tokens=False)["input_ids"]
    first = [tok(prefix + a, add_special_tokens=False)["input_ids"][len(base)] for a in answers]
    out = []
    for m in msgs:
        with torch.no_grad():
            logits = model(torch.tensor([chat_prompt(tok, m, answer_prefix=prefix)]))[0, -1]
        p = torch.softmax(logits[first], -1)
        out.append(sum((k + 1) * p[k].item() for k in range(5)) if task == "rating"
                   else answers[int(p.argmax())])
    return out


@pytest.mark.parametrize("task", ["rating", "sentiment"])
@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_packed_expect_judge_equals_separate_forwards(tiny, smol, task, which):
    model, tok = load_model(tiny[0], device="cpu") if which == "tiny" else smol
    msgs = judge_messages(task)
    judge = LocalJudge(model, tok, "expect", token_budget=400)      # several micro-batches
    packed = []
    hook = model.model.embed_tokens.register_forward_pre_hook(lambda m, args: packed.append(args[0].numel()))
    try:
        preds = judge.predict(msgs, task)
    finally:
        hook.remove()
    want = brute_force_expect(model, tok, msgs, task)
    if task == "rating":
        assert max(abs(a - b) for a, b in zip(preds, want)) < 1e-4
    else:
        assert preds == want
    # a profile's prompt is computed once for its 4 targets: far fewer tokens than the prompts hold
    total = sum(len(chat_prompt(tok, m, answer_prefix="<x>")) for m in msgs)
    assert len(packed) > 1 and sum(packed) < 0.75 * total


@pytest.mark.parametrize("task", ["rating", "sentiment"])
@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_packed_decode_judge_answers_as_separate_decoding(tiny, smol, task, which):
    """Shared-prefix prefill (each profile once, then each target) decodes the same greedy text as
    every prompt decoded alone."""
    from rollout import generate
    model, tok = load_model(tiny[0], device="cpu") if which == "tiny" else smol
    msgs = judge_messages(task, users=2)
    judge = LocalJudge(model, tok, "decode", token_budget=2000)
    stop = ("</rating>",) if task == "rating" else ("</sentiment>",)
    seen = []
    orig = judge.sampler.generate
    judge.sampler.generate = lambda *a, **kw: seen.append(kw["shared"]) or orig(*a, **kw)
    preds = judge.predict(msgs, task)
    assert sum(seen[0]) > 0                                  # prefixes were shared
    alone = [generate(model, [chat_prompt(tok, m)], max_new_tokens=20, temperature=0, stop=stop,
                      tokenizer=tok)[0][0].text for m in msgs]
    parse = parse_rating if task == "rating" else parse_sentiment
    assert preds == [parse(t) for t in alone]
    texts = [o[0].text for o in orig([chat_prompt(tok, m) for m in msgs],
                                     SamplingParams(max_new_tokens=20, temperature=0, stop=stop,
                                                    batch_size=5),
                                     tokenizer=tok, shared=seen[0])]
    assert texts == alone


def test_shared_prefixes_pack_fewest_tokens():
    """split_shared_prefixes against every way of cutting the prompts into consecutive groups."""
    import itertools
    import random

    from lettingo import split_shared_prefixes

    def common(group):
        return min(min(len(p) for p in group) - 1,
                   min(next((k for k, (a, b) in enumerate(zip(group[0], p)) if a != b),
                            min(len(group[0]), len(p))) for p in group))

    def fewest(prompts, max_tokens):
        best = None
        for cuts in itertools.product([False, True], repeat=len(prompts) - 1):
            groups, cur = [], [prompts[0]]
            for cut, p in zip(cuts, prompts[1:]):
                groups, cur = (groups + [cur], [p]) if cut else (groups, cur + [p])
            groups.append(cur)
            shared = [common(g) if len(g) > 1 else 0 for g in groups]
            sizes = [sum(map(len, g)) - (len(g) - 1) * c for g, c in zip(groups, shared)]
            if all(len(g) == 1 or size - c <= max_tokens for g, size, c in zip(groups, sizes, shared)):
                best = sum(sizes) if best is None else min(best, sum(sizes))
        return best

    rng = random.Random(0)
    for _ in range(400):
        prompts = [[rng.randrange(2) for _ in range(rng.randrange(1, 7))] for _ in range(rng.randrange(1, 8))]
        max_tokens = rng.randrange(1, 20)
        pairs = split_shared_prefixes(prompts, max_tokens)
        assert [a + b for a, b in pairs] == prompts and all(b for _, b in pairs)
        runs = [k for k in range(len(pairs)) if k == 0 or pairs[k][0] != pairs[k - 1][0]]
        packed = sum(len(b) for _, b in pairs) + sum(len(pairs[k][0]) for k in runs)
        assert packed <= fewest(prompts, max_tokens)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_http_judge_against_real_server(tiny):
    folder, _ = tiny
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "serve.py"), "--model", folder,
                             "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "serving" in proc.stdout.readline()
        judge = HTTPJudge(f"http://127.0.0.1:{port}", mode="decode", timeout=30, retries=1)
        msgs = [predictor_messages(SAMPLE, f"profile {k}", "rating") for k in range(5)]
        preds = judge.predict(msgs, "rating")
        assert judge.failures == 0 and len(preds) == 5
        # the tiny random model rarely writes a valid tag: unparseable answers are None and counted
        assert judge.bad_answers == sum(p is None for p in preds)
        raw = judge.ask(msgs[0])
        model, tok = load_model(folder, device="cpu")
        from rollout import generate
        want = generate(model, [chat_prompt(tok, msgs[0])], max_new_tokens=20, temperature=0,
                        tokenizer=tok)[0][0].text
        assert raw == want                                     # the server answers greedily with our model
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        for bad, why in (({"max_tokens": -5}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"),
                         ({"stream": True}, "stream"), ({"temperature": -1}, "temperature"),
                         ({"messages": []}, "messages")):
            body = json.dumps({"messages": msgs[0], **bad}).encode()
            try:
                urllib.request.urlopen(urllib.request.Request(url, data=body,
                                                              headers={"Content-Type": "application/json"}),
                                       timeout=30)
                raise AssertionError(f"{bad} was accepted")
            except urllib.error.HTTPError as e:
                assert e.code == 400 and why in json.loads(e.read())["error"]["message"]
        openai = pytest.importorskip("openai")             # the official client, as users drive a judge
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        assert [m.id for m in client.models.list()] == [folder]
        r = client.chat.completions.create(model=folder, messages=msgs[0], max_tokens=20, temperature=0)
        assert r.choices[0].message.content == want
        with pytest.raises(openai.BadRequestError, match="stream"):
            client.chat.completions.create(model=folder, messages=msgs[0], max_tokens=5, stream=True)
    finally:
        proc.terminate()
        proc.wait(10)


class Faulty(JSONHandler):
    hits = {}

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        mode = self.path.strip("/").split("/")[0]
        Faulty.hits[mode] = Faulty.hits.get(mode, 0) + 1
        if mode == "hang":
            time.sleep(2)
        if mode == "flaky" and Faulty.hits[mode] % 2 == 1:     # fails every other call: a retry recovers
            return self.send_error(500)
        body = b"{not json" if mode == "badjson" else b"" if mode == "err500" else json.dumps(
            {"choices": [{"message": {"content": "<rating>4.00</rating>"}}]}).encode()
        if mode == "err500":
            return self.send_error(500)
        self.send(body)


def test_the_judges_default_to_the_mode_of_every_cli():
    assert HTTPJudge("http://127.0.0.1:1").mode == RewardConfig().judge_mode == "expect"
    assert inspect.signature(LocalJudge).parameters["mode"].default == "expect"


def test_http_judge_faults():
    server = start_server(Faulty)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    msgs = [predictor_messages(SAMPLE, "p", "rating")] * 2
    try:
        for mode in ("err500", "hang", "badjson"):
            j = HTTPJudge(f"{base}/{mode}", mode="decode", timeout=0.5, retries=2, backoff=0.01)
            assert j.predict(msgs, "rating") == [None, None]            # failures, not scores
            assert j.failures == 2 and j.retried == 4
        assert Faulty.hits["err500"] == 6                               # 1 try + 2 retries, per request
        j = HTTPJudge(f"{base}/flaky", mode="decode", timeout=2, retries=2, backoff=0.01, concurrency=1)
        assert j.predict(msgs, "rating") == [4.0, 4.0] and j.failures == 0 and j.retried == 2
        out = score_profiles([SAMPLE], ["<user_profile>x</user_profile>"],
                             HTTPJudge(f"{base}/err500", mode="decode", timeout=0.5, retries=0), "rating")
        assert out[0].reward is None and out[0].status == "judge_failed"
    finally:
        server.shutdown()


def vllm_choice(content, top=None):
    """One choice of a vLLM chat completion, in its exact JSON shape."""
    choice = {"index": 0, "message": {"role": "assistant", "content": content, "refusal": None,
                                      "annotations": None, "audio": None, "function_call": None,
                                      "tool_calls": [], "reasoning_content": None},
              "logprobs": None, "finish_reason": "length", "stop_reason": None, "token_ids": None}
    if top is not None:
        entry = lambda t, p: {"token": t, "logprob": math.log(p), "bytes": list(t.encode())}
        choice["logprobs"] = {"content": [{**entry(*top[0]), "top_logprobs": [entry(t, p) for t, p in top]}]}
    return choice


class VLLMStub(JSONHandler):
    """Answers as vLLM does: /digits and /labels with top_logprobs, /lowmass where the forced tag is
    not continued (no answer token near the top), /nologprobs a server that ignores `logprobs`."""
    protocol_version = "HTTP/1.1"
    bodies, peers = [], set()
    TOP = {"digits": [("4", .5), ("3", .2), ("<", .15), (" 4", .1), ("5.", .05)],
           "labels": [("dis", .6), (" like", .2), ("neut", .1), ("The", .1)],
           "lowmass": [("<", .7), ("rating", .2), ("4", .1)]}

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        VLLMStub.bodies.append(body)
        VLLMStub.peers.add(self.client_address)
        mode = self.path.strip("/").split("/")[0]
        top = self.TOP.get(mode) if body.get("logprobs") else None
        data = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 0,
                           "model": body["model"],
                           "choices": [vllm_choice("<rating>2.00</rating>", top)],
                           "usage": {"prompt_tokens": 50, "total_tokens": 51, "completion_tokens": 1,
                                     "prompt_tokens_details": None},
                           "prompt_logprobs": None, "kv_transfer_params": None}).encode()
        self.send(data)
        if mode == "drop":       # closes the connection without saying so, as an idle timeout does
            self.close_connection = True


def test_http_expect_judge_against_a_vllm_shaped_server():
    server = start_server(VLLMStub)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        j = make_judge(RewardConfig(judge="judge", judge_url=f"{base}/digits/v1", judge_mode="expect",
                                    judge_concurrency=4))
        msgs = [predictor_messages(SAMPLE, f"p{k // 4}", "rating") for k in range(40)]
        VLLMStub.bodies.clear()
        VLLMStub.peers.clear()
        preds = j.predict(msgs, "rating")
        # digits 4 (.5 + .1 for " 4"), 3 (.2), 5 (.05 as "5."): mass .85, E = (4*.6 + 3*.2 + 5*.05) / .85
        assert preds == pytest.approx([(4 * .6 + 3 * .2 + 5 * .05) / .85] * 40)
        assert j.mass_n == 40 and j.mass_sum == pytest.approx(.85 * 40) and j.fallbacks == j.failures == 0
        body = VLLMStub.bodies[0]
        assert (body["messages"][-1] == {"role": "assistant", "content": "<rating>"}
                and body["continue_final_message"] is True and body["add_generation_prompt"] is False
                and body["max_tokens"] == 1 and body["logprobs"] is True and body["top_logprobs"] == 20)
        # a profile's first target goes first, the other three after it (the server's prefix cache)
        firsts = [b["messages"][0]["content"] for b in VLLMStub.bodies[:10]]
        assert sorted(firsts) == sorted(m[0]["content"] for m in msgs[::4])
        assert len(VLLMStub.peers) <= 4                       # one kept-alive connection per thread
        j = make_judge(RewardConfig(judge="judge", judge_url=f"{base}/labels", judge_mode="expect"))
        assert j.predict([predictor_messages(SAMPLE, "p", "sentiment")], "sentiment") == ["dislike"]
        j = make_judge(RewardConfig(judge="judge", judge_url=f"{base}/lowmass", judge_mode="expect"))
        assert j.predict(msgs[:3], "rating") == [2.0] * 3 and j.fallbacks == 3     # the parsed greedy answer
        j = HTTPJudge(f"{base}/drop", mode="decode", concurrency=1, retries=0)
        assert j.predict(msgs[:3], "rating") == [2.0] * 3 and j.retried == j.failures == 0   # reopened
        with pytest.raises(LettingoError, match="--judge-mode decode"):
            make_judge(RewardConfig(judge="judge", judge_url=f"{base}/nologprobs", judge_mode="expect"))
        decode = make_judge(RewardConfig(judge="judge", judge_url=f"{base}/nologprobs", judge_mode="decode"))
        assert decode.predict(msgs[:1], "rating") == [2.0]
    finally:
        server.shutdown()


def test_http_expect_judge_equals_the_local_judge(smol):
    """The expected rating over HTTP (tools/serve.py's top_logprobs) is the local expect judge's."""
    model, tok = smol
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "serve.py"), "--model",
                             "smollm2-135m", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "serving" in proc.stdout.readline()
        for task in ("rating", "sentiment"):
            msgs = judge_messages(task, users=2)
            # min_mass 0: the expectation itself on every prompt, even where the answer tokens hold little
            # of the probability (most of these made-up prompts: below 0.5) and a request would fall back
            remote = HTTPJudge(f"http://127.0.0.1:{port}", "smollm2-135m", mode="expect", concurrency=8,
                               min_mass=0.0)
            got = remote.predict(msgs, task)
            want = LocalJudge(model, tok, "expect").predict(msgs, task)
            assert remote.failures == remote.fallbacks == 0 and remote.mass_n == len(msgs)
            if task == "rating":
                assert max(abs(a - b) for a, b in zip(got, want)) < 1e-3
            else:
                assert got == want
    finally:
        proc.terminate()
        proc.wait(10)


def test_template_profile_by_hand():
    from reward import template_profile
    h = lambda t, g, r: {"title": t, "genres": g, "rating": r}
    s = {"user_mean": 3.5, "history": [h("A", "Drama, Comedy", 5), h("B", "Drama", 4), h("C", "Horror", 1),
                                       h("D", "Comedy", 4), h("E", "Horror, Thriller", 2)]}
    # Drama (5,4) mean 4.5, Comedy (5,4) 4.5, Horror (1,2) 1.5, Thriller (2) 2.0; user mean 3.5
    assert template_profile(s) == ("A moderate rater: average rating 3.5 out of 5. Likes Comedy, Drama. "
                                   "Dislikes Horror, Thriller.")
    assert template_profile(s, "swapped") == ("A moderate rater: average rating 3.5 out of 5. "
                                              "Likes Horror, Thriller. Dislikes Comedy, Drama.")
    assert template_profile(s, "none") == "A moderate rater: average rating 3.5 out of 5."
    s = {"user_mean": 4.2, "history": [h("Blue Guitar Strings", "", 5), h("Guitar Picks", "", 5),
                                       h("Drum Sticks Set", "", 1), h("Drum Pedal", "", 2)]}
    assert template_profile(s) == ("A generous rater: average rating 4.2 out of 5. Likes guitar. "
                                   "Dislikes drum.")
    assert template_profile({"history": [h("X", "", 2), h("Y", "", 1)]}).startswith(
        "A harsh rater: average rating 1.5")




def test_reward_cli_scores_each_profile_of_a_rollout_file(tiny, tmp_path):
    """python reward.py: every generation of a rollout.py file gets the reward GRPO would give it: an
    unclosed profile the format penalty without asking the judge, a closed one the judge's reward."""
    from conftest import run
    folder, _ = tiny
    run("data/prepare.py", "synthetic", "--users", "40", "--out", tmp_path, "--test-users", "3",
        "--val-users", "2", check=True)
    rows = [json.loads(x) for x in open(tmp_path / "test.jsonl")]
    prof = tmp_path / "p.jsonl"
    prof.write_text("".join(json.dumps({"user_id": r["user_id"], "item_id": r["item_id"], "generations": [
        {"text": f"<user_profile>{r['oracle_profile']}</user_profile>"}, {"text": "no tag"}]}) + "\n"
        for r in rows))
    r = run("reward.py", "--data", tmp_path / "test.jsonl", "--profiles", prof, "--judge", folder,
            "--out", tmp_path / "scored.jsonl")
    assert r.returncode == 0, r.stderr[-2000:]
    out = [json.loads(x) for x in open(tmp_path / "scored.jsonl")]
    assert len(out) == 2 * len(rows) and "format 3" in r.stdout
    model, tok = load_model(folder, device="cpu")
    want = score_profiles(rows, [f"<user_profile>{r['oracle_profile']}</user_profile>" for r in rows],
                          LocalJudge(model, tok), "rating")
    assert [o["reward"] for o in out[0::2]] == pytest.approx([w.reward for w in want], abs=1e-6)
    assert all(o["reward"] == FORMAT_PENALTY and o["status"] == "format" for o in out[1::2])
