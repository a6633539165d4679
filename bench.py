"""bench.py -- speed, always as a ratio against a baseline run in the same process on the same
machine, plus the fraction of the hardware limit (measured copy bandwidth / matmul rate).

    python bench.py rollout --batch 32 --prompt-tokens 300 --new-tokens 128 [--dtype bfloat16]
    python bench.py grpo                 # one GRPO step vs TRL's GRPOTrainer (pip install trl)
    python bench.py data                 # data/prepare.py on an ML-1M-sized ratings file
    python bench.py                      # a short run of all three
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

from lettingo import ALIASES, alias_folder, cli, load_model, resolve
from rollout import generate

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT = ("The user watched many films last year. They loved quiet dramas and sharp comedies, found most horror "
        "tedious, and rated big action films harshly unless the story was clever. ")


def hardware(dtype) -> dict:
    """Measured, not quoted: copy bandwidth (bytes read + written per second) and matmul FLOP/s."""
    x = torch.empty(64 * 2**20 // 4, dtype=torch.float32)                 # 256 MB
    y = torch.empty_like(x)
    best = min(timed(lambda: y.copy_(x)) for _ in range(5))
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    mm = min(timed(lambda: a @ b) for _ in range(5))
    return {"copy_GBps": 2 * x.numel() * 4 / best / 1e9, f"matmul_{str(dtype)[6:]}_GFLOPs": 2 * 2048**3 / mm / 1e9}


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def hf_folder(name):
    """transformers loads the same weights from the same folder (the alias' converted cache)."""
    return alias_folder(name, resolve(name)) if name in ALIASES else name


def bench_rollout(args):
    from transformers import AutoModelForCausalLM
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(os.cpu_count())
    ours, tok = load_model(args.model, dtype=dtype, device="cpu")
    ref = AutoModelForCausalLM.from_pretrained(hf_folder(args.model), dtype=dtype).eval()
    ids = tok(TEXT * (args.prompt_tokens // 20 + 2), add_special_tokens=False)["input_ids"]
    prompts = [ids[k:k + args.prompt_tokens] for k in range(args.batch)]  # distinct prompts, same length
    n_new = args.new_tokens

    def run_ours():
        out = generate(ours, prompts, max_new_tokens=n_new, temperature=1.0, seed=0, end_ids=set(), batch_size=args.batch)
        assert all(len(s[0].tokens) == n_new for s in out)

    def run_hf():
        x = torch.tensor(prompts)
        with torch.no_grad():
            out = ref.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True, temperature=1.0, top_k=0,
                               max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=tok.pad_token_id or 0)
        assert out.shape[1] == args.prompt_tokens + n_new

    times = {"ours": [], "transformers": []}
    for r in range(args.repeats):                                        # alternate, same process
        times["ours"].append(timed(run_ours))
        times["transformers"].append(timed(run_hf))
        print(f"  run {r}: ours {times['ours'][-1]:.2f}s  transformers {times['transformers'][-1]:.2f}s", flush=True)
    hw = hardware(dtype)
    t_ours, t_hf = min(times["ours"]), min(times["transformers"])
    tok_s = lambda t: args.batch * n_new / t
    cfg = ours.cfg
    n_params = sum(p.numel() for p in ours.parameters())
    n_body = n_params - cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    size = torch.tensor([], dtype=dtype).element_size()
    # work of the whole call: prefill (body on every prompt token, head on the last) + decode steps
    flops = 2 * n_body * args.batch * args.prompt_tokens + 2 * n_params * args.batch * n_new
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * size * args.batch * (args.prompt_tokens + n_new / 2)
    bytes_moved = n_new * (n_params * size + kv) + n_params * size
    t_flops, t_bytes = flops / (hw[f"matmul_{args.dtype}_GFLOPs"] * 1e9), bytes_moved / (hw["copy_GBps"] / 2 * 1e9)
    limit = max(t_flops, t_bytes)                                         # the roofline bound for this call
    print(json.dumps({"model": args.model, "dtype": args.dtype, "batch": args.batch, "prompt_tokens": args.prompt_tokens,
                      "new_tokens": n_new, **{k: round(v, 1) for k, v in hw.items()},
                      "ours_tok_s": round(tok_s(t_ours), 1), "transformers_tok_s": round(tok_s(t_hf), 1),
                      "lower_bound_s": round(limit, 2), "bound_by": "compute" if t_flops > t_bytes else "memory",
                      "ours_fraction_of_limit": round(limit / t_ours, 3)}, indent=1))
    print(f"rollout speedup_vs_transformers={t_hf / t_ours:.2f}")


def bench_data(args):
    with tempfile.TemporaryDirectory() as tmp:
        gen = [sys.executable, os.path.join(HERE, "data", "prepare.py"), "synthetic", "--users", "6040", "--items", "3706",
               "--total-ratings", "1000209", "--export-movielens", os.path.join(tmp, "raw"), "--out", os.path.join(tmp, "s")]
        subprocess.run(gen, check=True, capture_output=True)
        cmd = [sys.executable, os.path.join(HERE, "data", "prepare.py"), "movielens", "--raw", os.path.join(tmp, "raw"),
               "--out", os.path.join(tmp, "out"), "--targets-per-user", "3"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t = timed(lambda: subprocess.run(cmd, check=True, capture_output=True))
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        stats = json.load(open(os.path.join(tmp, "out", "stats.json")))
    print(json.dumps({"ratings": stats["ratings_read"], "users": stats["users_read"], "wall_s": round(t, 2),
                      "max_rss_MB": round(max(rss, before) / 1024), "train_samples": stats["train_samples"]}, indent=1))
    print(f"data seconds={t:.2f}")


def bench_grpo(args):
    """One GRPO step (rollout + reward + update) of ours and of TRL's GRPOTrainer: same model, group
    size, prompts, forced response length and a judge-free reward, timed in one process."""
    try:
        import trl
    except ImportError:
        raise SystemExit("bench.py grpo needs TRL for the baseline: pip install trl datasets")
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import grpo
    from reward import Scored
    from train import load_policy, make_optimizer, setup_distributed
    folder = hf_folder(args.model)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(TEXT * (args.prompt_tokens // 20 + 2), add_special_tokens=False)["input_ids"]
    prompts = [tok.decode(ids[k:k + args.prompt_tokens]) for k in range(args.prompts)]
    reward = lambda texts: [t.count("e") / max(len(t), 1) for t in texts]   # same toy reward for both

    d = setup_distributed()
    ns = grpo.parse_args(["--group-size", str(args.group_size), "--prompts-per-step", str(args.prompts),
                          "--mini-batches", "1", "--max-new-tokens", str(args.new_tokens), "--kl-coef", "0",
                          "--lr", "1e-6", "--token-budget", "16384", "--dtype", args.dtype])
    policy, rollout, tok_ours = load_policy(folder, d, False, getattr(torch, args.dtype))
    opt, sched = make_optimizer(policy, ns.lr, ns.weight_decay)
    batch = [{"user_id": str(k)} for k in range(args.prompts)]
    p_ids = [tok_ours(p, add_special_tokens=False)["input_ids"] for p in prompts]
    grpo.profile_prompt = lambda tk, s: p_ids[int(s["user_id"])]        # raw prompts, as TRL gets them
    grpo.profile_answer = lambda text, finish: text
    scorer = lambda samples, outs: [Scored(r) for r in reward([o.text for o in outs])]
    grpo.generate = lambda *a, **k: generate(*a, **{**k, "stop": (), "end_ids": set()})   # forced length, as TRL's

    def ours_step(step):
        return grpo.grpo_step(step, batch, list(range(args.prompts)), [0] * args.prompts, policy, rollout, None,
                              tok_ours, scorer, opt, sched, ns, d)

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype))
    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.prompts * args.group_size,
                     num_generations=args.group_size, max_completion_length=args.new_tokens, learning_rate=1e-6,
                     beta=0.0, max_steps=args.repeats + 1, logging_steps=1, report_to=[], use_cpu=True,
                     bf16=args.dtype == "bfloat16", temperature=1.0, save_strategy="no",
                     generation_kwargs={"min_new_tokens": args.new_tokens}, seed=0)
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: reward(completions), args=cfg,
                          train_dataset=Dataset.from_dict({"prompt": prompts * 8}), processing_class=tok)
    step_times = []

    class Timer(__import__("transformers").TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - self.t)

    trainer.add_callback(Timer())
    ours = []
    ours.append(timed(lambda: ours_step(0)))                               # warm-up (not counted)
    trainer.train()                                                        # warm-up step + repeats
    for r in range(args.repeats):
        ours.append(timed(lambda: ours_step(r + 1)))
    t_ours, t_trl = min(ours[1:]), min(step_times[1:])
    samples = args.prompts * args.group_size
    print(json.dumps({"model": args.model, "dtype": args.dtype, "prompts": args.prompts, "group_size": args.group_size,
                      "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "trl_version": trl.__version__,
                      "ours_step_s": round(t_ours, 2), "trl_step_s": round(t_trl, 2),
                      "ours_samples_per_s": round(samples / t_ours, 2), "trl_samples_per_s": round(samples / t_trl, 2)},
                     indent=1))
    print(f"grpo speedup_vs_trl={t_trl / t_ours:.2f}")


def main():
    p = argparse.ArgumentParser(description="Benchmarks against baselines run in the same process.")
    p.add_argument("what", nargs="?", default="all", choices=["all", "rollout", "grpo", "data"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=32, help="rollout: rows decoded together")
    p.add_argument("--prompt-tokens", type=int, default=300)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompts", type=int, default=2, help="grpo: prompts per step")
    p.add_argument("--group-size", type=int, default=8, help="grpo: samples per prompt (public code: 8)")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    if args.what in ("rollout", "all"):
        if args.what == "all":
            args.batch, args.new_tokens = 8, 32
        bench_rollout(args)
    if args.what in ("data", "all"):
        bench_data(args)
    if args.what in ("grpo", "all"):
        if args.what == "all":
            args.prompt_tokens, args.new_tokens, args.repeats = 100, 32, 1
        bench_grpo(args)


if __name__ == "__main__":
    cli(main)
