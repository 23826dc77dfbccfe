"""``lme-sim report``: PNG plots of finished runs and one self-contained HTML page showing them.

* efficacy_vs_edits.png: efficacy against the number of edits committed (``efficacy_curve``), one
  line per run, its collapse point (``collapse``) marked; runs sharing a method (seeds) as their mean
  in a band of ± one standard deviation;
* forgetting.png: retention by edit age (the ``forgetting_curve`` view), one line per run;
* metrics.png: efficacy / generalization / specificity / retention over batches, runs on one axis each;
* condition.png: condition number of every edited matrix over batches (``weight_health``);
* layer_usage.png: share of each batch's edits that touched each module (``layer_usage``), one
  heatmap per run whose method picks modules per edit (HiEdit), else for the first run.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from .analysis import check_runs, comparison_table, mean_std, run_groups, run_labels, summary_rows
from .storage.logger import read_only_query

CURVE_METRICS = ("efficacy", "generalization", "specificity", "retention")


def _rows(db, sql: str, params: list) -> list[dict]:
    cols, rows = read_only_query(db, sql, params)
    return [dict(zip(cols, r)) for r in rows]


def _label(db, run_ids):
    """A run's legend label: its editor's name and protocol (edits per batch), then its id."""
    labels = run_labels(db, run_ids)
    return lambda rid: f"{labels[rid]}, {rid}"


def plot_forgetting(db, run_ids, label, ax) -> None:
    rows = _rows(
        db,
        "select run_id, age, sum(retention * n_probes) / sum(n_probes) as retention "
        "from forgetting_curve where run_id = any(?) group by all order by age",
        [list(run_ids)],
    )
    for rid in run_ids:
        pts = [(r["age"], r["retention"]) for r in rows if r["run_id"] == rid]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=label(rid))
    ax.set(
        title="Forgetting curve: is an edit still in force?",
        xlabel="edit age (batches since the edit)",
        ylabel="retention (fraction of probes)",
        ylim=(-0.02, 1.02),
    )


def plot_metrics(db, run_ids, label, axes) -> None:
    rows = _rows(
        db,
        "select run_id, batch_id, name, value from metrics where run_id = any(?) and name = any(?) "
        "order by batch_id",
        [list(run_ids), list(CURVE_METRICS)],
    )
    for ax, name in zip(axes, CURVE_METRICS):
        for rid in run_ids:
            pts = [(r["batch_id"], r["value"]) for r in rows if r["run_id"] == rid and r["name"] == name]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=label(rid))
        ax.set(title=name, xlabel="batch (batch_id)", ylabel=name, ylim=(-0.02, 1.02))


def band(curves: list[list[tuple[float, float]]]) -> list[tuple[float, float, float, int]]:
    """(x, mean, std, n) at each x of any of the curves (lists of (x, y) points), over the curves that
    have a point there (sample std; 0 where one has)."""
    xs = sorted({x for curve in curves for x, _ in curve})
    out = []
    for x in xs:
        mean, std, n = mean_std([y for curve in curves for cx, y in curve if cx == x])
        out.append((x, mean, std, n))
    return out


def plot_efficacy_vs_edits(db, run_ids, label, ax) -> None:
    """Efficacy at each evaluation against the edits committed by then (``efficacy_curve``), one line
    per run; the sample size (``efficacy_n``) in the legend where the run logged it, and the run's
    collapse point (efficacy below 0.5, the ``collapse`` view) marked with an x. Generative efficacy
    (``gen_efficacy``), where the run measured it, is the dashed line of the same colour, its own
    collapse point (``gen_collapse_edits``) an x on it. Runs that share a method and protocol (seeds)
    are drawn as one line, their mean, in a band of ± one std, with an x where the mean falls below 0.5."""
    rows = _rows(
        db,
        "select c.run_id, c.n_edits, c.efficacy, c.efficacy_n, c.gen_efficacy, k.collapse_edits, "
        "k.gen_collapse_edits "
        "from efficacy_curve c join collapse k using (run_id) where c.run_id = any(?) "
        "order by c.n_edits, c.eval_id",
        [list(run_ids)],
    )
    singles = []
    for g in run_groups(db, run_ids):
        ids = [r["run_id"] for r in g["runs"]]
        if len(ids) == 1:
            singles += ids
            continue
        eff = band([[(r["n_edits"], r["efficacy"]) for r in rows if r["run_id"] == rid] for rid in ids])
        if not eff:
            continue
        x, mean, std, _ = zip(*eff)
        (line,) = ax.plot(x, mean, marker="o", ms=3, label=f"{g['label']}, mean ± std over {len(ids)} runs")
        ax.fill_between(
            x,
            [m - s for m, s in zip(mean, std)],
            [m + s for m, s in zip(mean, std)],
            alpha=0.25,
            color=line.get_color(),
        )
        gen = band(
            [
                [
                    (r["n_edits"], r["gen_efficacy"])
                    for r in rows
                    if r["run_id"] == rid and r["gen_efficacy"] is not None
                ]
                for rid in ids
            ]
        )
        curves = [(x, mean)]
        if gen:
            gx, gmean, _, _ = zip(*gen)
            ax.plot(
                gx, gmean, ls="--", marker=".", color=line.get_color(), label=f"{g['label']}, generative mean"
            )
            curves.append((gx, gmean))
        for cx, cy in curves:  # the mean's collapse: its first evaluation below 0.5
            below = [(a, b) for a, b in zip(cx, cy) if b < 0.5]
            if below:
                ax.plot(*below[0], marker="x", ms=10, mew=2, ls="", color=line.get_color())
    for rid in singles:
        mine = [r for r in rows if r["run_id"] == rid]
        if not mine:
            continue
        sizes = sorted({int(r["efficacy_n"]) for r in mine if r["efficacy_n"] is not None})
        n = "" if not sizes else f", n = {sizes[0]}" if len(sizes) == 1 else f", n = {sizes[0]}-{sizes[-1]}"
        (line,) = ax.plot(
            [r["n_edits"] for r in mine],
            [r["efficacy"] for r in mine],
            marker="o",
            ms=3,
            label=f"{label(rid)}{n}",
        )
        gen = [(r["n_edits"], r["gen_efficacy"]) for r in mine if r["gen_efficacy"] is not None]
        if gen:
            ax.plot(
                *zip(*gen), ls="--", marker=".", color=line.get_color(), label=f"{label(rid)}, generative"
            )
        k = mine[0]  # the run's collapse points, teacher-forced and generative
        for metric, at in (("efficacy", k["collapse_edits"]), ("gen_efficacy", k["gen_collapse_edits"])):
            if at is not None:
                y = next(r[metric] for r in mine if r["n_edits"] == at)
                ax.plot([at], [y], marker="x", ms=10, mew=2, ls="", color=line.get_color())
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set(
        title="Efficacy over the edits against the number of edits\n"
        "(solid: teacher-forced, dashed: generative; x: collapse, below 0.5; bands: ± std over seeds)",
        xlabel="edits committed at the evaluation",
        ylabel="efficacy (n: edits it was computed over)",
        ylim=(-0.02, 1.02),
    )


def plot_condition(db, run_ids, label, ax) -> None:
    rows = _rows(
        db,
        "select run_id, batch_id, module, condition from weight_health "
        "where run_id = any(?) order by batch_id",
        [list(run_ids)],
    )
    for rid in run_ids:
        for module in sorted({r["module"] for r in rows if r["run_id"] == rid}):
            pts = [
                (r["batch_id"], r["condition"]) for r in rows if r["run_id"] == rid and r["module"] == module
            ]
            short = ".".join(
                p for p in module.split(".") if p.isdigit() or p in ("c_proj", "down_proj", "fc_out")
            )
            ax.plot(*zip(*pts), label=f"{label(rid)} {short}")
    ax.set(
        title="Condition number of each edited matrix",
        xlabel="batch (batch_id)",
        ylabel="condition number (sigma_max / sigma_min)",
        yscale="log",
    )


def plot_layer_usage(db, run_id, label, ax) -> None:
    import numpy as np

    rows = _rows(
        db,
        "select u.batch_id, u.module, u.n_edits / b.n_edits as share from layer_usage u "
        "join batches b using (run_id, batch_id) where u.run_id = ? order by 1, 2",
        [run_id],
    )
    modules = sorted({r["module"] for r in rows})
    batches = sorted({r["batch_id"] for r in rows})
    if not modules:  # a run whose edits name no module (none committed): say so, not an empty image
        ax.text(0.5, 0.5, "no committed edit names a module", ha="center", va="center")
        ax.set(title=f"Layer usage: {label(run_id)}", xticks=[], yticks=[])
        return
    grid = np.zeros((len(modules), max(len(batches), 1)))
    for r in rows:
        grid[modules.index(r["module"]), batches.index(r["batch_id"])] = r["share"]
    im = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(modules)), [m.replace(".weight", "") for m in modules], fontsize=7)
    ax.set(title=f"Layer usage: {label(run_id)}", xlabel="batch (batch_id)", ylabel="module")
    ax.figure.colorbar(im, ax=ax, label="share of the batch's edits touching the module")


def write_report(db, run_ids: list[str], out_dir) -> list[Path]:
    """Write the PNGs and index.html into ``out_dir``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    check_runs(db, run_ids)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    label = _label(db, run_ids)
    files = []

    def save(fig, name):
        for ax in fig.axes:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(out / name)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    plot_efficacy_vs_edits(db, run_ids, label, ax)
    save(fig, "efficacy_vs_edits.png")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plot_forgetting(db, run_ids, label, ax)
    save(fig, "forgetting.png")
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    plot_metrics(db, run_ids, label, axes.flat)
    fig.suptitle("Editing metrics over the stream (evaluated on the most recent edits)")
    save(fig, "metrics.png")
    fig, ax = plt.subplots(figsize=(8, 5))
    plot_condition(db, run_ids, label, ax)
    save(fig, "condition.png")
    picks = [r["run_id"] for r in summary_rows(db, run_ids) if r["method"] == "hiedit"] or run_ids[:1]
    fig, axes = plt.subplots(len(picks), 1, figsize=(8, 3 + 1.5 * len(picks)), squeeze=False)
    for ax, rid in zip(axes[:, 0], picks):
        plot_layer_usage(db, rid, label, ax)
    save(fig, "layer_usage.png")
    files.append(_write_html(db, run_ids, out, files))
    return files


def _write_html(db, run_ids, out: Path, images: list[Path]) -> Path:
    import io

    from rich.console import Console

    console = Console(record=True, width=120, file=io.StringIO())
    console.print(comparison_table(db, run_ids))
    table = console.export_text()
    parts = [
        f"<h1>lme-sim report</h1><p>{html.escape(str(db))}: {html.escape(', '.join(run_ids))}</p>",
        f"<pre>{html.escape(table)}</pre>",
    ]
    for img in images:
        data = base64.b64encode(img.read_bytes()).decode()
        parts.append(
            f"<h2>{html.escape(img.stem.replace('_', ' '))}</h2>"
            f'<img alt="{html.escape(img.stem)}" src="data:image/png;base64,{data}">'
        )
    page = out / "index.html"
    page.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>lme-sim report</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%}</style>"
        "</head><body>" + "\n".join(parts) + "</body></html>"
    )
    return page
