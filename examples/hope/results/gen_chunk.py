"""How often must HOPE's generator memories write? Quality and speed by ``--gen-chunk-size``.

    python examples/hope/results/gen_chunk.py      # -> examples/hope/results/gen_chunk.json

The generator memories (k, v, eta, alpha) make their own keys and rates, so their recurrence is
nonlinear and runs chunk by chunk: a larger chunk means fewer sequential steps (and each token's
k, v read from an older state). For each chunk size this trains HOPE at its other defaults
(CPU preset, 500 steps, lr 1e-2, seeds 1-3: long_context.py's protocol and runs folder) and
reports, mean ± 95% over seeds:

* validation bits/char (train.py's final evaluation);
* bits/char of the first and the last 128-character bucket of 2,048-character validation windows
  (16x the training length, read in one call: long_context.position_bpc);
* training tokens/s at 128 and 2,048 characters against the Transformer++ of the same size, all
  models in one process in alternating rounds (context_throughput.training_tokens_per_s).
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
from examples import cli  # noqa: E402

#: HOPE's default flags but the generator chunk (the long-context benchmark's default row)
FLAGS = ["--no-cms", "--anchor-init", "0.9"]
TF = "Transformer++"


def name(size: int) -> str:
    return f"HOPE, generator chunk {size}"


def measure(args) -> dict:
    import torch

    from benchmarks.run import ci95
    from examples.data import load_shakespeare
    from examples.hope.continual import load_checkpoint
    from examples.hope.long_context import LR, position_bpc
    from examples.hope.model import config_from_dict, matched_transformer_config
    from examples.hope.results.context_throughput import training_tokens_per_s
    from examples.hope.results.sweep_and_ablate import train
    torch.set_num_threads(args.threads)
    runs = Path(args.runs)
    flags = {g: FLAGS + ["--gen-chunk-size", str(g)] for g in args.gen_chunks}
    with ThreadPoolExecutor(args.jobs) as pool:
        jobs = {(g, s): pool.submit(train, runs, "hope", flags[g], LR, s, args.steps, args.preset, args.cache_dir)
                for g in args.gen_chunks for s in args.seed}
        trained = {key: job.result() for key, job in jobs.items()}
    val = None
    rows, configs = [], {}
    for g in args.gen_chunks:
        per_seed = []
        for s in args.seed:
            model, tok, ck = load_checkpoint(Path(trained[(g, s)]["dir"]) / "hope.pt")
            model.eval()
            if val is None:
                val = tok.encode_tensor(load_shakespeare(args.cache_dir).val)
            T = ck["config"]["block_size"]
            idx = torch.linspace(0, len(val) - 16 * T - 2, args.windows).long()
            bpc = position_bpc(model, torch.stack([val[i:i + 16 * T + 1] for i in idx]), T)
            per_seed.append(dict(val=trained[(g, s)]["val_bpc"], first=bpc[0], last=bpc[-1]))
            configs[name(g)] = config_from_dict(ck["config"])
            train_len = T
            print(f"gen chunk {g} seed {s}: val {per_seed[-1]['val']:.4f}, 0-{T}: {bpc[0]:.3f}, "
                  f"last {T}: {bpc[-1]:.3f}", flush=True)
        row = dict(gen_chunk_size=g, model=name(g), flags=flags[g])
        for key in ("val", "first", "last"):
            values = [r[key] for r in per_seed]
            row[f"{key}_bpc"] = dict(mean=statistics.mean(values), ci95=ci95(values) if len(values) > 1 else 0.0,
                                     values=values)
        rows.append(row)
    configs[TF] = matched_transformer_config(configs[name(args.gen_chunks[0])])
    speed = training_tokens_per_s(configs, args.lengths, rounds=args.rounds)
    for row in rows:
        row["tokens_per_s"] = {n: speed[n][row["model"]] for n in speed}
        row["vs_transformer"] = {n: speed[n][row["model"]] / speed[n][TF] for n in speed}
    return dict(command="python examples/hope/results/gen_chunk.py " + " ".join(args.argv),
                date=time.strftime("%Y-%m-%d"), device=f"cpu ({args.threads} threads)", torch=torch.__version__,
                seeds=args.seed, steps=args.steps, lr=LR, train_len=train_len, windows=args.windows, rounds=args.rounds, rows=rows,
                transformer_tokens_per_s={n: speed[n][TF] for n in speed})


def table(result: dict) -> str:
    """docs/hope.md's generator-chunk table (tests/test_docs.py checks it against the JSON)."""
    lengths = list(result["transformer_tokens_per_s"])
    T = result["train_len"]
    lines = [f"| generator chunk | val bits/char | bits/char 0-{T} | bits/char {15 * T}-{16 * T} | "
             + " | ".join(f"tokens/s at {n} (x Transformer++)" for n in lengths) + " |",
             "|---|---|---|---|" + "---|" * len(lengths)]
    for r in result["rows"]:
        cells = [f"{r[k]['mean']:.4f} ± {r[k]['ci95']:.4f}" for k in ("val_bpc", "first_bpc", "last_bpc")]
        cells += [f"{r['tokens_per_s'][n]:,.0f} ({r['vs_transformer'][n]:.2f}x)" for n in lengths]
        lines.append(f"| {r['gen_chunk_size']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = cli.parser(__doc__)
    from examples.hope.results.sweep_and_ablate import add_run_options
    add_run_options(ap)
    ap.add_argument("--gen-chunks", type=cli.positive_int, nargs="+", default=[16, 32, 64],
                    help="generator chunk sizes (multiples of HOPE's M_mem chunk, 16)")
    ap.add_argument("--lengths", type=cli.positive_int, nargs="+", default=[128, 2048], help="tokens/s contexts")
    ap.add_argument("--rounds", type=cli.positive_int, default=7, help="alternating tokens/s rounds (first: warm-up)")
    ap.add_argument("--windows", type=cli.positive_int, default=32, help="validation windows of 16x train length")
    ap.add_argument("--jobs", type=cli.positive_int, default=2, help="training runs at a time (one thread each)")
    ap.add_argument("--threads", type=cli.positive_int, default=2, help="torch CPU threads for evaluation")
    ap.add_argument("--cache-dir", default=None, help="corpus cache (default: $DEEPOPT_CACHE or ~/.cache/deepopt)")
    ap.add_argument("--out", default=str(HERE / "gen_chunk.json"), help="result file")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    result = measure(args)
    print(table(result))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    cli.run(main)
