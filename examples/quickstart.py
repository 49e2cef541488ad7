"""Quick start: deepopt in a plain PyTorch training loop.

    python examples/quickstart.py                       # DeepMomentum, 600 steps, a few seconds on a CPU
    python examples/quickstart.py --optimizer m3
    python examples/quickstart.py --ckpt /tmp/q.pt --stop-after 300   # interrupted at 300 ...
    python examples/quickstart.py --ckpt /tmp/q.pt                    # ... resumes there

Two-spirals classification with a small MLP. The only deepopt-specific line is the one that
builds the optimizer; scheduler, gradient clipping and checkpointing are plain torch.
"""

import math
import os
import sys
from pathlib import Path

if __package__ in (None, ""):   # `python examples/quickstart.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# torch and deepopt are imported inside the functions: --help answers before they load
from examples import cli


def two_spirals(n, noise=0.1, seed=0):
    import torch
    gen = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=gen) * 3 * math.pi + 0.5
    label = torch.randint(0, 2, (n,), generator=gen)
    sign = 1 - 2 * label.float()
    x = torch.stack([sign * t * torch.cos(t), sign * t * torch.sin(t)], dim=1) / 5
    return x + noise * torch.randn(n, 2, generator=gen), label


def build_optimizer(name, model, lr, process_group=None):
    """deepopt.create_optimizer routes the params: matrices to the rule; for m3 the rest to AdamW.
    ``process_group`` (DDP): the ranks that share m3's Newton-Schulz work."""
    import deepopt
    if name == "multifreq":   # first layer updates every 4 steps on its summed gradients
        return deepopt.create_optimizer(model, "multifreq:deep", lr=lr, periods={r"^0\.": 4}, reduce="sum")
    if name == "m3":
        return deepopt.create_optimizer(model, "m3", lr=lr, adamw_lr=3e-3, precondition=False,
                                        process_group=process_group)
    if name == "delta":
        return deepopt.create_optimizer(model, "delta", lr=lr, delta=0.3)
    return deepopt.create_optimizer(model, "sgd" if name == "associative" else name, lr=lr)


def default_lr(optimizer):
    return 0.02 if optimizer == "m3" else 0.5


def add_arguments(parser):
    """The options quickstart.py and ddp_train.py share."""
    parser.add_argument("--optimizer", default="deep", choices=["deep", "delta", "associative", "m3", "multifreq"],
                        help="the deepopt rule (multifreq: DeepMomentum, the first layer every 4 steps)")
    parser.add_argument("--lr", type=cli.positive_float, default=None,
                        help=f"learning rate (default: {default_lr('deep')}, {default_lr('m3')} for m3)")
    parser.add_argument("--steps", type=cli.positive_int, default=600, help="training steps")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and batch-order seed")
    parser.add_argument("--stop-after", type=cli.nonnegative_int, default=None,
                        help="stop (and checkpoint) after this step, as if interrupted (default: run all --steps)")


def parse_args(argv=None):
    parser = cli.parser(__doc__)
    add_arguments(parser)
    parser.add_argument("--ckpt", default=None,
                        help="checkpoint file: saved at the end, resumed if present (default: none)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch
    import torch.nn.functional as F
    lr = args.lr if args.lr is not None else default_lr(args.optimizer)

    torch.manual_seed(args.seed)
    x_train, y_train = two_spirals(2048, seed=1)
    x_val, y_val = two_spirals(512, seed=2)
    model = torch.nn.Sequential(torch.nn.Linear(2, 128), torch.nn.Tanh(), torch.nn.Linear(128, 128),
                                torch.nn.Tanh(), torch.nn.Linear(128, 2))
    opt = build_optimizer(args.optimizer, model, lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    start = 0
    if args.ckpt and os.path.exists(args.ckpt):
        ckpt = torch.load(args.ckpt, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        start = ckpt["step"]
        print(f"resumed from {args.ckpt} at step {start}")

    gen = torch.Generator().manual_seed(args.seed)
    if start:   # replay the batch stream up to the checkpoint
        for _ in range(start):
            torch.randint(0, len(x_train), (128,), generator=gen)
    end = args.steps if args.stop_after is None else min(args.steps, args.stop_after)
    for step in range(start, end):
        idx = torch.randint(0, len(x_train), (128,), generator=gen)
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            with torch.no_grad():
                accuracy = (model(x_val).argmax(1) == y_val).float().mean().item()
            print(f"step {step:4d}  loss {loss.item():.4f}  val acc {accuracy:.3f}")

    if args.ckpt:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "step": end}, args.ckpt)
    return model


if __name__ == "__main__":
    cli.run(main)
