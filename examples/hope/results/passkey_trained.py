"""Can the models recall a pass key when they are trained to? (long_context.py's recall test
cannot separate models that never saw the task: all score the decoy control's chance rate.)

    python examples/hope/results/passkey_trained.py     # -> examples/hope/results/passkey_trained.json

HOPE at its defaults and the Transformer++ of the same size train at the CPU preset's model size
and window (128 characters, batch 32; ``--steps`` with warm-up and cosine as train.py, the
``associative`` optimizer) on batches made of three kinds of rows:

* ``--share`` pass-key windows (long_context.passkey_cases): the key at the start, asked after a
  random distance that fits the window (``--no-spread``: always at its end), Shakespeare's
  training text between and after;
* ``--copy-share`` copy windows: random letters, a newline, the same letters again, of a random
  length (the dense copying signal a model needs before it can find a key in text: with pass-key
  windows alone neither model left chance in this script's first version, 500 steps);
* the rest plain training text.

With ``--segments N`` (HOPE only) the key is asked up to N windows away: the batch's pass-key rows
span the windows up to the ask and are read one window per call, the memory state carried from
window to window (as train.py's ``--carry-state``) and cut from the graph in between unless
``--no-detach``: the memory learns to keep a key past the window it is trained on. ``--init``
continues from a model saved with ``--save`` (e.g. trained inside the window first).

The loss is the mean next-character loss plus ``--key-weight`` times the mean loss on the letters
to recall (the asked key, the copied letters). Then recall of the key's letters on validation text
at 1x, 4x and 16x the training length, with the decoy-key control (``--cases`` each), the
Transformer++ read with full attention and with a sliding window of the training length. The two
models train in parallel processes (``--jobs``), one thread each.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
from examples import cli  # noqa: E402
from examples.hope.long_context import FACTORS  # noqa: E402

KINDS = ("hope", "transformer")


def keyed_rows(tok, text, n: int, length: int, ask_end: int, g):
    """(rows, mask): ``n`` pass-key windows of ``length`` characters, the key asked so that it ends at
    ``ask_end``, training text after it; mask marks the asked key."""
    import torch

    from examples.hope.long_context import passkey_cases
    rows, positions, _, _ = passkey_cases(tok, text, ask_end, n, seed=int(torch.randint(2**31, (1,), generator=g)))
    starts = torch.randint(len(text) - length, (n,), generator=g)
    after = torch.stack([text[s:s + length - ask_end] for s in starts])
    mask = torch.zeros(n, length, dtype=torch.bool)
    mask[:, positions] = True
    return torch.cat([rows, after], 1), mask


def copy_rows(tok, n: int, length: int, g, fixed: int | None = None):
    """(rows, mask): random letters, a newline, the same letters, random letters to ``length``. The
    copied string's length is ``fixed`` or drawn per batch (5 to about half the window), so that the
    copy is found by content, not at a fixed offset (which a Transformer learns from positions
    alone, and which does not carry over to a pass key). mask marks the copied letters after the
    first, which the newline alone cannot give away."""
    import torch

    from examples.hope.long_context import PASSKEY_LETTERS
    letters = torch.tensor(tok.encode(PASSKEY_LETTERS))
    half = fixed or int(torch.randint(5, (length - 1) // 2 + 1, (1,), generator=g))
    s = letters[torch.randint(len(letters), (n, half), generator=g)]
    pad = letters[torch.randint(len(letters), (n, length - 2 * half - 1), generator=g)]
    rows = torch.cat([s, torch.tensor(tok.encode("\n")).expand(n, 1), s, pad], 1)
    mask = torch.zeros(n, length, dtype=torch.bool)
    mask[:, half + 2:2 * half + 1] = True
    return rows, mask


def training_batch(tok, text, args, batch: int, length: int, g):
    """[(x, y, mask over y)]: the batch's rows grouped by length. Copy and plain rows are ``length``
    long; the pass-key rows ask their key at one distance for the batch (drawn up to ``args.segments``
    windows, or at the end of them) and span the windows that distance needs."""
    import torch

    from examples.data import get_batch
    from examples.hope.long_context import PASSKEY_MIN_LENGTH
    keyed, copied = round(args.share * batch), round(args.copy_share * batch)
    span = args.segments * length + 1
    ask_end = int(torch.randint(PASSKEY_MIN_LENGTH, span + 1, (1,), generator=g)) if args.spread else span
    keyed_len = -(-(ask_end - 1) // length) * length + 1     # whole windows up to the ask
    parts = [keyed_rows(tok, text, keyed, keyed_len, ask_end, g)] if keyed else []
    if copied:
        parts.append(copy_rows(tok, copied, length + 1, g, args.copy_len))
    if batch - keyed - copied:
        x, y = get_batch(text, batch - keyed - copied, length, g)
        parts.append((torch.cat([x, y[:, -1:]], 1), torch.zeros(len(x), length + 1, dtype=torch.bool)))
    groups = {}
    for rows, mask in parts:
        groups.setdefault(rows.shape[1], []).append((rows, mask))
    out = []
    for same in groups.values():
        rows, mask = (torch.cat(t) for t in zip(*same))
        out.append((rows[:, :-1], rows[:, 1:], mask[:, 1:]))
    return out


def windowed_ce(model, x, y, window: int, detach: bool):
    """Per-character loss of rows longer than the window read ``window`` characters per call, the
    memory state carried from call to call (``detach``: cut from the graph in between)."""
    import torch
    import torch.nn.functional as F

    from examples.hope.model import detach_state
    state, ce = None, []
    for s in range(0, x.shape[1], window):
        logits, _, state = model(x[:, s:s + window], state=state, return_state=True)
        ce.append(F.cross_entropy(logits.transpose(1, 2), y[:, s:s + window], reduction="none"))
        if detach and state is not None:
            state = detach_state(state)
    return torch.cat(ce, 1)


def train_and_measure(kind: str, args) -> list[dict]:
    """Train ``kind`` on the mixture, then its recall rows (one per attention window)."""
    import torch

    from examples.data import load_shakespeare
    from examples.hope import train as T
    from examples.hope.continual import load_checkpoint
    from examples.hope.long_context import passkey_cases, passkey_recall
    from examples.hope.model import build_model
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    corpus = load_shakespeare(args.cache_dir)
    tok = corpus.tokenizer
    p = T.PRESETS["cpu"]
    if args.init:   # fine-tune a model this script saved (--save)
        model = load_checkpoint(args.init)[0]
        cfg = model.cfg
    else:
        cfg = T.build_configs(T.parse_args([]), tok.vocab_size)[kind]
        model = build_model(cfg)
    opt = T.make_optimizer("associative", model, args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, T.lr_lambda(p["warmup"], args.steps))
    text, val = tok.encode_tensor(corpus.train), tok.encode_tensor(corpus.val)
    g = torch.Generator().manual_seed(args.seed)
    start, history = time.perf_counter(), []
    for step in range(args.steps):
        parts = training_batch(tok, text, args, p["batch_size"], cfg.block_size, g)
        ce = torch.cat([windowed_ce(model, x, y, cfg.block_size, args.detach).flatten() for x, y, _ in parts])
        mask = torch.cat([m.flatten() for _, _, m in parts])
        loss = ce.mean() + args.key_weight * ce[mask].mean() if mask.any() else ce.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 250 == 0 or step + 1 == args.steps:
            history.append(dict(step=step + 1, loss=ce[~mask].mean().item(),
                                recall_loss=ce[mask].mean().item() if mask.any() else None))
            print(f"[{kind}] step {step + 1}: loss {history[-1]['loss']:.3f}, on the letters to recall "
                  f"{history[-1]['recall_loss'] or float('nan'):.3f}", flush=True)
    seconds = time.perf_counter() - start
    model.eval()
    out = []
    for window in ([None] if kind == "hope" else [None, cfg.block_size]):
        if kind == "transformer":
            model.cfg.window = window
        row = dict(model={"hope": "HOPE (defaults)"}.get(kind, "Transformer++ (" + (
            "RoPE, full attention)" if window is None else f"sliding window {window})")),
            train_s=seconds, history=history, recall={}, recall_whole={}, recall_by_letter={}, recall_control={})
        for f in args.factors:
            rows, pos, keys, controls = passkey_cases(tok, val, f * cfg.block_size, args.cases, seed=1000 + f)
            with torch.no_grad():
                (row["recall"][f"{f}x"], row["recall_whole"][f"{f}x"],
                 row["recall_by_letter"][f"{f}x"]) = passkey_recall(model, rows, pos, keys)
                row["recall_control"][f"{f}x"] = passkey_recall(model, controls, pos, keys)[0]
        print(json.dumps({k: v for k, v in row.items() if k != "history"}), flush=True)
        out.append(row)
    if args.save:   # continual.load_checkpoint's format
        model.cfg.window = None
        Path(args.save).mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "config": dataclasses.asdict(cfg), "tokenizer": tok.state_dict()},
                   Path(args.save) / f"{kind}.pt")
    return out


def table(results: list[dict]) -> str:
    """docs/hope.md's table of these runs (tests/test_docs.py checks it against the JSONs)."""
    factors = list(results[0]["models"][0]["recall"])
    lines = ["| training rows (seed) | model | recall " + " / ".join(factors) + " | keys whole | control |",
             "|---|---|---|---|---|"]
    for r in results:
        copy = f"copies of {r['copy_len']} letters" if r.get("copy_len") else "copies of 5-64 letters"
        segments = r.get("segments", 1)
        where = "at a random distance" if r["spread"] else "asked at the end"
        if segments > 1:
            where += (f" of {'up to ' if r['spread'] else ''}{segments} windows, state carried"
                      + (", detached" if r["detach"] else ""))
        rows = (f"{r['share']:.0%} pass key ({where}), "
                f"{r['copy_share']:.0%} {copy}; "
                + (f"{r['steps']} more steps at lr {r['lr']:g} ({r['seed']})" if r.get("init") else
                   f"{r['steps']} steps ({r['seed']})"))
        for m in r["models"]:
            cells = [" / ".join(f"{m[key][f]:.1%}" for f in factors)
                     for key in ("recall", "recall_whole", "recall_control")]
            lines.append(f"| {rows} | {m['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = cli.parser(__doc__)
    ap.add_argument("--share", type=float, default=0.5, help="share of each batch's rows that are pass-key windows")
    ap.add_argument("--copy-share", type=float, default=0.5, help="share of each batch's rows that are copy windows")
    ap.add_argument("--copy-len", type=cli.positive_int, default=None,
                    help="length of every copied string, at most half the window (default: random per batch, 5-64)")
    ap.add_argument("--no-spread", dest="spread", action="store_false",
                    help="ask the key at the end of every pass-key window (default: at a random distance)")
    ap.add_argument("--segments", type=cli.positive_int, default=1,
                    help="pass-key rows ask their key up to this many training windows away, HOPE reading them "
                         "window by window with its memory state carried (needs --model hope)")
    ap.add_argument("--no-detach", dest="detach", action="store_false",
                    help="with --segments: backpropagate through the carried state (default: detached between "
                         "windows, so gradients stay within one training window)")
    ap.add_argument("--key-weight", type=cli.nonnegative_float, default=1.0,
                    help="weight of the loss on the letters to recall, added to the mean loss")
    ap.add_argument("--init", default=None,
                    help="start from this saved model (a --save folder's hope.pt or transformer.pt; needs --model)")
    ap.add_argument("--steps", type=cli.nonnegative_int, default=3000,
                    help="training steps (0 with --init: measure a saved model)")
    ap.add_argument("--factors", type=cli.positive_int, nargs="+", default=list(FACTORS),
                    help="recall measured at these multiples of the training length")
    ap.add_argument("--lr", type=cli.positive_float, default=3e-3, help="learning rate (both models)")
    ap.add_argument("--seed", type=cli.nonnegative_int, default=1, help="training seed")
    ap.add_argument("--cases", type=cli.positive_int, default=200, help="recall cases per length")
    ap.add_argument("--model", choices=[*KINDS, "both"], default="both", help="the model(s) to train")
    ap.add_argument("--jobs", type=cli.positive_int, default=2, help="models trained at once (a process each)")
    ap.add_argument("--save", default=None, help="folder for the trained models (hope.pt, transformer.pt); default: none")
    ap.add_argument("--cache-dir", default=None, help="corpus cache (default: $DEEPOPT_CACHE or ~/.cache/deepopt)")
    ap.add_argument("--out", default=str(HERE / "passkey_trained.json"), help="result file")
    args = ap.parse_args(argv)
    if not 0.0 < args.share <= 1.0:
        ap.error(f"--share must lie in (0, 1], got {args.share}")
    if not 0.0 <= args.copy_share <= 1.0 - args.share:
        ap.error(f"--copy-share must lie in [0, 1 - --share] = [0, {1 - args.share:g}], got {args.copy_share}")
    if args.copy_len is not None and not 2 <= args.copy_len <= 64:
        ap.error(f"--copy-len must lie in [2, 64] (half the 129-character window), got {args.copy_len}")
    if args.segments > 1 and args.model != "hope":
        ap.error(f"--segments {args.segments} needs --model hope (the Transformer++ carries no state from window "
                 "to window)")
    if args.steps == 0 and args.init is None:
        ap.error("--steps 0 measures a saved model: it needs --init")
    if args.init is not None:
        if args.model == "both":
            ap.error("--init needs --model hope or --model transformer (the kind of the saved model)")
        if not Path(args.init).is_file():
            ap.error(f"--init {args.init}: no such file")
        import torch
        saved = torch.load(args.init, map_location="cpu", weights_only=False).get("config", {}).get("kind", "hope")
        if saved != args.model:
            ap.error(f"--init {args.init} holds a {saved} model, not --model {args.model}")
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch
    kinds = KINDS if args.model == "both" else [args.model]
    result = dict(command="python examples/hope/results/passkey_trained.py " + " ".join(sys.argv[1:] if argv is None
                                                                                      else argv),
                  date=time.strftime("%Y-%m-%d"), device="cpu (1 thread per model)", torch=torch.__version__,
                  **{k: getattr(args, k) for k in ("share", "copy_share", "copy_len", "spread", "segments", "detach",
                                                   "init", "key_weight", "steps", "lr", "seed", "cases", "factors")}, models=[])
    with ProcessPoolExecutor(min(args.jobs, len(kinds)), mp_context=multiprocessing.get_context("spawn")) as pool:
        for rows in pool.map(train_and_measure, kinds, [args] * len(kinds)):
            result["models"] += rows
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(table([result]))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    cli.run(main)
