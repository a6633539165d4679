"""tools/serve.py -- an OpenAI-compatible chat-completions server for a local model (a judge or
a remote profile writer for the other scripts); concurrent requests are decoded as one batch.

    python tools/serve.py --model smollm2-135m --port 8008
"""
from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from lettingo import (DEFAULT_MODEL, ArgParser, LettingoError, at_least, chat_prompt, cli,  # noqa: E402
                      load_model, pack_row)
from rollout import Sampler, SamplingParams, cpu_decode_layout  # noqa: E402


def check_request(req):
    """A chat request this server can answer, with its defaults filled in; else ValueError (-> HTTP 400)."""
    if (not isinstance(req, dict) or not isinstance(req.get("messages"), list) or not req["messages"]
            or not all(isinstance(m, dict) for m in req["messages"])):
        raise ValueError("`messages` must be a non-empty list of messages")
    if req.get("stream"):
        raise ValueError("streaming is not supported by this server; send \"stream\": false")
    if req.get("n", 1) != 1:
        raise ValueError("only n = 1 is supported")
    mt = req.get("max_tokens", req.get("max_completion_tokens"))
    mt = 256 if mt is None else mt
    if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
        raise ValueError(f"`max_tokens` must be an integer >= 1, got {mt!r}")
    t = req.get("temperature")
    t = 0.0 if t is None else t
    if not isinstance(t, (int, float)) or isinstance(t, bool) or t < 0:
        raise ValueError(f"`temperature` must be a number >= 0, got {t!r}")
    req["max_tokens"], req["temperature"] = mt, float(t)
    k = req.get("top_logprobs")
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_LOGPROBS
                          or not req.get("logprobs")):
        raise ValueError(f"`top_logprobs` must be an integer in [0, {MAX_LOGPROBS}] with `logprobs`: true, "
                         f"got {k!r}")
    if req.get("continue_final_message") and (req["messages"][-1].get("role") != "assistant"
                                              or req.get("add_generation_prompt", True)):
        raise ValueError("`continue_final_message` continues a final assistant message and needs "
                         "`add_generation_prompt`: false")


MAX_LOGPROBS = 20          # vLLM's default --max-logprobs


def request_prompt(tok, req) -> list[int]:
    """The prompt's token ids; with continue_final_message the reply continues the last (assistant)
    message, e.g. a forced answer tag."""
    msgs = req["messages"]
    if req.get("continue_final_message"):
        return chat_prompt(tok, msgs[:-1], answer_prefix=msgs[-1]["content"])
    return chat_prompt(tok, msgs)


@torch.no_grad()
def token_logprobs_json(model, tok, seqs, k: int) -> list[list[dict]]:
    """Per (prompt, generated tokens): OpenAI's logprobs.content -- each token's log-prob under the
    model's raw distribution (before temperature, as vLLM reports it) and the k most likely tokens
    there. One packed forward over all the sequences."""
    device = model.lm_head.weight.device
    row = pack_row(seqs, False, device)
    h = model.hidden(row.tokens, **row.inputs())[0]                                      # [N, D]
    out = []
    for (_, tokens), (last, start, n) in zip(seqs, row.spans):
        at = torch.tensor([last, *range(start, start + n - 1)][:n], device=device)       # predicts token j
        logp = torch.log_softmax(model.lm_head(h[at]).float(), -1)                       # [n, V]
        top = logp.topk(k, -1)
        entry = lambda i, lp: {"token": tok.decode([i]), "logprob": lp,
                               "bytes": list(tok.decode([i]).encode())}
        out.append([{**entry(t, logp[j, t].item()),
                     "top_logprobs": [entry(i, v) for v, i in zip(top.values[j].tolist(),
                                                                   top.indices[j].tolist())]}
                    for j, t in enumerate(tokens)])
    return out


def decode_worker(sampler: Sampler, tok, pending: queue.Queue, batch_size: int):
    """Drain whatever requests are waiting and decode them as one batch per sampling setting; the
    ones that ask for log-probs are then scored in one packed forward."""
    while True:
        batch = [pending.get()]
        while len(batch) < batch_size:
            try:
                batch.append(pending.get(timeout=0.005))
            except queue.Empty:
                break
        try:
            groups: dict = {}
            for job in batch:
                req = job["req"]
                stop = req.get("stop") or ()
                key = (req["max_tokens"], req["temperature"],
                       (stop,) if isinstance(stop, str) else tuple(stop))
                groups.setdefault(key, []).append(job)
            for (max_tokens, temperature, stop), jobs in groups.items():
                params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, stop=stop,
                                        batch_size=batch_size)
                prompts = [request_prompt(tok, j["req"]) for j in jobs]
                outs = [o[0] for o in sampler.generate(prompts, params, tokenizer=tok)]
                scored = [i for i, j in enumerate(jobs) if j["req"].get("logprobs")]
                for i, lp in zip(scored, token_logprobs_json(
                        sampler.model, tok, [(prompts[i], outs[i].tokens) for i in scored],
                        max(jobs[i]["req"].get("top_logprobs") or 0 for i in scored)) if scored else []):
                    jobs[i]["logprobs"] = lp
                for j, o in zip(jobs, outs):
                    j["result"] = o
                    j["done"].set()
        except Exception as e:  # a bad request must not kill the server
            for job in batch:
                job["error"] = str(e)
                job["done"].set()


def completion_json(model_name: str, req: dict, s, logprobs: list[dict] | None) -> dict:
    """A chat.completion in OpenAI's shape; logprobs: the request's token entries, if it asked."""
    choice = {"index": 0, "message": {"role": "assistant", "content": s.text},
              "finish_reason": "length" if s.finish == "length" else "stop"}
    if logprobs is not None:
        k = req.get("top_logprobs") or 0      # the batch computed the most any request asked for
        choice["logprobs"] = {"content": [{**c, "top_logprobs": c["top_logprobs"][:k]} for c in logprobs]}
    return {"id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion", "created": int(time.time()),
            "model": model_name, "choices": [choice],
            "usage": {"prompt_tokens": s.prompt_tokens, "completion_tokens": len(s.tokens),
                      "total_tokens": s.prompt_tokens + len(s.tokens)}}


def serve(model_name: str, host: str, port: int, batch_size: int, device: str | None):
    try:          # bind first: a port in use is an error now, not after the model has loaded
        server = ThreadingHTTPServer((host, port), None)
    except OSError as e:
        raise LettingoError(f"cannot listen on {host}:{port}: {e.strerror} "
                            "(another server there? pick --port)")
    model, tok = load_model(model_name, device=device)
    pending: queue.Queue = queue.Queue()
    threading.Thread(target=decode_worker, args=(Sampler(cpu_decode_layout(model)), tok, pending, batch_size),
                     daemon=True).start()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"          # keep-alive: a judge reuses its connections

        def reply(self, code, obj):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") in ("/v1/models", "/health"):
                return self.reply(200, {"object": "list", "data": [{"id": model_name, "object": "model"}]})
            self.reply(404, {"error": {"message": "not found"}})

        def do_POST(self):
            try:   # the body is read whatever the reply: on a kept-alive connection the next request follows
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            except ValueError:
                self.close_connection = True
                return self.reply(400, {"error": {"message": "bad request: no valid Content-Length"}})
            if not self.path.rstrip("/").endswith("/chat/completions"):
                return self.reply(404, {"error": {"message": "only /v1/chat/completions"}})
            try:
                req = json.loads(body)
                check_request(req)
            except ValueError as e:
                return self.reply(400, {"error": {"message": f"bad request: {e}"}})
            job = {"req": req, "done": threading.Event()}
            pending.put(job)
            job["done"].wait()
            if "error" in job:
                return self.reply(500, {"error": {"message": job["error"]}})
            self.reply(200, completion_json(model_name, req, job["result"], job.get("logprobs")))

        def log_message(self, *a):
            pass

    server.RequestHandlerClass = Handler
    print(f"serving {model_name} on http://{host}:{server.server_address[1]}/v1/chat/completions", flush=True)
    server.serve_forever()


def main():
    p = ArgParser(description="OpenAI-compatible chat server for a local model.")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model to serve: HF folder, .gguf or alias")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 = all)")
    p.add_argument("--port", type=at_least(0), default=8008, help="TCP port (0 = any free one)")
    p.add_argument("--batch-size", type=at_least(1), default=SamplingParams.batch_size,
                   help="max concurrent requests decoded together")
    p.add_argument("--device", default=None, help="cpu or cuda")
    a = p.parse_args()
    serve(a.model, a.host, a.port, a.batch_size, a.device)


if __name__ == "__main__":
    cli(main)
