"""Collect the HOPE example's runs into examples/hope/results/ (JSON, PNG, results table).

    bash examples/hope/results/run_all.sh        # runs everything, then this script
    python examples/hope/results/make_results.py --runs out
"""
import argparse
import json
import math
import shutil
import statistics as st
from pathlib import Path

HERE = Path(__file__).resolve().parent


def mean_sd(xs):
    return (st.mean(xs), st.stdev(xs) if len(xs) > 1 else 0.0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="out")
    args = ap.parse_args()
    runs = Path(args.runs)
    logs = sorted(runs.glob("hope_seed*/train_log.json"))
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
    for name in ("recall.json", "continual.json"):
        for p in [runs / "recall" / name, runs / "hope_seed0" / name]:
            if p.exists():
                shutil.copy(p, HERE / name)
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
    main()
