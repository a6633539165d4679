"""bench.py -- speed, always as a ratio against a baseline run in the same process on the same
machine, plus the fraction of the hardware limit (measured copy bandwidth / matmul rate).

    python bench.py rollout --batch 32 --prompt-tokens 300 --new-tokens 128 [--dtype bfloat16]
    python bench.py grpo                 # one GRPO step vs TRL's GRPOTrainer (pip install trl)
    python bench.py grpo --device cuda --shape smollm2-135m --prompts 16   # the update with each attention kernel
    python bench.py data                 # data/prepare.py on an ML-1M-sized ratings file
    python bench.py learning --raw ../shared/data/ml-100k   # the learning recipe end to end, judged on test users
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

from lettingo import (ALIASES, ArgParser, LettingoError, ModelConfig, Transformer, alias_folder, at_least, cli, load_model, resolve,
                      rope_frequencies)
from rollout import generate

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT = ("The user watched many films last year. They loved quiet dramas and sharp comedies, found most horror "
        "tedious, and rated big action films harshly unless the story was clever. ")


def hardware(dtype, device="cpu") -> dict:
    """Measured, not quoted: copy bandwidth (bytes read + written per second) and matmul FLOP/s."""
    x = torch.empty(256 * 2**20 // 4, dtype=torch.float32, device=device)    # 256 MB
    y = torch.empty_like(x)
    best = min(timed(lambda: y.copy_(x)) for _ in range(5))
    n = 8192 if device == "cuda" else 2048
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    mm = min(timed(lambda: a @ b) for _ in range(5))
    return {"copy_GBps": 2 * x.numel() * 4 / best / 1e9, f"matmul_{str(dtype)[6:]}_GFLOPs": 2 * n**3 / mm / 1e9}


def timed(fn) -> float:
    """Wall time of fn(), waiting for the GPU's queued work before and after."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def hf_folder(name):
    """transformers loads the same weights from the same folder (the alias' converted cache)."""
    return alias_folder(name, resolve(name)) if name in ALIASES else name


# real configs, random weights: speed does not depend on the values, and nothing is downloaded
SHAPES = {
    "smollm2-135m": ("llama", dict(architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                   num_key_value_heads=3, intermediate_size=1536, max_position_embeddings=8192,
                                   rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)),
    "qwen3-1.7b": ("qwen3", dict(architectures=["Qwen3ForCausalLM"], vocab_size=151936, hidden_size=2048, num_hidden_layers=28, num_attention_heads=16,
                                 num_key_value_heads=8, head_dim=128, intermediate_size=6144,
                                 max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                 tie_word_embeddings=True)),
}


def bench_models(args, dtype):
    """(ours, transformers' model with the same weights, prompt ids [batch][prompt_tokens])."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config
    if args.shape:
        family, kw = SHAPES[args.shape]
        torch.manual_seed(0)
        cfg = {"llama": LlamaConfig, "qwen3": Qwen3Config}[family](**kw)
        with torch.device(args.device):
            ref = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
        with torch.device("meta"):                                # no memory until the weights arrive
            ours = Transformer(ModelConfig.from_hf(cfg.to_dict())).to(dtype)
        ours.to_empty(device=args.device)
        ours.tie()
        ours.load_state_dict(ref.state_dict(), strict=False)      # same names; inv_freq is not saved
        ours.inv_freq = rope_frequencies(ours.cfg).to(args.device)
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(100, cfg.vocab_size, (args.batch, args.prompt_tokens), generator=g).tolist()
        return ours.eval(), ref, prompts
    ours, tok = load_model(args.model, dtype=dtype, device=args.device)
    ref = AutoModelForCausalLM.from_pretrained(hf_folder(args.model), dtype=dtype).to(args.device).eval()
    ids = tok(TEXT * (args.prompt_tokens // 20 + 2), add_special_tokens=False)["input_ids"]
    return ours, ref, [ids[k:k + args.prompt_tokens] for k in range(args.batch)]   # distinct, same length


def bench_rollout(args):
    dtype = getattr(torch, args.dtype)
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count())
    ours, ref, prompts = bench_models(args, dtype)
    n_new, rows = args.new_tokens, args.batch * args.n

    def run_ours(graphs, compiled=None):
        out = generate(ours, prompts, n=args.n, max_new_tokens=n_new, temperature=1.0, seed=0, end_ids=set(),
                       batch_size=rows, cuda_graphs=graphs, compiled=compiled)
        assert all(len(s.tokens) == n_new for ss in out for s in ss)

    def run_hf():
        x = torch.tensor(prompts, device=args.device).repeat_interleave(args.n, 0)
        with torch.no_grad():
            out = ref.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True, temperature=1.0, top_k=0,
                               max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=0)
        assert out.shape[1] == args.prompt_tokens + n_new

    runs = {"ours": lambda: run_ours(args.device == "cuda"), "transformers": run_hf}
    if args.device == "cuda":              # what the compile and the graphs buy: the same step without
        runs["ours_uncompiled"] = lambda: run_ours(True, False)
        runs["ours_eager"] = lambda: run_ours(False, False)
    else:                                  # the CPU's option: the step compiled, run without graphs
        runs["ours_compiled"] = lambda: run_ours(False, True)
    times = {k: [] for k in runs}
    for r in range(args.repeats + 1):      # alternate, same process; run 0 warms up (and compiles)
        for k, fn in runs.items():
            times[k].append(timed(fn))
        print(f"  run {r}: " + "  ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    hw = hardware(dtype, args.device)
    best = {k: min(v[1:]) for k, v in times.items()}
    print("warm-up call (compiles): " + "  ".join(f"{k} {v[0]:.1f}s" for k, v in times.items()))
    tok_s = lambda t: rows * n_new / t
    cfg = ours.cfg
    n_params = sum(p.numel() for p in ours.parameters())
    n_body = n_params - cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    size = torch.tensor([], dtype=dtype).element_size()
    # work of the whole call: prefill (body on every prompt token, head on the last) + decode steps
    flops = 2 * n_body * args.batch * args.prompt_tokens + 2 * n_params * rows * n_new
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * size * rows * (args.prompt_tokens + n_new / 2)
    bytes_moved = n_new * (n_params * size + kv) + n_params * size
    t_flops, t_bytes = flops / (hw[f"matmul_{args.dtype}_GFLOPs"] * 1e9), bytes_moved / (hw["copy_GBps"] / 2 * 1e9)
    limit = max(t_flops, t_bytes)                                         # the roofline bound for this call
    print(json.dumps({"model": args.shape or args.model, "weights": "random" if args.shape else "checkpoint",
                      "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "dtype": args.dtype,
                      "prompts": args.batch, "n": args.n, "rows": rows, "prompt_tokens": args.prompt_tokens,
                      "new_tokens": n_new, **{k: round(v, 1) for k, v in hw.items()},
                      **{f"{k}_tok_s": round(tok_s(t), 1) for k, t in best.items()},
                      "lower_bound_s": round(limit, 3), "bound_by": "compute" if t_flops > t_bytes else "memory",
                      "ours_fraction_of_limit": round(limit / best["ours"], 3)}, indent=1))
    print(f"rollout speedup_vs_transformers={best['transformers'] / best['ours']:.2f}")


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


def bench_update_kernels(args):
    """GPU: the update half of one GRPO step -- packed log-probs with grad + backward over every
    (prompt, completion) of the step, micro-batched by the token budget, as train.py runs it --
    with each attention kernel, prompts shared within a group where the kernel can (tree mask)."""
    from lettingo import TREE_BACKENDS, attention_backend
    from train import completion_logprobs, micro_batches
    dtype = getattr(torch, args.dtype)
    args.batch = args.prompts
    ours, _, prompts = bench_models(args, dtype)
    g = torch.Generator().manual_seed(1)
    seqs = [(p, torch.randint(100, ours.cfg.vocab_size, (args.new_tokens,), generator=g).tolist())
            for p in prompts for _ in range(args.group_size)]
    batches = {share: micro_batches(seqs, args.token_budget, share) for share in (True, False)}
    runs = []
    for kernel in ("flash", "varlen", "flex", "sdpa"):
        try:
            attention_backend(kernel, args.device, dtype)
        except LettingoError as e:
            print(f"  {kernel}: skipped ({e})")
            continue
        runs += [(kernel, share) for share in ((True, False) if kernel in TREE_BACKENDS else (False,))]

    def update(kernel, share):
        ours.attention = kernel
        for grp in batches[share]:
            lps = completion_logprobs(ours, [seqs[i] for i in grp], args.device, share_prompts=share)
            sum(lp.float().sum() for lp in lps).backward()
        ours.zero_grad(set_to_none=True)

    seq_tokens = sum(len(p) + len(c) for p, c in seqs)
    shared_tokens = len(prompts) * args.prompt_tokens + len(seqs) * args.new_tokens
    out = {}
    for kernel, share in runs:
        times = [timed(lambda: update(kernel, share)) for _ in range(args.repeats + 1)]   # first: warm-up / compile
        name = f"{kernel}_{'shared' if share else 'unshared'}"
        out[name] = {"s": round(min(times[1:]), 3), "first_call_s": round(times[0], 1),
                     "tokens_computed": shared_tokens if share else seq_tokens,
                     "sequence_tokens_per_s": round(seq_tokens / min(times[1:]))}
        print(f"  {name}: {out[name]}", flush=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(json.dumps({"model": args.shape or args.model, "device": device, "dtype": args.dtype,
                      "prompts": args.prompts, "group_size": args.group_size, "prompt_tokens": args.prompt_tokens,
                      "new_tokens": args.new_tokens, "token_budget": args.token_budget,
                      "micro_batches": {"shared": len(batches[True]), "unshared": len(batches[False])},
                      "update": out}, indent=1))
    base = min(v["s"] for k, v in out.items() if k.endswith("unshared"))
    print("grpo update " + " ".join(f"{k}={v['s'] / base:.2f}x" for k, v in out.items()) + " (of the fastest unshared)")


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
    from train import close_distributed, load_policy, make_optimizer, setup_distributed
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
    p_ids = [tok_ours(p, add_special_tokens=False)["input_ids"] for p in prompts]   # raw prompts, as TRL gets them
    scorer = lambda samples, outs: [Scored(r) for r in reward([o.text for o in outs])]

    def ours_step(step):   # the code path a user runs; no stop string and no end token: forced length, as TRL's
        return grpo.grpo_step(step, [{}] * args.prompts, p_ids, [grpo.sample_seed(0, step, i) for i in range(args.prompts)],
                              [0] * args.prompts, policy, rollout, None, tok_ours, scorer, opt, sched, ns, d,
                              stop=(), end_ids=set())

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
    close_distributed()


# ----------------------------------------------------------------------------- learning


DPO_START = {"base": "base writer", "warm": "warm start"}


def learning_recipe(args, out) -> list[tuple[str, list[str], str]]:
    """The recipe as (stage, command, the file that marks it done): each stage is a plain CLI call
    a user can rerun by hand, and is skipped when its output exists (rerun to continue)."""
    py, data = sys.executable, os.path.join(out, "data")
    tr, va, te = (os.path.join(data, f"{s}.jsonl") for s in ("train", "val", "test"))
    base = "smollm2-135m"                                  # the untrained writer: explorer, DPO's start, a test row
    warm = os.path.join(out, "explore-base", "sft", f"ckpt-{args.sft_steps:06d}", "model")
    grpo_model = os.path.join(out, "grpo", f"ckpt-{args.grpo_steps:06d}", "model")
    # DPO from the base writer (the paper) trains on pairs of the first exploration; from the warm start it
    # explores again with the warm start, since its pairs must be of what that writer writes
    dpo_dir = "explore-base" if args.dpo_start == "base" else "explore-warm"
    dpo_model = os.path.join(out, dpo_dir, "train", f"ckpt-{args.dpo_steps:06d}", "model")
    gen = ["--max-new-tokens", str(args.max_new_tokens), "--dtype", "bfloat16", "--token-budget", "4096", "--task", "rating"]
    val = ["--val-users", str(args.val_users)]
    prep = [py, f"{HERE}/data/prepare.py", args.dataset, "--out", data, "--test-users", str(args.test_users),
            "--val-users", str(args.val_users), "--reward-targets", str(args.reward_targets)] + (["--raw", args.raw] if args.raw else []) + (["--meta", args.meta] if args.meta else [])
    explore = lambda models, folder, users, n, temp: [
        py, f"{HERE}/dpo.py", "explore", "--models", models, "--data", tr, "--out", os.path.join(out, folder), "--users", str(users),
        "--n", str(n), "--temperature", str(temp), "--top-p", "0.9", "--max-new-tokens", str(args.max_new_tokens)]
    stage = lambda name, folder: [py, f"{HERE}/dpo.py", name, "--data", tr, "--out", os.path.join(out, folder), "--task", "rating"]
    test = lambda model, name: (f"test profiles: {name}", [py, f"{HERE}/rollout.py", "--model", model, "--data", te, "--temperature", "0",
                                "--max-new-tokens", str(args.max_new_tokens), "--batch-size", "64", "--dtype", "bfloat16",
                                "--out", os.path.join(out, f"test-{name}.jsonl")], os.path.join(out, f"test-{name}.jsonl"))
    eb, ew = os.path.join(out, "explore-base"), os.path.join(out, "explore-warm")
    explorers = base + (",template" if args.explore_template else "")   # code as a second explorer
    return [
        ("prepare data", prep, te),
        ("explore: " + explorers.replace(",", " + "), explore(explorers, "explore-base", args.explore_users, args.explore_n, 0.7), f"{eb}/profiles.jsonl"),
        ("evaluate explored profiles", stage("evaluate", "explore-base"), f"{eb}/scores-rating.jsonl"),
        ("warm start: SFT on the best explored profiles", stage("sft", "explore-base") + gen + val + [
            "--val-data", va, "--lr", "2e-5", "--steps", str(args.sft_steps), "--pairs-per-step", "8",
            "--eval-every", str(args.sft_steps), "--save-every", str(args.sft_steps)], warm),
        ("GRPO from the warm start", [py, f"{HERE}/grpo.py", "--model", warm, "--data", data, "--out", os.path.join(out, "grpo"),
                                      "--steps", str(args.grpo_steps), "--prompts-per-step", "8", "--group-size", "8",
                                      "--mini-batches", "1", "--temperature", "0.8", "--lr", str(args.grpo_lr), "--kl-coef", str(args.grpo_kl), "--seed", str(args.grpo_seed),
                                      "--eval-every", str(args.grpo_steps // 3), "--save-every", str(args.grpo_steps)] + gen + val,
         grpo_model),
    ] + ([] if args.no_dpo or args.dpo_start == "base" else [
        ("DPO: explore with the warm start", explore(warm, "explore-warm", args.dpo_users, args.dpo_n, args.dpo_temperature),
         f"{ew}/profiles.jsonl"),
        ("DPO: evaluate", stage("evaluate", "explore-warm"), f"{ew}/scores-rating.jsonl"),
    ]) + ([] if args.no_dpo else [
        ("DPO: pairs", stage("pairs", dpo_dir) + ["--min-margin", str(args.dpo_min_margin), "--max-pairs-per-user", "4"],
         os.path.join(out, dpo_dir, "pairs-rating.jsonl")),
        (f"DPO from the {DPO_START[args.dpo_start]}", stage("train", dpo_dir) + gen + val + [
            "--model", base if args.dpo_start == "base" else warm, "--val-data", va, "--lr", "5e-6", "--beta", "0.1",
            "--steps", str(args.dpo_steps), "--pairs-per-step", "8",
            "--eval-every", str(args.dpo_steps // 2), "--save-every", str(args.dpo_steps)], dpo_model),
    ]) + [test(base, "base"), test(warm, "warm"), test(grpo_model, "grpo")] + (
        [] if args.no_dpo else [test(dpo_model, "dpo")])


def bench_learning(args):
    """Prepare -> explore -> warm start -> GRPO and DPO -> judge every condition on the test users."""
    from reward import judge_conditions, make_judge, print_summary, profile_texts, summarize, template_profile
    from lettingo import PROFILE_CLOSE, PROFILE_OPEN
    from lettingo import read_jsonl
    out = args.out
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    times = {}
    for k, (name, cmd, done) in enumerate(learning_recipe(args, out)):
        if os.path.exists(done):
            print(f"[{k}] {name}: done ({done})", flush=True)
            continue
        log = os.path.join(out, "logs", f"{k:02d}.log")
        print(f"[{k}] {name}: {' '.join(cmd)}\n     log: {log}", flush=True)
        t0 = time.time()
        with open(log, "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=HERE).returncode
        times[name] = time.time() - t0
        print(f"     {times[name] / 60:.1f} min", flush=True)
        if rc != 0 or not os.path.exists(done):
            raise SystemExit(f"error: stage '{name}' failed (exit {rc}); see {log}")
    test = read_jsonl(os.path.join(out, "data", "test.jsonl"))
    names = {"base": "base writer (untrained)", "warm": "warm start (SFT on best explored)",
             "grpo": "GRPO (from the warm start)", **({} if args.no_dpo else {"dpo": f"DPO (from the {DPO_START[args.dpo_start]})"})}
    profiles = {names[k]: profile_texts(os.path.join(out, f"test-{k}.jsonl"), test) for k in names}
    for kinds, name in (("none", "template without genres"), ("swapped", "template, likes/dislikes swapped")):
        profiles[name] = [[f"{PROFILE_OPEN}{template_profile(s, kinds)}{PROFILE_CLOSE}"] for s in test]   # what
    #                                                                       the judge reads of the template
    judge = make_judge("smollm2-135m", mode="expect")
    rows = judge_conditions(test, judge, "rating", profiles)
    pairs = [("base", "warm"), ("warm", "grpo"), ("warm", "dpo"), ("base", "grpo"), ("base", "dpo")]
    summary = summarize("rating", test, rows, compare=[(names[a], names[b]) for a, b in pairs if b in names] +
                        [("template profile (code, no LLM)", names[k]) for k in ("grpo", "dpo") if k in names] +
                        [("template profile (code, no LLM)", "template without genres"),
                         ("template profile (code, no LLM)", "template, likes/dislikes swapped")])
    summary["stage_minutes"] = {k: round(v / 60, 2) for k, v in times.items()}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print_summary(summary)
    mae = lambda n: f"{summary['rows'][n]['all']['MAE'][0]:.3f}"
    ci = lambda a, b: "[{1:+.3f},{2:+.3f}]".format(*summary["paired"][f"{a} -> {b}"])
    dpo = "" if args.no_dpo else f" dpo={mae(names['dpo'])}"
    dpo_ci = "" if args.no_dpo else f" dpo_gain_ci={ci(names[args.dpo_start], names['dpo'])}"   # over DPO's own start
    print(f"learning base={mae(names['base'])} grpo={mae(names['grpo'])}{dpo} "
          f"template={mae('template profile (code, no LLM)')} no_profile={mae('no profile')} user_mean={mae('user mean (no LLM)')} "
          f"global_median={mae('global median (no LLM)')} "
          f"grpo_gain_ci={ci(names['warm'], names['grpo'])}{dpo_ci} "
          f"start={mae(names['warm'])} start_gain_ci={ci(names['base'], names['warm'])}")


def parse_args(argv=None):
    p = ArgParser(description="Benchmarks against baselines run in the same process.")
    p.add_argument("what", nargs="?", default="all", choices=["all", "rollout", "grpo", "data", "learning"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this real config instead of --model "
                   "(nothing downloaded; speed does not depend on the values)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=32, help="rollout: prompts decoded together")
    p.add_argument("--n", type=int, default=1, help="rollout: samples per prompt (rows = batch x n)")
    p.add_argument("--prompt-tokens", type=int, default=300)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompts", type=int, default=2, help="grpo: prompts per step")
    p.add_argument("--group-size", type=int, default=8, help="grpo: samples per prompt (public code: 8)")
    p.add_argument("--token-budget", type=int, default=16384, help="grpo --device cuda: tokens per micro-batch")
    p.add_argument("--repeats", type=int, default=2)
    g = p.add_argument_group("learning (prepare -> explore -> warm start -> GRPO / DPO -> judged on test users)")
    g.add_argument("--dataset", default="movielens", choices=["movielens", "amazon", "yelp", "synthetic"])
    g.add_argument("--raw", help="the dataset as data/prepare.py reads it (folder or file)")
    g.add_argument("--meta", help="amazon: metadata file")
    g.add_argument("--out", default="runs/learning", help="run folder (stages found done there are skipped)")
    g.add_argument("--test-users", type=int, default=100)
    g.add_argument("--val-users", type=at_least(1), default=100,
                   help="the only users settings are chosen on (32 were too few: their targets' mean was 0.65 off the test users')")
    g.add_argument("--max-new-tokens", type=int, default=96)
    g.add_argument("--reward-targets", type=int, default=4,
                   help="training rewards average the judge over this many next items of the user")
    g.add_argument("--explore-users", type=int, default=128)
    g.add_argument("--explore-n", type=int, default=6)
    g.add_argument("--explore-template", action=argparse.BooleanOptionalAction, default=True,
                   help="the template profile (code) joins the base writer's explored profiles: the warm start "
                        "then fine-tunes on whichever scores best per user")
    g.add_argument("--sft-steps", type=int, default=16)
    g.add_argument("--grpo-steps", type=int, default=30)
    g.add_argument("--grpo-lr", type=float, default=1e-5)
    g.add_argument("--grpo-kl", type=float, default=0.0, help="GRPO's k3 KL-to-the-warm-start weight (0: no reference model)")
    g.add_argument("--grpo-seed", type=int, default=0, help="GRPO's data order and sampling seed")
    g.add_argument("--dpo-start", choices=sorted(DPO_START), default="base",
                   help="DPO's start, and the start its gain is measured over: base = the paper (the base writer, on pairs "
                        "of the first exploration); warm = the warm start, on pairs of a second exploration by it (runs 2-9)")
    g.add_argument("--dpo-users", type=int, default=96, help="--dpo-start warm: users the warm start explores")
    g.add_argument("--dpo-n", type=at_least(1), default=4, help="--dpo-start warm: profiles explored per user")
    g.add_argument("--dpo-temperature", type=at_least(0.0, float), default=0.8, help="--dpo-start warm: exploration temperature")
    g.add_argument("--dpo-min-margin", type=at_least(0.0, float), default=0.02,
                   help="DPO: a pair's least reward gap (1 star = 0.25; chosen on validation for --dpo-start warm, "
                        "README run 9; from the base every pair is closed vs unclosed, gap ~1.8)")
    g.add_argument("--dpo-steps", type=int, default=30)
    g.add_argument("--no-dpo", action="store_true", help="the GRPO branch only (about half the time)")
    return p.parse_args(argv)


def main():
    args = parse_args()
    if args.what == "learning":
        if not args.raw and args.dataset != "synthetic":
            raise LettingoError("learning: --raw DATASET is required (or --dataset synthetic)")
        return bench_learning(args)
    if args.what in ("rollout", "all"):
        if args.what == "all":
            args.batch, args.new_tokens = 8, 32
        bench_rollout(args)
    if args.what in ("data", "all"):
        bench_data(args)
    if args.what == "grpo" and args.device == "cuda":
        return bench_update_kernels(args)
    if args.what in ("grpo", "all"):
        if args.what == "all":
            args.prompt_tokens, args.new_tokens, args.repeats = 100, 32, 1
        bench_grpo(args)


if __name__ == "__main__":
    cli(main)
