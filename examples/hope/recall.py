"""Test-time learning (a): multi-query associative recall beyond the training length.

    python examples/hope/recall.py                 # HOPE vs Transformer++, cpu, ~4 minutes
    python examples/hope/recall.py --seed 0 1 2

Each sequence stores ``n_pairs`` key-value pairs ``k1 v1 k2 v2 ...`` and then asks queries
``q a q a ...`` (a query is one of the stored keys; the model must output its value at the query
position). Both models are trained on sequences of length ``--train-len`` (default 32: 8 pairs,
8 queries; 32 keys, 32 values)
and evaluated, without any further training, on longer sequences:

* ``same_pairs``: the same number of pairs (8) followed by more queries (total length 2x, 4x, 8x): the
  stored associations must survive a longer context;
* ``more_pairs``: length and number of pairs scaled together (n_pairs = min(length / 4, 32):
  the 32 keys of the vocabulary are all distinct within a sequence).

HOPE's in-context memories keep writing while it reads the sequence (the test-time learning); the
Transformer must attend over positions it never saw in training (RoPE). Accuracy is measured on
the answer tokens only.
"""
from __future__ import annotations

import datetime
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# torch and the model are imported inside the functions: --help answers before they load
from examples import cli
from examples.hope.train import MODELS, OPTIMIZERS, lr_lambda, make_optimizer, model_kinds

N_KEYS, N_VALUES = 32, 32          # vocabulary: keys 0..31, values 32..63 (--n-keys/--n-values)


def make_batch(batch, n_pairs, n_queries, generator=None):
    """Inputs (B, L), targets (B, L) with -100 except at query positions; L = 2 (pairs + queries)."""
    import torch
    keys = torch.rand(batch, N_KEYS, generator=generator).argsort(-1)[:, :n_pairs]
    vals = N_KEYS + torch.randint(N_VALUES, (batch, n_pairs), generator=generator)
    which = torch.randint(n_pairs, (batch, n_queries), generator=generator)
    qk, qv = keys.gather(1, which), vals.gather(1, which)
    ctx = torch.stack([keys, vals], -1).flatten(1)
    qa = torch.stack([qk, qv], -1).flatten(1)
    x = torch.cat([ctx, qa], 1)
    y = torch.full_like(x, -100)
    y[:, 2 * n_pairs::2] = qv                  # at a query token, predict its value
    return x, y


def loss_and_acc(model, x, y):
    import torch.nn.functional as F
    logits = model(x)[0]
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    m = y != -100
    acc = (logits.argmax(-1)[m] == y[m]).float().mean().item()
    return loss, acc


def train_recall(kind, cfg, args, seed):
    import torch
    from examples.hope.model import build_model
    torch.manual_seed(seed)
    model = build_model(cfg)
    lr = args.lr if kind == "hope" else (args.lr_transformer or args.lr)
    opt = make_optimizer(args.optimizer, model, lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.steps // 10, args.steps))
    gen = torch.Generator().manual_seed(1000 + seed)
    n = args.train_len // 4
    t0 = time.perf_counter()
    for step in range(args.steps):
        x, y = make_batch(args.batch_size, n, n, gen)
        loss, acc = loss_and_acc(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if (step + 1) % 100 == 0 and not args.quiet:
            print(f"  [{kind} seed {seed}] step {step + 1}: loss {loss.item():.3f} acc {acc:.3f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    return model, time.perf_counter() - t0


def evaluate_recall(model, lengths, train_len, n_batches=4, batch=64, seed=12345):
    import torch
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    n_train = train_len // 4
    out = {"same_pairs": {}, "more_pairs": {}}
    with torch.no_grad():
        for L in lengths:
            accs_same, accs_more = [], []
            for _ in range(n_batches):
                x, y = make_batch(batch, n_train, L // 2 - n_train, gen)
                accs_same.append(loss_and_acc(model, x, y)[1])
                n = min(L // 4, N_KEYS)              # all keys distinct: at most N_KEYS pairs
                x, y = make_batch(batch, n, L // 2 - n, gen)
                accs_more.append(loss_and_acc(model, x, y)[1])
            out["same_pairs"][L] = sum(accs_same) / n_batches
            out["more_pairs"][L] = sum(accs_more) / n_batches
    model.train()
    return out


def parse_args(argv=None):
    ap = cli.parser(__doc__)
    ap.add_argument("--seed", type=int, nargs="+", default=[0], help="seeds: one training run per seed and model")
    ap.add_argument("--model", choices=MODELS, default="both", help="the model(s) to train")
    ap.add_argument("--n-keys", type=cli.positive_int, default=N_KEYS, help="key tokens in the vocabulary")
    ap.add_argument("--n-values", type=cli.positive_int, default=N_VALUES, help="value tokens in the vocabulary")
    ap.add_argument("--steps", type=cli.positive_int, default=800, help="training steps")
    ap.add_argument("--batch-size", type=cli.positive_int, default=64, help="sequences per step")
    ap.add_argument("--train-len", type=cli.positive_int, default=32,
                    help="training sequence length (a multiple of 4: pairs, then as many queries)")
    ap.add_argument("--eval-lengths", type=cli.positive_int, nargs="+", default=[32, 64, 128, 256, 512],
                    help="evaluation sequence lengths (>= --train-len)")
    ap.add_argument("--n-embd", type=cli.positive_int, default=64, help="model width")
    ap.add_argument("--n-head", type=cli.positive_int, default=1, help="attention / memory heads")
    ap.add_argument("--n-layer", type=cli.positive_int, default=2, help="layers")
    ap.add_argument("--optimizer", choices=OPTIMIZERS, default="associative",
                    help="as in train.py, wrapped in deepopt.MultiFrequency")
    ap.add_argument("--lr", type=cli.positive_float, default=1e-2, help="HOPE's learning rate")
    ap.add_argument("--lr-transformer", type=cli.positive_float, default=1e-3,
                    help="the Transformer's (at 1e-2 and 3e-3 it stays on the recall plateau)")
    ap.add_argument("--threads", type=cli.positive_int, default=1, help="CPU threads")
    ap.add_argument("--out", default="out/hope", help="output folder (recall.json)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)
    if args.train_len % 4 or args.train_len // 4 > args.n_keys:
        ap.error(f"--train-len must be a multiple of 4 and at most 4 x --n-keys ({4 * args.n_keys}), "
                 f"got {args.train_len}")
    short = [L for L in args.eval_lengths if L < args.train_len]
    if short:
        ap.error(f"--eval-lengths must be >= --train-len ({args.train_len}), got {short}")
    return args


def main(argv=None):
    global N_KEYS, N_VALUES
    args = parse_args(argv)
    import torch
    from examples.hope.model import HopeConfig, count_params, matched_transformer_config
    N_KEYS, N_VALUES = args.n_keys, args.n_values
    torch.set_num_threads(args.threads)
    hcfg = HopeConfig(vocab_size=N_KEYS + N_VALUES, block_size=args.train_len, n_layer=args.n_layer,
                      n_embd=args.n_embd, n_head=args.n_head, cms_hidden=2 * args.n_embd,
                      chunk_size=8, gen_chunk_size=16)
    cfgs = {"hope": hcfg, "transformer": matched_transformer_config(hcfg)}
    cfgs = {k: cfgs[k] for k in model_kinds(args.model)}
    res = {"command": "python examples/hope/recall.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": f"cpu ({platform.machine()}, {args.threads} thread(s))", "torch": torch.__version__,
           "args": vars(args), "configs": {k: asdict(c) for k, c in cfgs.items()}, "runs": []}
    for seed in args.seed:
        for kind, cfg in cfgs.items():
            model, t = train_recall(kind, cfg, args, seed)
            acc = evaluate_recall(model, args.eval_lengths, args.train_len)
            run = {"kind": kind, "seed": seed, "params": count_params(model), "train_time_s": t, **acc}
            res["runs"].append(run)
            print(f"{kind:12s} seed {seed}: same_pairs {acc['same_pairs']}  more_pairs {acc['more_pairs']}",
                  flush=True)
    summary = {}
    for kind in cfgs:
        rs = [r for r in res["runs"] if r["kind"] == kind]
        summary[kind] = {mode: {L: sum(r[mode][L] for r in rs) / len(rs) for L in args.eval_lengths}
                         for mode in ("same_pairs", "more_pairs")}
    res["summary"] = summary
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recall.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(summary, indent=1))
    return res


if __name__ == "__main__":
    cli.run(main)
