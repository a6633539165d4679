"""tools/stages.py -- a pipeline stage's output is reused when it exists and was made from the same
inputs (files by size, mtime and path; everything else by value), and is written atomically."""
from __future__ import annotations

import argparse
import hashlib
import json
import os


def fingerprint(*parts) -> str:
    """Inputs of a stage: files by size+mtime+path, everything else by value."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, str) and os.path.isfile(p):
            st = os.stat(p)
            p = f"{os.path.abspath(p)}:{st.st_size}:{st.st_mtime_ns}"
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def up_to_date(out_file, fp) -> bool:
    meta = out_file + ".inputs"
    if not (os.path.isfile(out_file) and os.path.isfile(meta)):
        return False
    with open(meta) as f:
        return f.read() == fp


def finish_stage(out_file, rows, fp):
    """Write the stage's rows (JSONL) under a temp name, rename, then record its inputs."""
    tmp = out_file + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, out_file)
    with open(out_file + ".inputs", "w") as f:
        f.write(fp)


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__).parse_args()
