"""Does torch.compile close HOPE's throughput gap on the CPU? Training tokens/s of HOPE and the
Transformer++ at the CPU preset (batch 32 x 128 characters), eager and compiled (inductor), and
the first step's time (the compile). One process, 2 threads, 5 timed steps after the first.

    python examples/hope/results/compile_throughput.py   # -> examples/hope/results/compile_throughput.json
"""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))
from examples import cli  # noqa: E402


def main(argv=None):
    ap = cli.parser(__doc__)
    ap.add_argument("--steps", type=cli.positive_int, default=5, help="timed steps per model and mode")
    ap.add_argument("--threads", type=cli.positive_int, default=2, help="torch CPU threads")
    ap.add_argument("--out", default=str(HERE / "compile_throughput.json"), help="result file")
    args = ap.parse_args(argv)
    import torch

    from examples.hope import train as T
    from examples.hope.model import build_model
    torch.set_num_threads(args.threads)
    configs = T.build_configs(T.parse_args([]), 65)
    x = torch.randint(65, (32, 128))
    result = dict(command="python examples/hope/results/compile_throughput.py", date=time.strftime("%Y-%m-%d"),
                  device=f"cpu ({platform.machine()}, {args.threads} threads)", torch=torch.__version__, runs={})
    for name in ("hope", "transformer"):
        for compiled in (False, True):
            model = build_model(configs[name])
            opt = T.make_optimizer("associative", model, T.DEFAULT_LR["associative"])
            step_fn = torch.compile(model) if compiled else model
            times = []
            for _ in range(args.steps + 1):
                start = time.perf_counter()
                step_fn(x, x)[1].backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - start)
            key = f"{name} {'compiled' if compiled else 'eager'}"
            result["runs"][key] = dict(first_step_s=times[0], tokens_per_s=x.numel() * args.steps / sum(times[1:]))
            print(key, json.dumps(result["runs"][key]), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    cli.run(main)
