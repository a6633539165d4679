"""lettingo.py: our decoder against transformers on the same weights, checkpoint I/O, bad input."""
import json
import os

import pytest
import torch
from conftest import make_model

from lettingo import (
    KVCache,
    LettingoError,
    load_model,
    resolve,
    save_model,
    token_logprobs,
)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
FAMILIES = [
    ("llama", dict(tie_word_embeddings=True)),                                   # SmolLM2-like
    ("llama", dict(tie_word_embeddings=False, rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)),  # Llama-3.2
    ("llama", dict(num_key_value_heads=4)),                                      # no GQA
    ("qwen2", dict(tie_word_embeddings=False)),                                  # q/k/v bias
    ("qwen3", dict(head_dim=32, tie_word_embeddings=True)),                      # q/k norm, head_dim != D/H
]


@pytest.mark.parametrize("family,kw", FAMILIES)
def test_parity_with_transformers(tmp_path, family, kw):
    ref = make_model(str(tmp_path), family, **kw)
    ours, tok = load_model(str(tmp_path), device="cpu")
    V = ref.config.vocab_size
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (3, 200), generator=g)   # long enough for llama3 scaling to matter
    mask = torch.ones(3, 200, dtype=torch.bool)
    mask[1, :37] = False                              # left padding
    mask[2, :150] = False
    with torch.no_grad():
        assert (ref(x).logits - ours(x)).abs().max() < 1e-4
        a = ref(x, attention_mask=mask.long()).logits
        b = ours(x, mask=mask)
        assert (a - b)[mask].abs().max() < 1e-4
        # packed: three documents of one row must equal three separate runs
        lens = [50, 80, 70]
        docs = [torch.randint(0, V, (1, n), generator=g) for n in lens]
        packed = torch.cat(docs, 1)
        doc_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lens)], 1)
        out = ours(packed, doc_ids=doc_ids)
        sep = torch.cat([ref(d).logits for d in docs], 1)
        assert (out - sep).abs().max() < 1e-4


def test_kv_cache_decode_equals_full_forward(tiny):
    folder, _ = tiny
    m, _ = load_model(folder, device="cpu")
    x = torch.randint(0, m.cfg.vocab_size, (2, 30))
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[0, :6] = False
    with torch.no_grad():
        full = m(x, mask=mask)
        cache = KVCache(m.cfg, 2, 40, torch.float32, "cpu")
        steps = [m(x[:, :20], mask=mask[:, :20], cache=cache)]
        for t in range(20, 30):                       # one token at a time
            steps.append(m(x[:, t:t + 1], cache=cache))
        inc = torch.cat(steps, 1)
    assert (full - inc)[mask].abs().max() < 1e-4


def test_token_logprobs_match_log_softmax():
    torch.manual_seed(0)
    h = torch.randn(2, 700, 16, requires_grad=True)
    w = torch.randn(50, 16)
    t = torch.randint(0, 50, (2, 700))
    index = torch.arange(2 * 700)
    lp, ent = token_logprobs(h, w, index, t.flatten(), temperature=0.7, chunk=300, with_entropy=True)
    lp, ent = lp.view(2, 700), ent.view(2, 700)
    ref = torch.log_softmax((h @ w.t()) / 0.7, -1)
    assert (lp - ref.gather(-1, t[..., None]).squeeze(-1)).abs().max() < 1e-5
    assert (ent - -(ref.exp() * ref).sum(-1)).abs().max() < 1e-4
    g1, = torch.autograd.grad(lp.sum(), h)
    g2, = torch.autograd.grad(ref.gather(-1, t[..., None]).sum(), h)
    assert (g1 - g2).abs().max() < 1e-4


def test_embedded_smollm2_matches_transformers_gguf(smol):
    from transformers import AutoModelForCausalLM

    from lettingo import chat_prompt
    ours, tok = smol
    path = resolve("smollm2-135m")
    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                               dtype=torch.float32).eval()
    ids = torch.tensor([chat_prompt(tok, [{"role": "user", "content": "Recommend me a good comedy movie."}])])
    with torch.no_grad():
        assert (ref(ids).logits - ours(ids)).abs().max() <= 1e-3
        want = ref.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32)[0, ids.shape[1]:]
        x = ids
        for _ in range(32):  # plain greedy loop, no cache: the model alone
            x = torch.cat([x, ours(x, last_only=True).argmax(-1)], 1)
    assert x[0, ids.shape[1]:].tolist() == want.tolist()


def test_save_roundtrip_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM
    make_model(str(tmp_path / "a"), "qwen3", head_dim=16)
    ours, tok = load_model(str(tmp_path / "a"), device="cpu")
    save_model(ours, tok, str(tmp_path / "b"), shard_bytes=100_000)   # forces a sharded checkpoint
    assert os.path.isfile(tmp_path / "b" / "model.safetensors.index.json")
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "b"), dtype=torch.float32).eval()
    again, _ = load_model(str(tmp_path / "b"), device="cpu")
    x = torch.randint(0, ours.cfg.vocab_size, (2, 20))
    with torch.no_grad():
        assert (ref(x).logits - ours(x)).abs().max() < 1e-4
        assert (again(x) - ours(x)).abs().max() == 0


def test_bad_input_gives_clear_errors(tmp_path):
    with pytest.raises(LettingoError, match="not found"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(LettingoError, match="no config.json"):
        load_model(str(tmp_path))
    folder = tmp_path / "m"
    make_model(str(folder), "llama")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["MambaForCausalLM"]}))
    with pytest.raises(LettingoError, match="unsupported architecture 'MambaForCausalLM'"):
        load_model(str(folder))
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3, "intermediate_size": 100}))
    with pytest.raises(LettingoError,
                       match=r"missing \(\d+\): model\.layers\.2\..*shape mismatch"
                             r".*\(64, 96\) vs \(64, 100\)"):
        load_model(str(folder))


def test_cli_error_is_one_line(tmp_path):
    from conftest import run
    r = run("lettingo.py", tmp_path / "nope")
    assert r.returncode != 0 and r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr


@pytest.mark.cuda
@pytest.mark.parametrize("family,kw", FAMILIES[:1] + FAMILIES[3:])
def test_cuda_parity_with_transformers(tmp_path, family, kw):
    """On the GPU: fp32 logits vs transformers (on the GPU too), packed documents (flash-attn /
    SDPA rows) vs separate forwards in bf16, and greedy decoding equal to the CPU's."""
    ref = make_model(str(tmp_path), family, **kw).cuda()
    ours, tok = load_model(str(tmp_path), dtype=torch.float32, device="cuda")
    V = ref.config.vocab_size
    x = torch.randint(0, V, (2, 64), device="cuda")
    with torch.no_grad():
        assert (ref(x).logits - ours(x)).abs().max() < 1e-4
        bf, _ = load_model(str(tmp_path), dtype=torch.bfloat16, device="cuda")
        docs = [torch.randint(0, V, (1, n), device="cuda") for n in (40, 70)]
        packed = bf(torch.cat(docs, 1),
                    doc_ids=torch.cat([torch.full((1, n), i, device="cuda")
                                       for i, n in enumerate((40, 70))], 1))
        sep = torch.cat([bf(d) for d in docs], 1)
        assert (packed.float() - sep.float()).abs().max() < 0.05
    from rollout import generate
    cpu, _ = load_model(str(tmp_path), dtype=torch.float32, device="cpu")
    prompt = [tok("Toy Story (1995): rated 5/5.", add_special_tokens=False)["input_ids"]]
    a = generate(ours, prompt, max_new_tokens=12, temperature=0)[0][0].tokens
    b = generate(cpu, prompt, max_new_tokens=12, temperature=0)[0][0].tokens
    assert a == b
