"""tools/cli.py -- the command-line edge of every script: flags generated from the config
dataclasses (grpo.py, dpo.py, tools/judge.py, rollout.py's SamplingParams: each field carries its
default, its origin and its help), bad input reported as one `error:` line, and the checks on input
and output files that run before any model loads."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lettingo import LettingoError, Stopped  # noqa: E402


def option(default, help: str, *, source: str | None = None, min: float | None = None,
           choices: tuple | None = None, kind: type | None = None):
    """A config field: its default, where the default comes from (`source`), the flag's help,
    and its valid values (`min`, `choices`; `kind` types a field whose default is None)."""
    meta = {"help": help + (f" ({source})" if source else ""), "min": min, "choices": choices, "kind": kind}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class ArgParser(argparse.ArgumentParser):
    """argparse with defaults shown in --help and bad arguments reported as one `error:` line."""

    def __init__(self, *a, **k):
        super().__init__(*a, formatter_class=argparse.ArgumentDefaultsHelpFormatter, **k)

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def at_least(lo, kind=int):
    """argparse type: a number >= lo, so a bad value fails at parse time with one clear line,
    before any model loads."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}")
        if not value >= lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {text}")
        return value
    return parse


def add_config(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()):
    """One flag per field of the dataclass `cls` (--field-name), typed, checked and helped from
    the field itself."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        meta, flag = f.metadata, "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kind = meta.get("kind") or (type(default) if default is not None else str)
        if hints[f.name] is bool:
            action = argparse.BooleanOptionalAction if default else "store_true"
            parser.add_argument(flag, action=action, default=default, help=meta["help"])
            continue
        typ = at_least(meta["min"], kind) if meta.get("min") is not None else kind
        parser.add_argument(flag, type=typ, default=default, choices=meta.get("choices"), help=meta["help"])


def config_from(cls, args: argparse.Namespace, **values):
    """The dataclass `cls` from parsed flags (fields absent from `args` keep their default)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in vars(args).items() if k in names}, **values})


def to_argv(cfg, base=None) -> list[str]:
    """The flags that give `cfg` from the defaults of `base` (default: the class' own defaults),
    so a preset can be run, and rerun by hand, as a plain command line."""
    base = base if base is not None else type(cfg)()
    argv = []
    for f in dataclasses.fields(cfg):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if value == getattr(base, f.name):
            continue
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    return argv


def cli(main):
    """Run a CLI entry point; our own errors become one clear line, not a stack trace."""
    try:
        main()
    except LettingoError as e:
        raise SystemExit(f"error: {e}")
    except (KeyboardInterrupt, Stopped) as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"stopped (Ctrl-C){': ' + str(e) if isinstance(e, Stopped) else ''}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)         # at once: no traceback, and no process-group teardown to hang on


# ----------------------------------------------------------------------------- files

def read_jsonl(path: str) -> list[dict]:
    """All JSON objects of a file; a bad line is reported with its number and skipped."""
    if os.path.isdir(path):
        raise LettingoError(f"{path}: a folder; this flag takes a JSONL file "
                            f"(e.g. {os.path.join(path, 'train.jsonl')})")
    if not os.path.isfile(path):
        raise LettingoError(f"{path}: no such file")
    rows, bad = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
                rows.append(row)
            except ValueError as e:
                bad += 1
                if bad <= 3:
                    print(f"warning: {path}:{i}: unreadable line skipped ({str(e)[:80]})", file=sys.stderr)
                if bad >= 20 and not rows:
                    raise LettingoError(f"{path}: not JSONL (its first {bad} lines are not JSON objects)")
    if bad:
        print(f"warning: {path}: {bad} unreadable line(s) skipped, {len(rows)} read", file=sys.stderr)
    if not rows:
        raise LettingoError(f"{path}: no readable rows")
    return rows


SAMPLE_KEYS = ("user_id", "item_id", "title", "rating", "history", "user_mean")


def read_samples(path: str) -> list[dict]:
    """read_jsonl + check_samples."""
    return check_samples(read_jsonl(path), path)


def check_samples(rows: list[dict], path: str) -> list[dict]:
    """The rows must be LettinGo samples, so a profiles file passed as data fails here with one
    line instead of a KeyError deep inside."""
    for i, r in enumerate(rows, 1):
        missing = [k for k in SAMPLE_KEYS if k not in r]
        if missing or not isinstance(r["history"], list):
            hint = " (this looks like a profiles file from rollout.py)" if "generations" in r else ""
            raise LettingoError(f"{path}: row {i} lacks {', '.join(missing) or 'a history list'}: "
                                f"not samples from data/prepare.py{hint}")
    return rows


def output_file(path: str) -> str:
    """Checked before any work: --out must be a file whose folder can exist (created here)."""
    if os.path.isdir(path):
        raise LettingoError(f"--out {path}: is a folder, expected a file name")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise LettingoError(f"--out {path}: cannot create its folder ({e.strerror})")
    if not os.access(folder, os.W_OK):
        raise LettingoError(f"--out {path}: folder {folder} is not writable")
    return path


def output_folder(path: str) -> str:
    """Checked before any work: --out must be a folder or not exist yet."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise LettingoError(f"--out {path}: exists and is not a folder")
    return path


if __name__ == "__main__":
    ArgParser(description=__doc__.split("\n\n")[0]).parse_args()
