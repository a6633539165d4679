"""grpo.py: the algorithm against hand-computed values; the loop learns, matches across ranks,
resumes exactly, survives a killed checkpoint write and never applies a non-finite step."""
import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from conftest import (ROOT, JSONHandler, clean_env, default_sigint, make_model, max_diff, optimized, run,
                      start_server, tiny_run_folder)
from conftest import checkpoint_weights as weights

from grpo import clipped_policy_loss, group_advantages, kl_k3, token_weights
from train import Dist, apply_update, latest_checkpoint


def test_group_advantages_by_hand():
    adv, flat = group_advantages([1.0, 0.0, 0.5, 0.5], 2)
    s = math.sqrt(0.5) + 1e-6                             # unbiased std of (1, 0), plus verl's eps
    assert adv[:2] == pytest.approx([0.5 / s, -0.5 / s], rel=1e-9) and adv[2:] == [0.0, 0.0] and flat == 1
    adv, _ = group_advantages([1.0, None, 3.0, None, None, 2.0], 3, eps=0.0)
    assert adv[1] is None and adv[3] is None and adv[4] is None
    assert adv[0] == pytest.approx(-1 / math.sqrt(2)) and adv[2] == pytest.approx(1 / math.sqrt(2))
    assert adv[5] == pytest.approx(2.0)                   # a group of one: mean 0, std 1 (verl)
    adv, _ = group_advantages([1.0, 0.0, 2.0], 3, scale="none")   # Dr. GRPO: r - mean
    assert adv == pytest.approx([0.0, -1.0, 1.0])
    # TRL's batch scaling: the group's mean, the whole batch's std (here given: 0.5)
    adv, _ = group_advantages([1.0, 0.0, 0.5, None], 2, eps=0.0, scale="batch", batch_std=0.5)
    assert adv[:3] == pytest.approx([1.0, -1.0, 1.0]) and adv[3] is None     # a group of one: mean 0


def test_truncated_profiles_are_penalised_or_left_out():
    from grpo import advantage_rewards
    from reward import Scored
    from rollout import Sample
    scored = [Scored(-1.0, None, "format"), Scored(0.5), Scored(None, None, "judge_failed"),
              Scored(-1.0, None, "format")]
    outs = [Sample([1], [0.0], "length"), Sample([1], [0.0], "eos"), Sample([1], [0.0], "eos"),
            Sample([1], [0.0], "stop")]                          # the last: closed but empty, not truncated
    assert advantage_rewards(scored, outs, "penalty") == [-1.0, 0.5, None, -1.0]
    assert advantage_rewards(scored, outs, "mask") == [None, 0.5, None, -1.0]
    # left out of the group's statistics too: mean of (0.5, -1) = -0.25, unbiased std 0.75 sqrt(2)
    adv = group_advantages(advantage_rewards(scored, outs, "mask"), 4, eps=0.0)[0]
    assert adv[0] is None and adv[1] == pytest.approx(0.75 / (0.75 * math.sqrt(2)))


def test_rollout_corrections_and_mismatch_by_hand():
    from grpo import mismatch, rollout_weights
    old = torch.log(torch.tensor([1.0, 3.0, 0.25]))             # rho = 1, 3, 0.25 against sampler 0
    sampler = torch.zeros(3)
    assert rollout_weights(old, sampler, "token-tis", 2.0).tolist() == pytest.approx([1.0, 2.0, 0.25])
    assert rollout_weights(old, sampler, "none", 2.0).tolist() == [1.0, 1.0, 1.0]
    # the sequence's ratio: exp(mean log rho) = 0.75 ** (1/3) = 0.909: inside [1/2, 2], outside [1/1.05, 1.05]
    assert rollout_weights(old, sampler, "seq-mask", 2.0).tolist() == [1.0, 1.0, 1.0]
    assert rollout_weights(old, sampler, "seq-mask", 1.05).tolist() == [0.0, 0.0, 0.0]
    m = mismatch(old, sampler)
    assert m["mismatch_diff"] == pytest.approx(math.log(0.75), abs=1e-6)
    assert m["mismatch_kl"] == pytest.approx((3 - math.log(3) - 1) + (0.25 - math.log(0.25) - 1), abs=1e-6)
    assert m["mismatch_out"] == 2                                # 3 > 2 and 0.25 < 1/2


def test_clipped_loss_value_and_gradient():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.5])).requires_grad_()
    adv = torch.tensor([1.0, 1.0, -2.0, -2.0])
    loss, clipped = clipped_policy_loss(logp, old, adv, 0.2, 0.2)
    # by hand: max(-A r, -A clip(r)): r=1.5,A=1 -> max(-1.5,-1.2)=-1.2 (clipped); r=.5,A=1 -> max(-.5,-.8)=-.5
    #          r=1.1,A=-2 -> max(2.2, 2.2)=2.2 (inside); r=.5,A=-2 -> max(1.0, 1.6)=1.6 (clipped)
    assert loss.tolist() == pytest.approx([-1.2, -0.5, 2.2, 1.6])
    assert clipped.tolist() == [True, False, False, True]
    g, = torch.autograd.grad(loss.sum(), logp)
    # d/dlogp of -A r = -A r; zero where clipped
    assert g.tolist() == pytest.approx([0.0, -0.5, 2.2, 0.0])
    # dual clip: A < 0 and a huge ratio -> loss capped at -A c
    big = torch.log(torch.tensor([10.0]))
    l2, c2 = clipped_policy_loss(big, torch.zeros(1), torch.tensor([-1.0]), 0.2, 0.28, dual_clip=3.0)
    assert l2.item() == pytest.approx(3.0) and c2.item()
    l3, _ = clipped_policy_loss(torch.log(torch.tensor([1.3])), torch.zeros(1), torch.tensor([1.0]), 0.2,
                                0.28)
    assert l3.item() == pytest.approx(-1.28)              # clip-higher


def test_k3_kl_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0, -30.0]), torch.tensor([-1.5, -1.0, 0.0])
    d = [-0.5, 1.0, 20.0]
    want = [math.exp(x) - x - 1 for x in d[:2]] + [10.0]   # the last one is clamped at 10
    assert kl_k3(logp, ref).tolist() == pytest.approx(want)


def test_aggregation_modes_by_hand():
    L = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0, 5.0, 6.0])]
    lens = [2, 4]
    agg = lambda mode: sum((x * w).sum()
                           for x, w in zip(L, token_weights(lens, mode, n_seqs=2, n_tokens=6, budget=16)))
    assert agg("token-mean").item() == pytest.approx(21 / 6)
    assert agg("seq-mean-token-mean").item() == pytest.approx((1.5 + 4.5) / 2)
    # Dr. GRPO / TRL dr_grpo: the constant generation budget (16), not the longest response (4)
    assert agg("seq-mean-token-sum-norm").item() == pytest.approx(21 / (2 * 16))


def test_validation_judges_every_target(monkeypatch):
    """train.validate on 2 users x 3 targets, a scripted writer (user a's profile closes, user b's
    runs out of tokens) and a scripted judge, against the metrics by hand: MAE over all 6 targets,
    format rate per user, GAUC per user (b's profile is judged as no profile)."""
    from types import SimpleNamespace

    import train
    from reward import template_profile
    hist = [{"title": "Up (2009)", "rating": 5.0, "genres": "Comedy"}]
    target = lambda u, k, r: {"user_id": u, "item_id": f"T{k}", "title": f"T{k}", "rating": r,
                              "history": hist, "recent": [], "user_mean": 4.0,
                              "label": "like" if r >= 4 else "dislike" if r <= 2 else "neutral"}
    val = [dict(target("a", 1, 5.0), more_targets=[target("a", 2, 3.0), target("a", 3, 1.0)]),
           dict(target("b", 4, 2.0), more_targets=[target("b", 5, 4.0), target("b", 6, 4.0)])]
    writes = [SimpleNamespace(text="likes T1 most", finish="eos"),             # closes
              SimpleNamespace(text="rambl", finish="length")]                  # runs out of tokens
    sampler = SimpleNamespace(generate=lambda prompts, *a, **k: [[w] for w in writes[:len(prompts)]])
    template = template_profile(val[0])

    class Judge:
        def predict(self, messages, task):
            out = []
            for m in messages:
                text, item = m[0]["content"], m[0]["content"].rsplit("New item: ", 1)[1]
                out.append({"T1": 4.5, "T2": 3.5, "T3": 2.0}[item] if "likes T1 most" in text
                           else 4.0 if template in text else 3.0)
            return out
    monkeypatch.setattr(train, "profile_prompt", lambda tok, s: [0])
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):    # a plain 1-rank group, not torchrun's
        monkeypatch.delenv(k, raising=False)
    d = train.setup_distributed()
    try:
        got = train.validate(sampler, None, Judge(), val, "rating", 8, 4, d)
    finally:
        import torch.distributed as dist
        dist.destroy_process_group()
    want = {"val_MAE": (0.5 + 0.5 + 1 + 1 + 1 + 1) / 6, "val_format_rate": 0.5, "val_MAE_closed": 2 / 3,
            "val_no_profile_MAE_closed": 4 / 3, "val_no_profile_MAE": 7 / 6, "val_template_MAE": 7 / 6,
            "val_judge_failures": 0, "val_GAUC": (1.0 + 0.5) / 2, "val_no_profile_GAUC": 0.5,
            "val_template_GAUC": 0.5}
    assert got == pytest.approx(want)


def test_every_epoch_shows_each_example_once_even_when_steps_cross_epochs():
    from train import rank_positions, step_examples
    n, per_step = 10, 4
    positions = rank_positions(per_step, 1, Dist(0, 1, torch.device("cpu")))
    stream = [i for s in range(10) for i, _ in step_examples(3, s, per_step, n, positions)]   # 40 positions
    assert all(sorted(stream[e * n:(e + 1) * n]) == list(range(n)) for e in range(4))
    # two ranks together take the same examples as one
    two = [step_examples(3, 2, per_step, n, rank_positions(per_step, 1, Dist(r, 2, torch.device("cpu"))))
           for r in (0, 1)]
    assert sorted(i for part in two for i, _ in part) == sorted(stream[8:12])
    # --steps 0: every example --epochs times, counted by hand: 2 epochs of 10 in steps of 4 = 5 steps
    from train import training_steps
    assert training_steps(0, 2, n, per_step) == 5 and training_steps(0, 1, n, per_step) == 3
    assert training_steps(7, 2, n, per_step) == 7
    shown = [i for s in range(training_steps(0, 2, n, per_step)) for i, _ in step_examples(3, s, per_step, n,
                                                                                         positions)]
    assert all(shown.count(i) == 2 for i in range(n))


def test_the_reference_runs_the_policys_attention_kernel(tiny):
    from train import TrainConfig, close_distributed, load_reference, setup_distributed
    d = setup_distributed()
    try:
        for kernel in ("sdpa", "flex"):                 # a forced kernel, also one that is not the default
            assert load_reference(tiny[0], TrainConfig(attention=kernel), d).attention == kernel
    finally:
        close_distributed()


def hand_objective(logp, old, sampler, adv, w, level, correction, cap, eps=0.2):
    """GRPO's policy loss written out: sum_i w_i sum_t c_t max(-A r, -A clip(r, 1 - eps, 1 + eps)) with
    r = exp(logp_t - old_t) per token, or GSPO's exp(mean_t (logp_t - old_t)) for the whole profile,
    and c_t = min(exp(old_t - sampler_t), cap) (token TIS), or 1 / 0 for a profile whose
    exp(mean_t (old_t - sampler_t)) is inside / outside [1/cap, cap] (sequence mask)."""
    total = 0.0
    for lp, o, s, a, wi in zip(logp, old, sampler, adv, w):
        for t in range(len(lp)):
            r = torch.exp(lp[t] - o[t]) if level == "token" else torch.exp((lp - o).sum() / len(lp))
            c = 1.0
            if correction == "token-tis":
                c = min(math.exp(float(o[t] - s[t])), cap)
            elif correction == "seq-mask":
                c = float(1 / cap <= math.exp(float((o - s).sum()) / len(o)) <= cap)
            total = total + wi * c * torch.maximum(-a * r, -a * r.clamp(1 - eps, 1 + eps))
    return total


@pytest.mark.parametrize("level,correction,cap", [("token", "token-tis", 2.0), ("sequence", "none", 2.0),
                                                  ("sequence", "seq-mask", 1.3), ("token", "seq-mask", 1.3)])
def test_gspo_and_rollout_corrections_against_the_formula_by_hand(tiny, level, correction, cap):
    from grpo import Episode, GRPOConfig, grpo_loss
    from train import close_distributed, completion_logprobs, full_tensor, load_policy, setup_distributed
    d = setup_distributed()
    try:
        cfg = GRPOConfig(kl_coef=0.0, importance_sampling_level=level, rollout_correction=correction,
                         rollout_correction_cap=cap)
        model = load_policy(tiny[0], cfg, d).model
        prompt, comps = [5, 6, 7, 8], [[9, 10, 11], [12, 13], [14, 15, 16, 17]]
        seqs = [(prompt, c) for c in comps]
        with torch.no_grad():
            true = [x.logprobs for x in completion_logprobs(model, seqs, d.device)]
        shift = [torch.tensor([0.3, -0.25, 0.1]), torch.tensor([-0.4, 0.05]),
                 torch.tensor([0.2, 0.3, -0.1, 0.0])]
        old = [t + s for t, s in zip(true, shift)]                  # off-policy: ratios off 1, some clipped
        sampler = [o - torch.tensor([0.9, -0.2, 0.1, 0.0][:len(o)]) for o in old]   # known mismatch
        adv, w = [1.0, -1.0, 0.5], [0.1, 0.2, 0.3]
        episodes = [Episode(prompt, c, a, 0, s, o) for c, a, s, o in zip(comps, adv, sampler, old)]
        loss, m = grpo_loss(model, episodes, w, cfg, d.device)
        loss.backward()
        got = {n: full_tensor(p.grad).clone() for n, p in model.named_parameters()}
        model.zero_grad()
        logp = [x.logprobs for x in completion_logprobs(model, seqs, d.device)]
        want = hand_objective(logp, old, sampler, adv, w, level, correction, cap)
        want.backward()
        assert loss.item() == pytest.approx(want.item(), abs=1e-6)
        assert max((got[n] - full_tensor(p.grad)).abs().max().item()
                   for n, p in model.named_parameters()) < 1e-6
        d_all = torch.cat([o - s for o, s in zip(old, sampler)])
        assert m["mismatch_diff"] == pytest.approx(d_all.sum().item(), abs=1e-5)
        assert m["mismatch_kl"] == pytest.approx((d_all.exp() - d_all - 1).sum().item(), abs=1e-5)
        assert m["mismatch_out"] == ((d_all.exp() < 0.5) | (d_all.exp() > 2)).sum().item() == 3
    finally:
        close_distributed()


@pytest.mark.parametrize("level,correction", [("token", "token-tis"), ("sequence", "none"),
                                              ("sequence", "token-tis")])
def test_the_loss_equals_trls_compute_loss(tiny, level, correction):
    """TRL 1.16's GRPOTrainer._compute_loss (loss_type bnpo = token-mean; importance_sampling_ratio as its
    token_truncate mode makes it) on the same per-token log-probs: the same loss and gradients."""
    pytest.importorskip("trl")
    from types import SimpleNamespace

    from trl import GRPOTrainer

    from grpo import Episode, GRPOConfig, grpo_loss, token_weights
    from train import close_distributed, completion_logprobs, full_tensor, load_policy, setup_distributed
    d = setup_distributed()
    try:
        cfg = GRPOConfig(kl_coef=0.0, importance_sampling_level=level, rollout_correction=correction,
                         rollout_correction_cap=2.0, clip_low=0.2, clip_high=0.28)
        model = load_policy(tiny[0], cfg, d).model
        prompt, comps = [5, 6, 7, 8], [[9, 10, 11], [12, 13], [14, 15, 16, 17]]
        seqs = [(prompt, c) for c in comps]
        with torch.no_grad():
            true = [x.logprobs for x in completion_logprobs(model, seqs, d.device)]
        old = [t + torch.tensor([0.3, -0.25, 0.1, 0.2][:len(t)]) for t in true]
        sampler = [o - torch.tensor([0.9, -0.2, 0.1, 0.0][:len(o)]) for o in old]
        adv = [1.0, -1.0, 0.5]
        episodes = [Episode(prompt, c, a, 0, s, o) for c, a, s, o in zip(comps, adv, sampler, old)]
        n_tok = sum(map(len, comps))
        loss, _ = grpo_loss(model, episodes, token_weights(list(map(len, comps)), "token-mean", 3, n_tok, 8),
                            cfg, d.device)
        loss.backward()
        ours = {n: full_tensor(p.grad).clone() for n, p in model.named_parameters()}
        model.zero_grad()
        pad = lambda xs: torch.nn.utils.rnn.pad_sequence(xs, batch_first=True)              # [B, T]
        logp = [x.logprobs for x in completion_logprobs(model, seqs, d.device)]
        mask = pad([torch.ones(len(c)) for c in comps])
        ratio = (pad(old) - pad(sampler)) * mask
        inputs = {"prompt_ids": torch.tensor([prompt] * 3), "prompt_mask": torch.ones(3, 4),
                  "completion_ids": pad([torch.tensor(c) for c in comps]), "completion_mask": mask,
                  "advantages": torch.tensor(adv), "old_per_token_logps": pad(old),
                  "importance_sampling_ratio": (torch.exp(ratio).clamp(max=2.0) if correction == "token-tis"
                                                else torch.ones_like(ratio))}
        acc = SimpleNamespace(reduce=lambda x, reduction: x, gather=lambda x: x,
                              gather_for_metrics=lambda x: x, num_processes=1, sync_gradients=True)
        from collections import defaultdict
        fake = SimpleNamespace(
            _get_per_token_logps_and_entropies=lambda *a, **k: (pad(logp), torch.zeros_like(mask), None),
            top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level,
            beta=0.0, loss_type="bnpo", epsilon_low=0.2, epsilon_high=0.28, args=SimpleNamespace(delta=None),
            use_vllm=True, vllm_importance_sampling_correction=True, model=SimpleNamespace(training=True),
            current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False, aux_loss_enabled=False,
            accelerator=acc, _metrics={"train": defaultdict(list)}, max_completion_length=8)
        want = GRPOTrainer._compute_loss(fake, None, inputs)
        want.backward()
        assert loss.item() == pytest.approx(want.item(), abs=1e-6)
        assert max((ours[n] - full_tensor(p.grad)).abs().max().item()
                   for n, p in model.named_parameters()) < 1e-6
    finally:
        close_distributed()


def test_non_finite_step_is_skipped():
    model = torch.nn.Linear(3, 2)
    policy, d = optimized(model, 0.1), Dist(0, 1, torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(1, 3)).sum().backward()
    model.weight.grad[0, 0] = float("nan")
    norm, ok = apply_update(policy, 1.0, 1.0, d)
    assert not ok and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not policy.optimizer.state                      # nothing stepped, not even Adam's moments
    model(torch.ones(1, 3)).sum().backward()
    _, ok = apply_update(policy, float("inf"), 1.0, d)
    assert not ok and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model(torch.ones(1, 3)).sum().backward()
    _, ok = apply_update(policy, 1.0, 1.0, d)
    assert ok and not torch.equal(before[0], model.weight)


def test_the_clipped_update_does_not_depend_on_the_weights_layout():
    """One fp32 process samples with the policy itself, whose weights keep the decode layout (transposed
    strides, rollout.cpu_decode_layout): the clipped AdamW update must be the bits torch's clip_grad_norm_
    and AdamW give on the same weights and gradients stored row-major (a norm summed in memory order
    differs in its last bits)."""
    import copy
    torch.manual_seed(0)
    rowmajor = torch.nn.Linear(1536, 576)
    moved = copy.deepcopy(rowmajor)
    moved.weight.data = moved.weight.data.t().contiguous().t()
    (rowmajor(torch.randn(8, 1536)) ** 2).sum().backward()
    moved.weight.grad = rowmajor.weight.grad.t().contiguous().t()
    moved.bias.grad = rowmajor.bias.grad.clone()
    assert not moved.weight.grad.is_contiguous() and torch.equal(moved.weight.grad, rowmajor.weight.grad)
    reference = torch.optim.AdamW(rowmajor.parameters(), lr=0.1, weight_decay=0.0)
    want = torch.nn.utils.clip_grad_norm_(rowmajor.parameters(), 1e-3).item()
    reference.step()
    norm, ok = apply_update(optimized(moved, 0.1), 1.0, 1e-3, Dist(0, 1, torch.device("cpu")))
    assert ok and norm == want
    assert torch.equal(moved.weight, rowmajor.weight) and torch.equal(moved.bias, rowmajor.bias)


@pytest.fixture(scope="module")
def toy_setup(tmp_path_factory):
    return tiny_run_folder(tmp_path_factory.mktemp("toy"), users=40)


def toy(setup, out, *extra, nproc=1, check=True):
    return run("tests/toy_grpo.py", "--model", setup / "model", "--judge", setup / "model",
               "--data", setup / "data", "--out", out, "--prompts-per-step", "4", "--group-size", "4",
               "--max-new-tokens", "12", "--eval-every", "100", "--val-users", "2", "--lr", "3e-3",
               "--token-budget", "1500", *extra, nproc=nproc, check=check)


def test_a_judge_that_dies_is_not_trained_on(toy_setup, tmp_path, monkeypatch):
    """The judge fails on every profile from step 2 on, as a killed server: steps 2 and 3 apply no
    update, the run stops after --judge-down-steps 2 with one error line, and --resume with the
    judge back continues to the end."""
    monkeypatch.setenv("TOY_JUDGE_DIES_AFTER", "2")
    r = toy(toy_setup, tmp_path, "--steps", "6", "--save-every", "1", "--judge-down-steps", "2", check=False)
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(errors) == 1 and "failed on most profiles in steps 2-3" in errors[0]
    assert "--resume" in errors[0]
    assert [json.loads(x)["skipped"] for x in open(tmp_path / "metrics.jsonl")] == [0, 0, 1]
    ckpt = lambda s: weights(tmp_path / f"ckpt-{s:06d}")
    assert max_diff(ckpt(2), weights_start(toy_setup)) > 1e-4        # steps 0 and 1 trained (2 ckpts kept)
    assert max_diff(ckpt(3), ckpt(2)) == 0                                # step 2: nothing applied
    monkeypatch.delenv("TOY_JUDGE_DIES_AFTER")
    toy(toy_setup, tmp_path, "--steps", "6", "--save-every", "1", "--judge-down-steps", "2", "--resume")
    assert latest_checkpoint(str(tmp_path)).endswith("ckpt-000006")


class RatingServer(JSONHandler):
    """A judge server that answers every chat request with a rating."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send(json.dumps({"choices": [{"message": {"content": "<rating>4.00</rating>"}}]}).encode())


def test_a_killed_judge_server_stops_the_run(toy_setup, tmp_path):
    """A real judge server, killed after the second checkpoint: no step after the kill applies an
    update, the run stops with one error line after --judge-down-steps such steps, and --resume
    with a server back on the same port trains to the end."""
    server = start_server(RatingServer)
    port = server.server_address[1]
    args = ["--steps", "8", "--save-every", "1", "--judge-down-steps", "2"]
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, os.path.join(ROOT, "tests", "toy_grpo.py"), "--model", toy_setup / "model",
           "--judge-url", url, "--judge-mode", "decode", "--data", toy_setup / "data", "--out", tmp_path,
           "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "12", "--eval-every", "100",
           "--val-users", "2", "--token-budget", "1500", *args]
    env = {**clean_env(), "TOY_JUDGE_URL": url}
    proc = subprocess.Popen(list(map(str, cmd)), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (tmp_path / "ckpt-000002").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        server.shutdown()
        server.server_close()                                   # the judge is gone
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert proc.returncode != 0 and "Traceback" not in err, err[-2000:]
    assert len(errors) == 1 and url in errors[0] and "--resume" in errors[0]
    skipped = [json.loads(x)["skipped"] for x in open(tmp_path / "metrics.jsonl")]
    assert skipped[:2] == [0, 0] and skipped == sorted(skipped) and skipped[-1] == 1   # trained, then never
    first = skipped.index(1)
    assert max_diff(weights(tmp_path / f"ckpt-{first + 1:06d}"), weights(tmp_path / f"ckpt-{first:06d}")) == 0
    server = start_server(RatingServer, port)                  # the judge is back
    try:
        r = subprocess.run(list(map(str, cmd + ["--resume"])), env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    finally:
        server.shutdown()
        server.server_close()
    assert r.returncode == 0, r.stderr[-2000:]
    assert latest_checkpoint(str(tmp_path)).endswith("ckpt-000008")


def test_it_learns(toy_setup, tmp_path):
    toy(toy_setup, tmp_path, "--steps", "16", "--group-size", "8", "--mini-batches", "1",
        "--save-every", "100")
    rewards = [json.loads(x)["reward_mean"] for x in open(tmp_path / "metrics.jsonl")]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.08, rewards


def test_two_ranks_match_one(toy_setup, tmp_path):
    toy(toy_setup, tmp_path / "one", "--steps", "2", "--save-every", "2")
    toy(toy_setup, tmp_path / "two", "--steps", "2", "--save-every", "2", nproc=2)
    a, b = weights(tmp_path / "one" / "ckpt-000002"), weights(tmp_path / "two" / "ckpt-000002")
    start = weights_start(toy_setup)
    assert max_diff(a, start) > 1e-3                       # the steps did move the weights
    assert max_diff(a, b) < 1e-5


def weights_start(setup):
    from safetensors.torch import load_file
    return load_file(os.path.join(setup, "model", "model.safetensors"))


def test_resume_is_exact_and_survives_killed_write(toy_setup, tmp_path, monkeypatch):
    toy(toy_setup, tmp_path / "straight", "--steps", "4", "--save-every", "2")
    toy(toy_setup, tmp_path / "split", "--steps", "2", "--save-every", "2")
    # a write killed midway leaves only a .tmp folder: the previous checkpoint stays the latest
    shutil.copytree(tmp_path / "split" / "ckpt-000002", tmp_path / "split" / "ckpt-000004.tmp")
    os.remove(tmp_path / "split" / "ckpt-000004.tmp" / "trainer.pt")
    assert latest_checkpoint(str(tmp_path / "split")).endswith("ckpt-000002")
    toy(toy_setup, tmp_path / "split", "--steps", "4", "--save-every", "2", "--resume")
    assert max_diff(weights(tmp_path / "straight" / "ckpt-000004"),
                    weights(tmp_path / "split" / "ckpt-000004")) < 1e-6
    from transformers import (
        AutoModelForCausalLM,  # the checkpoint is a loadable HF folder
    )
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "split" / "ckpt-000004" / "model"))


def test_a_second_run_into_a_run_folder_stops_before_any_work_and_resume_keeps_the_logs_clean(toy_setup,
                                                                                              tmp_path):
    toy(toy_setup, tmp_path, "--steps", "1", "--save-every", "1")
    r = toy(toy_setup, tmp_path, "--steps", "2", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: --out") and "--resume" in r.stderr
    # killed after logging step 1, before its checkpoint: resumed from step 1, its row is redone once
    row = json.loads(open(tmp_path / "metrics.jsonl").readline())
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({**row, "step": 1}) + "\n")
    toy(toy_setup, tmp_path, "--steps", "3", "--save-every", "1", "--resume")
    steps = [json.loads(x)["step"] for x in open(tmp_path / "metrics.jsonl")]
    assert steps == [0, 1, 2]


def test_ctrl_c_is_one_line_and_exit_130(toy_setup, tmp_path):
    import signal
    cmd = [sys.executable, os.path.join(ROOT, "tests", "toy_grpo.py"), "--model", toy_setup / "model",
           "--judge", toy_setup / "model", "--data", toy_setup / "data", "--out", tmp_path,
           "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "12", "--eval-every", "100",
           "--val-users", "2",
           "--steps", "500", "--save-every", "1"]
    proc = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=clean_env(), preexec_fn=default_sigint)
    for line in proc.stdout:
        if line.startswith("step    1 |"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped (Ctrl-C): in step") and "--resume" in last and "ckpt-" in last


def test_killed_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    """A crash inside save_model (after the temp folder exists) never touches the last good one."""
    import train
    from lettingo import load_model
    make_model(str(tmp_path / "m"), "llama")
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):   # setup_distributed sets them:
        monkeypatch.delenv(k, raising=False)                       # restore afterwards for later subprocesses
    d = train.setup_distributed()
    model, tok = load_model(str(tmp_path / "m"), device="cpu")
    policy = optimized(train.shard(model, torch.float32), 1e-3)
    policy.tok = tok
    train.save_checkpoint(str(tmp_path / "run"), 1, policy, {}, d)

    def crash(*a, **k):
        os.makedirs(a[2], exist_ok=True)
        open(os.path.join(a[2], "model.safetensors"), "w").write("half")
        raise KeyboardInterrupt("killed")
    monkeypatch.setattr(train, "save_model", crash)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(str(tmp_path / "run"), 2, policy, {}, d)
    assert latest_checkpoint(str(tmp_path / "run")).endswith("ckpt-000001")
    load_model(os.path.join(latest_checkpoint(str(tmp_path / "run")), "model"))
    monkeypatch.undo()
    for step in (2, 3):                        # keep 2: ckpt-1 goes, ckpt-2 keeps its weights only
        train.save_checkpoint(str(tmp_path / "run"), step, policy, {}, d, keep=2)
    assert sorted(os.listdir(tmp_path / "run")) == ["ckpt-000002", "ckpt-000003"]
    blobs = [torch.load(tmp_path / "run" / c / "trainer.pt", weights_only=False) for c in ("ckpt-000002",
                                                                                         "ckpt-000003")]
    assert "optimizer" not in blobs[0] and "optimizer" in blobs[1] and blobs[0]["step"] == 2
    with pytest.raises(train.LettingoError, match="weights only"):
        train.load_trainer_state(str(tmp_path / "run" / "ckpt-000002"), policy, d)
    train.load_trainer_state(str(tmp_path / "run" / "ckpt-000003"), policy, d)
    import torch.distributed as dist
    dist.destroy_process_group()


def test_shared_prompt_packing_matches_separate_forwards(tiny):
    """A group's completions packed behind one copy of their prompt give the same log-probs and
    gradients as each (prompt + completion) run alone through a plain forward."""
    from lettingo import load_model
    from train import completion_logprobs
    folder, _ = tiny
    m, _ = load_model(folder, device="cpu")
    g = torch.Generator().manual_seed(0)
    rnd = lambda n: torch.randint(3, m.cfg.vocab_size, (n,), generator=g).tolist()
    P, Q = rnd(40), rnd(25)
    seqs = [(P, rnd(7)), (Q, rnd(4)), (P, rnd(12)), (P, rnd(1))]
    lps = [x.logprobs for x in completion_logprobs(m, seqs, "cpu", share_prompts=True)]
    sum((lp * (k + 1)).sum() for k, lp in enumerate(lps)).backward()
    shared = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    total = 0
    for k, (p, c) in enumerate(seqs):
        logp = torch.log_softmax(m(torch.tensor([p + c]))[0, len(p) - 1:-1], -1)
        want = logp.gather(1, torch.tensor(c)[:, None]).squeeze(1)
        assert (lps[k] - want).abs().max() < 1e-5
        total = total + (want * (k + 1)).sum()
    total.backward()
    assert max((shared[n] - p.grad).abs().max().item() for n, p in m.named_parameters()) < 1e-4


def test_micro_batches_respect_the_packed_budget():
    """Against a brute-force count of completion_logprobs' layout (each distinct prompt of a group
    packed once when shared, once per completion when not): every micro-batch fits the budget (or
    is a single item), groups are contiguous and cover all, and a group is only closed when the
    next item would not fit."""
    from lettingo import micro_batches
    g = torch.Generator().manual_seed(3)
    rnd = lambda lo, hi: int(torch.randint(lo, hi, (), generator=g))
    prompts = [[k] * rnd(20, 300) for k in range(6)]
    seqs = []
    for k in range(6):                                # groups of 1-8 completions; one pair item (DPO)
        seqs += [(prompts[k], [1] * rnd(1, 130)) for _ in range(rnd(1, 9))]
    seqs.append((prompts[0], [1] * 50, [1] * 60))

    def packed(items, share):
        if share:
            distinct = {tuple(p): len(p) for p, *_ in items}
            return sum(distinct.values()) + sum(len(c) for _, *cs in items for c in cs)
        return sum(len(p) * len(cs) + sum(map(len, cs)) for p, *cs in items)

    for share in (True, False):
        for budget in (300, 700, 2000):
            groups = micro_batches(seqs, budget, share)
            assert [i for grp in groups for i in grp] == list(range(len(seqs)))
            for a, b in zip(groups, groups[1:]):
                items = [seqs[i] for i in a]
                assert len(a) == 1 or packed(items, share) <= budget
                assert packed(items + [seqs[b[0]]], share) > budget      # greedy: the next one did not fit
        unshared, shared = len(micro_batches(seqs, 2000, False)), len(micro_batches(seqs, 2000, True))
        assert shared < unshared


def test_plot_curves_draws_every_panel(tmp_path):
    """A run folder written by hand -> curves.png whose panels carry the logged values."""
    pytest.importorskip("matplotlib")
    import matplotlib.image

    from tools.plot import plot_dpo, plot_grpo
    rows = [{"step": s, "reward_mean": -0.5 + 0.1 * s, "reward_std": 0.2, "format_rate": 0.3 + 0.1 * s,
             "kl": 0.01 * s, "entropy": 2.0, "clip_frac": 0.01, "response_length": 40 + s,
             "time_rollout": 5.0, "time_reward": 1.0, "time_update": 3.0, "grad_norm": 0.5} for s in range(5)]
    val = [{"step": s, "val_MAE": 1.2 - 0.05 * s, "val_format_rate": 0.5, "val_MAE_closed": 1.0,
            "val_no_profile_MAE_closed": 1.1, "val_no_profile_MAE": 1.2, "val_template_MAE": 0.9}
           for s in (0, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val))
    path = plot_grpo(str(tmp_path))
    img = matplotlib.image.imread(path)
    # a real figure, not a blank page
    assert img.shape[0] > 600 and img.shape[1] > 1200 and img[..., :3].std() > 0.05
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 0.7 - 0.1 * s, "pref_accuracy": 0.5, "reward_margin": 0.1 * s,
                    "chosen_reward": 0.0, "logp_chosen": -30.0, "logp_rejected": -40.0,
                    "grad_norm": 1.0}) + "\n" for s in range(3)))
    assert os.path.isfile(plot_dpo(str(tmp_path / "d")))


def plain_logprobs(m, seqs):
    """Each (prompt + completion) alone through a plain causal forward: the reference."""
    out = []
    for p, c in seqs:
        logp = torch.log_softmax(m(torch.tensor([p + c], device=m.lm_head.weight.device))[0, len(p) - 1:-1]
                                 .float(), -1)
        out.append(logp.gather(1, torch.tensor(c, device=logp.device)[:, None]).squeeze(1))
    return out


def test_flex_attention_on_cpu_matches_separate_forwards(tiny):
    """FlexAttention's block mask (documents + shared-prompt branches, padded to its block size)
    gives the log-probs of separate plain forwards (CPU: forward only, as FlexAttention has no CPU
    backward); the GPU-only kernels say clearly why they cannot run here."""
    from lettingo import LettingoError, attention_backend, load_model
    from train import completion_logprobs
    folder, _ = tiny
    m, _ = load_model(folder, device="cpu")
    g = torch.Generator().manual_seed(1)
    rnd = lambda n: torch.randint(3, m.cfg.vocab_size, (n,), generator=g).tolist()
    P, Q = rnd(90), rnd(30)
    seqs = [(P, rnd(7)), (Q, rnd(4)), (P, rnd(60)), (P, rnd(1))]          # 302 tokens packed: 3 flex blocks
    m.attention = "flex"
    with torch.no_grad():
        lps = [x.logprobs for x in completion_logprobs(m, seqs, "cpu")]
        want = plain_logprobs(m, seqs)
    assert max((a - b).abs().max().item() for a, b in zip(lps, want)) < 1e-5
    assert attention_backend("auto", "cpu", torch.float32) == "sdpa"
    for kind in ("varlen", "flash"):
        with pytest.raises(LettingoError, match=f"--attention {kind} cannot run here"):
            attention_backend(kind, "cpu", torch.float32)
    with pytest.raises(LettingoError, match="no CPU backward"):
        attention_backend("flex", "cpu", torch.float32)                  # grad enabled: training


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["varlen", "flex", "sdpa"])
def test_cuda_attention_backends_match_sdpa(tiny, kernel):
    """Each GPU kernel, bf16, on a GRPO-like micro-batch: log-probs and gradients vs separate plain
    SDPA forwards (flex and sdpa share the prompt; varlen carries one copy per sequence)."""
    from lettingo import load_model
    from train import completion_logprobs
    folder, _ = tiny
    g = torch.Generator().manual_seed(2)
    m, _ = load_model(folder, dtype=torch.bfloat16, device="cuda")
    rnd = lambda n: torch.randint(3, m.cfg.vocab_size, (n,), generator=g).tolist()
    P, Q = rnd(150), rnd(70)
    seqs = [(P, rnd(40)), (P, rnd(33)), (Q, rnd(20)), (P, rnd(5)), (Q, rnd(64))]
    weights = [1.0, -2.0, 0.5, 3.0, -1.0]
    m.attention = kernel
    lps = [x.logprobs for x in completion_logprobs(m, seqs, "cuda")]
    sum((lp.float() * w).sum() for lp, w in zip(lps, weights)).backward()
    grads = {n: p.grad.float().clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.attention = "sdpa"
    want = plain_logprobs(m, seqs)
    sum((lp * w).sum() for lp, w in zip(want, weights)).backward()
    assert max((a.float() - b).abs().max().item() for a, b in zip(lps, want)) < 0.1
    rel = max(((grads[n] - p.grad.float()).norm() / (p.grad.float().norm() + 1e-6)).item()
              for n, p in m.named_parameters())
    assert rel < 0.05, rel


def test_the_packed_backward_is_the_same_bits_on_a_busy_machine(tmp_path):
    """A prompt's keys and last token are gathered once per completion; the backward must sum those
    copies in a fixed order. Advanced indexing's backward adds them with atomics from the CPU's
    threads, so a process burning a core beside it changed the gradient's last bits (and a GRPO run's
    lines from step 10 on); 40 backwards of the same packed batch must give one gradient."""
    import hashlib
    from lettingo import load_model
    from train import completion_logprobs
    make_model(str(tmp_path / "m"), "llama", hidden_size=128, intermediate_size=192)
    model = load_model(str(tmp_path / "m"), dtype=torch.float32, device="cpu")[0]
    model.attention = "sdpa"
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (250, 170, 300)]
    seqs = [(p, torch.randint(3, 200, (40,), generator=g).tolist()) for p in prompts for _ in range(4)]
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        seen = set()
        for _ in range(40):
            model.zero_grad()
            lps = completion_logprobs(model, seqs, "cpu", share_prompts=True)
            sum(x.logprobs.sum() for x in lps).backward()
            grads = b"".join(p.grad.numpy().tobytes() for p in model.parameters())
            seen.add(hashlib.sha1(grads).hexdigest())
    finally:
        burner.kill()
    assert torch.get_num_threads() > 1 and len(seen) == 1, len(seen)


def test_lora_layer_against_the_formula(tiny):
    """A LoRA layer's output and its adapters' gradients against the formula written out: y = x W^T + b
    + s (x A^T) B^T, dL/dB = s dy^T (x A^T), dL/dA = s (dy B)^T x; W, b get no gradient."""
    from train import LoRALinear
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    layer = LoRALinear(base, 3, 12.0, torch.Generator().manual_seed(0))
    base.weight.requires_grad_(False)
    base.bias.requires_grad_(False)
    with torch.no_grad():
        layer.lora_B.normal_()                              # B starts at 0: give it values to test
    x, dy = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    layer = layer.double()
    W, b, A, B, s = layer.weight, layer.bias, layer.lora_A, layer.lora_B, 12.0 / 3
    y = layer(x)
    (y * dy).sum().backward()
    assert torch.allclose(y, x @ W.T + b + s * (x @ A.T) @ B.T, atol=1e-12)
    assert torch.allclose(B.grad, s * dy.T @ (x @ A.T), atol=1e-12)
    assert torch.allclose(A.grad, s * (dy @ B).T @ x, atol=1e-12)
    assert W.grad is None and b.grad is None


def test_a_lora_policy_starts_as_the_base_and_its_judge_shares_the_weights(tiny, tmp_path):
    """With LoRA the policy's logits at the start equal transformers' on the checkpoint; only the
    adapters train; one fp32 process samples with the policy itself, whose logits are those of
    transformers' model with W + s B A, and a saved model holds W + s B A; it judges with the
    policy's own frozen tensors, and the judge's probabilities equal those of a judge loaded alone."""
    import copy

    from safetensors.torch import load_file

    from lettingo import load_model, save_model
    from reward import LocalJudge
    from train import (MergedWeights, TrainConfig, close_distributed, full_tensor, load_judge, load_policy,
                       setup_distributed)
    folder, reference = tiny
    d = setup_distributed()
    try:
        cfg = TrainConfig(model=folder, judge=folder, lora_rank=4, lora_alpha=8.0)
        policy = load_policy(folder, cfg, d)
        judge, params = load_judge(cfg, policy, d), dict(policy.model.named_parameters())
        shared = {p.data_ptr() for p in judge.model.parameters()}
        assert all(full_tensor(p).data_ptr() in shared for p in params.values() if not p.requires_grad)
        tokens = torch.tensor([[5, 17, 42, 9, 100, 3, 77]])
        with torch.no_grad():
            assert (policy.model(tokens) - reference(tokens).logits).abs().max() < 1e-4
        trained = [n for n, p in params.items() if p.requires_grad]
        assert len(trained) == 2 * 7 * 2 and all(n.endswith((".lora_A", ".lora_B")) for n in trained)
        merged = copy.deepcopy(reference)
        with torch.no_grad():
            for n in trained:
                if n.endswith(".lora_B"):
                    B, A = full_tensor(params[n]).normal_(), full_tensor(params[n.replace("_B", "_A")])
                    merged.get_parameter(n.replace("lora_B", "weight")).add_(2.0 * B @ A)   # as if trained
        policy.sync()
        assert policy.rollout is policy.model
        with torch.no_grad():
            assert (policy.rollout(tokens) - merged(tokens).logits).abs().max() < 1e-4
        stem = "model.layers.1.mlp.down_proj."
        save_model(policy.model, policy.tok, str(tmp_path / "merged"), state_dict=MergedWeights(params, 2.0))
        saved = load_file(str(tmp_path / "merged" / "model.safetensors"))     # safetensors' own reader
        assert torch.allclose(saved[stem + "weight"], merged.get_parameter(stem + "weight"), atol=1e-6)
        assert not any(k.endswith(("lora_A", "lora_B")) for k in saved) and len(saved) == 2 * 9 + 2
        alone = LocalJudge(*load_model(folder, device="cpu"))
        messages = [[{"role": "user", "content": f"Toy Story (1995): rated {r}/5. Heat (1995)?"}]
                    for r in (1, 5)]
        assert torch.allclose(judge.probabilities(messages, "rating"),
                              alone.probabilities(messages, "rating"), atol=1e-6)
    finally:
        close_distributed()


def test_lora_runs_resume_exactly_and_match_across_ranks(toy_setup, tmp_path):
    """GRPO with LoRA: 4 steps straight, 2 + 2 resumed (the base from --model, the adapters from the
    checkpoint) and on 2 ranks (FSDP with frozen and trained tensors in one unit) save the same merged
    model, which differs from the start in the adapted layers only; resuming without LoRA is one error."""
    lora = ("--lora-rank", "4", "--lora-alpha", "8", "--lr", "3e-2", "--save-every", "2")
    toy(toy_setup, tmp_path / "straight", "--steps", "4", *lora)
    toy(toy_setup, tmp_path / "split", "--steps", "2", *lora)
    toy(toy_setup, tmp_path / "split", "--steps", "4", "--resume", *lora)
    toy(toy_setup, tmp_path / "two", "--steps", "4", *lora, nproc=2)
    a, b, c = (weights(tmp_path / run / "ckpt-000004") for run in ("straight", "split", "two"))
    start = weights_start(toy_setup)
    moved = {k for k in a if not torch.equal(a[k], start[k])}
    assert moved and all(k.endswith("_proj.weight") for k in moved), moved
    assert max_diff(a, b) < 1e-6 and max_diff(a, c) < 1e-5
    r = toy(toy_setup, tmp_path / "split", "--steps", "6", "--resume", check=False)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith("error:") and "--lora-rank" in last
