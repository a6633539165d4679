"""bench.py -- speed, always as a ratio against a baseline run in the same process on the same
machine, plus the fraction of the hardware limit (measured copy bandwidth / matmul rate).

    python bench.py rollout --batch 32 --prompt-tokens 300 --new-tokens 128 [--dtype bfloat16]
    python bench.py grpo                 # one GRPO step vs TRL's GRPOTrainer (pip install trl)
    python bench.py update [--device cuda --shape smollm2-135m --prompts 16]
                                         # the update with each attention kernel (CPU: and
                                         # activation checkpointing), time and peak memory
    python bench.py data                 # data/prepare.py on an ML-1M-sized ratings file
    python bench.py judge --data DIR/train.jsonl
                                         # one GRPO step's judging: packed vs padded, HTTP concurrency
    python bench.py                      # a short run of each
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

import torch

from lettingo import (ALIASES, DEFAULT_MODEL, ArgParser, LettingoError, ModelConfig, Transformer,
                      alias_folder, chat_prompt, cli, load_model, predictor_messages, resolve,
                      rope_frequencies, split_shared_prefixes)
from reward import Scored
from rollout import Sampler, SamplingParams, cpu_decode_layout, prompt_seed

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT = ("The user watched many films last year. They loved quiet dramas and sharp comedies, found most "
        "horror tedious, and rated big action films harshly unless the story was clever. ")


def hardware(dtype, device="cpu") -> dict:
    """Measured, not quoted: copy bandwidth (bytes read + written per second) and matmul FLOP/s."""
    x = torch.empty(256 * 2**20 // 4, dtype=torch.float32, device=device)    # 256 MB
    y = torch.empty_like(x)
    best = min(timed(lambda: y.copy_(x)) for _ in range(5))
    n = 8192 if device == "cuda" else 2048
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    mm = min(timed(lambda: a @ b) for _ in range(5))
    return {"copy_GBps": 2 * x.numel() * 4 / best / 1e9,
            f"matmul_{str(dtype)[6:]}_GFLOPs": 2 * n**3 / mm / 1e9}


def timed(fn) -> float:
    """Wall time of fn(), waiting for the GPU's queued work before and after."""
    sync = (torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized()
            else (lambda: None))
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
    "smollm2-135m": ("llama", dict(architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576,
                                   num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                   intermediate_size=1536, max_position_embeddings=8192,
                                   rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)),
    "qwen3-1.7b": ("qwen3", dict(architectures=["Qwen3ForCausalLM"], vocab_size=151936, hidden_size=2048,
                                 num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                                 head_dim=128, intermediate_size=6144,
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

    cpu_decode_layout(ours)
    params = SamplingParams(n=args.n, max_new_tokens=n_new, temperature=1.0, batch_size=rows)

    def run_ours(sampler):
        out = sampler.generate(prompts, params, seed=0, end_ids=set())
        assert all(len(s.tokens) == n_new for ss in out for s in ss)

    def run_hf():
        x = torch.tensor(prompts, device=args.device).repeat_interleave(args.n, 0)
        with torch.no_grad():
            out = ref.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True,
                               temperature=1.0, top_k=0, max_new_tokens=n_new, min_new_tokens=n_new,
                               pad_token_id=0)
        assert out.shape[1] == args.prompt_tokens + n_new

    samplers = {"ours": Sampler(ours)}     # each keeps its graphs across the runs, as a training loop does
    if args.device == "cuda":              # what the compile and the graphs buy: the same step without
        samplers["ours_uncompiled"] = Sampler(ours, cuda_graphs=True, compiled=False)
        samplers["ours_eager"] = Sampler(ours, cuda_graphs=False, compiled=False)
    else:                                  # the CPU's option: the step compiled, run without graphs
        samplers["ours_compiled"] = Sampler(ours, cuda_graphs=False, compiled=True)
    runs = {"ours": lambda: run_ours(samplers["ours"]), "transformers": run_hf}
    runs.update({k: (lambda s=s: run_ours(s)) for k, s in samplers.items() if k != "ours"})
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
    t_flops, t_bytes = (flops / (hw[f"matmul_{args.dtype}_GFLOPs"] * 1e9),
                        bytes_moved / (hw["copy_GBps"] / 2 * 1e9))
    limit = max(t_flops, t_bytes)                                         # the roofline bound for this call
    print(json.dumps({"model": args.shape or args.model, "weights": "random" if args.shape else "checkpoint",
                      "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                      "dtype": args.dtype,
                      "prompts": args.batch, "n": args.n, "rows": rows, "prompt_tokens": args.prompt_tokens,
                      "new_tokens": n_new, **{k: round(v, 1) for k, v in hw.items()},
                      **{f"{k}_tok_s": round(tok_s(t), 1) for k, t in best.items()},
                      "lower_bound_s": round(limit, 3),
                      "bound_by": "compute" if t_flops > t_bytes else "memory",
                      "ours_fraction_of_limit": round(limit / best["ours"], 3)}, indent=1))
    print(f"rollout speedup_vs_transformers={best['transformers'] / best['ours']:.2f}")


def bench_data(args):
    with tempfile.TemporaryDirectory() as tmp:
        gen = [sys.executable, os.path.join(HERE, "data", "prepare.py"), "synthetic", "--users", "6040",
               "--items", "3706", "--total-ratings", "1000209",
               "--export-movielens", os.path.join(tmp, "raw"), "--out", os.path.join(tmp, "s")]
        subprocess.run(gen, check=True, capture_output=True)
        cmd = [sys.executable, os.path.join(HERE, "data", "prepare.py"), "movielens",
               "--raw", os.path.join(tmp, "raw"), "--out", os.path.join(tmp, "out"),
               "--targets-per-user", "3"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t = timed(lambda: subprocess.run(cmd, check=True, capture_output=True))
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        stats = json.load(open(os.path.join(tmp, "out", "stats.json")))
    print(json.dumps({"ratings": stats["ratings_read"], "users": stats["users_read"], "wall_s": round(t, 2),
                      "max_rss_MB": round(max(rss, before) / 1024), "train_samples": stats["train_samples"]},
                     indent=1))
    print(f"data seconds={t:.2f}")


def bench_update_kernels(args):
    """The update half of one GRPO step -- packed log-probs with grad + backward over every (prompt,
    completion) of the step, micro-batched by the token budget, as train.py runs it -- with each
    attention kernel this device has, prompts shared within a group where the kernel can (tree mask;
    the baseline: each sequence its own prompt copy), on CPU also with activation checkpointing.
    Time and the peak memory above the start (GPU: allocated; CPU: resident, polled)."""
    from lettingo import TREE_BACKENDS, attention_backend, micro_batches
    from train import completion_logprobs
    dtype = getattr(torch, args.dtype)
    ours, ref, prompts = bench_models(argparse.Namespace(**{**vars(args), "batch": args.prompts}), dtype)
    del ref
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
        runs += [(kernel, share, False) for share in ((True, False) if kernel in TREE_BACKENDS else (False,))]
    if args.device == "cpu":
        runs += [(kernel, share, True) for kernel, share, _ in runs]

    def update(kernel, share, checkpointing):
        ours.attention, ours.checkpointing = kernel, checkpointing
        for grp in batches[share]:
            lps = completion_logprobs(ours, [seqs[i] for i in grp], args.device, share_prompts=share)
            sum(lp.logprobs.float().sum() for lp in lps).backward()
        ours.zero_grad(set_to_none=True)

    seq_tokens = sum(len(p) + len(c) for p, c in seqs)
    shared_tokens = len(prompts) * args.prompt_tokens + len(seqs) * args.new_tokens
    out = {}
    for kernel, share, checkpointing in runs:
        times, peaks = [], []
        for _ in range(args.repeats + (args.device == "cuda")):     # GPU: a first call compiles
            with PeakMemory(args.device) as mem:
                times.append(timed(lambda: update(kernel, share, checkpointing)))
            peaks.append(mem.peak_bytes)
        name = f"{kernel}_{'shared' if share else 'unshared'}" + ("_checkpointing" if checkpointing else "")
        best = min(times[-args.repeats:])
        out[name] = {"s": round(best, 2), "peak_GiB": round(max(peaks) / 2**30, 2),
                     "tokens_computed": shared_tokens if share else seq_tokens,
                     "sequence_tokens_per_s": round(seq_tokens / best)}
        print(f"  {name}: {out[name]}", flush=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(json.dumps({"model": args.shape or args.model, "device": device, "dtype": args.dtype,
                      "prompts": args.prompts, "group_size": args.group_size,
                      "prompt_tokens": args.prompt_tokens,
                      "new_tokens": args.new_tokens, "token_budget": args.token_budget,
                      "micro_batches": {"shared": len(batches[True]), "unshared": len(batches[False])},
                      "update": out}, indent=1))
    base = min(v["s"] for k, v in out.items() if "unshared" in k)
    print("grpo update " + " ".join(f"{k}={base / v['s']:.2f}x" for k, v in out.items())
          + " (speed, of the fastest unshared)")


class PeakMemory:
    """The peak memory above the start while the block runs: on CUDA allocated bytes, on CPU the
    process' resident set, read from /proc every 5 ms by a thread."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            from lettingo import release_freed_memory
            release_freed_memory()
            self.start = self.peak = resident_bytes()
            self.running = True
            self.thread = threading.Thread(target=self.poll, daemon=True)
            self.thread.start()
        return self

    def poll(self):
        while self.running:
            self.peak = max(self.peak, resident_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.device == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated() - self.start
        else:
            self.running = False
            self.thread.join()
            self.peak_bytes = max(self.peak, resident_bytes()) - self.start


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_grpo(args):
    """One GRPO step (rollout + reward + update) of ours and of TRL's GRPOTrainer: same model, group
    size, prompts, forced response length and a judge-free reward, timed in one process."""
    try:
        import trl
    except ImportError:
        raise SystemExit("bench.py grpo needs TRL for the baseline: pip install trl datasets")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    import grpo
    from train import close_distributed, load_policy, setup_distributed
    folder = hf_folder(args.model)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(TEXT * (args.prompt_tokens // 20 + 2), add_special_tokens=False)["input_ids"]
    prompts = [tok.decode(ids[k:k + args.prompt_tokens]) for k in range(args.prompts)]
    reward = lambda texts: [t.count("e") / max(len(t), 1) for t in texts]   # same toy reward for both

    d = setup_distributed()
    cfg_ours = grpo.GRPOConfig(group_size=args.group_size, prompts_per_step=args.prompts, mini_batches=1,
                               max_new_tokens=args.new_tokens, kl_coef=0.0, lr=1e-6, token_budget=16384,
                               dtype=args.dtype)
    policy = load_policy(folder, cfg_ours, d)
    # raw prompts, as TRL gets them
    p_ids = [policy.tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    rewards = ToyRewards(reward)

    # the code path a user runs; no stop string and no end token: forced length, as TRL's
    def ours_step(step):
        batch = [grpo.Prompt({}, ids, prompt_seed(0, step, i), 0) for i, ids in enumerate(p_ids)]
        return grpo.grpo_step(policy, None, batch, rewards, cfg_ours, d, stop=(), end_ids=set())

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype))
    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(),
                     per_device_train_batch_size=args.prompts * args.group_size,
                     num_generations=args.group_size, max_completion_length=args.new_tokens,
                     learning_rate=1e-6, beta=0.0, max_steps=args.repeats + 1, logging_steps=1, report_to=[],
                     use_cpu=True,
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
    print(json.dumps({"model": args.model, "dtype": args.dtype, "prompts": args.prompts,
                      "group_size": args.group_size, "prompt_tokens": args.prompt_tokens,
                      "new_tokens": args.new_tokens, "trl_version": trl.__version__,
                      "ours_step_s": round(t_ours, 2), "trl_step_s": round(t_trl, 2),
                      "ours_samples_per_s": round(samples / t_ours, 2),
                      "trl_samples_per_s": round(samples / t_trl, 2)},
                     indent=1))
    print(f"grpo speedup_vs_trl={t_trl / t_ours:.2f}")
    close_distributed()


class ToyRewards:
    """grpo_step's rewards object (reward.JudgeRewards' interface) for a judge-free toy reward."""

    def __init__(self, reward):
        self.reward = reward

    def score(self, samples, outs):
        return [Scored(r) for r in self.reward([o.text for o in outs])]


def judge_prompts(args):
    """One GRPO step's judge requests: --users users x --group-size profiles x each user's reward
    targets, as target_rewards sends them (a profile's targets consecutive). The profiles are the
    template's with a different closing clause per sample (a written profile's length)."""
    from reward import sample_targets, template_profile
    from lettingo import read_samples
    tmp = None
    if not args.data:
        tmp = tempfile.TemporaryDirectory()
        subprocess.run([sys.executable, os.path.join(HERE, "data", "prepare.py"), "synthetic",
                        "--users", "60", "--out", tmp.name, "--reward-targets", "4"],
                       check=True, capture_output=True)
    samples = read_samples(args.data or os.path.join(tmp.name, "train.jsonl"))[:args.users]
    clauses = ["rarely", "often", "mostly", "sometimes", "usually", "seldom", "always", "never"]
    msgs = [predictor_messages(t, f"{template_profile(s)} They {clauses[k % 8]} rewatch films they loved.",
                               "rating")
            for s in samples for k in range(args.group_size) for t in sample_targets(s)]
    return msgs


def bench_judge(args):
    """The judge of one GRPO step (expect mode): packed (a profile's prompt once for all its targets)
    vs left-padded batches of 16 prompts, one per (profile, target) -- the same model, same run; then
    over HTTP against tools/serve.py at 8 requests in flight vs the judge's default."""
    from reward import HTTPJudge, LocalJudge, RewardConfig, answer_tokens
    from rollout import left_pad
    msgs = judge_prompts(args)
    model, tok = load_model(args.model, device=args.device)
    judge = LocalJudge(model, tok, "expect")
    prompts = [chat_prompt(tok, m, answer_prefix="<rating>") for m in msgs]
    cand = torch.tensor(answer_tokens(tok, "<rating>", [str(k) for k in range(1, 6)]))
    pairs = split_shared_prefixes(prompts)
    packed_tokens = sum(len(r) for _, r in pairs) + sum(len(pairs[i][0]) for i in range(len(pairs))
                                                         if i == 0 or pairs[i][0] != pairs[i - 1][0])

    chunks = [idx[c:c + 16] for idx in [sorted(range(len(prompts)), key=lambda i: len(prompts[i]))]
              for c in range(0, len(prompts), 16)]

    @torch.no_grad()
    def padded():                                   # the unpacked path: left-padded batches of 16
        out = torch.empty(len(prompts))
        for idx in chunks:
            tokens, mask = left_pad([prompts[i] for i in idx], args.device)
            p = torch.softmax(model(tokens, mask=mask, last_only=True)[:, -1, cand].cpu(), -1)
            out[idx] = p @ torch.arange(1.0, 6.0)
        return out.tolist()
    padded_tokens = sum(len(idx) * max(len(prompts[i]) for i in idx) for idx in chunks)
    res = {}
    for name, fn in (("padded", padded), ("packed", lambda: judge.predict(msgs, "rating"))):
        fn()                                        # warm-up
        got = []
        res[name] = (min(timed(lambda: got.append(fn())) for _ in range(args.repeats)), got[-1])
    diff = max(abs(a - b) for a, b in zip(res["padded"][1], res["packed"][1]))
    real = sum(map(len, prompts))
    out = {"pairs": len(msgs), "prompt_tokens": real, "padded_tokens": padded_tokens,
           "packed_tokens": packed_tokens, "max_abs_diff": diff,
           **{f"{k}_s": round(v[0], 2) for k, v in res.items()},
           **{f"{k}_prompt_tokens_per_s": round(real / v[0]) for k, v in res.items()}}
    if args.http:
        port = free_port()
        server = subprocess.Popen([sys.executable, os.path.join(HERE, "tools", "serve.py"), "--model",
                                   args.model, "--port", str(port), "--batch-size", "64"],
                                  stdout=subprocess.PIPE, text=True)
        try:
            server.stdout.readline()
            url = f"http://127.0.0.1:{port}"
            default = RewardConfig.judge_concurrency
            for conc in (8, default):
                remote = HTTPJudge(url, args.model, mode="expect", concurrency=conc, timeout=600)
                remote.predict(msgs[:8], "rating")                                   # warm-up
                out[f"http_concurrency_{conc}_s"] = round(timed(lambda: remote.predict(msgs, "rating")), 2)
            out["http_speedup"] = round(out["http_concurrency_8_s"] / out[f"http_concurrency_{default}_s"], 2)
        finally:
            server.terminate()
            server.wait(10)
    print(json.dumps(out, indent=1))
    print(f"judge speedup_packed_vs_padded={res['padded'][0] / res['packed'][0]:.2f}"
          + (f" http_speedup_default_vs_8={out['http_speedup']:.2f}" if args.http else ""))


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv=None):
    p = ArgParser(description="Benchmarks against baselines run in the same process.")
    p.add_argument("what", nargs="?", default="all",
                   choices=["all", "rollout", "grpo", "update", "data", "judge"],
                   help="what to measure (all: a short run of each)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="HF folder, .gguf or alias (ours and transformers load it)")
    p.add_argument("--shape", choices=sorted(SHAPES),
                   help="random weights of this real config instead of --model "
                        "(nothing downloaded; speed does not depend on the values)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both sides run")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights and compute dtype")
    p.add_argument("--batch", type=int, default=32, help="rollout: prompts decoded together")
    p.add_argument("--n", type=int, default=1, help="rollout: samples per prompt (rows = batch x n)")
    p.add_argument("--prompt-tokens", type=int, default=300, help="tokens per prompt")
    p.add_argument("--new-tokens", type=int, default=128,
                   help="tokens sampled per row (forced: no early stop)")
    p.add_argument("--prompts", type=int, default=2, help="grpo: prompts per step")
    p.add_argument("--group-size", type=int, default=8, help="grpo: samples per prompt (public code: 8)")
    p.add_argument("--token-budget", type=int, default=16384,
                   help="update: tokens per micro-batch")
    p.add_argument("--users", type=int, default=8, help="judge: users of the step (x group size x targets)")
    p.add_argument("--data", help="judge: samples JSONL with reward targets "
                                  "(data/prepare.py --reward-targets 4; default: synthetic)")
    p.add_argument("--http", action=argparse.BooleanOptionalAction, default=True,
                   help="judge: also over HTTP against tools/serve.py")
    p.add_argument("--repeats", type=int, default=2, help="timed runs after the warm-up; the best counts")
    return p.parse_args(argv)


def main():
    args = parse_args()
    short = lambda **kw: argparse.Namespace(**{**vars(args), **kw}) if args.what == "all" else args
    if args.what in ("rollout", "all"):
        bench_rollout(short(batch=8, new_tokens=32))
    if args.what in ("data", "all"):
        bench_data(args)
    if args.what == "update" or (args.what == "grpo" and args.device == "cuda"):
        return bench_update_kernels(args)
    if args.what in ("grpo", "all"):
        bench_grpo(short(prompt_tokens=100, new_tokens=32, repeats=1))
    if args.what in ("judge", "all"):
        bench_judge(short(users=2, repeats=1))


if __name__ == "__main__":
    cli(main)
