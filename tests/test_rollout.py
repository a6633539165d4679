"""rollout.py: greedy parity with transformers, log-probs vs a no-cache forward, batch invariance,
shared prefill, stops, bad input."""
import json
import math
import os
import time

import pytest
import torch
from conftest import run

from lettingo import LettingoError, chat_prompt, load_model
from rollout import generate, mix32, row_keys, row_seed, sample_next, uniforms

THREE_PROMPTS = [[5, 9, 33, 7], [40, 41, 42, 43, 44, 45, 46, 47, 48], [7, 8]]  # lengths 4, 9, 2: left padding



def hf_greedy(ref, prompts, pad_id, eos_id, n_new):
    """transformers' greedy continuation of a left-padded batch, each row cut after its first EOS."""
    P = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    out = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False,
                       pad_token_id=pad_id, eos_token_id=eos_id)
    rows = out[:, P:].tolist()
    return [r[:r.index(eos_id) + 1] if eos_id in r else r for r in rows]


def test_greedy_matches_transformers_tiny(tiny):
    folder, ref = tiny
    m, tok = load_model(folder, device="cpu")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in (5, 17, 9, 30)]
    ours = generate(m, prompts, max_new_tokens=32, temperature=0, end_ids={tok.eos_token_id})
    assert [s[0].tokens for s in ours] == hf_greedy(ref, prompts, tok.pad_token_id, tok.eos_token_id, 32)


def test_greedy_matches_transformers_smollm2(smol):
    from transformers import AutoModelForCausalLM

    from lettingo import resolve
    m, tok = smol
    path = resolve("smollm2-135m")
    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                               dtype=torch.float32).eval()
    prompts = [chat_prompt(tok, [{"role": "user", "content": c}]) for c in
               ("Name three comedy films.", "Write a haiku about the sea, please, in English.",
                "Describe a person who loves horror movies.")]
    ours = generate(m, prompts, max_new_tokens=32, temperature=0, end_ids={tok.eos_token_id})
    assert [s[0].tokens for s in ours] == hf_greedy(ref, prompts, tok.pad_token_id, tok.eos_token_id, 32)


def test_logprobs_equal_full_forward(tiny):
    folder, _ = tiny
    m, tok = load_model(folder, device="cpu")
    prompts = [[5, 9, 33, 7], [40, 41, 42, 43, 44, 45, 46, 47, 48]]
    out = generate(m, prompts, n=2, max_new_tokens=20, temperature=1.0, seed=3, end_ids=set())
    for p, samples in zip(prompts, out):
        for s in samples:
            seq = torch.tensor([p + s.tokens])
            with torch.no_grad():
                ref = torch.log_softmax(m(seq)[0, len(p) - 1:-1], -1)
            want = ref.gather(1, torch.tensor(s.tokens)[:, None]).squeeze(1)
            assert (torch.tensor(s.logprobs) - want).abs().max() < 1e-4


def lowbias32(x: int) -> int:
    """Wellons' lowbias32 in plain Python ints: the reference for rollout.mix32."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def reference_uniform(seed: int, step: int) -> float:
    key = lowbias32(lowbias32(seed >> 32) ^ (seed & 0xFFFFFFFF))
    h = lowbias32(key ^ lowbias32((step * 0x9E3779B9) & 0xFFFFFFFF))
    return ((h >> 9) + 0.5) / 2**23


def test_hash_matches_python_reference():
    xs = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 123456789, 0xDEADBEEF]
    assert mix32(torch.tensor(xs)).tolist() == [lowbias32(x) for x in xs]
    seeds = [row_seed(s, j) for s in (0, 7, 2**40 + 3) for j in range(3)]
    for step in (0, 1, 95, 100_000):
        u = uniforms(row_keys(seeds, "cpu"), torch.tensor([step]))
        assert u.tolist() == [reference_uniform(sd, step) for sd in seeds]


def test_sampled_tokens_equal_brute_force_decoding(tiny):
    """Every sampled token equals inverse-CDF sampling, written here in plain Python, from a full
    forward (no cache) over the prompt and the tokens so far -- with top-p, top-k and temperature."""
    folder, _ = tiny
    m, _ = load_model(folder, device="cpu")
    prompts = [[5, 9, 33, 7], [40, 41, 42, 43, 44, 45, 46, 47, 48]]
    for kw in ({"temperature": 1.0}, {"temperature": 0.7, "top_p": 0.8}, {"temperature": 1.3, "top_k": 5}):
        out = generate(m, prompts, n=2, max_new_tokens=12, seed=[11, 12], end_ids=set(), **kw)
        for i, (p, samples) in enumerate(zip(prompts, out)):
            for j, s in enumerate(samples):
                seq = list(p)
                for step in range(12):
                    with torch.no_grad():
                        logits = (m(torch.tensor([seq]))[0, -1].double() / kw["temperature"]).tolist()
                    order = sorted(range(len(logits)), key=lambda v: -logits[v])
                    keep = order[:kw.get("top_k") or len(order)]
                    z = [math.exp(logits[v] - logits[order[0]]) for v in keep]
                    if kw.get("top_p"):               # smallest prefix of the sorted tokens reaching top_p
                        total, mass, k = sum(z), 0.0, 0
                        while mass < kw["top_p"] * total:
                            mass, k = mass + z[k], k + 1
                        keep, z = keep[:k], z[:k]
                    u = (reference_uniform(row_seed(12 if i else 11, j), step)
                         * sum(z[v] for v in range(len(keep))))
                    by_id = sorted(zip(keep, z))        # the cdf runs in vocabulary order
                    acc = 0.0
                    for tok_id, w in by_id:
                        acc += w
                        if acc >= u:
                            break
                    assert s.tokens[step] == tok_id, (kw, i, j, step)
                    seq.append(tok_id)


def test_sampling_distribution_matches_probabilities():
    """Counter-based inverse-CDF sampling over many rows hits each token at its probability."""
    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 1.5
    rows = 40_000
    toks, _ = sample_next(logits.expand(rows, 12).contiguous(), 1.0, 1.0, 0,
                          row_keys([row_seed(5, r) for r in range(rows)], "cpu"), torch.tensor([3]))
    freq = torch.bincount(toks, minlength=12).double() / rows
    p = torch.softmax(logits[0].double(), -1)
    assert ((freq - p).abs() <= 4 * (p * (1 - p) / rows).sqrt() + 1e-4).all(), (freq, p)
    toks, _ = sample_next(logits.expand(rows, 12).contiguous(), 1.0, 0.5, 0,
                          row_keys([row_seed(6, r) for r in range(rows)], "cpu"), torch.tensor([0]))
    allowed = set(torch.argsort(p, descending=True)
                  [:int((p.sort(descending=True).values.cumsum(0) < 0.5).sum()) + 1].tolist())
    assert set(toks.tolist()) <= allowed


def test_batch_invariance_and_determinism(tiny):
    folder, _ = tiny
    m, tok = load_model(folder, device="cpu")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in (3, 25, 11)]
    batched = generate(m, prompts, max_new_tokens=24, temperature=0, end_ids=set())
    for i, p in enumerate(prompts):
        alone = generate(m, [p], max_new_tokens=24, temperature=0, end_ids=set())
        assert alone[0][0].tokens == batched[i][0].tokens
    # sampling: a seeded row gives the same tokens alone or inside a batch, and again on re-run
    s1 = generate(m, prompts, n=2, max_new_tokens=16, seed=[7, 8, 9], end_ids=set())
    s2 = generate(m, prompts[1:2], n=2, max_new_tokens=16, seed=[8], end_ids=set(), batch_size=1)
    assert [s.tokens for s in s1[1]] == [s.tokens for s in s2[0]]
    s3 = generate(m, prompts, n=2, max_new_tokens=16, seed=[7, 8, 9], end_ids=set())
    assert [[s.tokens for s in ss] for ss in s1] == [[s.tokens for s in ss] for ss in s3]


def test_n_samples_share_one_prefill(tiny):
    folder, _ = tiny
    m, tok = load_model(folder, device="cpu")
    prefill_rows = []
    hook = m.register_forward_pre_hook(lambda mod, args, kw: prefill_rows.append(args[0].shape[0])
                                       if args[0].shape[1] > 1 else None, with_kwargs=True)
    out = generate(m, [[5, 6, 7, 8], [9, 10, 11]], n=4, max_new_tokens=12, temperature=1.0, seed=0,
                   end_ids=set())
    hook.remove()
    assert prefill_rows == [2]                             # one prefill row per prompt, not per sample
    assert len({tuple(s.tokens) for s in out[0]}) > 1       # and the samples differ


def test_stops_and_finish_reasons(tiny):
    folder, _ = tiny
    m, tok = load_model(folder, device="cpu")
    p = [[5, 6, 7]]
    greedy = generate(m, p, max_new_tokens=10, temperature=0, tokenizer=tok, end_ids=set())[0][0]
    assert greedy.finish == "length" and len(greedy.tokens) == 10
    # EOS as the very first token: make the first greedy token the end token
    first = greedy.tokens[0]
    eos = generate(m, p, max_new_tokens=10, temperature=0, end_ids={first})[0][0]
    assert eos.finish == "eos" and eos.tokens == [first]
    # a stop string that ends inside a token: the text is cut right after it, the token kept
    text = tok.decode(greedy.tokens)
    piece = tok.decode(greedy.tokens[3:5])
    stop_str = text[:text.find(piece) + len(piece) - 1]    # ends one character before token 4 ends
    stop_str = stop_str[-3:] if len(stop_str) >= 3 else stop_str
    st = generate(m, p, max_new_tokens=10, temperature=0, tokenizer=tok, stop=(stop_str,),
                  end_ids=set())[0][0]
    assert st.finish == "stop" and st.text.endswith(stop_str) and len(st.tokens) <= 5
    assert st.tokens == greedy.tokens[:len(st.tokens)]


def test_bad_input(tiny):
    folder, _ = tiny
    m, tok = load_model(folder, device="cpu")
    with pytest.raises(LettingoError, match="empty prompt list"):
        generate(m, [], max_new_tokens=4)
    with pytest.raises(LettingoError, match="context"):
        generate(m, [[5] * 2100], max_new_tokens=4)
    with pytest.raises(LettingoError, match="not found"):
        load_model("no-such-model")


def test_cli_skips_bad_lines(tiny, tmp_path):
    folder, _ = tiny
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "rate 5"}]}) + "\n{not json\n"
                    + json.dumps({"user_id": "u2", "messages": [{"role": "user", "content": "hello"}]})
                    + "\n")
    out = tmp_path / "out.jsonl"
    r = run("rollout.py", "--model", folder, "--data", data, "--out", out, "--n", "2",
            "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert ":2: unreadable line skipped" in r.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 2 and rows[1]["user_id"] == "u2" and len(rows[1]["generations"]) == 2
    assert "generated tokens/s" in r.stdout
    r = run("rollout.py", "--model", "nope", "--data", data, "--out", out)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: model 'nope' not found")


def test_the_cli_seeds_prompts_as_exploration_does(tiny, tmp_path):
    """One seeding rule for every caller: rollout.py --seed S samples prompt i with prompt_seed(S, 0, i),
    as dpo.py explore does, so the same writer on the same users explores the same profiles."""
    from rollout import Sampler, SamplingParams, prompt_seed
    folder, _ = tiny
    rows = [{"messages": [{"role": "user", "content": f"rate {k}"}]} for k in range(3)]
    data, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run("rollout.py", "--model", folder, "--data", data, "--out", out, "--n", 2, "--max-new-tokens", 6,
        "--temperature", 1.0, "--seed", 5, check=True)
    model, tok = load_model(folder, device="cpu")
    prompts = [chat_prompt(tok, r["messages"]) for r in rows]
    want = Sampler(model).generate(prompts, SamplingParams(n=2, max_new_tokens=6, temperature=1.0),
                                   seed=[prompt_seed(5, 0, i) for i in range(3)], tokenizer=tok)
    got = [[g["text"] for g in json.loads(x)["generations"]] for x in out.read_text().splitlines()]
    assert got == [[o.text for o in group] for group in want]


def test_ctrl_c_keeps_the_rows_written_and_resume_completes_them(tiny, tmp_path):
    import signal
    import subprocess
    import sys
    from conftest import ROOT, clean_env, default_sigint
    folder, _ = tiny
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"rate {k}"}]}) + "\n"
                            for k in range(300)))
    args = ["--model", folder, "--data", data, "--n", 2, "--max-new-tokens", 24, "--temperature", 1.0,
            "--batch-size", 4]
    run("rollout.py", *args, "--out", tmp_path / "whole.jsonl", check=True)
    out = tmp_path / "part.jsonl"
    proc = subprocess.Popen([sys.executable, f"{ROOT}/rollout.py", *map(str, args), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=clean_env(), preexec_fn=default_sigint)
    while not (out.exists() and out.read_text().count("\n") >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("stopped (Ctrl-C): ") and "--resume" in err
    kept = out.read_text().count("\n")
    assert 3 <= kept < 300
    with open(out, "a") as f:
        f.write('{"user_id": null, "cut sh')                         # a line a kill cut short
    run("rollout.py", *args, "--out", out, "--resume", check=True)
    assert out.read_text() == (tmp_path / "whole.jsonl").read_text()


def test_turn_end_is_the_chat_templates_not_the_smallest_end_id(tiny):
    from rollout import end_token_ids, turn_end_id
    _, tok = load_model(tiny[0], device="cpu")
    ids = tok.get_vocab()
    assert min(end_token_ids(tok)) == ids["<|endoftext|>"] != ids["<|im_end|>"]     # the two differ here
    assert turn_end_id(tok) == ids["<|im_end|>"]


def test_graph_path_bookkeeping_changes_nothing(tiny, monkeypatch):
    """The CUDA-graph path's bookkeeping -- rows padded to power-of-two buckets, tokens looked at
    every 8 steps, finished rows compacted away -- run eagerly on the CPU (Sampler(bucketed=True)),
    samples exactly what the plain path samples."""
    import rollout
    compactions = []
    rows = rollout.DecodeState.rows
    monkeypatch.setattr(rollout.DecodeState, "rows",
                        lambda st, index: compactions.append(len(index)) or rows(st, index))
    folder, _ = tiny
    m, tok = load_model(folder, device="cpu")
    params = rollout.SamplingParams(n=3, max_new_tokens=40, temperature=0.9, top_p=0.95,
                                    stop=("</user_profile>",))
    kw = dict(seed=[1, 2, 3], tokenizer=tok, end_ids=set(range(0, m.cfg.vocab_size, 7)))
    padded = rollout.Sampler(m, bucketed=True).generate(THREE_PROMPTS, params, **kw)
    assert compactions and all(n & (n - 1) == 0 for n in compactions)       # compacted, to powers of two
    plain = rollout.Sampler(m).generate(THREE_PROMPTS, params, **kw)
    flat = lambda out: [(s.tokens, s.finish) for ss in out for s in ss]
    assert flat(padded) == flat(plain)
    lps = lambda out: torch.tensor([lp for ss in out for s in ss for lp in s.logprobs])
    assert (lps(padded) - lps(plain)).abs().max() < 1e-5
    assert len({len(s.tokens) for ss in plain for s in ss}) > 2


@pytest.mark.cuda
def test_cuda_graph_decode_equals_eager_and_cpu(tiny):
    """Replayed CUDA graphs sample exactly what the eager step samples (same function), rows stop
    and are compacted across buckets, and the CPU samples the same tokens (fp32)."""
    folder, _ = tiny
    m, _ = load_model(folder, dtype=torch.float32, device="cuda")
    cpu, _ = load_model(folder, dtype=torch.float32, device="cpu")
    prompts = THREE_PROMPTS
    ends = set(range(0, m.cfg.vocab_size, 7))            # ~1 in 7 tokens ends a row: rows end at many steps
    kw = dict(n=3, max_new_tokens=40, temperature=0.9, top_p=0.95, seed=[1, 2, 3], end_ids=ends)
    graphed = generate(m, prompts, cuda_graphs=True, compiled=False, **kw)
    eager = generate(m, prompts, cuda_graphs=False, **kw)
    on_cpu = generate(cpu, prompts, **kw)
    flat = lambda out: [(s.tokens, s.finish) for ss in out for s in ss]
    assert flat(graphed) == flat(eager)
    assert len({len(s.tokens) for ss in graphed for s in ss}) > 2
    assert sum(a == b for a, b in zip(flat(graphed), flat(on_cpu))) >= 8    # 9 rows; fp32 GPU vs CPU
    assert len(m.decode_graphs.graphs) >= 2                                 # compacted to a smaller bucket


@pytest.mark.cuda
def test_cuda_compiled_graph_decode_equals_eager(tiny):
    """The compiled step (torch.compile of the same decode_step, captured in graphs) samples what
    the eager step samples: fp32, same seeds; fusion may reorder float sums, so log-probs agree to
    1e-4 and at most one of the 9 rows may take another path after a near-tie."""
    folder, _ = tiny
    m, _ = load_model(folder, dtype=torch.float32, device="cuda")
    prompts = THREE_PROMPTS
    ends = set(range(0, m.cfg.vocab_size, 7))
    kw = dict(n=3, max_new_tokens=40, temperature=0.9, top_p=0.95, seed=[1, 2, 3], end_ids=ends)
    compiled = generate(m, prompts, cuda_graphs=True, compiled=True, **kw)
    eager = generate(m, prompts, cuda_graphs=False, compiled=False, **kw)
    pairs = [(a, b) for x, y in zip(compiled, eager) for a, b in zip(x, y)]          # 9 rows
    same = [(a, b) for a, b in pairs if (a.tokens, a.finish) == (b.tokens, b.finish)]
    assert len(same) >= 8
    assert max(abs(p - q) for a, b in same for p, q in zip(a.logprobs, b.logprobs)) < 1e-4
    assert len(m.decode_graphs_compiled.graphs) >= 2


def test_compiled_decode_step_equals_eager_on_cpu(tiny):
    """torch.compile traces the same decode_step (model, sampling, cache writes; the cumsum left
    out) and samples what the eager step samples -- the CPU half of the GPU's compiled graphs."""
    folder, _ = tiny
    m, _ = load_model(folder, dtype=torch.float32, device="cpu")
    prompts = THREE_PROMPTS
    kw = dict(n=3, max_new_tokens=24, temperature=0.9, top_p=0.95, seed=[1, 2, 3],
              end_ids=set(range(0, m.cfg.vocab_size, 7)))
    compiled, eager = generate(m, prompts, compiled=True, **kw), generate(m, prompts, compiled=False, **kw)
    pairs = [(a, b) for x, y in zip(compiled, eager) for a, b in zip(x, y)]
    assert all((a.tokens, a.finish) == (b.tokens, b.finish) for a, b in pairs)
    assert max(abs(p - q) for a, b in pairs for p, q in zip(a.logprobs, b.logprobs)) < 1e-5
    assert len({len(a.tokens) for a, _ in pairs}) > 2                  # rows ended at different steps


@pytest.mark.cuda
def test_cuda_compile_failure_falls_back_to_the_uncompiled_graph(tiny, monkeypatch, capsys):
    """A compiler failure on some shape costs speed, not the run: the uncompiled step is captured,
    the samples are the eager step's, and stderr says what happened."""
    import rollout
    folder, _ = tiny
    m, _ = load_model(folder, dtype=torch.float32, device="cuda")

    def broken(*a):
        raise RuntimeError("inductor bug")
    monkeypatch.setattr(rollout, "compiled_decode_step", lambda: broken)
    kw = dict(n=2, max_new_tokens=12, temperature=0.9, seed=[4, 5], end_ids=set())
    prompts = [[5, 9, 33, 7], [7, 8]]
    got = generate(m, prompts, cuda_graphs=True, compiled=True, **kw)
    assert "torch.compile of the decode step failed (RuntimeError: inductor bug)" in capsys.readouterr().err
    want = generate(m, prompts, cuda_graphs=False, compiled=False, **kw)
    assert [s.tokens for ss in got for s in ss] == [s.tokens for ss in want for s in ss]
