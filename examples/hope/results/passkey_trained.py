"""Can the models recall a pass key when they are trained to? (long_context.py's recall test
cannot separate models that never saw the task: all score the decoy control's chance rate.)

    python examples/hope/results/passkey_trained.py     # -> examples/hope/results/passkey_trained.json

HOPE at its defaults and the Transformer++ of the same size train at the CPU preset (500 steps of
32 x 128 characters, lr 1e-2, the ``associative`` optimizer, warm-up and cosine as train.py) on
batches whose first ``--share`` of rows are pass-key windows of the training length (the key at
the start, asked at the end, Shakespeare's training text between: long_context.passkey_cases),
the rest plain text. Then recall of the key's letters on validation text at 1x, 4x and 16x the
training length, with the decoy-key control (200 cases each), the Transformer++ read with full
attention and with a sliding window of the training length.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
from examples import cli  # noqa: E402


def train_on_passkeys(kind: str, corpus, args):
    import torch

    from examples.data import get_batch
    from examples.hope import train as T
    from examples.hope.long_context import passkey_cases
    from examples.hope.model import build_model
    torch.manual_seed(args.seed)
    p = T.PRESETS["cpu"]
    tok = corpus.tokenizer
    cfg = T.build_configs(T.parse_args([]), tok.vocab_size)[kind]
    model = build_model(cfg)
    opt = T.make_optimizer("associative", model, args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, T.lr_lambda(p["warmup"], args.steps))
    text = tok.encode_tensor(corpus.train)
    keyed = round(args.share * p["batch_size"])
    g = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for step in range(args.steps):
        x, y = get_batch(text, p["batch_size"] - keyed, p["block_size"], g)
        rows = passkey_cases(tok, text, p["block_size"] + 1, keyed, seed=args.seed * 100_000 + step)[0]
        x, y = torch.cat([rows[:, :-1], x]), torch.cat([rows[:, 1:], y])
        loss = model(x, y)[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            print(f"[{kind}] step {step + 1}: loss {loss.item():.3f}", flush=True)
    return model.eval(), cfg, time.perf_counter() - start


def main(argv=None):
    ap = cli.parser(__doc__)
    ap.add_argument("--share", type=float, default=0.5, help="share of each batch's rows that are pass-key windows")
    ap.add_argument("--steps", type=cli.positive_int, default=500, help="training steps")
    ap.add_argument("--lr", type=float, default=1e-2, help="learning rate (long_context.py's)")
    ap.add_argument("--seed", type=cli.nonnegative_int, default=1, help="training seed")
    ap.add_argument("--cases", type=cli.positive_int, default=200, help="recall cases per length")
    ap.add_argument("--threads", type=cli.positive_int, default=2, help="torch CPU threads")
    ap.add_argument("--cache-dir", default=None, help="corpus cache (default: $DEEPOPT_CACHE or ~/.cache/deepopt)")
    ap.add_argument("--out", default=str(HERE / "passkey_trained.json"), help="result file")
    args = ap.parse_args(argv)
    if not 0.0 < args.share <= 1.0:
        ap.error(f"--share must lie in (0, 1], got {args.share}")
    import torch

    from examples.data import load_shakespeare
    from examples.hope.long_context import FACTORS, passkey_cases, passkey_recall
    torch.set_num_threads(args.threads)
    corpus = load_shakespeare(args.cache_dir)
    val = corpus.tokenizer.encode_tensor(corpus.val)
    result = dict(command="python examples/hope/results/passkey_trained.py " + " ".join(sys.argv[1:] if argv is None
                                                                                      else argv),
                  date=time.strftime("%Y-%m-%d"), device=f"cpu ({args.threads} threads)", torch=torch.__version__,
                  share=args.share, steps=args.steps, lr=args.lr, seed=args.seed, cases=args.cases, models=[])
    for kind in ("hope", "transformer"):
        model, cfg, seconds = train_on_passkeys(kind, corpus, args)
        for window in ([None] if kind == "hope" else [None, cfg.block_size]):
            if kind == "transformer":
                model.cfg.window = window
            row = dict(model={"hope": "HOPE (defaults)"}.get(kind, "Transformer++ (" + (
                "RoPE, full attention)" if window is None else f"sliding window {window})")),
                train_s=seconds, recall={}, recall_whole={}, recall_control={})
            for f in FACTORS:
                rows, pos, keys, controls = passkey_cases(corpus.tokenizer, val, f * cfg.block_size, args.cases,
                                                          seed=1000 + f)
                row["recall"][f"{f}x"], row["recall_whole"][f"{f}x"] = passkey_recall(model, rows, pos, keys)
                row["recall_control"][f"{f}x"] = passkey_recall(model, controls, pos, keys)[0]
            print(json.dumps(row), flush=True)
            result["models"].append(row)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    cli.run(main)
