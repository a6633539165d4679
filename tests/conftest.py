"""Shared fixtures: tiny random Llama / Qwen2 / Qwen3 checkpoints built with transformers (the
independent reference), with a small byte-level BPE tokenizer and a ChatML template."""
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# The references (transformers models, brute-force loops) are built on the CPU, and the 2-rank tests
# use gloo: on a GPU workstation the suite runs on the CPU as in CI -- this process and every child
# it starts. The GPU paths have their own tests, marked `cuda`: LETTINGO_TEST_CUDA=1 pytest -m cuda tests
CUDA_TESTS = os.environ.get("LETTINGO_TEST_CUDA") == "1"
if not CUDA_TESTS:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""     # before torch initialises CUDA

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["The user likes drama and comedy films, rates generously around 4.", "<user_profile>",
          "</user_profile>", "<rating>3.50</rating> 1 2 3 4 5 1.00 2.00 4.50 5.00",
          "<sentiment>like neutral dislike</sentiment>",
          "Toy Story (1995): rated 5/5. Heat (1995) rated 2/5. Action, Thriller, Romance, Sci-Fi, Horror."
          ] * 20


def make_tokenizer(folder):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    return fast


def make_model(folder, family="llama", seed=0, **overrides):
    """Save a tiny random HF model + tokenizer to `folder`; returns the transformers model (fp32)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config
    tok = make_tokenizer(folder)
    kw = dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=96, max_position_embeddings=2048,
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    kw.update(overrides)
    cfg = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family](**kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    if family == "qwen2":  # random init leaves biases at zero: make them matter
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("bias"):
                    p.normal_(0, 0.5)
    model.save_pretrained(folder)
    return model


@pytest.fixture
def tiny(tmp_path):
    """A tiny Llama folder and its transformers reference."""
    folder = str(tmp_path / "tiny")
    return folder, make_model(folder, "llama", tie_word_embeddings=True)


@pytest.fixture(scope="session")
def smol():
    """The embedded SmolLM2-135M (ours), loaded once per test session."""
    from lettingo import load_model
    return load_model("smollm2-135m", device="cpu")


def tiny_run_folder(d, users):
    """A tiny model and a small synthetic dataset (short histories) for the training-loop tests."""
    make_model(str(d / "model"), "llama", tie_word_embeddings=True)
    run("data/prepare.py", "synthetic", "--users", users, "--out", d / "data",
        "--test-users", 4 if users > 30 else 2, "--val-users", 4 if users > 30 else 2, "--profile-history", 3,
        check=True)
    return d


def run(script, *args, nproc=1, timeout=300, check=False):
    """The one launcher: a script of the repository (a path relative to it, or absolute) in a child
    process -- under torchrun when nproc > 1 -- from the repository root, without a process group's
    variables. check: fail with the output's tail unless it exits 0."""
    cmd = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"] if nproc > 1
           else [sys.executable])
    r = subprocess.run(cmd + [os.path.join(ROOT, script), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT, env=clean_env())
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def default_sigint():
    """A child's SIGINT back to the default before it starts (Popen's preexec_fn): a suite run in the
    background of a shell (`pytest &`) ignores SIGINT, and a child would inherit that, so a test's
    Ctrl-C would never reach it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def clean_env():
    """The environment without a process group's variables: a child never joins a test's own group."""
    return {k: v for k, v in os.environ.items()
            if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}


def checkpoint_weights(folder):
    """The model tensors of a checkpoint folder (RUN/ckpt-STEP)."""
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, "model", "model.safetensors"))


def optimized(model, lr):
    """A Policy around `model` as train.load_policy makes it: AdamW, constant lr."""
    from train import Policy
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    return Policy(model, None, None, None, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def pytest_configure(config):
    config.addinivalue_line("markers",
                            "cuda: needs a CUDA GPU (run with LETTINGO_TEST_CUDA=1 pytest -m cuda tests)")


def pytest_collection_modifyitems(config, items):
    reason = ("no CUDA GPU" if not torch.cuda.is_available() else "GPU tests run with LETTINGO_TEST_CUDA=1") \
        if not (CUDA_TESTS and torch.cuda.is_available()) else None
    for item in items:
        if reason and "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


class JSONHandler(BaseHTTPRequestHandler):
    """A stub server's request handler: `send` a body with its length; no request log."""

    def send(self, body: bytes):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def start_server(handler, port=0) -> ThreadingHTTPServer:
    """A stub HTTP server on 127.0.0.1 (any free port), serving from a thread."""
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
