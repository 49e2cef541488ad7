"""Where HOPE's loss goes beyond its training context: validation loss per 128-character
position bucket of 1,024-character windows, with the memories writing over the whole window
("carry", as continual.py --eval-lengths measures it) and reset every ``--reset`` characters to
the meta-learned initial state, as in training ("reset"); plus how far the memory states move
from that initial state along the window. The Transformer++ checkpoint, if present, is
measured the same way (no state: its positions beyond training rely on RoPE alone).

    python examples/hope/results/long_context.py --ckpt-dir out/hope   # -> <ckpt-dir>/long_context.json

``--ckpt-dir`` takes several folders: each model comes from the first one holding its checkpoint.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
from examples import cli  # noqa: E402


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


def main(argv=None):
    ap = cli.parser(__doc__)
    ap.add_argument("--ckpt-dir", nargs="+", default=["out/hope"], help="folders with hope.pt (and transformer.pt)")
    ap.add_argument("--length", type=cli.positive_int, default=1024, help="window length (characters)")
    ap.add_argument("--bucket", type=cli.positive_int, default=128, help="position bucket (the training length)")
    ap.add_argument("--reset", type=cli.positive_int, default=128, help="reset period of the 'reset' variant")
    ap.add_argument("--windows", type=cli.positive_int, default=64, help="validation windows")
    ap.add_argument("--threads", type=cli.positive_int, default=1, help="torch CPU threads")
    ap.add_argument("--cache-dir", default=None, help="corpus cache (default: $DEEPOPT_CACHE or ~/.cache/deepopt)")
    ap.add_argument("--out", default=None, help="result file (default: <ckpt-dir>/long_context.json)")
    args = ap.parse_args(argv)
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
    result = dict(command="python examples/hope/results/long_context.py " + " ".join(argv or sys.argv[1:]),
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
        to_bpc = 1 / math.log(2)
        if kind == "hope":
            carry, drift = bucket_losses(model, windows, args.bucket, None, True)
            reset, reset_drift = bucket_losses(model, windows, args.bucket, args.reset, True)
            result["models"][kind] = dict(carry_bpc=[v * to_bpc for v in carry], carry_state_distance=drift,
                                          reset_bpc=[v * to_bpc for v in reset], reset_state_distance=reset_drift)
        else:
            losses, _ = bucket_losses(model, windows, args.bucket, None, False)
            result["models"][kind] = dict(carry_bpc=[v * to_bpc for v in losses])
        print(kind, json.dumps({k: [round(v, 3) for v in vs] for k, vs in result["models"][kind].items()}), flush=True)
    out = Path(args.out) if args.out else dirs[0] / "long_context.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    cli.run(main)
