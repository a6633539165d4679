"""tools/plot.py -- the curves of a training run: RUN_DIR/curves.png from its metrics.jsonl and
validation.jsonl (a GRPO run, or a DPO / SFT run of dpo.py). Needs matplotlib.

    python tools/plot.py runs/grpo-demo
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lettingo import ArgParser, LettingoError, cli, read_jsonl  # noqa: E402


def plot_curves(run_dir, panels, title):
    """One figure per run from metrics.jsonl / validation.jsonl. panels: [(panel title, [(file, key,
    label, style)])]; style "band:KEY" draws KEY as a +- band; "stack" stacks the series as areas.
    matplotlib is optional: a clear error says how to get it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LettingoError("plotting needs matplotlib: pip install matplotlib")
    files = {}
    for f in ("metrics.jsonl", "validation.jsonl"):
        path = os.path.join(run_dir, f)
        files[f] = read_jsonl(path) if os.path.isfile(path) else []
    if not files["metrics.jsonl"]:
        raise LettingoError(f"{run_dir}: no metrics.jsonl to plot")
    cols = 3
    fig, axes = plt.subplots((len(panels) + cols - 1) // cols, cols,
                             figsize=(5 * cols, 3.2 * ((len(panels) + cols - 1) // cols)), squeeze=False)
    for ax, (name, series) in zip(axes.flat, panels):
        stack = []
        for f, key, label, style in series:
            pts = [(r["step"], r[key], r) for r in files[f] if r.get(key) is not None]
            if not pts:
                continue
            x, y = [p[0] for p in pts], [p[1] for p in pts]
            if style == "stack":
                stack.append((x, y, label))
                continue
            ax.plot(x, y, style if style and not style.startswith("band:") else "-", label=label,
                    marker="o" if len(x) < 12 else None)
            if style and style.startswith("band:"):
                sd = [p[2].get(style[5:], 0.0) for p in pts]
                ax.fill_between(x, [a - b for a, b in zip(y, sd)], [a + b for a, b in zip(y, sd)], alpha=0.2)
        if stack:
            ax.stackplot(stack[0][0], *[s[1] for s in stack], labels=[s[2] for s in stack], alpha=0.7)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{title}: {run_dir}", fontsize=11)
    fig.tight_layout()
    path = os.path.join(run_dir, "curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def validation_panel(run_dir):
    """The plot panel of what validate() logs: the metric on all users, on closed-profile users,
    and the no-profile / template lines."""
    path = os.path.join(run_dir, "validation.jsonl")
    rows = read_jsonl(path) if os.path.isfile(path) else []
    key, v = ("accuracy" if rows and "val_accuracy" in rows[0] else "MAE"), "validation.jsonl"
    return (f"validation {key}", [(v, f"val_{key}", "all users", "-"),
                                  (v, f"val_{key}_closed", "users whose profile closed", "-"),
                                  (v, f"val_no_profile_{key}_closed", "no profile, same users", "--"),
                                  (v, f"val_no_profile_{key}", "no profile, all users", ":"),
                                  (v, f"val_template_{key}", "template profile (code)", ":")])


def plot_grpo(run_dir):
    """RUN/curves.png: training reward, format, validation (all users, closed-profile users, with the
    no-profile and template lines), KL, entropy, clipping, response length, time per step."""
    m, v = "metrics.jsonl", "validation.jsonl"
    return plot_curves(run_dir, [
        ("training reward (mean +- std)", [(m, "reward_mean", "reward", "band:reward_std")]),
        ("format rate (profile closed)", [(m, "format_rate", "training samples", "-"),
                                          (v, "val_format_rate", "validation (greedy)", "-")]),
        validation_panel(run_dir),
        ("KL to reference (k3)", [(m, "kl", "kl", "-")]),
        ("entropy (per token)", [(m, "entropy", "entropy", "-")]),
        ("clip fraction", [(m, "clip_frac", "clipped tokens", "-")]),
        ("response length (tokens)", [(m, "response_length", "mean", "-")]),
        ("time per step (s)", [(m, "time_rollout", "rollout", "stack"), (m, "time_reward", "reward", "stack"),
                               (m, "time_update", "update", "stack")]),
        ("gradient norm", [(m, "grad_norm", "before clipping", "-")]),
        ("sampler-trainer mismatch (per token)", [(m, "mismatch_kl", "k3 KL(sampler || trainer)", "-"),
                                                  (m, "mismatch_out", "ratio outside [0.5, 2]", "--")]),
    ], "GRPO")


def plot_dpo(run_dir):
    """RUN/curves.png for a DPO (OUT/train) or SFT (OUT/sft) run: loss, preference accuracy,
    margins, log-probs, validation (all users, closed-profile users, no-profile / template lines)."""
    m, v = "metrics.jsonl", "validation.jsonl"
    return plot_curves(run_dir, [
        ("loss", [(m, "loss", "DPO loss", "-"), (m, "nll", "SFT NLL per token", "-")]),
        ("preference accuracy", [(m, "pref_accuracy", "implicit reward chosen > rejected", "-")]),
        ("implicit reward", [(m, "reward_margin", "margin (chosen - rejected)", "-"),
                             (m, "chosen_reward", "chosen", "--")]),
        ("summed log-probs", [(m, "logp_chosen", "chosen", "-"), (m, "logp_rejected", "rejected", "-")]),
        validation_panel(run_dir),
        ("validation format rate", [(v, "val_format_rate", "profile closed", "-")]),
        ("gradient norm", [(m, "grad_norm", "before clipping", "-")]),
    ], "DPO" if os.path.basename(os.path.normpath(run_dir)) != "sft" else "SFT warm start")


def main():
    p = ArgParser(description="Draw RUN_DIR/curves.png (needs matplotlib).")
    p.add_argument("run_dir", metavar="RUN_DIR",
                   help="a GRPO run folder, or a DPO / SFT one (OUT/train, OUT/sft)")
    run_dir = p.parse_args().run_dir
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise LettingoError(f"{run_dir}: no metrics.jsonl to plot")
    grpo = "reward_mean" in read_jsonl(path)[0]
    (plot_grpo if grpo else plot_dpo)(run_dir)


if __name__ == "__main__":
    cli(main)
