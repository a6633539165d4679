"""grpo.py's training loop with a toy reward -- the share of low-id tokens in the response -- so
learning, multi-rank parity and resume can be tested on a tiny random model in seconds.
    python tests/toy_grpo.py <grpo.py flags>        (or under torchrun)
TOY_JUDGE_DIES_AFTER=K: from the (K+1)-th step on, the toy judge fails on every sample, as a judge
server that was killed."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grpo  # noqa: E402
from reward import Scored  # noqa: E402

LOW = 100   # reward: the share of response tokens whose id is below LOW (single bytes in the tiny BPE)
DIES_AFTER = int(os.environ.get("TOY_JUDGE_DIES_AFTER", -1))
calls = []


def token_share(samples, outs):
    calls.append(1)
    if 0 <= DIES_AFTER < len(calls):
        return [Scored(None, None, "judge_failed") for _ in outs]
    return [Scored(sum(t < LOW for t in o.tokens) / max(len(o.tokens), 1)) for o in outs]


if __name__ == "__main__":
    grpo.cli(lambda: grpo.run(grpo.parse_config(sys.argv[1:]), scorer=token_share))
    grpo.close_distributed()
