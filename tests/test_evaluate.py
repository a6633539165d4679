"""tools/evaluate.py: the per-user paired differences, two profiles per sample, the calibrated MAE and
the no-LLM baselines by hand, the paired bootstrap against brute force, and the CLI on synthetic users."""
import json

import pytest
from conftest import run
from test_reward import SAMPLE, users_targets

from tools.evaluate import Condition, affine_fit, baseline_predictions, calibrations, summarize


def test_paired_differences_are_per_user():
    """Two conditions on 2 users x 3 targets: the paired MAE and GAUC differences are over users."""
    preds_a, targets = users_targets({"A": [(5, 3.0), (3, 3.0), (1, 3.0)],
                                      "B": [(4, 4.0), (2, 2.0), (2, 2.0)]})
    preds_b, _ = users_targets({"A": [(5, 5.0), (3, 3.0), (1, 1.0)], "B": [(4, 2.0), (2, 4.0), (2, 4.0)]})
    samples = [dict(targets[0], more_targets=targets[1:3]), dict(targets[3], more_targets=targets[4:6])]
    rows = {name: Condition(p, list(range(6))) for name, p in (("no profile", preds_a), ("b", preds_b))}
    out = summarize("rating", samples, rows)
    # user A: MAE 4/3 -> 0, GAUC 1/2 -> 1; user B: MAE 0 -> 2, GAUC 1 -> 0
    assert out["paired"]["no profile -> b"][0] == pytest.approx(((4 / 3 - 0) + (0 - 2)) / 2)
    assert out["paired_GAUC"]["no profile -> b"][0] == pytest.approx(((0.5 - 1) + (1 - 0)) / 2)
    assert out["rows"]["b"]["all"]["GAUC"][0] == pytest.approx(0.5) and out["n_targets"] == 6


def test_two_profiles_per_sample_are_paired_and_ordered_within_each():
    """rollout.py --n 2: each sample's two profiles answer all its targets. The row is paired with no
    profile (a user's value: the mean over its profiles), and GAUC orders items within one profile:
    user A's profile 1 orders its items right (1), profile 2 wrong (0) -> 1/2, where pooling both
    profiles' answers would count the pairs across them and give 3/4."""
    preds_a, targets = users_targets({"A": [(5, 3.0), (1, 3.0)], "B": [(4, 4.0), (2, 2.0)]})
    samples = [dict(targets[0], more_targets=targets[1:2]), dict(targets[2], more_targets=targets[3:4])]
    # sample A: profile 1 -> 2.0, 1.0; profile 2 -> 1.2, 1.5; sample B: 4.0, 2.0 twice
    two = Condition([2.0, 1.0, 1.2, 1.5, 4.0, 2.0, 4.0, 2.0], [0, 1, 0, 1, 2, 3, 2, 3])
    out = summarize("rating", samples, {"no profile": Condition(preds_a, list(range(4))), "two": two})
    # MAE: A no profile (2 + 2) / 2, two (3 + 0 + 3.8 + 0.5) / 4; B 0 and 0
    assert out["paired"]["no profile -> two"][0] == pytest.approx(((2 - 7.3 / 4) + 0) / 2)
    # GAUC: A no profile 1/2 (a tie), two (1 + 0) / 2; B 1 and 1
    assert out["paired_GAUC"]["no profile -> two"][0] == pytest.approx(0.0)
    assert out["rows"]["two"]["all"]["GAUC"][0] == pytest.approx((1 + 0 + 1 + 1) / 4)


def test_calibrated_mae_by_hand():
    """The affine map is fitted on validation predictions and applied to test ones: a condition that
    reads its users but answers one star low and at half the scale gets a calibrated MAE of 0; a
    constant gets the validation ratings' mean."""
    rated = lambda rs: [dict(SAMPLE, user_id=str(k // 2), item_id=str(k), rating=r) for k, r in enumerate(rs)]
    assert affine_fit([1.0, 1.5, 2.0, None], rated([1, 2, 3, 5])) == pytest.approx((-1.0, 2.0))
    assert affine_fit([3.0, 3.0], rated([2, 5])) == (3.5, 0.0)               # no spread: the mean
    val, test = rated([2, 4, 1, 5]), rated([5, 3, 4, 1])
    val_samples = [dict(val[0], more_targets=val[1:2]), dict(val[2], more_targets=val[3:4])]
    test_samples = [dict(test[0], more_targets=test[1:2]), dict(test[2], more_targets=test[3:4])]
    fits = calibrations(val_samples, {"reads": Condition([1.5, 2.5, 1.0, 3.0], list(range(4))),
                                      "constant": Condition([2.0] * 4, list(range(4)))})
    assert fits["reads"] == pytest.approx((-1.0, 2.0)) and fits["constant"] == (3.0, 0.0)
    out = summarize("rating", test_samples, {"reads": Condition([3.0, 2.0, 2.5, 1.0], list(range(4))),
                                             "constant": Condition([2.0] * 4, list(range(4)))},
                    calibration=fits)
    assert out["rows"]["reads"]["all"]["MAE"][0] == pytest.approx((2 + 1 + 1.5 + 0) / 4)
    assert out["rows"]["reads"]["all"]["calibrated_MAE"][0] == pytest.approx(0.0)
    assert out["rows"]["constant"]["all"]["calibrated_MAE"][0] == pytest.approx((2 + 0 + 1 + 2) / 4)


def test_eval_cli_on_synthetic(tiny, tmp_path):
    folder, _ = tiny
    run("data/prepare.py", "synthetic", "--users", "40", "--out", tmp_path, "--test-users", "6",
        "--val-users", "2", check=True)
    prof = tmp_path / "p.jsonl"
    rows = [json.loads(x) for x in open(tmp_path / "test.jsonl")]
    prof.write_text("".join(json.dumps({"user_id": r["user_id"], "item_id": r["item_id"], "generations": [
        {"text": f"<user_profile>{r['oracle_profile']}</user_profile>"}, {"text": "broken"}]}) + "\n"
        for r in rows))
    val = tmp_path / "v.jsonl"                       # the same writer on the validation users
    val.write_text("".join(json.dumps({"user_id": r["user_id"], "item_id": r["item_id"],
                                       "text": f"<user_profile>{r['oracle_profile']}</user_profile>"}) + "\n"
                           for r in map(json.loads, open(tmp_path / "val.jsonl"))))
    r = run("tools/evaluate.py", "--data", tmp_path / "test.jsonl", "--profiles", prof, "--judge", folder,
            "--val-data", tmp_path / "val.jsonl", "--val-profiles", val)
    assert r.returncode == 0, r.stderr
    for row in ("global mean (no LLM)", "user mean (no LLM)", "no profile", "raw history", "oracle profile",
                "profiles: ", "template profile (code, no LLM)", "paired differences",
                "no profile -> template profile", "calibrated_MAE", "template, likes/dislikes swapped",
                "item kNN of the history (no LLM)", "item mean (no LLM) -> item kNN of the history"):
        assert row in r.stdout
    bare = run("tools/evaluate.py", "--data", tmp_path / "test.jsonl", "--judge", "none")   # no model at all
    assert bare.returncode == 0 and "item kNN" in bare.stdout, bare.stderr
    assert "raw history" not in bare.stdout
    bad = run("tools/evaluate.py", "--data", tmp_path / "test.jsonl", "--profiles", prof, "--judge", folder,
              "--val-data", tmp_path / "val.jsonl")
    assert bad.returncode != 0 and bad.stderr.startswith("error: --val-profiles: one file per --profiles")
    line = [x for x in r.stdout.splitlines() if x.startswith("profiles: ")][0]
    assert " 50% " in line                                                # one of two generations has no tag


def test_baselines_by_hand():
    h = lambda r: {"rating": r}
    samples = [{"user_mean": 4.5, "history": [h(5), h(4)]},
               {"user_mean": 2.0, "history": [h(4), h(1)], "recent": [h(4)]}]
    # all history ratings: 5, 4, 4, 1, 4 -> mean 18 / 5 = 3.6, median 4
    b = baseline_predictions("rating", samples)
    assert b == {"global mean (no LLM)": [pytest.approx(3.6)] * 2, "global median (no LLM)": [4] * 2,
                 "user mean (no LLM)": [4.5, 2.0]}


def test_paired_difference_against_brute_force():
    import random as rnd

    from tools.evaluate import paired_difference
    a = [0.5, 1.0, 0.2, 0.9, 0.4, 0.7]
    b = [0.4, 0.6, 0.3, 0.5, 0.1, 0.7]
    mean, lo, hi = paired_difference(a, b, boot=2000, seed=3)
    assert mean == pytest.approx(sum(x - y for x, y in zip(a, b)) / 6)
    # the same resampling written out: users drawn once for both conditions
    rng = rnd.Random(3)
    d = sorted(sum(a[k] - b[k] for k in ks) / 6
               for ks in ([rng.randrange(6) for _ in a] for _ in range(2000)))
    assert (lo, hi) == pytest.approx((d[50], d[1949]))
    # only samples both judged
    assert paired_difference([1.0, None, 0.5], [0.5, 0.2, None]) == (0.5, 0.5, 0.5)
    # a constant gain: a zero-width interval
    shift = paired_difference(a, [x - 0.25 for x in a])
    assert shift == pytest.approx((0.25, 0.25, 0.25))
