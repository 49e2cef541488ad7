"""Long contexts: does a model trained on 128 characters use 16x more?

    python examples/hope/long_context.py                  # -> examples/hope/results/long_context.{json,png}
    python examples/hope/long_context.py --ckpt-dir out/hope   # one checkpoint folder's diagnosis

The benchmark trains (or reuses, from ``--runs``) each model of ``MODELS`` at the CPU preset
(500 steps of 32 x 128 characters, lr 1e-2: both HOPE's and the Transformer's selected lr in
``results/ablations.json``) on ``--seed`` seeds: HOPE at its defaults, with the CMS, with the CMS
and steady-state training, without the anchor gate (with and without the CMS), and the
Transformer++. It measures, per model, mean over seeds:

* **bits/char by position**: validation windows of ``16 x train_len`` characters read in one
  call (HOPE's memories write along the whole window; the Transformer++ attends to all of it
  with the RoPE it was trained with, or, as the sliding-window baseline, to its last
  ``train_len`` positions), the loss averaged per ``train_len``-wide position bucket;
* **passkey recall** at 1x, 4x and 16x the training length: ``The pass key is <5 random
  letters>. Remember it.`` opens the window, validation text fills it, and it ends with ``The
  pass key is <the key>.``; recall is the share of the key's letters the model predicts (argmax,
  each letter given the ones before it) at the end, over ``--cases`` cases. The control is the
  same cases with a different key at the start: what a model that cannot see the key scores
  (chance, about 1/26, plus whatever the first letters give away);
* **training tokens/s** at 128, 512 and 2048 characters (``results/context_throughput.py``'s
  measurement, all models in alternating rounds).

With ``--ckpt-dir`` it measures the checkpoints in those folders instead, as
``results/sweep_and_ablate.py`` uses it: bits/char per 128-character bucket of 1,024-character
windows with HOPE's memories written over the whole window ("carry") and reset every
``--reset`` characters ("reset"), and how far the memory state moves from its initial value.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples import cli

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
#: row name -> (train.py --model, train.py flags, Transformer attention window at evaluation)
GEN = ["--gen-chunk-size", "32"]    # HOPE's generator chunk since 2026-12-07 (16 before)
MODELS = {   # (the flags explicit: runs trained before the defaults changed keep their folders)
    "HOPE (anchor gate, one MLP: the defaults)": ("hope", ["--no-cms", "--anchor-init", "0.9", *GEN], None),
    "HOPE with CMS (levels 1/4/16)": ("hope", ["--cms", "--anchor-init", "0.9", *GEN], None),
    "HOPE with CMS, steady-state training (--carry-state --reset-prob 0.05)":
        ("hope", ["--cms", "--anchor-init", "0.9", *GEN, "--carry-state", "--reset-prob", "0.05"], None),
    "HOPE w/o anchor gate (retention toward zero)": ("hope", ["--no-cms", "--anchor-init", "0", *GEN], None),
    "HOPE w/o anchor gate, with CMS (the model before 2026-12-06)":
        ("hope", ["--cms", "--anchor-init", "0", "--gen-chunk-size", "16"], None),
    "Transformer++ (RoPE, full attention)": ("transformer", [], None),
    "Transformer++ (sliding window = train length)": ("transformer", [], "train_len"),
}
HOPE_ROW = next(iter(MODELS))      # HOPE at its defaults
OLD_HOPE_ROW = "HOPE w/o anchor gate, with CMS (the model before 2026-12-06)"
LR = 1e-2
PASSKEY_LETTERS = "abcdefghijklmnopqrstuvwxyz"
#: the prompt around the 5-letter key: before it, after it, and before it is asked at the end
PASSKEY_PROMPT = ("The pass key is ", ". Remember it.\n", "\nThe pass key is ")
PASSKEY_MIN_LENGTH = sum(map(len, PASSKEY_PROMPT)) + 2 * 5 + 1   # one character of filler
FACTORS = (1, 4, 16)
TO_BPC = 1 / math.log(2)


# --------------------------------------------------------------------------- measurements
def position_bpc(model, windows, bucket: int, batch: int = 8) -> list[float]:
    """Bits/char per ``bucket``-wide position bucket, each window read in one call."""
    import torch
    import torch.nn.functional as F
    x, y = windows[:, :-1], windows[:, 1:]
    per_pos = torch.zeros(x.shape[1], dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, len(x), batch):
            logits = model(x[i:i + batch])[0]
            per_pos += F.cross_entropy(logits.transpose(1, 2), y[i:i + batch], reduction="none").double().sum(0)
    per_pos /= len(x)
    return [per_pos[s:s + bucket].mean().item() * TO_BPC for s in range(0, x.shape[1], bucket)]


def passkey_cases(tok, text, length: int, cases: int, seed: int):
    """(inputs, key positions, keys, control inputs): ``cases`` windows of ``length`` characters,
    the key at the start and asked at the end; the control window opens with another key."""
    import torch
    missing = sorted(set("".join(PASSKEY_PROMPT) + PASSKEY_LETTERS) - set(tok.stoi))
    if missing:
        raise ValueError(f"the passkey prompt needs characters the tokenizer lacks: {missing}")
    g = torch.Generator().manual_seed(seed)
    letters = torch.tensor(tok.encode(PASSKEY_LETTERS))

    def words(n):
        return letters[torch.randint(len(letters), (n, 5), generator=g)]

    keys, decoys = words(cases), words(cases)
    head = [tok.encode(PASSKEY_PROMPT[0]), tok.encode(PASSKEY_PROMPT[1])]
    tail = tok.encode(PASSKEY_PROMPT[2])
    fill = length - PASSKEY_MIN_LENGTH + 1
    if fill < 1:
        raise ValueError(f"passkey length {length} is too short for the prompt ({PASSKEY_MIN_LENGTH} characters)")
    starts = torch.randint(len(text) - fill, (cases,), generator=g)
    rows, controls = [], []
    for key, decoy, s in zip(keys, decoys, starts):
        filler = text[s:s + fill]
        for first, out in ((key, rows), (decoy, controls)):
            out.append(torch.cat([torch.tensor(head[0]), first, torch.tensor(head[1]), filler,
                                  torch.tensor(tail), key]))
    positions = torch.arange(length - 5, length)        # the key's letters at the end
    return torch.stack(rows), positions, keys, torch.stack(controls)


def passkey_recall(model, rows, positions, keys, batch: int = 8) -> tuple[float, float, list[float]]:
    """(share of key letters predicted, share of keys predicted whole, share per letter of the key)."""
    import torch
    hits = []
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            logits = model(rows[i:i + batch, :-1])[0]
            pred = logits[:, positions - 1].argmax(-1)            # predicts the letter at `positions`
            hits.append(pred == keys[i:i + batch])
    hits = torch.cat(hits)
    return hits.float().mean().item(), hits.all(-1).float().mean().item(), hits.float().mean(0).tolist()


# --------------------------------------------------------------------------- benchmark
def _mean(values):
    return None if None in values else statistics.mean(values)


def _ci(values):
    from benchmarks.run import ci95   # (the suite's one 95% t-interval)
    return None if None in values else ci95(values) if len(values) > 1 else 0.0


def train_models(train, runs: Path, args) -> dict:
    """{(row name, seed): train(...)'s record}: each run once, ``args.jobs`` at a time (the rows that
    read one checkpoint two ways share its run)."""
    with ThreadPoolExecutor(args.jobs) as pool:
        jobs = {}
        for model, flags, _ in MODELS.values():
            for s in args.seed:
                if (model, tuple(flags), s) not in jobs:
                    jobs[(model, tuple(flags), s)] = pool.submit(train, runs, model, flags, LR, s, args.steps,
                                                                 args.preset, args.cache_dir)
        return {(name, s): jobs[(model, tuple(flags), s)].result()
                for name, (model, flags, _) in MODELS.items() for s in args.seed}


def benchmark(args) -> dict:
    import torch

    from examples.data import load_shakespeare
    from examples.hope.continual import load_checkpoint
    from examples.hope.results.context_throughput import training_tokens_per_s
    from examples.hope.results.sweep_and_ablate import train
    torch.set_num_threads(args.threads)
    runs = Path(args.runs)
    trained = train_models(train, runs, args)
    corpus = load_shakespeare(args.cache_dir)
    result = dict(command="python examples/hope/long_context.py " + " ".join(args.argv), date=time.strftime("%Y-%m-%d"),
                  device="cpu", torch=torch.__version__, seeds=args.seed, steps=args.steps, lr=LR,
                  windows=args.windows, cases=args.cases, models=[])
    throughput = None
    for name, (kind, flags, window) in MODELS.items():
        per_seed = []
        for s in args.seed:
            model, tok, ck = load_checkpoint(Path(trained[(name, s)]["dir"]) / f"{kind}.pt")
            train_len = ck["config"]["block_size"]
            if window == "train_len":
                model.cfg.window = train_len
            model.eval()
            val = tok.encode_tensor(corpus.val)
            length = train_len * FACTORS[-1]
            idx = torch.linspace(0, len(val) - length - 2, args.windows).long()
            windows = torch.stack([val[i:i + length + 1] for i in idx])
            rec = dict(bpc=position_bpc(model, windows, train_len), recall={}, recall_whole={}, recall_control={})
            for f in FACTORS:
                if f * train_len < PASSKEY_MIN_LENGTH:   # (only a smoke run's context is this short)
                    rec["recall"][f"{f}x"] = rec["recall_whole"][f"{f}x"] = rec["recall_control"][f"{f}x"] = None
                    continue
                rows, pos, keys, controls = passkey_cases(tok, val, f * train_len, args.cases, seed=1000 + f)
                rec["recall"][f"{f}x"], rec["recall_whole"][f"{f}x"] = passkey_recall(model, rows, pos, keys)[:2]
                rec["recall_control"][f"{f}x"] = passkey_recall(model, controls, pos, keys)[0]
            per_seed.append(rec)
            print(f"{name} seed {s}: bpc@1x {rec['bpc'][0]:.3f} @16x {rec['bpc'][-1]:.3f}; recall "
                  + " ".join(f"{k} {v:.3f} (control {rec['recall_control'][k]:.3f})"
                             for k, v in rec["recall"].items() if v is not None),
                  flush=True)
        buckets = len(per_seed[0]["bpc"])
        row = dict(model=name, train_len=train_len, window=model.cfg.window if kind == "transformer" else None,
                   positions=[train_len * (i + 1) for i in range(buckets)],
                   bpc=[_mean([r["bpc"][i] for r in per_seed]) for i in range(buckets)],
                   bpc_ci95=[_ci([r["bpc"][i] for r in per_seed]) for i in range(buckets)],
                   bpc_per_seed=[r["bpc"] for r in per_seed],
                   val_bpc_train=[trained[(name, s)]["val_bpc"] for s in args.seed])
        for key in ("recall", "recall_whole", "recall_control"):
            row[key] = {f"{f}x": _mean([r[key][f"{f}x"] for r in per_seed]) for f in FACTORS}
        row["recall_ci95"] = {f"{f}x": _ci([r["recall"][f"{f}x"] for r in per_seed]) for f in FACTORS}
        result["models"].append(row)
    if args.throughput:
        import dataclasses

        from examples.hope.model import config_from_dict
        configs = {}
        for name, (kind, flags, window) in MODELS.items():
            cfg = config_from_dict(json.loads((Path(trained[(name, args.seed[0])]["dir"]) / "train_log.json")
                                              .read_text())["models"][kind]["config"])
            configs[name] = dataclasses.replace(cfg, window=cfg.block_size) if window else cfg
        throughput = training_tokens_per_s(configs, [128, 512, 2048])
        for row in result["models"]:
            row["tokens_per_s"] = {length: rates[row["model"]] for length, rates in throughput.items()}
    result["summary"] = summary(result)
    return result


def summary(result: dict) -> str:
    """The README's HOPE long-context sentence, from the result file."""
    rows = {r["model"]: r for r in result["models"]}
    hope, tf, sw = rows[HOPE_ROW], rows["Transformer++ (RoPE, full attention)"], \
        rows["Transformer++ (sliding window = train length)"]
    n = len(hope["positions"])
    old = rows.get(OLD_HOPE_ROW)

    def val(r):
        return f"{_mean(r['val_bpc_train']):.3f} ± {_ci(r['val_bpc_train']):.3f}"
    others = ([f"the model before 2026-12-06: {val(old)}"] if old else []) + [f"Transformer++: {val(tf)}"]
    text = (f"HOPE at its defaults reaches {val(hope)} validation bits/char ({'; '.join(others)}; mean ± 95% "
            f"over seeds {', '.join(map(str, result['seeds']))}). ")
    text += (f"Trained on {hope['train_len']} characters, HOPE's bits/char at {n}x that length is "
            f"{hope['bpc'][-1]:.2f} against {hope['bpc'][0]:.2f} at 1x (Transformer++ with RoPE: "
            f"{tf['bpc'][-1]:.2f} against {tf['bpc'][0]:.2f}; sliding window: {sw['bpc'][-1]:.2f}); passkey recall "
            f"of the key's letters at 16x: HOPE {hope['recall']['16x']:.0%}, Transformer++ {tf['recall']['16x']:.0%}, "
            f"sliding window {sw['recall']['16x']:.0%} (chance control {sw['recall_control']['16x']:.0%})")
    if "tokens_per_s" in hope:
        ratio = {k: hope["tokens_per_s"][k] / tf["tokens_per_s"][k] for k in hope["tokens_per_s"]}
        text += "; HOPE trains at " + ", ".join(f"{r:.2f}x" for r in ratio.values()) + \
            " the Transformer's tokens/s at " + ", ".join(ratio) + " characters"
    return text + "."


def table(result: dict) -> str:
    """docs/hope.md's long-context table (tests/test_docs.py checks it against the JSON)."""
    rows = result["models"]
    pos = rows[0]["positions"]
    shown = [i for i, p in enumerate(pos) if p in (pos[0], 2 * pos[0], 4 * pos[0], 8 * pos[0], pos[-1])]
    head = ("| model | val bits/char (train.py) | " + " | ".join(f"{pos[i] - pos[0]}-{pos[i]}" for i in shown)
            + " | recall 1x / 4x / 16x (control) | tokens/s 128 / 512 / 2048 |")
    lines = [head, "|---|---|" + "---|" * (len(shown) + 2)]
    for r in rows:
        def share(d):
            return " / ".join("-" if d[k] is None else f"{d[k]:.2f}" for k in ("1x", "4x", "16x"))
        recall = f"{share(r['recall'])} ({share(r['recall_control'])})"
        speed = " / ".join(f"{v:,.0f}" for v in r["tokens_per_s"].values()) if "tokens_per_s" in r else "-"
        val = r["val_bpc_train"]
        lines.append(f"| {r['model']} | {_mean(val):.4f} ± {_ci(val):.4f} | "
                     + " | ".join(f"{r['bpc'][i]:.3f} ± {r['bpc_ci95'][i]:.3f}" for i in shown)
                     + f" | {recall} | {speed} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in result["models"]:
        lo = [b - c for b, c in zip(r["bpc"], r["bpc_ci95"])]
        hi = [b + c for b, c in zip(r["bpc"], r["bpc_ci95"])]
        line, = ax.plot(r["positions"], r["bpc"], "o-", ms=3, label=r["model"])
        ax.fill_between(r["positions"], lo, hi, color=line.get_color(), alpha=0.2)
    train_len = result["models"][0]["train_len"]
    ax.axvline(train_len, color="grey", ls=":", label=f"training length ({train_len})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in the window (characters, bucket end)")
    ax.set_ylabel("validation bits/char")
    ax.set_ylim(top=min(8.0, ax.get_ylim()[1]))
    ax.set_title(f"bits/char by position, mean ± 95% over seeds {result['seeds']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- one folder's checkpoints
def state_distance(state, start) -> float:
    """Relative Frobenius distance of every memory tensor from the initial state's, pooled."""
    import torch
    num = den = 0.0
    for st, st0 in zip(state, start):
        for key, value in st.items():
            if key == "conv" or not torch.is_tensor(value):
                continue
            num += (value - st0[key]).square().sum().item()
            den += st0[key].square().sum().item()
    return math.sqrt(num / max(den, 1e-30))


def bucket_losses(model, windows, bucket: int, reset: int | None, hope: bool):
    """Mean loss per ``bucket``-wide position bucket, and (HOPE) the state's distance from its
    initial value at each bucket's end. ``reset``: restart the memories every ``reset`` chars."""
    import torch
    import torch.nn.functional as F
    from examples.hope.model import detach_state
    x, y = windows[:, :-1], windows[:, 1:]
    L = x.shape[1]
    with torch.no_grad():
        if not hope:
            logits = model(x)[0]
            per_pos = F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(0)
            return [per_pos[s:s + bucket].mean().item() for s in range(0, L, bucket)], None
        losses, drift, state = [], [], None
        start = [block.titans.initial_state(x.shape[0]) for block in model.blocks]
        for s in range(0, L, bucket):
            if reset and s % reset == 0:
                state = None
            logits, _, state = model(x[:, s:s + bucket], state=state, return_state=True)
            state = detach_state(state)
            losses.append(F.cross_entropy(logits.transpose(1, 2), y[:, s:s + bucket]).item())
            drift.append(state_distance(state, start))
        return losses, drift


def diagnose(args) -> dict:
    dirs = [Path(d) for d in args.ckpt_dir]
    found = {kind: next((d / f"{kind}.pt" for d in dirs if (d / f"{kind}.pt").exists()), None)
             for kind in ("hope", "transformer")}
    if not any(found.values()):
        raise FileNotFoundError(f"no hope.pt or transformer.pt in {', '.join(map(str, dirs))}: train first "
                                f"(python examples/hope/train.py --out {dirs[0]})")
    import torch
    torch.set_num_threads(args.threads)
    from examples.data import iter_eval_batches, load_shakespeare
    from examples.hope.continual import load_checkpoint
    corpus = load_shakespeare(args.cache_dir)
    result = dict(command="python examples/hope/long_context.py " + " ".join(args.argv),
                  length=args.length, bucket=args.bucket, reset=args.reset, windows=args.windows, models={})
    for kind, path in found.items():
        if path is None:
            continue
        model, tok, _ = load_checkpoint(path)
        result.setdefault("checkpoints", {})[kind] = str(path)
        model.eval()
        val = tok.encode_tensor(corpus.val)
        windows = torch.cat([torch.cat([x, y[:, -1:]], 1) for x, y in
                             iter_eval_batches(val, args.windows, args.length, args.windows)])
        if kind == "hope":
            carry, drift = bucket_losses(model, windows, args.bucket, None, True)
            reset, reset_drift = bucket_losses(model, windows, args.bucket, args.reset, True)
            result["models"][kind] = dict(carry_bpc=[v * TO_BPC for v in carry], carry_state_distance=drift,
                                          reset_bpc=[v * TO_BPC for v in reset], reset_state_distance=reset_drift)
        else:
            losses, _ = bucket_losses(model, windows, args.bucket, None, False)
            result["models"][kind] = dict(carry_bpc=[v * TO_BPC for v in losses])
        print(kind, json.dumps({k: [round(v, 3) for v in vs] for k, vs in result["models"][kind].items()}), flush=True)
    return result


def main(argv=None):
    ap = cli.parser(__doc__)
    from examples.hope.results.sweep_and_ablate import add_run_options
    add_run_options(ap)
    ap.add_argument("--jobs", type=cli.positive_int, default=2, help="training runs at a time (one thread each)")
    ap.add_argument("--windows", type=cli.positive_int, default=32, help="validation windows (16x train length)")
    ap.add_argument("--cases", type=cli.positive_int, default=200, help="passkey cases per length")
    ap.add_argument("--no-throughput", dest="throughput", action="store_false", help="skip the tokens/s rounds")
    ap.add_argument("--out", default=None, help="result file (default: results/long_context.json, or with "
                                                "--ckpt-dir <ckpt-dir>/long_context.json)")
    ap.add_argument("--ckpt-dir", nargs="+", default=None, help="measure these folders' hope.pt / transformer.pt")
    ap.add_argument("--length", type=cli.positive_int, default=1024, help="with --ckpt-dir: window length")
    ap.add_argument("--bucket", type=cli.positive_int, default=128, help="with --ckpt-dir: position bucket")
    ap.add_argument("--reset", type=cli.positive_int, default=128, help="with --ckpt-dir: reset period")
    ap.add_argument("--threads", type=cli.positive_int, default=2, help="torch CPU threads")
    ap.add_argument("--cache-dir", default=None, help="corpus cache (default: $DEEPOPT_CACHE or ~/.cache/deepopt)")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.ckpt_dir:
        result = diagnose(args)
        out = Path(args.out) if args.out else Path(args.ckpt_dir[0]) / "long_context.json"
    else:
        result = benchmark(args)
        out = Path(args.out) if args.out else RESULTS / "long_context.json"
        print(table(result), result["summary"], sep="\n\n")
        plot(result, out.with_suffix(".png"))
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    cli.run(main)
