"""The report's figures, drawn with matplotlib and returned as SVG text (the page embeds them as data URIs).

matplotlib is imported here only, when a report is written: `import thresher` stays fast. Figures are made with
`matplotlib.figure.Figure` directly (no pyplot), so nothing global such as a GUI backend is touched.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from thresher.report.collect import Comparison, EmbeddingMap, Lineage, ScoreHistogram, StepInfo, Training, depths

BLUE, ORANGE, GREEN, RED, GREY, PURPLE = "#3b6fd4", "#e8833a", "#2e9e6a", "#d64545", "#9aa3ad", "#8a5cd1"
STATUS_COLOURS = {"done": "#dff3e8", "cached": "#e3ecfb", "failed": "#fbe0e0", "running": "#fff4d6", "pending": "#eef0f2"}


def _figure(w: float, h: float) -> Any:
    import matplotlib
    from matplotlib.figure import Figure

    matplotlib.rcParams.update({
        "svg.fonttype": "none", "font.family": "DejaVu Sans", "font.size": 9, "axes.spines.top": False,
        "axes.spines.right": False, "axes.titlesize": 10, "axes.titleweight": "bold", "axes.grid": True,
        "grid.alpha": 0.25, "legend.frameon": False, "svg.hashsalt": "thresher",
    })  # fmt: skip
    return Figure(figsize=(w, h), layout="constrained")


def to_svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    return buf.getvalue()


def dag(steps: list[StepInfo]) -> str:
    """Steps in layers (a source on top, each step one layer below its deepest parent), an arrow per edge."""
    layer = depths(steps)
    rows: dict[int, list[StepInfo]] = {}
    for s in steps:
        rows.setdefault(layer[s.name], []).append(s)
    width = max(len(r) for r in rows.values())
    fig = _figure(max(5.0, 2.6 * width), 0.62 * len(rows) + 0.3)
    ax = fig.add_subplot()
    ax.set_axis_off()
    pos: dict[str, tuple[float, float]] = {}
    for d, members in rows.items():
        for i, s in enumerate(members):
            pos[s.name] = ((i + 0.5) * width / len(members), -d)
    for s in steps:
        for p in s.parents:
            if p in pos:
                ax.annotate("", xy=(pos[s.name][0], pos[s.name][1] + 0.3), xytext=(pos[p][0], pos[p][1] - 0.3),
                            arrowprops={"arrowstyle": "-|>", "color": "#6b7785", "lw": 1.1, "shrinkA": 0, "shrinkB": 0})
    for s in steps:
        x, y = pos[s.name]
        counts = f"{s.rows_out if s.rows_out is not None else '-'} out"
        if s.rows_rejected:
            counts += f" · {s.rows_rejected} rejected"
        if s.rows_failed:
            counts += f" · {s.rows_failed} failed"
        ax.text(x, y, f"{s.name}\n{s.cls} · {counts}", ha="center", va="center", fontsize=8.5,
                bbox={"boxstyle": "round,pad=0.45", "fc": STATUS_COLOURS.get(s.status, "#eef0f2"), "ec": "#8994a0"})
    ax.set_xlim(-0.1, width + 0.1)
    ax.set_ylim(-len(rows) + 0.5, 0.5)
    return to_svg(fig)


def _stacked(names: list[str], series: list[tuple[list[float], str, str]], xlabel: str) -> str:
    """Horizontal bars, one per name (first on top), each split into the series' parts."""
    fig = _figure(7.5, 0.32 * len(names) + 1.1)
    ax = fig.add_subplot()
    left = np.zeros(len(names))
    for values, colour, label in series:
        v = np.array(values[::-1], dtype=float)
        ax.barh(names[::-1], v, left=left, color=colour, label=label)
        left += v
    ax.set_xlabel(xlabel)
    ax.grid(axis="y", visible=False)
    ax.legend(loc="lower right", ncols=len(series), bbox_to_anchor=(1.0, 1.0))
    return to_svg(fig)


def accounting(steps: list[StepInfo]) -> str:
    """Per step, the rows it was given split into out / rejected / failed."""
    return _stacked([s.name for s in steps], [
        ([s.rows_out or 0 for s in steps], GREEN, "out"),
        ([s.rows_rejected or 0 for s in steps], ORANGE, "rejected"),
        ([s.rows_failed or 0 for s in steps], RED, "failed"),
    ], "rows")  # fmt: skip


def histogram(h: ScoreHistogram) -> str:
    fig = _figure(4.6, 2.9)
    ax = fig.add_subplot()
    v = h.values
    distinct, counts = np.unique(v, return_counts=True)
    if len(distinct) <= 15:  # a judge's 0-5 (half points) scale: one bar per value said
        gap = float(np.diff(distinct).min()) if len(distinct) > 1 else 1.0
        ax.bar(distinct, counts, width=0.8 * gap, color=BLUE, alpha=0.85)
        ax.set_xticks(distinct, [f"{x:g}" for x in distinct])
    else:
        ax.hist(v, bins=min(40, max(8, int(np.sqrt(len(v))))), color=BLUE, alpha=0.85, edgecolor="white", linewidth=0.5)
    colours = [RED, PURPLE, ORANGE, GREEN]
    for i, (x, label) in enumerate(h.thresholds):
        ax.axvline(x, color=colours[i % len(colours)], lw=1.6, ls="--", label=label)
    ax.set_title(f"{h.column}  (n={len(v)}, mean {v.mean():.3g})")
    ax.set_xlabel(f"{h.column} (from step {h.step})")
    ax.set_ylabel("rows")
    if h.thresholds:  # headroom above the bars for the legend
        ax.set_ylim(top=ax.get_ylim()[1] * (1.2 + 0.1 * len(h.thresholds)))
        ax.legend(fontsize=7.5, loc="upper left")
    return to_svg(fig)


def comparison(c: Comparison) -> str:
    """Each score's distribution in the pool, in each selection and in the random baseline (box plots)."""
    cols = list(c.scores)
    fig = _figure(min(12.0, 3.4 * len(cols) + 1.0), 3.2)
    axes = fig.subplots(1, len(cols), squeeze=False)[0]
    for ax, col in zip(axes, cols, strict=True):
        per = c.scores[col]
        labels = list(per)
        data = [per[k] if len(per[k]) else np.array([np.nan]) for k in labels]
        box = ax.boxplot(data, patch_artist=True, showmeans=True, widths=0.6,
                         meanprops={"marker": "D", "markerfacecolor": "white", "markeredgecolor": "black", "markersize": 4})
        for patch, k in zip(box["boxes"], labels, strict=True):
            patch.set_facecolor(GREY if k == "pool" else ORANGE if k in c.random else BLUE)
            patch.set_alpha(0.8)
        ax.set_xticks(range(1, len(labels) + 1), [f"{k}\n(n={len(per[k])})" for k in labels], fontsize=7.5)
        ax.set_title(col)
    return to_svg(fig)


def embedding(m: EmbeddingMap) -> str:
    """PCA of the stored vectors: left coloured by near-duplicate group, right by what the selection kept."""
    import matplotlib

    panels = 2 if m.selected is not None or m.random is not None else 1
    fig = _figure(5.0 * panels, 4.2)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    big = len(m.xy) > 1500
    x, y = m.xy[:, 0], m.xy[:, 1]
    ax = axes[0]
    sizes = np.bincount(m.group[m.group >= 0]) if (m.group >= 0).any() else np.zeros(0, dtype=int)
    in_group = np.array([g >= 0 and sizes[g] > 1 for g in m.group], dtype=bool)
    ax.scatter(x[~in_group], y[~in_group], s=8, c=GREY, alpha=0.5, lw=0, label="no near duplicate", rasterized=big)
    if in_group.any():
        cmap = matplotlib.colormaps["tab20"]
        colours = [cmap(int(g) % 20) for g in m.group[in_group]]
        kept = in_group & ~m.removed
        ax.scatter(x[in_group], y[in_group], s=22, c=colours, lw=0, label="duplicate group (colour)", rasterized=big)
        ax.scatter(x[kept], y[kept], s=40, facecolors="none", edgecolors="black", lw=0.8, label="group survivor")
    ax.set_title(f"{m.step}: near-duplicate groups ({int(m.removed.sum())} removed)")
    ax.set_xlabel(f"PC1 ({m.explained[0]:.0%} of variance)")
    ax.set_ylabel(f"PC2 ({m.explained[1]:.0%})")
    ax.legend(fontsize=7.5, loc="best")
    if panels == 2:
        ax = axes[1]
        base = ~m.removed
        ax.scatter(x[m.removed], y[m.removed], s=10, marker="x", c=RED, alpha=0.6, lw=0.8, label="removed as duplicate")
        ax.scatter(x[base], y[base], s=8, c=GREY, alpha=0.45, lw=0, label="kept", rasterized=big)
        if m.selected is not None:
            ax.scatter(x[m.selected], y[m.selected], s=18, c=BLUE, lw=0, label=f"selected ({m.selection_name})")
        if m.random is not None:
            ax.scatter(x[m.random], y[m.random], s=34, facecolors="none", edgecolors=ORANGE, lw=1.0,
                       label=f"random baseline ({m.random_name})")
        ax.set_title("selection on the same map")
        ax.set_xlabel("PC1")
        ax.legend(fontsize=7.5, loc="best")
    return to_svg(fig)


def lineage(lin: Lineage) -> str:
    """Accepted evolutions per round, split by operation."""
    fig = _figure(5.6, 2.8)
    ax = fig.add_subplot()
    ops = sorted({op for r in lin.per_round.values() for op in r})
    rounds = list(lin.per_round)
    bottom = np.zeros(len(rounds))
    import matplotlib

    cmap = matplotlib.colormaps["Set2"]
    for i, op in enumerate(ops):
        h = np.array([lin.per_round[r].get(op, 0) for r in rounds], dtype=float)
        ax.bar([f"round {r}" for r in rounds], h, bottom=bottom, color=cmap(i % 8), label=op)
        bottom += h
    ax.set_ylabel("accepted evolutions")
    ax.set_title(f"{lin.step}: accepted per round")
    ax.legend(fontsize=7.5, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return to_svg(fig)


def timings(steps: list[StepInfo]) -> str:
    fig = _figure(7.5, 0.3 * len(steps) + 1.0)
    ax = fig.add_subplot()
    names = [s.name for s in steps][::-1]
    secs = [s.seconds or 0.0 for s in steps][::-1]
    colours = [GREY if s.status == "cached" else RED if s.status == "failed" else BLUE for s in steps][::-1]
    ax.barh(names, secs, color=colours)
    for i, v in enumerate(secs):
        ax.text(v, i, f" {v:.2f}s", va="center", fontsize=7.5)
    ax.set_xlabel("seconds (grey: cached, from the run that made it)")
    ax.grid(axis="y", visible=False)
    return to_svg(fig)


def tokens(rows: list[dict[str, Any]]) -> str:
    return _stacked([r["step"] for r in rows], [
        ([r["prompt_tokens"] for r in rows], BLUE, "prompt tokens"),
        ([r["completion_tokens"] for r in rows], ORANGE, "completion tokens"),
    ], "tokens")  # fmt: skip


def training(t: Training) -> str:
    fig = _figure(9.0, 3.0)
    a, b = fig.subplots(1, 2)
    if t.train:
        a.plot([r["step"] for r in t.train], [r["loss"] for r in t.train], color=BLUE, marker="o", ms=3, label="train loss")
    if t.eval:
        a.plot([r["step"] for r in t.eval], [r["eval_loss"] for r in t.eval], color=ORANGE, marker="s", ms=4, label="eval loss")
    a.set_xlabel("optimizer step")
    a.set_title("loss")
    a.legend(fontsize=8)
    speed = [r for r in t.train if isinstance(r.get("tokens_per_s"), (int, float))]
    b.plot([r["step"] for r in speed], [r["tokens_per_s"] for r in speed], color=GREEN, marker="o", ms=3)
    b.set_xlabel("optimizer step")
    b.set_title("tokens/s")
    b.set_ylim(bottom=0)
    return to_svg(fig)
