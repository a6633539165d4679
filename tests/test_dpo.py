"""dpo.py: the loss by hand and by finite differences, pair rules, learning, 2 ranks, resume."""
import json
import math
import shutil

import pytest
import torch
from conftest import checkpoint_weights as weights
from conftest import make_model, max_diff, optimized, run, tiny_run_folder

from dpo import DPOConfig, best_profiles, dpo_loss, dpo_step, make_pairs


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo-sum", 0.0),
                                           ("ipo", 0.0)])
def test_dpo_loss_by_hand_and_finite_differences(loss_type, eps):
    pc, pr, rc, rr = -10.0, -12.0, -11.0, -11.5
    nc, nr = 4.0, 10.0                                      # response lengths (only IPO uses them)
    delta = (pc - rc) - (pr - rr)                           # 1 - (-0.5) = 1.5
    beta = 0.1
    sig = lambda x: 1 / (1 + math.exp(-x))
    if loss_type == "sigmoid":
        want = -(1 - eps) * math.log(sig(beta * delta)) - eps * math.log(sig(-beta * delta))
    elif loss_type == "ipo-sum":
        want = (delta - 1 / (2 * beta)) ** 2
    else:                                                   # TRL: every log-prob divided by its length first
        want = ((pc / nc - rc / nc) - (pr / nr - rr / nr) - 1 / (2 * beta)) ** 2     # (0.25 + 0.05 - 5)^2
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)
    x = torch.tensor([pc, pr], dtype=torch.float64, requires_grad=True)
    loss, cr, rj = dpo_loss(x[0], x[1], f64(rc), f64(rr), beta, loss_type, eps, f64(nc), f64(nr))
    assert loss.item() == pytest.approx(want, rel=1e-12)
    scale = (nc, nr) if loss_type == "ipo" else (1.0, 1.0)
    assert (cr.item() == pytest.approx(beta * (pc - rc) / scale[0])
            and rj.item() == pytest.approx(beta * (pr - rr) / scale[1]))
    g, = torch.autograd.grad(loss, x)
    h = 1e-6
    for i in range(2):
        e = torch.zeros(2, dtype=torch.float64)
        e[i] = h
        f = lambda v: dpo_loss(v[0], v[1], f64(rc), f64(rr), beta, loss_type, eps, f64(nc), f64(nr))[0].item()
        assert g[i].item() == pytest.approx((f(x.detach() + e) - f(x.detach() - e)) / (2 * h), rel=1e-6)


def test_rpo_adds_the_chosen_token_mean_nll(tmp_path, monkeypatch):
    """dpo_step's loss against transformers' log-probs on the same weights, by hand: the mean over
    pairs of -log sigmoid(beta delta), plus rpo_alpha x the chosen responses' NLL per token over the
    whole batch (TRL's rpo_alpha) -- with the two pairs in separate micro-batches."""
    import torch.nn.functional as F

    import train
    from lettingo import load_model
    hf = make_model(str(tmp_path / "m"), "llama")
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):    # a plain 1-rank group, not torchrun's
        monkeypatch.delenv(k, raising=False)
    d = train.setup_distributed()
    model, _ = load_model(str(tmp_path / "m"), device="cpu")
    batch = [([11, 5, 7], [9, 4, 20, 3], [8, 6]), ([3, 30], [5], [7, 17, 27])]    # (prompt, chosen, rejected)
    refs = [{"ref_chosen": -5.0, "ref_rejected": -4.0}, {"ref_chosen": -2.0, "ref_rejected": -9.0}]

    def logp(prompt, response):                      # transformers: summed log-probs of the response
        with torch.no_grad():
            lp = hf(torch.tensor([prompt + response])).logits[0].log_softmax(-1)
        return sum(lp[len(prompt) - 1 + k, t].item() for k, t in enumerate(response))
    beta, chosen = 0.1, [logp(p, c) for p, c, _ in batch]
    delta = [(c - r["ref_chosen"]) - (logp(p, rj) - r["ref_rejected"])
             for c, (p, _, rj), r in zip(chosen, batch, refs)]
    dpo_mean = sum(-F.logsigmoid(torch.tensor(beta * x, dtype=torch.float64)).item() for x in delta) / 2
    nll = -sum(chosen) / (4 + 1)                      # over the batch's 5 chosen tokens
    try:
        policy = optimized(train.shard(model, torch.float32), 0.0)
        for alpha in (0.0, 0.7):
            out = dpo_step(policy, batch, refs, DPOConfig(beta=beta, rpo_alpha=alpha, token_budget=12), d)
            assert out["loss"] == pytest.approx(dpo_mean + alpha * nll, abs=1e-5)
            assert out["nll_chosen"] == pytest.approx(nll, abs=1e-5)
    finally:
        import torch.distributed as dist
        dist.destroy_process_group()


def rows(user, rewards, task="sentiment"):
    return [{"user_id": user, "item_id": "i", "text": f"{user}-{k}", f"reward_{task}": r}
            for k, r in enumerate(rewards)]


def test_pairs_paper_rule_margin_cap_and_users():
    # sentiment: 2 correct x 3 incorrect = 6 pairs; a -1 format failure counts as incorrect
    pairs, empty = make_pairs(rows("a", [1.0, 0.0, 1.0, 0.0, -1.0]) + rows("b", [1.0, 1.0])
                              + rows("c", [0.0, None]), "sentiment", min_margin=0.0, max_per_user=10)
    assert len(pairs) == 6 and empty == 2
    assert ({(p["chosen"], p["rejected"]) for p in pairs}
            == {(f"a-{w}", f"a-{l}") for w in (0, 2) for l in (1, 3, 4)})
    assert all(p["user_id"] == "a" for p in pairs)          # never across users
    # rating: only gaps >= margin, the better one chosen, widest first under the cap
    pairs, empty = make_pairs(rows("a", [0.9, 0.85, 0.5, 0.2], "rating") + rows("b", [0.7, 0.7], "rating"),
                              "rating", min_margin=0.3, max_per_user=2)
    assert empty == 1 and [(p["chosen"], p["rejected"]) for p in pairs] == [("a-0", "a-3"), ("a-1", "a-3")]
    pairs, _ = make_pairs(rows("a", [1.0, 0.0, 0.0, 0.0, 0.0]), "sentiment", min_margin=0.0, max_per_user=3)
    assert len(pairs) == 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tiny_run_folder(tmp_path_factory.mktemp("dpo"), users=30)
    # synthetic preferences: chosen profiles say "likes", rejected ones are random byte soup
    samples = [json.loads(x) for x in open(d / "data" / "train.jsonl")][:12]
    with open(d / "pairs.jsonl", "w") as f:
        for k, s in enumerate(samples):
            f.write(json.dumps({"user_id": s["user_id"], "item_id": s["item_id"], "margin": 1.0,
                                "chosen": "<user_profile>likes Comedy, rates 4</user_profile>",
                                "rejected": f"<user_profile>{'xq'[k % 2] * (3 + k % 4)} zz</user_profile>"})
                    + "\n")
    return d


def run_dpo(setup, out, *extra, nproc=1):
    return run("dpo.py", "train", "--data", setup / "data" / "train.jsonl", "--pairs", setup / "pairs.jsonl",
               "--out", out, "--model", setup / "model", "--lr", "2e-3", "--pairs-per-step", "4",
               "--token-budget", "1200", *extra, nproc=nproc, check=True)


def test_it_learns_and_reference_is_computed_once(setup, tmp_path):
    r = run_dpo(setup, tmp_path, "--steps", "12", "--save-every", "100")
    assert "reference log-probs computed once now" in r.stdout
    ref_file = setup / "pairs.ref.jsonl"
    assert all("ref_chosen" in json.loads(x) for x in open(ref_file))
    m = [json.loads(x) for x in open(tmp_path / "train" / "metrics.jsonl")]
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 0
    assert sum(x["pref_accuracy"] for x in m[-3:]) / 3 > 0.9
    assert m[-1]["logp_chosen"] > m[0]["logp_chosen"] or m[-1]["logp_rejected"] < m[0]["logp_rejected"]
    r = run_dpo(setup, tmp_path / "again", "--steps", "1", "--save-every", "100")
    assert "reference log-probs loaded" in r.stdout         # stored with the pairs, not recomputed


def test_reference_logprobs_end_a_complete_profile_with_the_turn_end(setup, tmp_path):
    """The tiny tokenizer knows two end tokens (<|endoftext|> 0, <|im_end|> 2); its chat template ends a
    turn with <|im_end|>: the reference scores chosen + <|im_end|>, as transformers does here."""
    from transformers import AutoModelForCausalLM
    from dpo import profile_prompt
    from lettingo import load_model
    run_dpo(setup, tmp_path, "--steps", "1", "--save-every", "100")
    hf = AutoModelForCausalLM.from_pretrained(setup / "model").eval()
    _, tok = load_model(str(setup / "model"), device="cpu")
    samples = {(s["user_id"], s["item_id"]): s for s in map(json.loads, open(setup / "data" / "train.jsonl"))}
    pair = json.loads(open(setup / "pairs.ref.jsonl").readline())
    prompt = profile_prompt(tok, samples[(pair["user_id"], pair["item_id"])])
    chosen = tok(pair["chosen"][len("<user_profile>"):], add_special_tokens=False)["input_ids"]
    chosen += [tok.convert_tokens_to_ids("<|im_end|>")]
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([prompt + chosen])).logits[0].double(), -1)
    want = sum(logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(chosen))
    assert pair["ref_chosen"] == pytest.approx(want, abs=1e-3)


def test_bf16_reference_gives_zero_implicit_rewards_at_step_0(setup, tmp_path):
    """The reference computes in the policy's dtype (TRL's way): at step 0 the policy is the reference,
    so the implicit rewards beta (log pi - log ref) are 0 in bf16 too. All 12 pairs in the step, so
    that it packs the micro-batch the reference packed (SDPA's CPU kernel may round a sequence
    differently next to other ones: ~1e-5 in bf16)."""
    pairs = tmp_path / "pairs.jsonl"
    shutil.copy(setup / "pairs.jsonl", pairs)                     # its own reference file
    run("dpo.py", "train", "--data", setup / "data" / "train.jsonl", "--pairs", pairs, "--out", tmp_path,
        "--model", setup / "model", "--lr", "0", "--pairs-per-step", "12", "--steps", "1",
        "--save-every", "100",
        "--dtype", "bfloat16", check=True)
    m = json.loads(open(tmp_path / "train" / "metrics.jsonl").readline())
    assert abs(m["chosen_reward"]) < 1e-6 and abs(m["reward_margin"]) < 1e-6, m     # fp32 ref: ~1e-4


def test_two_ranks_match_one_and_resume(setup, tmp_path):
    run_dpo(setup, tmp_path / "one", "--steps", "2", "--save-every", "1")
    run_dpo(setup, tmp_path / "two", "--steps", "2", "--save-every", "1", nproc=2)
    a, b = (weights(tmp_path / "one" / "train" / "ckpt-000002"),
            weights(tmp_path / "two" / "train" / "ckpt-000002"))
    assert max_diff(a, b) < 1e-5
    run_dpo(setup, tmp_path / "one", "--steps", "4", "--save-every", "1", "--resume")
    run_dpo(setup, tmp_path / "straight", "--steps", "4", "--save-every", "4")
    assert max_diff(weights(tmp_path / "one" / "train" / "ckpt-000004"),
                    weights(tmp_path / "straight" / "train" / "ckpt-000004")) < 1e-6


def test_stages_skip_when_up_to_date(setup, tmp_path):
    base = ["--data", setup / "data" / "train.jsonl", "--out", tmp_path, "--model", setup / "model",
            "--judge", setup / "model", "--explore-users", "4", "--explore-n", "3", "--max-new-tokens", "8",
            "--task", "rating", "--min-margin", "0"]
    for stage in ("explore", "evaluate", "pairs"):
        r = run("dpo.py", stage, *base)
        assert r.returncode == 0 and "up to date" not in r.stdout, r.stderr[-2000:]
    prof = [json.loads(x) for x in open(tmp_path / "profiles.jsonl")]
    assert len(prof) == 12 and {p["model"] for p in prof} == {str(setup / "model")}
    scores = [json.loads(x) for x in open(tmp_path / "scores-rating.jsonl")]
    assert len(scores) == 12 and all("reward_rating" in s and "no_profile_reward_rating" in s for s in scores)
    assert "up to date, skipped" in run("dpo.py", "explore", *base).stdout


def test_tokenize_pair_ends_only_complete_profiles(setup):
    from dpo import tokenize_pair
    from lettingo import load_model
    _, tok = load_model(str(setup / "model"), device="cpu")
    sample = json.loads(open(setup / "data" / "train.jsonl").readline())
    end = tok.eos_token_id
    prompt, c, r = tokenize_pair(tok, sample, {"chosen": "<user_profile>likes Comedy</user_profile>",
                                               "rejected": "<user_profile>likes Comedy and"}, end)
    assert prompt[-len(tok("<user_profile>", add_special_tokens=False)["input_ids"]):] == \
        tok("<user_profile>", add_special_tokens=False)["input_ids"]          # the forced tag ends the prompt
    assert c[-1] == end and tok.decode(c[:-1]) == "likes Comedy</user_profile>"
    assert end not in r and tok.decode(r) == "likes Comedy and"              # truncated: no end token


def test_best_profiles_rule():
    r = lambda u, k, rew, bare, st="ok": {"user_id": u, "item_id": "i", "text": f"{u}-{k}",
                                          "reward_rating": rew, "no_profile_reward_rating": bare,
                                          "status_rating": st}
    rows_ = [r("a", 0, 0.8, 0.7), r("a", 1, 0.9, 0.7),       # a: the best *closed* one
             r("a", 2, 1.0, 0.7, "format"),
             r("b", 0, 0.6, 0.7), r("b", 1, 0.7, 0.7),       # b: none beats no profile
             r("c", 0, 0.75, 0.7), r("c", 1, None, 0.7, "judge_failed")]
    picks = best_profiles(rows_, "rating", min_gain=0.0)
    assert [(p["user_id"], p["chosen"]) for p in picks] == [("a", "a-1"), ("c", "c-0")]
    assert picks[0]["gain"] == pytest.approx(0.2)
    assert [p["user_id"] for p in best_profiles(rows_, "rating", min_gain=0.1)] == ["a"]


def test_sft_stage_learns_the_kept_profiles(setup, tmp_path):
    """Warm start: scores written by hand (one user's profile beats no profile, one does not);
    the SFT stage keeps only the first and its NLL falls as it trains."""
    samples = [json.loads(x) for x in open(setup / "data" / "train.jsonl")][:2]
    (tmp_path / "scores-rating.jsonl").write_text("".join(json.dumps(
        {"user_id": s["user_id"], "item_id": s["item_id"], "model": "m", "k": 0,
         "text": "<user_profile>likes Comedy</user_profile>",
         "reward_rating": 0.9 - 0.5 * i, "no_profile_reward_rating": 0.6, "status_rating": "ok"}) + "\n"
        for i, s in enumerate(samples)))
    r = run("dpo.py", "sft", "--data", setup / "data" / "train.jsonl", "--out", tmp_path,
            "--model", setup / "model", "--task", "rating", "--lr", "1e-3", "--steps", "6",
            "--pairs-per-step", "1", "--save-every", "6")
    assert r.returncode == 0, r.stderr[-2000:]
    kept = [json.loads(x) for x in open(tmp_path / "sft-rating.jsonl")]
    assert [k["user_id"] for k in kept] == [samples[0]["user_id"]]
    nll = [json.loads(x)["nll"] for x in open(tmp_path / "sft" / "metrics.jsonl")]
    assert len(nll) == 6 and all(b < a for a, b in zip(nll, nll[1:])) and nll[-1] < nll[0] - 0.5
    assert (tmp_path / "sft" / "ckpt-000006" / "model" / "config.json").is_file()


def test_template_explorer_writes_the_hand_derived_profile(tmp_path):
    """--models <model>,template: the code-written profile joins the explored ones, one per user
    (whatever --n), tags included; expected texts written out by hand from the two histories."""
    h = lambda t, g, r: {"item_id": t, "title": t, "genres": g, "rating": r, "timestamp": 0}
    rows = [{"user_id": "u1", "item_id": "x", "title": "X", "rating": 4.0, "user_mean": 4.25,
             "history": [h("A", "Drama", 5), h("B", "Drama", 5), h("C", "Horror", 3), h("D", "Comedy", 4)]},
            {"user_id": "u2", "item_id": "y", "title": "Y", "rating": 2.0, "user_mean": 2.0,
             "history": [h("E", "Western", 1), h("F", "Comedy", 3)]}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run("dpo.py", "explore", "--data", tmp_path / "train.jsonl", "--out", tmp_path / "ex",
            "--models", "template", "--explore-n", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    prof = [json.loads(x) for x in open(tmp_path / "ex" / "profiles.jsonl")]
    assert [(p["user_id"], p["model"], p["k"], p["text"]) for p in prof] == [
        ("u1", "template", 0, "<user_profile>A generous rater: average rating 4.2 out of 5. Likes Drama. "
                              "Dislikes Horror, Comedy.</user_profile>"),
        ("u2", "template", 0, "<user_profile>A harsh rater: average rating 2.0 out of 5. Likes Comedy. "
                              "Dislikes Western.</user_profile>")]
