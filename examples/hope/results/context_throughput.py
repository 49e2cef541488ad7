"""Training tokens/s of HOPE and the Transformer++ at the CPU preset's widths as the context grows
(128, 512, 2048 characters; 4096 tokens per step: batch 32, 8, 2), both models in one process in
alternating rounds so that machine load hits both alike (8 rounds of 5 steps, the first a warm-up);
medians.

    python examples/hope/results/context_throughput.py     # -> examples/hope/results/context_throughput.json
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
from examples import cli  # noqa: E402

TOKENS_PER_STEP = 4096


def training_tokens_per_s(configs: dict, lengths, rounds: int = 3, steps: int = 2,
                          optimizer: str = "associative") -> dict:
    """{str(length): {name: median training tokens/s}} of the models ``configs`` maps names to
    (each config's ``block_size`` set to the length), 4096 tokens per step, the models in
    alternating rounds (the first a warm-up) so that machine load hits all alike."""
    import dataclasses

    import torch

    from examples.hope import train as T
    from examples.hope.model import build_model
    out = {}
    for length in lengths:
        batch = max(1, TOKENS_PER_STEP // length)
        models = {k: build_model(dataclasses.replace(c, block_size=length)) for k, c in configs.items()}
        opts = {k: T.make_optimizer(optimizer, m, T.DEFAULT_LR[optimizer]) for k, m in models.items()}
        x = torch.randint(configs[next(iter(configs))].vocab_size, (batch, length))
        rates = {k: [] for k in models}
        for r in range(rounds):
            for k, m in models.items():
                start = time.perf_counter()
                for _ in range(steps):
                    m(x, x)[1].backward()
                    opts[k].step()
                    opts[k].zero_grad(set_to_none=True)
                if r:
                    rates[k].append(steps * batch * length / (time.perf_counter() - start))
        out[str(length)] = {k: statistics.median(v) for k, v in rates.items()}
    return out


def main(argv=None):
    ap = cli.parser(__doc__)
    ap.add_argument("--lengths", type=cli.positive_int, nargs="+", default=[128, 512, 2048], help="contexts")
    ap.add_argument("--rounds", type=cli.positive_int, default=8, help="alternating rounds (the first is warm-up)")
    ap.add_argument("--steps", type=cli.positive_int, default=5, help="training steps per model and round")
    ap.add_argument("--threads", type=cli.positive_int, default=2, help="torch CPU threads")
    ap.add_argument("--out", default=str(HERE / "context_throughput.json"), help="result file")
    args = ap.parse_args(argv)
    import torch

    from examples.hope import train as T
    torch.set_num_threads(args.threads)
    result = dict(command="python examples/hope/results/context_throughput.py", date=time.strftime("%Y-%m-%d"),
                  device=f"cpu ({platform.machine()}, {args.threads} threads)", torch=torch.__version__,
                  tokens_per_step=TOKENS_PER_STEP, rounds=args.rounds, steps_per_round=args.steps, tokens_per_s={})
    configs = T.build_configs(T.parse_args([]), 65)
    for length in args.lengths:
        med = training_tokens_per_s(configs, [length], args.rounds, args.steps)[str(length)]
        result["tokens_per_s"][str(length)] = med
        print(f"context {length}: HOPE {med['hope']:,.0f}, Transformer++ {med['transformer']:,.0f} tokens/s "
              f"({med['hope'] / med['transformer']:.2f}x)", flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    cli.run(main)
