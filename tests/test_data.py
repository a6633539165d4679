"""data/prepare.py: every source format from small raw files, leakage, counts, bad input."""
import gzip
import json
import os

import pytest
from conftest import ROOT, run

from data.prepare import synthetic

SHARED = os.path.join(ROOT, "..", "shared", "data")
SMALL = ["--min-interactions", "3", "--min-history", "1", "--test-users", "1", "--val-users", "1",
         "--eval-targets", "1"]


def prepare(*args):
    return run("data/prepare.py", *args)


def load(out):
    return {s: [json.loads(x) for x in open(os.path.join(out, f"{s}.jsonl"))]
            for s in ("train", "val", "test")}, \
        json.load(open(os.path.join(out, "stats.json")))


def check_leakage(splits):
    """Every history item strictly earlier than its target; means from earlier ratings only; users
    disjoint."""
    users = {s: {x["user_id"] for x in v} for s, v in splits.items()}
    assert (not (users["train"] & users["test"]) and not (users["train"] & users["val"])
            and not (users["val"] & users["test"]))
    for v in splits.values():
        for s in v:
            hist = s["history"] + s["recent"]
            assert all(h["timestamp"] < s["timestamp"] for h in hist)
            assert [h["timestamp"] for h in hist] == sorted(h["timestamp"] for h in hist)   # oldest first
            assert s["item_id"] not in {h["item_id"] for h in hist}
            later = [s] + s.get("more_targets", [])          # every target after the whole history
            assert [t["timestamp"] for t in later] == sorted(t["timestamp"] for t in later)
            assert not {t["item_id"] for t in later} & {h["item_id"] for h in hist}


def write_ml100k(d, rows):
    os.makedirs(d, exist_ok=True)
    open(f"{d}/u.genre", "w").write("Action|0\nComedy|1\nDrama|2\n")
    with open(f"{d}/u.item", "wb") as f:
        f.write("1|Caf\xe9 Movie (1995)|01-Jan-1995||url|1|0|0\n".encode("latin-1"))
        f.write(b"2|Funny (1990)|01-Jan-1990||url|0|1|0\n3|Sad (1980)|||url|0|0|1\n"
                b"4|Both (1999)|||url|1|1|0\n")
    open(f"{d}/u.data", "w").write("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))


ROWS = [(u, i, r, 100 * u + t) for u in (1, 2, 3) for i, r, t in ((1, 5, 1), (2, 4, 2), (3, 1, 3), (4, 2, 4))]


def test_movielens_100k_fields(tmp_path):
    raw = tmp_path / "raw"
    write_ml100k(raw, ROWS + [(1, 4, 3, 104)])          # a duplicate (user 1, item 4)
    r = prepare("movielens", "--raw", raw, "--out", tmp_path / "o", *SMALL, "--profile-history", "2",
                "--recent", "1")
    assert r.returncode == 0, r.stderr
    splits, stats = load(tmp_path / "o")
    assert stats["ratings_read"] == 13 and stats["dropped"]["duplicate"]["count"] == 1
    s = [x for v in splits.values() for x in v if x["user_id"] == "2"][0]
    assert s["item_id"] == "4" and s["rating"] == 2.0 and s["label"] == "dislike" and s["timestamp"] == 204
    assert s["title"] == "Both (1999)" and s["description"] == "Released 1999. Genres: Action, Comedy"
    assert [h["title"] for h in s["history"]] == ["Caf\xe9 Movie (1995)", "Funny (1990)"]   # older part
    assert [h["genres"] for h in s["history"]] == ["Action", "Comedy"]
    assert [h["item_id"] for h in s["recent"]] == ["3"]                                    # 1 most recent
    assert s["user_mean"] == pytest.approx((5 + 4 + 1) / 3, abs=1e-4)
    assert s["item_mean"] == pytest.approx(2.0)        # the training user's rating of item 4
    check_leakage(splits)


def test_movielens_1m_and_latest_formats(tmp_path):
    d = tmp_path / "ml1m"
    d.mkdir()
    (d / "movies.dat").write_bytes("1::Am\xe9lie (2001)::Comedy|Romance\n2::Heat (1995)::Action\n"
                                   .encode("latin-1"))
    (d / "ratings.dat").write_text("".join(f"{u}::{1 + k % 2}::{3 + k % 2}::{10 * u + k}\n"
                                           for u in (1, 2, 3) for k in range(2))
                                   + "4::1::5::1\n4::2::4::2\n4::9::4::3\n")             # item 9 unknown
    r = prepare("movielens", "--raw", d, "--out", tmp_path / "o1", "--min-interactions", "2",
                "--min-history", "1", "--test-users", "1", "--val-users", "1")
    assert r.returncode == 0, r.stderr
    splits, stats = load(tmp_path / "o1")
    assert stats["dropped"]["unknown item"]["count"] == 1 and "unknown item" in r.stdout
    s = splits["train"][0]
    assert s["title"] == "Heat (1995)" and s["history"][0]["title"] == "Am\xe9lie (2001)"
    d = tmp_path / "latest"
    d.mkdir()
    (d / "movies.csv").write_text('movieId,title,genres\n1,"Good, Bad (1966)",Western\n'
                                  '2,Up (2009)|x,Animation\n')
    (d / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" +
                                   "".join(f"{u},{1 + k % 2},{2.5 + k},{10 * u + k}\n"
                                           for u in (1, 2, 3) for k in range(2)))
    r = prepare("movielens", "--raw", d, "--out", tmp_path / "o2", "--min-interactions", "2",
                "--min-history", "1", "--test-users", "1", "--val-users", "1")
    assert r.returncode == 0, r.stderr
    splits, stats = load(tmp_path / "o2")
    s = splits["test"][0]
    assert s["rating"] == 3.5 and s["label"] == "neutral" and s["history"][0]["title"] == "Good, Bad (1966)"


def test_amazon_2014_gz_literal_meta_and_2023(tmp_path):
    reviews = [{"reviewerID": f"U{u}", "asin": f"A{i}", "overall": 1.0 + i, "unixReviewTime": 100 * u + i,
                "summary": "Nice", "reviewText": "x" * 300} for u in range(3) for i in range(3)]
    with gzip.open(tmp_path / "r.json.gz", "wt") as f:
        f.writelines(json.dumps(x) + "\n" for x in reviews)
    with gzip.open(tmp_path / "meta.json.gz", "wt") as f:   # Python literals, as the 2014 dump
        f.writelines(repr({"asin": f"A{i}", "title": f"Book {i}", "description": "About things"}) + "\n"
                     for i in range(3))
    r = prepare("amazon", "--raw", tmp_path / "r.json.gz", "--meta", tmp_path / "meta.json.gz",
                "--out", tmp_path / "o", *SMALL, "--min-interactions", "3")
    assert r.returncode == 0, r.stderr
    splits, _ = load(tmp_path / "o")
    s = splits["test"][0]
    assert s["title"] == "Book 2" and s["description"] == "About things" and s["rating"] == 3.0
    assert s["history"][0]["review"] == ("Nice: " + "x" * 300)[:200]                # summary: text
    rows = [{"user_id": f"U{u}", "parent_asin": f"P{i}", "rating": 5.0, "timestamp": 1000 * (10 * u + i),
             "title": "t", "text": "great"} for u in range(3) for i in range(3)]
    (tmp_path / "Books.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    r = prepare("amazon", "--raw", tmp_path / "Books.jsonl", "--out", tmp_path / "o3", *SMALL)
    assert r.returncode == 0, r.stderr
    splits, _ = load(tmp_path / "o3")
    s = splits["test"][0]
    assert s["title"] == "P2" and s["timestamp"] == 10 * int(s["user_id"][1:]) + 2   # ms -> s; title = id


def test_amazon_folders_as_published_and_5core_defaults(tmp_path):
    """--raw takes the folder as downloaded, finds the category's metadata, and the default split and
    minimum-interaction settings fit 5-core data (every user has >= 5 reviews)."""
    users, items = 30, 8
    reviews = [{"reviewerID": f"U{u}", "asin": f"A{(u + i) % items}", "overall": float(1 + (u + i) % 5),
                "unixReviewTime": 1000 * u + i, "summary": "ok", "reviewText": "fine"}
               for u in range(users) for i in range(5)]
    d14 = tmp_path / "2014"
    d14.mkdir()
    with gzip.open(d14 / "reviews_Musical_Instruments_5.json.gz", "wt") as f:
        f.writelines(json.dumps(x) + "\n" for x in reviews)
    with gzip.open(d14 / "meta_Musical_Instruments.json.gz", "wt") as f:
        f.writelines(repr({"asin": f"A{i}", "title": f"Guitar {i}"}) + "\n" for i in range(items))
    r = prepare("amazon", "--raw", d14, "--out", tmp_path / "o14")
    assert r.returncode == 0, r.stderr
    splits, stats = load(tmp_path / "o14")
    assert stats["users_read"] == users and not stats["items_without_metadata"]
    # 10 % / 5 % of 30 users
    assert len(splits["test"]) == 3 and len(splits["val"]) == 2 and len(splits["train"]) == 25
    assert all(s["title"].startswith("Guitar") for s in splits["test"])
    check_leakage(splits)
    d23 = tmp_path / "2023"
    d23.mkdir()
    rows = [{"user_id": f"U{u}", "parent_asin": f"P{(u + i) % items}", "rating": 4.0,
             "timestamp": 1000 * (10 * u + i), "title": "t", "text": "great"}
            for u in range(users) for i in range(5)]
    (d23 / "Books.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    r = prepare("amazon", "--raw", d23, "--out", tmp_path / "o23")      # no metadata: said, not silent
    assert r.returncode == 0 and "no item metadata" in r.stderr, r.stderr
    assert load(tmp_path / "o23")[1]["items_without_metadata"]
    with gzip.open(d23 / "meta_Books.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"parent_asin": f"P{i}", "title": f"Novel {i}"}) + "\n" for i in range(items))
    r = prepare("amazon", "--raw", d23, "--out", tmp_path / "o23m")
    assert r.returncode == 0, r.stderr
    assert load(tmp_path / "o23m")[0]["test"][0]["title"].startswith("Novel")
    (d23 / "Extra.jsonl").write_text("")
    r = prepare("amazon", "--raw", d23, "--out", tmp_path / "o23x")     # two candidates: say which
    assert r.returncode != 0 and "expected one reviews file" in r.stderr and "Traceback" not in r.stderr
    r = prepare("amazon", "--raw", d14, "--out", tmp_path / "o14x", "--test-users", "20", "--val-users", "10")
    assert r.returncode != 0 and "--min-interactions" in r.stderr       # the error names the fix


def test_yelp(tmp_path):
    (tmp_path / "yelp_academic_dataset_business.json").write_text(
        "".join(json.dumps({"business_id": f"B{i}", "name": f"Cafe {i}", "categories": "Coffee",
                            "city": "Reno"}) + "\n" for i in range(3)))
    (tmp_path / "yelp_academic_dataset_review.json").write_text(
        "".join(json.dumps({"user_id": f"U{u}", "business_id": f"B{i}", "stars": 4,
                            "date": f"2019-01-0{i + 1} 10:00:00", "text": "ok"}) + "\n"
                for u in range(3) for i in range(3)))
    r = prepare("yelp", "--raw", tmp_path, "--out", tmp_path / "o", *SMALL)
    assert r.returncode == 0, r.stderr
    splits, _ = load(tmp_path / "o")
    s = splits["test"][0]
    assert (s["title"] == "Cafe 2" and s["description"] == "Categories: Coffee. City: Reno"
            and s["history"][-1]["review"] == "ok")


def test_synthetic_deterministic_fast_and_leak_free(tmp_path):
    r = prepare("synthetic", "--users", 200, "--out", tmp_path / "a", "--test-users", 20, "--val-users", 20,
                "--targets-per-user", 3)
    assert r.returncode == 0, r.stderr
    assert json.load(open(tmp_path / "a" / "stats.json"))["seconds"] < 2
    prepare("synthetic", "--users", 200, "--out", tmp_path / "b", "--test-users", 20, "--val-users", 20,
            "--targets-per-user", 3)
    assert open(tmp_path / "a" / "train.jsonl").read() == open(tmp_path / "b" / "train.jsonl").read()
    splits, _ = load(tmp_path / "a")
    check_leakage(splits)
    assert all("love" in s["oracle_profile"] for s in splits["test"])


def test_reward_targets_are_the_next_interactions(tmp_path):
    r = prepare("synthetic", "--users", 60, "--out", tmp_path / "a", "--test-users", 5, "--val-users", 5,
                "--reward-targets", 3, "--targets-per-user", 2)
    assert r.returncode == 0, r.stderr
    splits, _ = load(tmp_path / "a")
    check_leakage(splits)
    train = splits["train"]
    ratings, _, _ = synthetic(60)                      # the same users, read directly
    by_user, train_users = {}, {s["user_id"] for s in train}
    for u, i, r, t, _ in ratings:
        by_user.setdefault(u, []).append((t, i, r))
    for s in splits["test"] + splits["val"]:           # evaluation: the user's last 5 interactions
        rows = sorted(by_user[s["user_id"]])
        targets = [(t["timestamp"], t["item_id"]) for t in [s] + s["more_targets"]]
        assert targets == [(t, i) for t, i, _ in rows[-5:]]
        assert [h["timestamp"] for h in s["history"]] == [t for t, _, _ in rows[-15:-5]]
    for s in splits["test"] + splits["val"] + train:   # item mean: over the training users' ratings
        for t in [s] + s["more_targets"]:
            rs = [r for u in train_users for _, i, r in by_user[u] if i == t["item_id"]]
            assert t["item_mean"] == (pytest.approx(sum(rs) / len(rs), abs=1e-4) if rs else None)
    assert train and all(len(s["more_targets"]) == 2 for s in train)
    for u in {s["user_id"] for s in train}:
        mine = sorted((s for s in train if s["user_id"] == u), key=lambda s: s["timestamp"])
        assert len(mine) == 2
        # targets are consecutive interactions: the later sample's target is the earlier one's next
        assert mine[1]["item_id"] == mine[0]["more_targets"][0]["item_id"]
        assert mine[1]["more_targets"][0]["item_id"] == mine[0]["more_targets"][1]["item_id"]
        assert len(mine[1]["history"]) >= len(mine[0]["history"])


def test_judge_users_are_their_own_split_and_the_item_means_keep_counting_them(tmp_path):
    common = ["--users", 80, "--test-users", 5, "--val-users", 5, "--reward-targets", 2]
    prepare("synthetic", *common, "--out", tmp_path / "a")
    r = prepare("synthetic", *common, "--out", tmp_path / "b", "--judge-users", 20, "--judge-targets", 4,
                "--judge-contexts", 3)
    assert r.returncode == 0, r.stderr
    before, _ = load(tmp_path / "a")
    splits, stats = load(tmp_path / "b")
    judge = [json.loads(x) for x in open(tmp_path / "b" / "judge.jsonl")]
    check_leakage({**splits, "judge": judge})
    users = {s: {x["user_id"] for x in v} for s, v in {**splits, "judge": judge}.items()}
    assert len(users["judge"]) == 20 == stats["judge_users"]
    assert all(not (users["judge"] & users[s]) for s in ("train", "val", "test"))
    # the judge users are taken from the writer's training users; evaluation users do not move
    assert users["judge"] | users["train"] == {x["user_id"] for x in before["train"]}
    assert splits["test"] == before["test"] and splits["val"] == before["val"]
    ratings, _, _ = synthetic(80)
    by_user = {}
    for u, i, r, t, _ in ratings:
        by_user.setdefault(u, []).append((t, i, r))
    for u in users["judge"]:        # blocks of 4 consecutive targets from the newest back, at most 3
        rows = sorted(by_user[u])
        mine = [s for s in judge if s["user_id"] == u]
        assert len(mine) == min(3, (len(rows) - 5) // 4)
        for k, s in enumerate(reversed(mine)):
            block = rows[len(rows) - 4 * (k + 1):len(rows) - 4 * k]
            assert [(t["timestamp"], t["item_id"]) for t in [s] + s["more_targets"]] == [(t, i) for t, i, _ in
                                                                                          block]
            before = rows[:len(rows) - 4 * (k + 1)]
            assert [h["timestamp"] for h in s["history"]] == [t for t, _, _ in before[-10:]]


def test_item_knn_against_the_formula_by_hand(tmp_path):
    from data.prepare import ItemKNN
    ratings = {"u1": {"a": 5.0, "b": 4.0, "c": 1.0}, "u2": {"a": 4.0, "b": 5.0, "c": 2.0},
               "u3": {"a": 1.0, "b": 2.0}, "u4": {"c": 5.0}}
    knn = ItemKNN(ratings, shrink=1.0)
    # deviations from each user's mean: u1 (mean 10/3), u2 (11/3), u3 (3/2)
    da = {"u1": 5 - 10 / 3, "u2": 4 - 11 / 3, "u3": 1 - 1.5}
    db = {"u1": 4 - 10 / 3, "u2": 5 - 11 / 3, "u3": 2 - 1.5}
    dot = sum(da[u] * db[u] for u in da)
    cos = dot / (sum(v * v for v in da.values()) * sum(v * v for v in db.values())) ** 0.5
    assert knn.similarity("a", "b") == pytest.approx(cos * 3 / (3 + 1.0))
    assert knn.similarity("a", "x") == 0.0
    mean = {"a": 10 / 3, "b": 11 / 3, "c": 8 / 3}
    sac, sbc = knn.similarity("a", "c"), knn.similarity("b", "c")
    shown = [{"item_id": "a", "rating": 5.0}, {"item_id": "b", "rating": 3.0}]
    want = mean["c"] + (sac * (5 - mean["a"]) + sbc * (3 - mean["b"])) / (abs(sac) + abs(sbc))
    assert knn.predict("c", shown) == pytest.approx(min(5, max(1, want)), abs=1e-4)
    assert knn.predict("x", shown) is None and knn.item_mean("c") == pytest.approx(8 / 3, abs=1e-4)


def test_bad_input(tmp_path):
    raw = tmp_path / "raw"
    write_ml100k(raw, ROWS)
    with open(raw / "u.data", "ab") as f:
        f.write(b"1\t2\n")                     # a missing field
        f.write(b"2\t1\t\xff\t5\n")             # a non-UTF-8 byte
        f.write(b"3\t1\t4")                     # truncated last line
    r = prepare("movielens", "--raw", raw, "--out", tmp_path / "o", *SMALL)
    assert r.returncode == 0, r.stderr
    assert ("dropped 3 (malformed line)" in r.stdout and "u.data:13" in r.stdout
            and "u.data:14: not utf-8" in r.stdout)
    assert load(tmp_path / "o")[1]["ratings_read"] == 12
    r = prepare("movielens", "--raw", tmp_path / "missing", "--out", tmp_path / "o")
    assert r.returncode != 0 and "no such folder" in r.stderr and "Traceback" not in r.stderr
    (raw / "u.data").write_text("")
    r = prepare("movielens", "--raw", raw, "--out", tmp_path / "o")
    assert r.returncode != 0 and "u.data: file is empty" in r.stderr and "Traceback" not in r.stderr
    with gzip.open(tmp_path / "r.json.gz", "wt") as f:
        f.writelines(json.dumps({"user_id": f"U{u}", "asin": f"A{i}", "rating": 4,
                                 "timestamp": 1000 * (u * 10 + i)}) + "\n"
                     for u in range(3) for i in range(3))
    blob = (tmp_path / "r.json.gz").read_bytes()
    (tmp_path / "cut.json.gz").write_bytes(blob[:-12])   # truncated gzip stream
    r = prepare("amazon", "--raw", tmp_path / "cut.json.gz", "--out", tmp_path / "o", *SMALL)
    assert "truncated" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(not os.path.isdir(SHARED),
                    reason="the shared MovieLens data is not mounted at ../shared/data")
@pytest.mark.parametrize("name,ratings,users,items", [("ml-100k", 100000, 943, 1682),
                                                      ("ml-latest-small", 100836, 610, 9724)])
def test_shared_movielens_counts_and_leakage(tmp_path, name, ratings, users, items):
    r = prepare("movielens", "--raw", os.path.join(SHARED, name), "--out", tmp_path, "--profile-history", 30,
                "--recent", 10, "--targets-per-user", 2)
    assert r.returncode == 0, r.stderr
    splits, stats = load(tmp_path)
    assert (stats["ratings_read"], stats["users_read"], stats["items_rated"]) == (ratings, users, items)
    assert stats["ratings_kept"] == ratings and stats["dropped"] == {}
    check_leakage(splits)
    for s in splits["test"][:50]:                  # the user mean is over strictly earlier ratings only
        assert len(s["recent"]) == 10 and s["user_mean"] is not None
