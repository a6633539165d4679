"""data/prepare.py -- rating datasets -> leak-free LettinGo samples (train/val/test JSONL + stats.json).

One sample = one target interaction of one user, with the history strictly before it:
    python data/prepare.py movielens --raw ../shared/data/ml-100k --out runs/ml100k
    python data/prepare.py synthetic --users 200 --out runs/synth
Protocols: the public GRPO code's (profile from the last 10 interactions): --profile-history 10 --recent 0;
the paper's (profile from older history, 10 recent kept raw): --profile-history 30 --recent 10.
"""
from __future__ import annotations

import ast
import dataclasses
import bisect
import csv
import glob
import gzip
import json
import math
import os
import random
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lettingo import ArgParser, LettingoError, add_config, cli, config_from, option  # noqa: E402


class Drops:
    """Every dropped row is counted by reason; the first few line numbers are kept for the report."""

    def __init__(self):
        self.count, self.where = Counter(), defaultdict(list)

    def add(self, reason, where=None):
        self.count[reason] += 1
        if where is not None and len(self.where[reason]) < 5:
            self.where[reason].append(where)

    def report(self):
        return {r: {"count": n, "examples": self.where.get(r, [])} for r, n in sorted(self.count.items())}


def open_text(path, encoding="utf-8"):
    """Text lines of a plain or .gz file, decoded strictly so a bad byte is reported per line."""
    if not os.path.isfile(path):
        raise LettingoError(f"{path}: no such file")
    raw = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    return raw, encoding


def lines(path, drops: Drops, encoding="utf-8", skip_header=False):
    """Yield (line number, text) of a file; undecodable lines and truncated .gz streams are reported."""
    raw, enc = open_text(path, encoding)
    n = 0
    try:
        with raw:
            for n, b in enumerate(raw, 1):
                if skip_header and n == 1:
                    continue
                try:
                    text = b.decode(enc).rstrip("\r\n")
                except UnicodeDecodeError as e:
                    drops.add("malformed line",
                              f"{os.path.basename(path)}:{n}: not {enc} ({e.reason} at byte {e.start})")
                    continue
                if text.strip():
                    yield n, text
    except (EOFError, OSError, gzip.BadGzipFile) as e:
        drops.add("truncated file", f"{os.path.basename(path)}: stream ends after line {n} ({e})")
        print(f"warning: {path}: truncated or corrupt after line {n} ({e}); using what was read",
              file=sys.stderr)
    if n == 0:
        raise LettingoError(f"{path}: file is empty")


# ----------------------------------------------------------------------------- sources
# Each reader returns (ratings, items): ratings = [(user, item, rating, timestamp, review)], items =
# {item: (title, description)}; items is None when the source has no metadata (ids name the items).

def read_movielens(folder, drops):
    if os.path.isfile(folder):
        raise LettingoError(f"--raw {folder}: a file; --raw takes the MovieLens folder that holds it "
                            f"({os.path.dirname(folder) or '.'})")
    if not os.path.isdir(folder):
        raise LettingoError(f"--raw {folder}: no such folder (expected a MovieLens folder with u.data, "
                            "ratings.dat or ratings.csv)")
    p = lambda f: os.path.join(folder, f)
    items, ratings = {}, []
    if os.path.isfile(p("u.data")):                                         # ML-100K
        genres = ([g.split("|")[0] for _, g in lines(p("u.genre"), drops, "latin-1")]
                  if os.path.isfile(p("u.genre")) else [])
        for n, line in lines(p("u.item"), drops, "latin-1"):
            f = line.split("|")
            if len(f) < 5:
                drops.add("malformed item line", f"u.item:{n}")
                continue
            g = [genres[i] for i, flag in enumerate(f[5:]) if flag == "1" and i < len(genres)]
            items[f[0]] = (f[1], describe_movie(f[1], g))
        rows, sep = lines(p("u.data"), drops), "\t"
    elif os.path.isfile(p("ratings.dat")):                                  # ML-1M / ML-10M
        for n, line in lines(p("movies.dat"), drops, "latin-1"):
            f = line.split("::")
            if len(f) != 3:
                drops.add("malformed item line", f"movies.dat:{n}")
                continue
            items[f[0]] = (f[1], describe_movie(f[1], f[2].split("|")))
        rows, sep = lines(p("ratings.dat"), drops), "::"
    elif os.path.isfile(p("ratings.csv")):                                  # ml-latest(-small)
        for n, line in lines(p("movies.csv"), drops, skip_header=True):
            f = next(csv.reader([line]))
            if len(f) != 3:
                drops.add("malformed item line", f"movies.csv:{n}")
                continue
            items[f[0]] = (f[1], describe_movie(f[1], f[2].split("|")))
        rows, sep = lines(p("ratings.csv"), drops, skip_header=True), ","
    else:
        raise LettingoError(f"--raw {folder}: no u.data, ratings.dat or ratings.csv there")
    fname = {"\t": "u.data", "::": "ratings.dat", ",": "ratings.csv"}[sep]
    for n, line in rows:
        f = line.split(sep)
        try:
            if len(f) != 4:
                raise ValueError(f"{len(f)} fields, expected 4")
            ratings.append((f[0], f[1], float(f[2]), int(f[3]), ""))
        except ValueError as e:
            drops.add("malformed line", f"{fname}:{n}: {e}")
    return ratings, items


def describe_movie(title, genres):
    year = title[-5:-1] if title.endswith(")") and title[-5:-1].isdigit() else None
    genres = [g for g in genres if g and g not in ("unknown", "(no genres listed)")]
    return ". ".join(x for x in [f"Released {year}" if year else "",
                                 "Genres: " + ", ".join(genres) if genres else ""] if x)


def parse_json_or_literal(text):
    try:
        return json.loads(text)
    except ValueError:
        return ast.literal_eval(text)  # Amazon 2014 metadata is Python-literal, not JSON


def amazon_files(raw, meta=None):
    """(reviews file, metadata file or None) from --raw as published: a file, or a folder holding
    one category -- 2023 `<Cat>.jsonl[.gz]` + `meta_<Cat>.jsonl[.gz]`, 2014/2018
    `reviews_<Cat>[_5].json.gz` or `<Cat>[_5].json[.gz]` + `meta_<Cat>.json[.gz]`."""
    if os.path.isdir(raw):
        found = sorted(n for n in os.listdir(raw) if n.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")))
        reviews = [n for n in found if not n.startswith("meta_")]
        if len(reviews) != 1:
            raise LettingoError(f"--raw {raw}: expected one reviews file (*.json[l][.gz], not meta_*), found "
                                f"{reviews or 'none'}; pass the file itself as --raw")
        path = os.path.join(raw, reviews[0])
    elif os.path.isfile(raw):
        path = raw
    else:
        raise LettingoError(f"--raw {raw}: no such file or folder")
    if meta is None:                     # the category's metadata beside the reviews, if published there
        name = os.path.basename(path)
        for suffix in (".gz", ".jsonl", ".json", "_5"):
            name = name[:-len(suffix)] if name.endswith(suffix) else name
        name = name[len("reviews_"):] if name.startswith("reviews_") else name
        folder = os.path.dirname(path)
        cands = [os.path.join(folder, f"meta_{name}{ext}")
                 for ext in (".jsonl.gz", ".jsonl", ".json.gz", ".json")]
        meta = next((c for c in cands if os.path.isfile(c)), None)
        if meta:
            print(f"metadata: {meta}")
    return path, meta


def read_amazon(path, drops, meta=None, review_chars=200):
    """2014/2018 (reviewerID, asin, overall, unixReviewTime) or 2023 (user_id, parent_asin, rating,
    timestamp in ms) review lines; optional metadata (title, description) from --meta."""
    items = None
    if meta:
        items = {}
        for n, line in lines(meta, drops):
            try:
                m = parse_json_or_literal(line)
                key = m.get("parent_asin") or m["asin"]
                desc = m.get("description") or ""
                desc = " ".join(desc) if isinstance(desc, list) else str(desc)
                items[key] = (m.get("title") or key, desc[:300])
            except (ValueError, SyntaxError, KeyError, AttributeError):
                drops.add("malformed item line", f"{os.path.basename(meta)}:{n}")
    ratings = []
    for n, line in lines(path, drops):
        try:
            r = json.loads(line)
            if "reviewerID" in r:
                user, item, rating, ts = (r["reviewerID"], r["asin"], float(r["overall"]),
                                          int(r["unixReviewTime"]))
                text = ": ".join(x.strip() for x in (r.get("summary"), r.get("reviewText"))
                                 if x and x.strip())
            else:
                user, item, rating = r["user_id"], r.get("parent_asin") or r["asin"], float(r["rating"])
                ts = int(r["timestamp"]) // 1000
                text = ": ".join(x.strip() for x in (r.get("title"), r.get("text")) if x and x.strip())
            ratings.append((user, item, rating, ts, text[:review_chars]))
        except (ValueError, KeyError, TypeError) as e:
            drops.add("malformed line", f"{os.path.basename(path)}:{n}: {type(e).__name__} {e}")
    return ratings, items


def read_yelp(folder, drops, review_chars=200):
    if not os.path.isdir(folder):
        raise LettingoError(f"--raw {folder}: no such folder "
                            "(expected the Yelp review.json and business.json)")
    find = lambda name: (glob.glob(os.path.join(folder, f"*{name}.json"))
                         + glob.glob(os.path.join(folder, f"*{name}.json.gz")) or [None])[0]
    review, business = find("review"), find("business")
    if not review or not business:
        raise LettingoError(f"--raw {folder}: needs *review.json and *business.json")
    items = {}
    for n, line in lines(business, drops):
        try:
            b = json.loads(line)
            items[b["business_id"]] = (b["name"], ". ".join(
                x for x in (b.get("categories") and f"Categories: {b['categories']}",
                            b.get("city") and f"City: {b['city']}") if x))
        except (ValueError, KeyError) as e:
            drops.add("malformed item line", f"{os.path.basename(business)}:{n}: {e}")
    ratings = []
    for n, line in lines(review, drops):
        try:
            r = json.loads(line)
            ts = int(datetime.strptime(r["date"], "%Y-%m-%d %H:%M:%S")
                     .replace(tzinfo=timezone.utc).timestamp())
            ratings.append((r["user_id"], r["business_id"], float(r["stars"]), ts,
                            (r.get("text") or "")[:review_chars]))
        except (ValueError, KeyError, TypeError) as e:
            drops.add("malformed line", f"{os.path.basename(review)}:{n}: {type(e).__name__} {e}")
    return ratings, items


# ----------------------------------------------------------------------------- synthetic users

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Thriller", "Animation", "Documentary",
          "Fantasy"]
ADJ = ["Silent", "Last", "Golden", "Broken", "Hidden", "Crimson", "Endless", "Little", "Wild", "Frozen",
       "Secret", "Lost"]
NOUN = ["River", "Kingdom", "Summer", "Machine", "Garden", "Storm", "Letter", "Island", "Road", "Planet",
        "Heart", "City"]


def synthetic(n_users, seed=0, n_items=400, min_ratings=20, max_ratings=60, total_ratings=None):
    """Users with latent traits and ratings drawn from a stated model:
        score = 3.0 + generosity + 1.3 [item has a liked genre] - 1.6 [item has a disliked genre]
                + quality_item + Normal(0, noise_user);   rating = clip(round(score), 1, 5)
    generosity ~ U(-1, 1), noise ~ U(0.2, 1.0) (consistency), 2 liked and 1-2 disliked genres.
    Returns (ratings, items, oracle profiles {user: text}). Deterministic for a seed."""
    import numpy as np
    rng = np.random.default_rng(seed)
    items, item_genres = {}, []
    for i in range(n_items):
        g = list(rng.choice(len(GENRES), size=int(rng.integers(1, 3)), replace=False))
        item_genres.append(set(g))
        title = (f"The {ADJ[rng.integers(len(ADJ))]} {NOUN[rng.integers(len(NOUN))]} {i} "
                 f"({1970 + int(rng.integers(50))})")
        desc = f"Genres: {', '.join(GENRES[k] for k in g)}. A {GENRES[g[0]].lower()} story."
        items[str(i)] = (title, desc)
    quality = rng.normal(0, 0.3, n_items)
    counts = rng.integers(min_ratings, max_ratings + 1, n_users)
    if total_ratings:  # an exact total spread evenly (ML-1M-sized files for the speed check)
        counts = np.full(n_users, total_ratings // n_users)
        counts[: total_ratings % n_users] += 1
        if counts.max() > n_items:
            raise LettingoError(f"--total-ratings needs at least {counts.max()} items per user; "
                                "raise --items")
    ratings, oracle = [], {}
    for u in range(n_users):
        gen, noise = rng.uniform(-1, 1), rng.uniform(0.2, 1.0)
        prefs = rng.choice(len(GENRES), size=3 + int(rng.integers(0, 2)), replace=False)
        liked, disliked = set(prefs[:2].tolist()), set(prefs[2:].tolist())
        chosen = rng.choice(n_items, size=int(counts[u]), replace=False)
        like = np.array([bool(item_genres[i] & liked) for i in chosen])
        dislike = np.array([bool(item_genres[i] & disliked) for i in chosen])
        score = 3.0 + gen + 1.3 * like - 1.6 * dislike + quality[chosen] + rng.normal(0, noise, len(chosen))
        stars = np.clip(np.rint(score), 1, 5)
        times = 1_000_000_000 + np.sort(rng.integers(0, 10**8, len(chosen)))
        uid = str(u + 1)
        ratings += [(uid, str(i), float(r), int(t), "") for i, r, t in zip(chosen, stars, times)]
        tone = "generously" if gen > 0.33 else "harshly" if gen < -0.33 else "about average"
        oracle[uid] = (
            f"This user rates {tone} (typical rating about {3.0 + gen:.1f}). They love "
            f"{' and '.join(GENRES[k] for k in sorted(liked))} and dislike "
            f"{' and '.join(GENRES[k] for k in sorted(disliked))}. Their ratings are "
            f"{'very consistent' if noise < 0.45 else 'fairly consistent' if noise < 0.75 else 'noisy'}.")
    return ratings, items, oracle


def export_movielens(folder, ratings, items):
    """Write ratings in the ML-1M layout (ratings.dat / movies.dat, `::`-separated)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "movies.dat"), "w", encoding="latin-1") as f:
        for i, (title, desc) in items.items():
            f.write(f"{i}::{title}::{desc.split('. ')[0].replace('Genres: ', '').replace(', ', '|')}\n")
    with open(os.path.join(folder, "ratings.dat"), "w") as f:
        f.writelines(f"{u}::{i}::{int(r)}::{t}\n" for u, i, r, t, _ in ratings)


# ----------------------------------------------------------------------------- samples

def build_samples(ratings, items, args, drops, oracle=None):
    """Group by user, order by time, split users, and cut one sample per target interaction."""
    by_user, seen = defaultdict(list), set()
    for u, i, r, t, text in ratings:
        if items is not None and i not in items:
            drops.add("unknown item", f"user {u} item {i}")
            continue
        if (u, i) in seen:
            drops.add("duplicate", f"user {u} item {i}")
            continue
        seen.add((u, i))
        by_user[u].append((t, i, r, text))
    del seen
    for rows in by_user.values():
        rows.sort()                                 # oldest first
    eligible = []
    for u in sorted(by_user):
        if len(by_user[u]) < args.min_interactions:
            drops.add("too little history", f"user {u}: {len(by_user[u])} interactions")
        else:
            eligible.append(u)
    random.Random(args.seed).shuffle(eligible)
    # split sizes that fit the data when not given: fractions with caps
    n_test = args.test_users if args.test_users is not None else min(200, max(1, round(0.10 * len(eligible))))
    n_val = args.val_users if args.val_users is not None else min(50, max(1, round(0.05 * len(eligible))))
    need = n_test + n_val
    if len(eligible) <= need:
        raise LettingoError(f"only {len(eligible)} users have >= {args.min_interactions} interactions; "
                            f"--test-users {n_test} + --val-users {n_val} leaves none for training "
                            f"(lower those, or --min-interactions)")
    # judge users: training users the writer never sees, for fine-tuning the recommender
    rest = eligible[need + args.judge_users:]
    split_users = {"test": eligible[:n_test], "val": eligible[n_test:need],
                   "judge": eligible[need:need + args.judge_users],
                   "train": rest[:args.train_users] if args.train_users else rest}
    if args.judge_users and not split_users["train"]:
        raise LettingoError(f"--judge-users {args.judge_users} leaves no training users for the writer")
    out = {split: [s for u in users for s in user_samples(split, u, by_user[u], items, args, drops, oracle)]
           for split, users in split_users.items()}
    # what the training users (writer's and judge's) rated: the item mean and kNN baselines
    train_ratings = {u: {i: r for _, i, r, _ in by_user[u]}
                     for u in split_users["train"] + split_users["judge"]}
    knn = ItemKNN(train_ratings)
    for split, samples in out.items():
        for s in samples:
            shown = s["history"] + s["recent"]
            for t in [s] + s.get("more_targets", []):
                t["item_mean"] = knn.item_mean(t["item_id"])
                if split in ("val", "test"):
                    t["item_knn"] = knn.predict(t["item_id"], shown)
    return out, by_user


def user_samples(split, u, rows, items, args, drops, oracle) -> list[dict]:
    """train: the last --targets-per-user targets, each with its next reward targets; val/test: one
    sample whose targets are the user's last --eval-targets interactions, the history before the
    first; judge: consecutive blocks of --judge-targets targets from the newest back (at most
    --judge-contexts), each with the history before it."""
    if split == "train":
        blocks = [(j, args.reward_targets - 1) for j in range(len(rows) - args.targets_per_user
                                                               - args.reward_targets + 1,
                                                               len(rows) - args.reward_targets + 1)]
    elif split == "judge":
        k = args.judge_targets
        starts = range(len(rows) - k, args.min_history - 1, -k)
        blocks = [(j, k - 1) for j in list(starts)[:args.judge_contexts or None]][::-1]
    else:
        more = min(args.eval_targets, len(rows) - args.min_history) - 1
        blocks = [(len(rows) - 1 - more, more)]
    samples = []
    for j, more in blocks:
        s = make_sample(u, rows, j, items, args, drops, oracle)
        if s and more:                # the next interactions after the target, also after the history
            s["more_targets"] = [target_fields(rows[x], items, args) for x in range(j + 1, j + 1 + more)]
        if s:
            samples.append(s)
    return samples


class ItemKNN:
    """A no-LLM recommender that reads only the history the writer is shown: item-based collaborative
    filtering (Sarwar et al. 2001) fitted on the training users' ratings. The prediction for item j is
    its mean plus the user's deviations from the means of the shown items i, weighted by sim(i, j):
    the adjusted cosine over the training users who rated both (each rating minus that user's mean),
    shrunk by n / (n + shrink) for n co-raters. Its within-user ordering beyond the item mean's is what
    any profile of that history could add."""

    def __init__(self, ratings: dict, shrink: float = 10.0):
        self.shrink = shrink
        self.raters = defaultdict(dict)                   # item -> {user: rating - the user's mean}
        by_item = defaultdict(list)
        for u, rs in ratings.items():
            mean = sum(rs.values()) / len(rs)
            for i, r in rs.items():
                self.raters[i][u] = r - mean
                by_item[i].append(r)
        self.means = {i: sum(v) / len(v) for i, v in by_item.items()}

    def item_mean(self, item) -> float | None:
        m = self.means.get(item)
        return None if m is None else round(m, 4)

    def similarity(self, i, j) -> float:
        a, b = self.raters.get(i, {}), self.raters.get(j, {})
        if len(a) > len(b):
            a, b = b, a
        common = [u for u in a if u in b]
        if len(common) < 2:
            return 0.0
        dot = sum(a[u] * b[u] for u in common)
        norm = math.sqrt(sum(a[u] ** 2 for u in common) * sum(b[u] ** 2 for u in common))
        return dot / norm * len(common) / (len(common) + self.shrink) if norm else 0.0

    def predict(self, item, shown: list[dict]) -> float | None:
        """None for an item no training user rated (the item mean's fallback applies)."""
        if item not in self.means:
            return None
        num = den = 0.0
        for h in shown:
            if h["item_id"] in self.means:
                s = self.similarity(h["item_id"], item)
                num += s * (h["rating"] - self.means[h["item_id"]])
                den += abs(s)
        return round(min(5.0, max(1.0, self.means[item] + (num / den if den else 0.0))), 4)


def genres_of(description: str) -> str:
    """The genre/category part of an item description, shown next to history items."""
    for part in description.split(". "):
        for key in ("Genres: ", "Categories: "):
            if part.startswith(key):
                return part[len(key):].rstrip(".")
    return ""


def target_fields(row, items, args) -> dict:
    """What a sample says about the item whose rating is predicted."""
    t, i, r, _ = row
    title, desc = items[i] if items else (i, "")
    return {"item_id": i, "title": title, "description": desc, "rating": r,
            "label": "like" if r >= args.like_min else "dislike" if r <= args.dislike_max else "neutral",
            "timestamp": t}


def make_sample(u, rows, j, items, args, drops, oracle):
    t, i, r, _ = rows[j]
    first_same = bisect.bisect_left(rows, (t,))     # rows at the target's timestamp are not "before" it
    earlier = rows[:min(first_same, j)]
    if len(earlier) < args.min_history:
        drops.add("too little history", f"user {u} target {i}: {len(earlier)} earlier interactions")
        return None
    as_dict = lambda row: {"item_id": row[1], "title": items[row[1]][0] if items else row[1],
                           **({"genres": genres_of(items[row[1]][1])}
                              if items and genres_of(items[row[1]][1]) else {}),
                           "rating": row[2], "timestamp": row[0], **({"review": row[3]} if row[3] else {})}
    recent = earlier[len(earlier) - args.recent:] if args.recent else []
    older = earlier[:len(earlier) - args.recent] if args.recent else earlier
    sample = {"user_id": u, **target_fields(rows[j], items, args),
              "history": [as_dict(x) for x in older[-args.profile_history:]],
              "recent": [as_dict(x) for x in recent],
              "user_mean": round(sum(x[2] for x in earlier) / len(earlier), 4)}
    if oracle:
        sample["oracle_profile"] = oracle[u]
    return sample


@dataclass
class PrepareConfig:
    """python data/prepare.py SOURCE: which users and interactions become which samples."""
    source: str = option(None, "movielens | amazon | yelp | synthetic", kind=str,
                         choices=("movielens", "amazon", "yelp", "synthetic"), required=True)
    raw: str | None = option(None, "movielens/yelp: the dataset folder; amazon: the reviews file "
                             "(.json/.jsonl[.gz])", kind=str)
    meta: str | None = option(None, "amazon: optional metadata file (titles, descriptions)", kind=str)
    out: str = option(None, "output folder for train/val/test.jsonl and stats.json", kind=str, required=True)
    profile_history: int = option(10, "interactions the profile is written from", source="public GRPO code",
                                  min=1)
    recent: int = option(0, "most recent interactions kept raw for the recommender (paper: 10)", min=0)
    min_interactions: int | None = option(None, "users with fewer are dropped (none: 20 for "
                                          "movielens/synthetic, 5 for amazon/yelp 5-core data)", kind=int,
                                          min=2)
    min_history: int | None = option(None, "targets with fewer earlier interactions are dropped (none: 5, "
                                     "or 3 for amazon/yelp)", kind=int, min=1)
    test_users: int | None = option(None, "none: 10%% of eligible users, at most 200", kind=int, min=0)
    val_users: int | None = option(None, "none: 5%% of eligible users, at most 50", kind=int, min=0)
    train_users: int = option(0, "cap on training users (0 = all the rest)", min=0)
    judge_users: int = option(0, "training users set aside for fine-tuning the judge (tools/judge.py), "
                              "never seen by the writer: judge.jsonl", min=0)
    judge_contexts: int = option(0, "judge users: at most this many samples per user, each a block of "
                                 "--judge-targets targets with the history before it, newest first (0 = all)",
                                 min=0)
    judge_targets: int = option(10, "judge users: targets per sample (they share one copy of the context in "
                                "training)", min=1)
    targets_per_user: int = option(1, "train users: last N interactions as targets", min=1)
    reward_targets: int = option(1, "train users: each sample also carries the next N-1 interactions as "
                                 "`more_targets`; a profile's reward is its mean over all N (less noisy than "
                                 "one item)", min=1)
    eval_targets: int = option(5, "val/test users: the last K interactions are targets (the history before "
                               "the first of them), so per-user orderings can be scored; 1 = one target per "
                               "user", min=1)
    like_min: float = option(4.0, "rating >= this is 'like'")
    dislike_max: float = option(2.0, "rating <= this is 'dislike'")
    review_chars: int = option(200, "review text kept per interaction", source="public GRPO code", min=0)
    seed: int = option(0, "user split and synthetic data seed")
    users: int = option(300, "synthetic: number of users", min=2)
    items: int = option(400, "synthetic: catalog size", min=2)
    total_ratings: int = option(0, "synthetic: exact number of ratings (0 = 20-60 per user)", min=0)
    export_movielens: str | None = option(None, "synthetic: also write ratings.dat/movies.dat (ML-1M layout) "
                                          "to this folder", kind=str)

    def __post_init__(self):       # the source's thresholds where none is given
        sparse = self.source in ("amazon", "yelp")
        self.min_interactions = self.min_interactions or (5 if sparse else 20)
        self.min_history = self.min_history or (3 if sparse else 5)


def main():
    p = ArgParser(description="Turn a ratings dataset into leak-free LettinGo samples.")
    p.add_argument("source", choices=["movielens", "amazon", "yelp", "synthetic"])
    add_config(p, PrepareConfig, skip=("source",))
    prepare(config_from(PrepareConfig, p.parse_args()))


def prepare(args: PrepareConfig):
    """args.source -> args.out/{train,val,test[,judge]}.jsonl + stats.json."""
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise LettingoError(f"--out {args.out}: exists and is not a folder")
    t0, drops, oracle = time.time(), Drops(), None
    if args.source == "synthetic":
        ratings, items, oracle = synthetic(args.users, args.seed, args.items,
                                           total_ratings=args.total_ratings)
        if args.export_movielens:
            export_movielens(args.export_movielens, ratings, items)
    elif not args.raw:
        raise LettingoError(f"{args.source} needs --raw PATH")
    elif args.source == "movielens":
        ratings, items = read_movielens(args.raw, drops)
    elif args.source == "amazon":
        reviews, meta = amazon_files(args.raw, args.meta)
        ratings, items = read_amazon(reviews, drops, meta, args.review_chars)
        if items is None:
            print("warning: no item metadata (no --meta and no meta_<Category> file beside the reviews): "
                  "items are shown by their ids, with the review text that exists; "
                  "stats.json says items_without_metadata",
                  file=sys.stderr)
    else:
        ratings, items = read_yelp(args.raw, drops, args.review_chars)
    if not ratings:
        raise LettingoError(f"no readable ratings in {args.raw}")
    splits, by_user = build_samples(ratings, items, args, drops, oracle)
    os.makedirs(args.out, exist_ok=True)
    for split, samples in splits.items():
        if split == "judge" and not args.judge_users:
            continue
        with open(os.path.join(args.out, f"{split}.jsonl"), "w") as f:
            f.writelines(json.dumps(s) + "\n" for s in samples)
    stats = {"source": args.source, "raw": args.raw, "options": dataclasses.asdict(args),
             "ratings_read": len(ratings), "users_read": len({r[0] for r in ratings}),
             "items_rated": len({r[1] for r in ratings}),
             "items_in_catalog": len(items) if items is not None else None,
             "ratings_kept": sum(len(v) for v in by_user.values()), "items_without_metadata": items is None,
             "rating_counts": dict(sorted(Counter(r[2] for r in ratings).items())),
             "dropped": drops.report(), "seconds": round(time.time() - t0, 2),
             **{f"{s}_samples": len(v) for s, v in splits.items()},
             **{f"{s}_users": len({x['user_id'] for x in v}) for s, v in splits.items()}}
    with open(os.path.join(args.out, "stats.json"), "w") as f:
        json.dump(stats, f, indent=2)
    print(f"{stats['ratings_read']:,} ratings, {stats['users_read']:,} users, "
          f"{stats['items_rated']:,} items rated -> train {len(splits['train'])} / "
          f"val {len(splits['val'])} / test {len(splits['test'])} samples "
          + (f"/ judge {len(splits['judge'])} " if args.judge_users else "") +
          f"in {args.out} ({stats['seconds']} s)")
    for reason, d in drops.report().items():
        print(f"dropped {d['count']:,} ({reason}), e.g. {'; '.join(map(str, d['examples'][:3]))}")


if __name__ == "__main__":
    cli(main)
