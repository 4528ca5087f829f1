"""Plots of a study for the MLflow parent run: Pareto front, history, parameter importance, depth curves."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402

from llama_tuner.study.objectives import is_feasible, result_of  # noqa: E402


def pareto_front(view, path: Path) -> None:
    """tg against peak memory, coloured by context; infeasible trials as grey crosses."""
    fig, ax = plt.subplots(figsize=(8, 5))
    ok = [(t, result_of(t)) for t in view.trials]
    feas = [(t, r) for t, r in ok if r.ok and is_feasible(r, view.limits)]
    bad = [(t, r) for t, r in ok if r.ok and not is_feasible(r, view.limits)]
    if bad:
        ax.scatter([r.peak_memory_bytes / 2**30 for _, r in bad], [r.tg_mean for _, r in bad], marker="x",
                   c="grey", label="infeasible")
    if feas:
        sc = ax.scatter([r.peak_memory_bytes / 2**30 for _, r in feas], [r.tg_mean for _, r in feas],
                        c=[r.config.n_ctx for _, r in feas], cmap="viridis", norm=matplotlib.colors.LogNorm())
        fig.colorbar(sc, ax=ax, label="n_ctx")
    for name, p in view.presets.items():
        f = p.candidate.figures
        ax.annotate(name, (f.peak_memory_bytes / 2**30, f.tg_mean), textcoords="offset points", xytext=(5, 5))
    ax.axvline(view.limits.budget_bytes / 2**30, color="red", linestyle="--", label="budget")
    ax.set_xlabel("peak memory (GiB)")
    ax.set_ylabel("generation (t/s)")
    ax.set_title(f"{view.name}: tg vs memory")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def history(view, path: Path) -> None:
    """tg of each trial in order, with the best feasible so far."""
    fig, ax = plt.subplots(figsize=(8, 4))
    xs, ys, best, bests = [], [], None, []
    for t in view.trials:
        r = result_of(t)
        if r.ok:
            xs.append(t.number)
            ys.append(r.tg_mean)
            if is_feasible(r, view.limits) and (best is None or r.tg_mean > best):
                best = r.tg_mean
            bests.append(best)
    ax.scatter(xs, ys, s=14, label="trial tg")
    ax.step(xs, bests, where="post", color="orange", label="best feasible")
    ax.set_xlabel("trial")
    ax.set_ylabel("generation (t/s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def importance(view, path: Path) -> bool:
    """Importance of each parameter for a high tg; False when there is too little data.

    Optuna 5's default evaluator (PED-ANOVA) looks for what makes the target low, so the
    target is the negated generation rate.
    """
    try:
        with warnings.catch_warnings():  # its reminder that low is good: the negation above handles it
            warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator computes")
            imp = optuna.importance.get_param_importances(view.study, target=lambda t: -t.values[0])
    except (RuntimeError, ValueError, ZeroDivisionError):
        return False
    if not imp:
        return False
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.4 * len(imp)))
    names = list(imp)[::-1]
    ax.barh(names, [imp[n] for n in names])
    ax.set_xlabel("importance for a high tg (PED-ANOVA)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def depth_curves(view, path: Path) -> bool:
    """tg and pp against depth for every trial with a depth curve (chat, reasoning, long, custom workloads),
    the presets drawn bold; False when no trial has one."""
    curves = [(t.number, r) for t in view.trials if (r := result_of(t)) and r.ok and r.curve]
    if not curves:
        return False
    chosen = {p.candidate.trial: name for name, p in view.presets.items()}
    fig, (tg_ax, pp_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    for number, r in curves:
        name = chosen.get(number)
        style = dict(linewidth=2.2, label=f"{name} (trial {number})") if name else dict(linewidth=0.7, alpha=0.4,
                                                                                          color="grey")
        c = r.curve
        tg_ax.plot(c.depths, c.tg_rates(), marker="o" if name else None, **style)
        mids = [(a + b) / 2 for a, b in zip(c.depths, c.depths[1:])]
        pp_ax.plot(mids, c.pp_rates(), marker="o" if name else None, **style)
    tg_ax.set_xlabel("depth (tokens in the context)")
    tg_ax.set_ylabel("generation (t/s)")
    pp_ax.set_xlabel("depth (middle of the filled span)")
    pp_ax.set_ylabel("prompt (t/s)")
    tg_ax.set_title(f"{view.name}: depth curves")
    tg_ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plots(view, out: Path) -> list[str]:
    """Write every plot that has data; returns the file names."""
    written = []
    if view.trials and depth_curves(view, out / "depth_curves.png"):
        written.append("depth_curves.png")
    if view.trials:
        pareto_front(view, out / "pareto_front.png")
        history(view, out / "optimization_history.png")
        written += ["pareto_front.png", "optimization_history.png"]
        if importance(view, out / "param_importance.png"):
            written.append("param_importance.png")
    return written
