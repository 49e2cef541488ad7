"""Markdown table and PNG plots from ``results.json``.

    python -m benchmarks.report [benchmarks/results]     # rebuild results.md and the plots
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

PLOTS = ("loss_curves.png", "time_to_target.png", "forgetting.png", "lr_sweep.png", "forgetting_frontier.png")
BASELINES = ("sgd", "adamw", "muon", "adamw-level-lr")



def _save_grid(plt, fig, axes, n, path):
    """Blank the unused panels of a grid of n plots, add one shared legend, save and close."""
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    h, lab = axes.flat[0].get_legend_handles_labels()
    fig.legend(h, lab, loc="lower center", ncol=min(len(lab), 10), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)

def _pm(m, s, fmt="{:.4g}", sfmt="{:.2g}"):
    if m is None:
        return "n/a"
    if not math.isfinite(m):
        return "diverged"
    return fmt.format(m) + ("" if s is None else " ± " + sfmt.format(s))


def _num(x, fmt="{:.3g}"):
    return "—" if x is None else fmt.format(x)


def _interval(e, key):
    """(low, high) of the 95% interval of ``key`` (``<key>_mean`` ± ``<key>_ci``), or None."""
    m, ci = e.get(f"{key}_mean"), e.get(f"{key}_ci")
    if m is None or ci is None or not math.isfinite(m):
        return None
    return m - ci, m + ci


def below(e, ref, key) -> bool:
    """``e``'s 95% interval of ``key`` lies wholly below ``ref``'s: the only "win" this report calls."""
    a, b = _interval(e, key), _interval(ref, key)
    return a is not None and b is not None and a[1] < b[0]


def verdicts(results: dict) -> dict:
    """Per task: the deepopt optimizers whose per-seed steps to the target (the worst AdamW seed's final test loss) lie wholly
    below AdamW's (95% intervals separate), the same against torch Muon, and the continual
    forgetting change vs AdamW (with whether the intervals separate)."""
    from benchmarks.optimizers import OPTIMIZERS
    out = {}
    for t, tr in results["tasks"].items():
        opts = tr["optimizers"]
        ref, muon = opts.get("adamw", {}), opts.get("muon")
        v = {"faster": [], "slower_or_never": [], "faster_than_muon": []}
        if tr["kind"] != "continual":
            for o, e in opts.items():
                if e.get("confirming_run") or not OPTIMIZERS[o]["deepopt"]:
                    continue
                (v["faster"] if below(e, ref, "steps_to_target") else v["slower_or_never"]).append(o)
                if muon and below(e, muon, "steps_to_target"):
                    v["faster_than_muon"].append(o)
        if tr["kind"] == "continual" and ref.get("forgetting_mean") is not None:
            f0 = ref["forgetting_mean"]
            v["forgetting_change_vs_adamw"] = {
                o: (e["forgetting_mean"] - f0) / f0 if f0 and e.get("forgetting_mean") is not None
                and math.isfinite(e["forgetting_mean"]) else None
                for o, e in opts.items() if not e.get("confirming_run")}
            v["forgets_less"] = [o for o, e in opts.items() if not e.get("confirming_run")
                                 and OPTIMIZERS[o]["deepopt"] and below(e, ref, "forgetting")]
        out[t] = v
    return out


def summary_table(results: dict) -> str:
    """One row per task, one column per optimizer: final test loss, mean ± 95% interval half-width
    over the reported seeds and, in brackets, the per-seed steps to the target (mean
    ± half-width; — = a seed never reached it); continual: average final accuracy / forgetting
    (mean ± half-width). Bold: a deepopt optimizer whose interval lies wholly below AdamW's
    (steps; continual: forgetting)."""
    from benchmarks.optimizers import OPTIMIZERS
    names = [o for o in OPTIMIZERS if any(o in tr["optimizers"] and not tr["optimizers"][o].get("confirming_run")
                                          for tr in results["tasks"].values())]
    ver = verdicts(results)
    lines = ["| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for t, tr in results["tasks"].items():
        row = [t]
        for o in names:
            e = tr["optimizers"].get(o)
            if e is None:
                row.append("n/a")
                continue
            if tr["kind"] == "continual":
                cell = (f"{_pm(e.get('avg_acc_mean'), e.get('avg_acc_ci'), '{:.3f}', '{:.3f}')} / "
                        f"{_pm(e.get('forgetting_mean'), e.get('forgetting_ci'), '{:.3f}', '{:.3f}')}")
                win = o in ver[t].get("forgets_less", [])
            else:
                st = e.get("steps_to_target_mean")
                steps = _pm(st, e.get("steps_to_target_ci"), "{:.0f}", "{:.0f}") if st is not None else "—"
                cell = f"{_pm(e.get('test_loss_mean'), e.get('test_loss_ci'), '{:.3g}')} ({steps})"
                win = o in ver[t].get("faster", [])
            if e.get("diverged_seeds"):
                cell += f" [{e['diverged_seeds']} div.]"
            row.append(f"**{cell}**" if win else cell)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def markdown(results: dict) -> str:
    from benchmarks.optimizers import OPTIMIZERS
    m = results["meta"]
    lines = [f"Command: `{m['command']}`  ", f"Machine: {m['machine']}; {m['jobs']} runs in parallel, "
             f"1 thread each. Date: {m['date']}. Sum of all run wall times: "
             f"{m['sum_of_run_walls_s'] / 60:.1f} min.",
             *([("Invocations that wrote into this directory (a resumed or cached re-run trains only "
                 "the missing runs): " + "; ".join(
                     f"{h['date']}: {h['wall_s'] / 60:.1f} min, {h['runs_trained']} runs trained"
                     for h in m["invocations"]) + ".")] if m.get("invocations") else []),
             "", f"LRs selected on seed {m.get('select_seed', 0)} (validation split); reported seeds: "
             + ", ".join(map(str, m["seeds"])) + " (test split), mean ± the half-width of the 95% "
             "t-interval over them (with 3 seeds: 2.48 standard deviations). *Target* = the worst of AdamW's per-seed "
             "final test losses on the curves (every AdamW seed reaches it); *steps to target* are counted per seed on the test curve (evaluated "
             "every `eval_every` steps), and a difference counts only where the two 95% intervals do not "
             "overlap. Time = training time only (no evaluation), on the seed-mean curve. *Val target*: the "
             "same with AdamW's final validation loss on the seed-mean validation curves. Step times are "
             "medians on a shared 2-core machine running two benchmarks at once: compare them loosely.", ""]
    ver = verdicts(results)
    lines += ["### All tasks", "", "Final test loss mean ± 95% half-width (per-seed steps to the worst AdamW seed's "
              "final test loss, mean ± 95% half-width; — = a seed never reached it); continual task: average final "
              "accuracy / forgetting, mean ± 95% half-width. **Bold**: a deepopt optimizer whose interval lies "
              "wholly below AdamW's (steps; continual: forgetting). Per-task details below.", "",
              summary_table(results)]
    for t, tr in results["tasks"].items():
        opts = tr["optimizers"]
        lines += [f"### {t}", "", f"{tr['description']}. Budget: {tr['steps']} steps (all optimizers); "
                  f"runs' wall time {tr['runs_wall_s'] / 60:.1f} min."
                  + (f" Target test loss: {tr['target_test_loss']:.4g}." if tr.get("target_test_loss") else ""), ""]
        cont = tr["kind"] == "continual"
        acc = tr["kind"] != "loss"
        head = ["optimizer", "best lr", "test loss (95%)"]
        if acc:
            head.append("test acc")
        if cont:
            head += ["avg final acc", "forgetting", "forgetting vs AdamW"]
        else:
            head += ["steps to target, per seed", "mean (95%)", "time to target (s)", "steps to val target"]
        head += ["step (ms)", "vs AdamW"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        ref = opts.get("adamw", {})
        fchange = ver[t].get("forgetting_change_vs_adamw", {})
        for o, e in opts.items():
            if e.get("confirming_run"):
                continue
            name = f"**{o}**" if OPTIMIZERS[o]["deepopt"] else o
            row = [name, _num(e["best_lr"]), _pm(e.get("test_loss_mean"), e.get("test_loss_ci"))]
            if acc:
                row.append(_pm(e.get("test_acc_mean"), e.get("test_acc_std"), "{:.3f}", "{:.3f}"))
            if cont:
                row += [_pm(e.get("avg_acc_mean"), e.get("avg_acc_ci"), "{:.3f}", "{:.3f}"),
                        _pm(e.get("forgetting_mean"), e.get("forgetting_ci"), "{:.3f}", "{:.3f}"),
                        "—" if o == "adamw" or fchange.get(o) is None else f"{100 * fchange[o]:+.0f}%"]
                verdict = "ref" if o == "adamw" else (
                    "less forgetting (intervals separate)" if below(e, ref, "forgetting") else
                    "more forgetting (intervals separate)" if below(ref, e, "forgetting") else
                    "forgetting within AdamW's interval")
                if o != "adamw" and e.get("avg_acc_mean") is not None and ref.get("avg_acc_mean") is not None:
                    verdict += ", higher acc" if e["avg_acc_mean"] > ref["avg_acc_mean"] else ", lower acc"
            else:
                per_seed = e.get("steps_to_target_per_seed") or []
                sv = e.get("steps_to_val_target")
                row += [" / ".join("—" if x is None else str(x) for x in per_seed) or "—",
                        _pm(e.get("steps_to_target_mean"), e.get("steps_to_target_ci"), "{:.0f}", "{:.0f}")
                        if e.get("steps_to_target_mean") is not None else "not reached by every seed",
                        _num(e.get("time_to_target_s"), "{:.2f}"),
                        _num(sv, "{}") if sv is not None else "not reached"]
                if o == "adamw":
                    verdict = "ref"
                elif below(e, ref, "steps_to_target"):
                    verdict = "**faster** (intervals separate)"
                elif below(ref, e, "steps_to_target"):
                    verdict = "slower (intervals separate)"
                elif e.get("steps_to_target_mean") is None:
                    verdict = "a seed never reaches the target"
                else:
                    verdict = "tie (intervals overlap)"
            if e.get("diverged_seeds"):
                verdict += f"; {e['diverged_seeds']} seed(s) diverged"
            row += [_num(e.get("step_time_ms"), "{:.2f}"), verdict]
            lines.append("| " + " | ".join(row) + " |")
        conf = [(o, e) for o, e in opts.items() if e.get("confirming_run")]
        lines.append("")
        if tr.get("not_applicable"):
            why = (["torch's Muon takes only 2-D params and this model's hidden weights are conv kernels"]
                   if "muon" in tr["not_applicable"] else [])
            why += (["MultiFrequency levels need a layered model"]
                    if any(o.startswith("mf-") for o in tr["not_applicable"]) else [])
            lines.append(f"- Not run here: {', '.join(tr['not_applicable'])} ({'; '.join(why)}).")
        if conf:
            for o, e in conf:
                lines.append(f"- `{o}` (not swept) at {e['twin']}'s best lr {e['lr']:.3g}: final test loss "
                             f"{_num(e['final_test_loss'], '{:.6g}')} vs {e['twin']} {_num(e['twin_final_test_loss'], '{:.6g}')}"
                             f" — {'identical curves' if e['identical_to_twin'] else 'max |diff| %s' % _num(e['max_abs_diff'])}.")
        sr = opts.get("delta", {}).get("grad_stable_rank")
        if sr:
            lines.append("- DeltaMomentum diagnostic: gradient stable rank ||G||_F²/s₁² at init: "
                         + ", ".join(f"{k} {v:.1f}" for k, v in sr.items())
                         + " (Frobenius keys decay the top direction by delta/stable rank only).")
        lines.append("")
    lines += frontier_section(results)
    lines += ["### Summary", ""]
    for t, v in ver.items():
        if "forgetting_change_vs_adamw" in v:
            ch = v["forgetting_change_vs_adamw"]
            lines.append(f"- {t}: forgetting vs AdamW: " + ", ".join(
                f"{o} {100 * c:+.0f}%" for o, c in ch.items() if c is not None and o != "adamw")
                + "; intervals wholly below AdamW's: " + (", ".join(v["forgets_less"]) or "none"))
        else:
            lines.append(f"- {t}: deepopt optimizers faster than AdamW to the target (95% intervals "
                         "separate): " + (", ".join(v["faster"]) or "none")
                         + "; faster than torch Muon: " + (", ".join(v["faster_than_muon"]) or "none"))
    return "\n".join(lines) + "\n"


def dominated_by(point: dict, others: list[dict]) -> list[dict]:
    """The points of ``others`` with at least ``point``'s accuracy and at most its forgetting
    (seed means): ``point`` lies on or inside their frontier."""
    return [o for o in others if o["avg_acc_mean"] is not None and point["avg_acc_mean"] is not None
            and o["avg_acc_mean"] >= point["avg_acc_mean"] and o["forgetting_mean"] <= point["forgetting_mean"]]


def frontier_section(results: dict) -> list[str]:
    """The accuracy-forgetting points of every swept LR (test split, reported seeds) and, for each
    MultiFrequency point, the baseline points that dominate it."""
    lines = []
    for t, tr in results["tasks"].items():
        fr = {o: e["frontier"] for o, e in tr["optimizers"].items() if e.get("frontier")}
        if not fr:
            continue
        lines += [f"### {t}: the accuracy-forgetting frontier", "",
                  "Every swept LR on the reported seeds (test split; mean ± 95% half-width). A MultiFrequency "
                  "point is a win only if no AdamW or control point has at least its accuracy and at most its "
                  "forgetting.", "", "| optimizer | lr | avg final acc | forgetting | dominated by |", "|---|---|---|---|---|"]
        baseline = [dict(p, optimizer=o) for o, pts in fr.items() if o in ("adamw", "adamw-level-lr") for p in pts]
        for o, pts in fr.items():
            for p in pts:
                dom = dominated_by(p, baseline) if o not in ("adamw", "adamw-level-lr") else []
                lines.append(f"| {o} | {p['lr']:.3g} | {_pm(p['avg_acc_mean'], p['avg_acc_ci'], '{:.3f}', '{:.3f}')} | "
                             f"{_pm(p['forgetting_mean'], p['forgetting_ci'], '{:.3f}', '{:.3f}')} | "
                             + (", ".join(f"{d['optimizer']} {d['lr']:.3g}" for d in dom) or
                                ("—" if o in ("adamw", "adamw-level-lr") else "none: beyond the frontier")) + " |")
        lines.append("")
    return lines


def _colors(names):
    import matplotlib.pyplot as plt
    cmap = plt.get_cmap("tab20")
    return {n: cmap(i % 20) for i, n in enumerate(names)}


def make_plots(results: dict, out: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from benchmarks.optimizers import OPTIMIZERS
    from benchmarks.tasks import TASKS
    tasks = results["tasks"]
    names = list(OPTIMIZERS)
    col = _colors(names)
    ls = {o: "--" if o in BASELINES else "-" for o in names}

    # 1. test-loss curves with seed bands
    n = len(tasks)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax, (t, tr) in zip(axes.flat, tasks.items()):
        for o, e in tr["optimizers"].items():
            if e.get("confirming_run") or not e["curve"]["step"]:
                continue
            s = np.asarray(e["curve"]["step"])
            mu = np.asarray(e["curve"]["test_loss_mean"], float)
            sd = np.asarray(e["curve"]["test_loss_std"], float)
            ok = np.isfinite(mu)
            if not ok.any():
                continue
            ax.plot(s[ok], mu[ok], ls[o], color=col[o], label=o, lw=1.4)
            sd = np.where(np.isfinite(sd), sd, 0)
            lo = mu - sd
            if TASKS[t].log_loss:
                lo = np.maximum(lo, mu * 0.1)
            ax.fill_between(s[ok], lo[ok], (mu + sd)[ok], color=col[o], alpha=0.15, lw=0)
        if tr.get("target_test_loss"):
            ax.axhline(tr["target_test_loss"], color="k", lw=0.7, ls=":")
        if TASKS[t].log_loss:
            ax.set_yscale("log")
        else:
            fin = [v for e in tr["optimizers"].values() if not e.get("confirming_run")
                   for v in e["curve"]["test_loss_mean"] if np.isfinite(v)]
            if fin:
                lo_, hi_ = min(fin), np.percentile(fin, 90)
                ax.set_ylim(lo_ - 0.05 * (hi_ - lo_), hi_)
        ax.set_title(t + (" (avg over seen tasks)" if tr["kind"] == "continual" else ""), fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("test loss")
        ax.grid(alpha=0.3)
    _save_grid(plt, fig, axes, n, out / "loss_curves.png")

    # 2. time-to-target bars (and steps as the bar label)
    tt = [(t, tr) for t, tr in tasks.items() if tr["kind"] != "continual"]
    fig, axes = plt.subplots(1, max(len(tt), 1), figsize=(3.6 * max(len(tt), 1), 4.2), squeeze=False)
    for ax, (t, tr) in zip(axes.flat, tt):
        opts = [(o, e) for o, e in tr["optimizers"].items() if not e.get("confirming_run")]
        y = np.arange(len(opts))
        vals = [e.get("time_to_target_s") for _, e in opts]
        top = max([v for v in vals if v] or [1.0])
        for i, ((o, e), v) in enumerate(zip(opts, vals)):
            if v is None:
                ax.barh(i, top, color="none", edgecolor="0.6", hatch="//")
                ax.text(top * 0.02, i, "not reached", va="center", fontsize=7)
            else:
                ax.barh(i, v, color=col[o])
                ax.text(v, i, f" {e['steps_to_target']}", va="center", fontsize=7)
        ax.set_yticks(y, [o for o, _ in opts], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("train seconds to the target (worst AdamW seed's final test loss)\n(label: steps)", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "time_to_target.png", dpi=110)
    plt.close(fig)

    # 3. forgetting matrices (continual task): R[i][j] = test acc on task j after training task i
    ct = [(t, tr) for t, tr in tasks.items() if tr["kind"] == "continual"]
    mats = [(o, e) for t, tr in ct for o, e in tr["optimizers"].items()
            if not e.get("confirming_run") and e.get("acc_matrix_mean")]
    if mats:
        c = min(4, len(mats))
        r = math.ceil(len(mats) / c)
        fig, axes = plt.subplots(r, c, figsize=(3.3 * c, 3.2 * r), squeeze=False)
        for ax, (o, e) in zip(axes.flat, mats):
            R = np.asarray(e["acc_matrix_mean"])
            ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
            for i in range(R.shape[0]):
                for j in range(R.shape[1]):
                    ax.text(j, i, f"{R[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="w" if R[i, j] < 0.6 else "k")
            ax.set_title(f"{o}: acc {_pm(e.get('avg_acc_mean'), None, '{:.3f}')}, "
                         f"forget {_pm(e.get('forgetting_mean'), None, '{:.3f}')}", fontsize=8)
            ax.set_xlabel("evaluated on task", fontsize=7)
            ax.set_ylabel("after training task", fontsize=7)
            ax.tick_params(labelsize=6)
        for ax in list(axes.flat)[len(mats):]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(out / "forgetting.png", dpi=110)
        plt.close(fig)

    # 4. LR sweeps (validation metric vs lr)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for ax, (t, tr) in zip(axes.flat, tasks.items()):
        for o, e in tr["optimizers"].items():
            if e.get("confirming_run"):
                continue
            pts = sorted((float(k), v) for k, v in e["sweep"].items())
            xs = [p[0] for p in pts if math.isfinite(p[1])]
            ys = [p[1] for p in pts if math.isfinite(p[1])]
            if tr["kind"] == "continual":
                ys = [-v for v in ys]
            ax.plot(xs, ys, "o" + ls[o], color=col[o], label=o, ms=3, lw=1)
        ax.set_xscale("log")
        if TASKS[t].log_loss:
            ax.set_yscale("log")
        ax.set_title(t, fontsize=10)
        ax.set_xlabel("lr")
        ax.set_ylabel("val avg final acc" if tr["kind"] == "continual" else "final val loss")
        ax.grid(alpha=0.3)
    _save_grid(plt, fig, axes, n, out / "lr_sweep.png")

    # 5. accuracy-forgetting frontier: every swept LR, mean and 95% interval over the reported seeds
    fr = [(t, o, e["frontier"]) for t, tr in tasks.items() for o, e in tr["optimizers"].items() if e.get("frontier")]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for t, o, pts in fr:
        pts = [p for p in pts if p["avg_acc_mean"] is not None and p["avg_acc_ci"] is not None]
        x = [p["forgetting_mean"] for p in pts]
        y = [p["avg_acc_mean"] for p in pts]
        ax.errorbar(x, y, xerr=[p["forgetting_ci"] for p in pts], yerr=[p["avg_acc_ci"] for p in pts],
                    fmt="o" + ls[o], color=col[o], label=o, ms=4, lw=1, capsize=2)
        for p in pts:
            ax.annotate(f"{p['lr']:.3g}", (p["forgetting_mean"], p["avg_acc_mean"]), fontsize=6,
                        textcoords="offset points", xytext=(3, 3), color=col[o])
    ax.set_xlabel("forgetting (test; lower is better)")
    ax.set_ylabel("average final accuracy (test)")
    ax.set_title("continual task: every swept lr (label), mean ± 95% over seeds", fontsize=9)
    ax.grid(alpha=0.3)
    if fr:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "forgetting_frontier.png", dpi=110)
    plt.close(fig)


def write_report(results: dict, out: Path, plots: bool = True):
    out = Path(out)
    (out / "results.md").write_text(markdown(results))
    if plots:
        make_plots(results, out)


if __name__ == "__main__":
    d = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results"
    write_report(json.loads((d / "results.json").read_text()), d)
    print(f"wrote {d / 'results.md'}")
