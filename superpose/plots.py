"""The plots of a report and of a sweep, as PNG files (matplotlib's Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

from .runs import Run
from .stats import first_at_or_below, si, step_count, switch_spike, value_at

PLOTS = {
    "val_loss_vs_step.png": "Validation loss vs step (= FLOPs)",
    "val_loss_vs_seconds.png": "Validation loss vs training wall-clock",
    "val_loss_vs_tokens.png": "Validation loss vs data tokens seen",
    "train_loss_switch.png": "Training loss around the switch",
}


def _switch_x(run: Run, axis: str) -> float | None:
    """Where the switch sits on an axis (step, elapsed seconds, data tokens)."""
    if run.switch_step is None:
        return None
    if axis == "step":
        return float(run.switch_step)
    return run.at_step({"elapsed": "elapsed", "tokens": "tokens_seen"}[axis], run.switch_step)

def plot_runs(runs: list[Run], out: Path, wall_clock_note: str | None = None) -> None:
    """The validation curves against step, wall-clock and data; ``wall_clock_note`` goes under the
    wall-clock plot's title when its x-axis cannot be compared between the runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    target = runs[0].curve.final("loss")
    # The step-0 loss (~ln V) would squash every curve: the y-axis starts at the highest later point.
    top = max(r.curve.loss[1:].max() for r in runs) + 0.1
    bottom = min(r.curve.loss.min() for r in runs) - 0.1
    axes = {"step": ("step", "training step (= model FLOPs)"),
            "seconds": ("elapsed", "training wall-clock (s, validation excluded)"),
            "tokens": ("tokens", "data tokens seen")}
    for name, (axis, xlabel) in axes.items():
        fig, ax = plt.subplots(figsize=(8, 5))
        for i, run in enumerate(runs):
            color = colors[i % len(colors)]
            ax.plot(getattr(run.curve, axis), run.curve.loss, "o-", ms=3, color=color, label=run.label)
            switch = _switch_x(run, axis)
            if switch is not None:
                ax.axvline(switch, color=color, ls="--", lw=1, label=f"{run.name}: switch to next-token")
            crossing = first_at_or_below(run.curve.step, run.curve.loss, target) if i else None
            if crossing is not None:
                at = value_at(run.curve.step, getattr(run.curve, axis), crossing)
                ax.plot([at], [target], "*", ms=12, color=color, label=f"{run.name}: reaches {runs[0].name}'s final loss")
        ax.axhline(target, color="grey", ls=":", lw=1, label=f"{runs[0].name} final ({target:.3f})")
        ax.set_ylim(bottom, top)
        if axis == "tokens":
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: si(v)))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/token)")
        note = wall_clock_note if name == "seconds" and wall_clock_note else None
        ax.set_title(PLOTS[f"val_loss_vs_{name}.png"] + (f"\n({note})" if note else ""), color="firebrick" if note else "black")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"val_loss_vs_{name}.png", dpi=120)
        plt.close(fig)
    plot_switch(runs, out, plt, colors)

def plot_switch(runs: list[Run], out: Path, plt, colors) -> None:
    """Training loss (every logged step) around the first TST run's switch, all runs overlaid."""
    switches = [r.switch_step for r in runs if r.switch_step is not None]
    fig, ax = plt.subplots(figsize=(8, 5))
    if switches:
        steps = runs[0].config.train.steps
        lo, hi = max(0, min(switches) - 0.15 * steps), min(steps, max(switches) + 0.35 * steps)
        ys = []
        for i, run in enumerate(runs):
            x, y = run.train_series("loss")
            keep = (x >= lo) & (x <= hi)
            ax.plot(x[keep], y[keep], "-", lw=1.2, color=colors[i % len(colors)], label=f"{run.label} training loss")
            ys.append(y[keep])
            if run.switch_step is not None:
                ax.axvline(run.switch_step, color=colors[i % len(colors)], ls="--", lw=1, label=f"{run.name}: switch")
                spike = switch_spike(x, y, run.switch_step)
                if spike["measured"]:
                    ax.axhline(spike["pre_switch_loss"], color=colors[i % len(colors)], ls=":", lw=1,
                               label=f"{run.name}: pre-switch level {spike['pre_switch_loss']:.2f}")
                    if spike["recovered"]:
                        at = run.switch_step + spike["recovery_steps"]
                        ax.plot([at], [spike["pre_switch_loss"]], "v", ms=8, color=colors[i % len(colors)],
                                label=f"{run.name}: back under it after {step_count(spike['recovery_steps'])}")
        ax.set_xlim(lo, hi)
        ax.set_xlabel("training step")
        ax.set_ylabel("training loss (nats; phase 1 = MCE without log s)")
        ax.set_title(PLOTS["train_loss_switch.png"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no run has a superposition stage", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(out / "train_loss_switch.png", dpi=120)
    plt.close(fig)


def plot_sweep(rows: list[dict], path: Path) -> None:
    """Final validation loss vs bag size, one line per ratio, the baseline as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in rows if r["bag_size"] == 1)
    fig, ax = plt.subplots(figsize=(7, 5))
    for ratio in sorted({r["ratio"] for r in rows if r["bag_size"] > 1}):
        points = sorted((r["bag_size"], r["final_val_loss"]) for r in rows if r["ratio"] == ratio and r["bag_size"] > 1)
        ax.plot(*zip(*points), "o-", label=f"TST r = {ratio:g}")
    ax.axhline(base["final_val_loss"], color="black", ls="--", label=f"baseline ({base['final_val_loss']:.3f})")
    ax.set_xticks(sorted({r["bag_size"] for r in rows if r["bag_size"] > 1}))
    ax.set_xlabel("bag size s")
    ax.set_ylabel(f"final validation loss after {base['steps']} steps (nats)")
    ax.set_title("TST sweep at equal FLOPs: final validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
