"""grpo.py's training loop with a toy reward -- the share of low-id tokens in the response -- so
learning, multi-rank parity and resume can be tested on a tiny random model in seconds.
    python tests/toy_grpo.py <grpo.py flags>        (or under torchrun)
TOY_JUDGE_DIES_AFTER=K: from the (K+1)-th step on, the toy judge fails on every sample, as a judge
server that was killed. TOY_JUDGE_URL: a real judge server is asked once per sample (reward.HTTPJudge);
where it does not answer, the sample's judge failed."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grpo  # noqa: E402
from reward import HTTPJudge, Scored  # noqa: E402

LOW = 100   # reward: the share of response tokens whose id is below LOW (single bytes in the tiny BPE)
DIES_AFTER = int(os.environ.get("TOY_JUDGE_DIES_AFTER", -1))
URL = os.environ.get("TOY_JUDGE_URL")
judge = HTTPJudge(URL, mode="decode", timeout=2, retries=1, backoff=0.05) if URL else None
calls = []


class TokenShare:
    """The rewards object grpo.run takes (grpo.JudgeRewards' interface)."""

    def score(self, samples, outs):
        calls.append(1)
        answers = (judge.predict([[{"role": "user", "content": "Rate it."}]] * len(outs), "rating") if judge
                   else [None if 0 <= DIES_AFTER < len(calls) else 4.0] * len(outs))
        return [Scored(None, None, "judge_failed") if a is None else
                Scored(sum(t < LOW for t in o.tokens) / max(len(o.tokens), 1)) for a, o in zip(answers, outs)]


def main():
    grpo.run(grpo.parse_config(sys.argv[1:]), rewards=TokenShare())


if __name__ == "__main__":
    grpo.cli(main)
    grpo.close_distributed()
