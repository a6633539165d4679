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
from lettingo import LettingoError, chat_prompt, load_model  # noqa: E402
from rollout import Sampler, SamplingParams, cpu_decode_layout  # noqa: E402
from tools.cli import ArgParser, at_least, cli  # noqa: E402


def check_request(req):
    """A chat request this server can answer, with its defaults filled in; else ValueError (-> HTTP 400)."""
    if not isinstance(req, dict) or not isinstance(req.get("messages"), list) or not req["messages"]:
        raise ValueError("`messages` must be a non-empty list")
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


def decode_worker(sampler: Sampler, tok, pending: queue.Queue, batch_size: int):
    """Drain whatever requests are waiting and decode them as one batch per sampling setting."""
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
                params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, stop=stop)
                outs = sampler.generate([chat_prompt(tok, j["req"]["messages"]) for j in jobs], params,
                                        tokenizer=tok, batch_size=batch_size)
                for j, o in zip(jobs, outs):
                    j["result"] = o[0]
                    j["done"].set()
        except Exception as e:  # a bad request must not kill the server
            for job in batch:
                job["error"] = str(e)
                job["done"].set()


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
            if not self.path.rstrip("/").endswith("/chat/completions"):
                return self.reply(404, {"error": {"message": "only /v1/chat/completions"}})
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                check_request(req)
            except ValueError as e:
                return self.reply(400, {"error": {"message": f"bad request: {e}"}})
            job = {"req": req, "done": threading.Event()}
            pending.put(job)
            job["done"].wait()
            if "error" in job:
                return self.reply(500, {"error": {"message": job["error"]}})
            s = job["result"]
            choice = {"index": 0, "message": {"role": "assistant", "content": s.text},
                      "finish_reason": "length" if s.finish == "length" else "stop"}
            self.reply(200, {"id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion",
                             "created": int(time.time()), "model": model_name, "choices": [choice],
                             "usage": {"prompt_tokens": s.prompt_tokens, "completion_tokens": len(s.tokens),
                                       "total_tokens": s.prompt_tokens + len(s.tokens)}})

        def log_message(self, *a):
            pass

    server.RequestHandlerClass = Handler
    print(f"serving {model_name} on http://{host}:{server.server_address[1]}/v1/chat/completions", flush=True)
    server.serve_forever()


def main():
    p = ArgParser(description="OpenAI-compatible chat server for a local model.")
    p.add_argument("--model", default="smollm2-135m", help="model to serve: HF folder, .gguf or alias")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 = all)")
    p.add_argument("--port", type=at_least(0), default=8008, help="TCP port (0 = any free one)")
    p.add_argument("--batch-size", type=at_least(1), default=16,
                   help="max concurrent requests decoded together")
    p.add_argument("--device", default=None, help="cpu or cuda")
    a = p.parse_args()
    serve(a.model, a.host, a.port, a.batch_size, a.device)


if __name__ == "__main__":
    cli(main)
