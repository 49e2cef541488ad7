"""Collect the HOPE example's runs into examples/hope/results/ (JSON, PNG, results table).

    bash examples/hope/results/run_all.sh        # runs everything, then this script
    python examples/hope/results/make_results.py --runs out
"""
import json
import shutil
import statistics as st
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
from examples import cli  # noqa: E402


def mean_sd(xs):
    return (st.mean(xs), st.stdev(xs) if len(xs) > 1 else 0.0)


def main():
    ap = cli.parser(__doc__)
    ap.add_argument("--runs", default="out", help="the --out root of run_all.sh's runs")
    args = ap.parse_args()
    runs = Path(args.runs)
    logs = sorted(runs.glob("hope_seed*/train_log.json"))
    if not logs:   # before anything here is overwritten
        raise FileNotFoundError(f"no {runs}/hope_seed*/train_log.json: run examples/hope/results/run_all.sh first")
    table = {"lm": {}, "seeds": []}
    per = {"hope": [], "transformer": []}
    for path in logs:
        log = json.loads(path.read_text())
        seed = log["args"]["seed"]
        shutil.copy(path, HERE / f"train_log_seed{seed}.json")
        if (path.parent / "loss.png").exists():
            shutil.copy(path.parent / "loss.png", HERE / f"loss_seed{seed}.png")
        table["seeds"].append(seed)
        for kind, rec in log["models"].items():
            per[kind].append(rec)
        table["command"], table["device"], table["date"] = log["command"], log["device"], log["date"]
    for kind, recs in per.items():
        if recs:
            table["lm"][kind] = {
                "params": recs[0]["params"],
                "val_bpc": mean_sd([r["final_val_bpc"] for r in recs]),
                "tokens_per_s": mean_sd([r["tokens_per_s"] for r in recs]),
                "per_seed_bpc": [round(r["final_val_bpc"], 4) for r in recs]}
    # recall: HOPE runs (lr 1e-2) from out/recall, Transformer runs at its own lr (1e-3) from
    # out/recall_tr (the same seeds; recall.py's defaults now give both in one call)
    if (runs / "recall" / "recall.json").exists():
        rec = json.loads((runs / "recall" / "recall.json").read_text())
        shutil.copy(runs / "recall" / "recall.json", HERE / "recall_transformer_lr1e-2_run.json")
        if (runs / "recall_tr" / "recall.json").exists():
            tr = json.loads((runs / "recall_tr" / "recall.json").read_text())
            rec["runs"] = [r for r in rec["runs"] if r["kind"] == "hope"] + tr["runs"]
            rec["transformer_command"] = tr["command"]
            rec["transformer_lr"] = tr["args"]["lr_transformer"]
        rec["summary"] = {}
        for kind in ("hope", "transformer"):
            rs = [r for r in rec["runs"] if r["kind"] == kind]
            rec["summary"][kind] = {m: {L: st.mean(r[m][L] for r in rs) for L in rs[0][m]}
                                    for m in ("same_pairs", "more_pairs")}
        (HERE / "recall.json").write_text(json.dumps(rec, indent=1))
    for src, dst in [("hope_seed0/continual.json", "continual.json"),
                     ("throughput/throughput.json", "throughput.json"),
                     ("recall_tr_long/recall.json", "recall_transformer_2000steps.json")]:
        if (runs / src).exists():
            shutil.copy(runs / src, HERE / dst)
    (HERE / "summary.json").write_text(json.dumps(table, indent=1))
    try:   # combined curve: mean val bpc over seeds
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for kind, recs in per.items():
            for i, r in enumerate(recs):
                h = r["history"]
                ax.plot([x["tokens"] for x in h], [x["val_bpc"] for x in h], "o-", alpha=0.7,
                        color="C0" if kind == "hope" else "C1", label=kind if i == 0 else None)
        ax.set_xlabel("training tokens")
        ax.set_ylabel("validation bits / char")
        ax.set_title("Shakespeare char LM, cpu preset, 3 seeds")
        ax.legend()
        fig.tight_layout()
        fig.savefig(HERE / "loss.png", dpi=120)
    except ImportError:
        pass
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    cli.run(main)
