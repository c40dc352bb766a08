"""The report's figure: training loss and both validation losses of the two runs."""

from __future__ import annotations

from pathlib import Path


def make_plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = summary["runs"]
    styles = {"run_expand": ("block expansion (new blocks only)", "tab:blue"),
              "run_full": ("full fine-tuning (original model)", "tab:red")}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, (label, color) in styles.items():
        train = runs[name]["train"]
        xs, ys = [t[0] for t in train], [t[1] for t in train]
        axes[0].plot(xs, ys, color=color, lw=0.6, alpha=0.3)
        window = max(1, len(ys) // 15)
        smooth = [sum(ys[max(0, i - window + 1):i + 1]) / len(ys[max(0, i - window + 1):i + 1])
                  for i in range(len(ys))]
        axes[0].plot(xs, smooth, color=color, lw=1.6, label=f"{label}, mean of {window}")
        ev = runs[name]["eval"]
        for ax, key in ((axes[1], "valid_loss/general"), (axes[2], "valid_loss/domain")):
            pts = [(r["iteration"], r[key]) for r in ev if key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=label, ms=3)
    base = summary["comparison"]
    for ax, key in ((axes[1], "general"), (axes[2], "domain")):
        if base[key]["base"] is not None:
            ax.axhline(base[key]["base"], color="gray", ls="--", lw=1, label="base model (before)")
    axes[0].set_title("training loss (domain text; faint: per step)")
    axes[1].set_title("validation loss: general text (forgetting)")
    axes[2].set_title("validation loss: domain text (learning)")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"LLaMA Pro quickstart ({summary['size']}): block expansion vs full fine-tuning, "
                 f"same data, steps and lr")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
