"""Optimizer factory: ``name -> (build(model, lr, *, aux_lr, seed, mf_periods), LR grid)``.

Every optimizer runs with weight decay 0 (budgets are a few hundred steps). ``aux_lr`` is the
AdamW learning rate for the parameters a matrix optimizer does not take (Muon, M3 and the
Newton-Schulz DeepMomentum route embeddings, the head, biases and norms to AdamW, as Muon users
do): the benchmark passes AdamW's best LR on the same task.

Names:
    sgd          torch.optim.SGD, momentum 0.9
    adamw        torch.optim.AdamW, betas (0.9, 0.999), weight_decay 0
    muon         torch.optim.Muon on 2-D hidden matrices (momentum 0.95, Nesterov) + AdamW
                 (aux_lr) for the rest; torch's Muon takes only 2-D params, so conv kernels go
                 to AdamW (M3 and deep-ns view them as matrices).
    assoc-sgd    deepopt.AssociativeMomentum (SGD convention): not swept, one confirming run at
                 sgd's best LR (must equal torch SGD exactly)
    assoc-adamw  deepopt.AssociativeMomentum(preconditioner="adam", decoupled_weight_decay=True):
                 confirming run at adamw's best LR (must equal torch AdamW exactly)
    delta        deepopt.DeltaMomentum, momentum 0.9, delta 0.5, keys="matrix" (the defaults)
    delta-spectral  the same with keys="spectral" (keys over sigma_1: the comparison the Frobenius keys need)
    deep         deepopt.DeepMomentum, momentum 0.9, defaults (MLP memory, l2 objective,
                 identity output)
    deep-ns      deepopt.DeepMomentum(output="newton_schulz", momentum=dampening=0.95, Nesterov,
                 adjust_lr="original") on the matrices + AdamW (aux_lr) for the rest
    m3           deepopt.M3 (defaults) on M3.matrix_groups(model), AdamW (aux_lr) for the rest
    mf-adamw     deepopt.MultiFrequency(AdamW, reduce="mean") with the task's slow levels
    mf-deep      deepopt.MultiFrequency(DeepMomentum, reduce="mean") with the task's slow levels
    adamw-level-lr  the control for mf-adamw: torch AdamW stepping every param every step, with
                 each slow level's lr scaled by 1/C (C = that level's period): the same total lr
                 per level as mf-adamw's one step every C, without the multi-frequency updates
"""
from __future__ import annotations

import numpy as np
import torch

import deepopt
from deepopt.create import split_params


def log_grid(lo_exp: float, hi_exp: float, per_decade: int = 2) -> list[float]:
    """LRs 10**e for e from lo_exp to hi_exp in steps of 1/per_decade (rounded to 3 digits)."""
    n = int(round((hi_exp - lo_exp) * per_decade)) + 1
    return [float(f"{10 ** e:.3g}") for e in np.linspace(lo_exp, hi_exp, n)]


class Chain:
    """torch Muon and torch AdamW stepped together (torch's Muon takes 2-D matrices only)."""

    def __init__(self, *opts):
        self.opts = [o for o in opts if o is not None]

    @property
    def param_groups(self):
        return [g for o in self.opts for g in o.param_groups]

    def zero_grad(self, set_to_none=True):
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        for o in self.opts:
            o.step()


def _split_matrices(model, two_d_only=False):
    """(matrices, others) by deepopt.create_optimizer's routing (hidden matrices vs embeddings,
    head, ndim < 2); ``two_d_only`` also sends conv kernels (ndim > 2) to ``others``."""
    mats, others = ([p for _, p in named] for named in split_params(model))
    if two_d_only:
        others += [p for p in mats if p.ndim != 2]
        mats = [p for p in mats if p.ndim == 2]
    return mats, others


def _adamw(params, lr):
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if params else None


def build_sgd(model, lr, **kw):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def build_adamw(model, lr, **kw):
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)


def build_muon(model, lr, aux_lr, **kw):
    mats, others = _split_matrices(model, two_d_only=True)
    muon = torch.optim.Muon(mats, lr=lr, weight_decay=0.0, momentum=0.95, nesterov=True) if mats else None
    return Chain(muon, _adamw(others, aux_lr))


def build_assoc_sgd(model, lr, **kw):
    return deepopt.AssociativeMomentum(model.parameters(), lr=lr, momentum=0.9)


def build_assoc_adamw(model, lr, **kw):
    return deepopt.AssociativeMomentum(model.parameters(), lr=lr, momentum=0.9, preconditioner="adam",
                                       beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=True)


def build_delta(model, lr, **kw):
    return deepopt.DeltaMomentum(model.parameters(), lr=lr, momentum=0.9, delta=0.5, keys="matrix")


def build_delta_spectral(model, lr, **kw):
    return deepopt.DeltaMomentum(model.parameters(), lr=lr, momentum=0.9, delta=0.5, keys="spectral")


def build_deep(model, lr, seed=0, **kw):
    return deepopt.DeepMomentum(model.parameters(), lr=lr, momentum=0.9, seed=seed)


# Newton-Schulz in bf16 as torch Muon runs it, on CPU too (ns_dtype's CPU default is fp32): the
# committed curves were made so, and the comparison with torch Muon keeps one precision.
#: the Newton-Schulz form the committed results ran with (the recipes take the Gram form now, which
#: trains the same: benchmarks/results/ns_step.json, "training"); the "-gram" variants run it
NS_FORM = dict(ns_form="direct")


def build_deep_ns(model, lr, aux_lr, seed=0, options=None, **kw):
    # one optimizer: DeepMomentum on the hidden matrices, an AdamW group (torch AdamW's betas) for the rest
    return deepopt.create_optimizer(model, "deep-ns", lr=lr, adamw_lr=aux_lr, adamw_beta2=0.999, seed=seed,
                                    ns_dtype="bfloat16", **{**NS_FORM, **(options or {})})


def build_m3(model, lr, aux_lr, options=None, **kw):
    return deepopt.create_optimizer(model, "m3", lr=lr, adamw_lr=aux_lr, adamw_beta2=0.999, ns_dtype="bfloat16",
                                    **{**NS_FORM, **(options or {})})


def build_mf_adamw(model, lr, mf_periods, **kw):
    groups = deepopt.MultiFrequency.groups_by_name(model, mf_periods)
    return deepopt.MultiFrequency(torch.optim.AdamW(groups, lr=lr, weight_decay=0.0), reduce="mean")


def build_adamw_level_lr(model, lr, mf_periods, **kw):
    groups = deepopt.MultiFrequency.groups_by_name(model, mf_periods)
    for g in groups:
        g["lr"] = lr / g.pop("update_every")
    return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)


def build_mf_deep(model, lr, mf_periods, seed=0, **kw):
    groups = deepopt.MultiFrequency.groups_by_name(model, mf_periods)
    return deepopt.MultiFrequency(deepopt.DeepMomentum(groups, lr=lr, momentum=0.9, seed=seed), reduce="mean")


# 5-point half-decade grids; the sweep extends a grid past an edge when the best LR is on it.
SGD_GRID = log_grid(-2.5, -0.5)          # 3.16e-3 .. 0.316
ADAM_GRID = log_grid(-3.5, -1.5)         # 3.16e-4 .. 3.16e-2
MUON_GRID = log_grid(-2.5, -0.5)         # 3.16e-3 .. 0.316
M3_GRID = log_grid(-3, -1)               # 1e-3 .. 0.1 (the scale-free preconditioner keeps Muon's lr scale)

OPTIMIZERS = {
    # name: (build, grid, needs aux_lr, twin for confirming runs, needs MF periods, deepopt?)
    "sgd": dict(build=build_sgd, grid=SGD_GRID, deepopt=False),
    "adamw": dict(build=build_adamw, grid=ADAM_GRID, deepopt=False),
    "muon": dict(build=build_muon, grid=MUON_GRID, aux=True, deepopt=False),
    "assoc-sgd": dict(build=build_assoc_sgd, grid=None, twin="sgd", deepopt=True),
    "assoc-adamw": dict(build=build_assoc_adamw, grid=None, twin="adamw", deepopt=True),
    "delta": dict(build=build_delta, grid=SGD_GRID, deepopt=True),
    "delta-spectral": dict(build=build_delta_spectral, grid=SGD_GRID, deepopt=True),
    "deep": dict(build=build_deep, grid=SGD_GRID, deepopt=True),
    "deep-ns": dict(build=build_deep_ns, grid=MUON_GRID, aux=True, deepopt=True),
    "m3": dict(build=build_m3, grid=M3_GRID, aux=True, deepopt=True),
    "mf-adamw": dict(build=build_mf_adamw, grid=ADAM_GRID, mf=True, deepopt=True),
    "mf-deep": dict(build=build_mf_deep, grid=SGD_GRID, mf=True, deepopt=True),
    "adamw-level-lr": dict(build=build_adamw_level_lr, grid=ADAM_GRID, mf=True, deepopt=False),
}

# Per-task grid overrides (the rest use the optimizer's grid): gradients on Rosenbrock are
# O(100), so the SGD-scale rules need far smaller steps.
GRID_OVERRIDES = {
    ("rosenbrock", "sgd"): log_grid(-5, -3),
    ("rosenbrock", "delta"): log_grid(-5, -3),
    ("rosenbrock", "delta-spectral"): log_grid(-5, -3),
    ("rosenbrock", "deep"): log_grid(-5, -3),
    ("rosenbrock", "adamw"): log_grid(-2, 0),
    ("noisy_quadratic", "sgd"): log_grid(-1.5, 0.5),
    ("noisy_quadratic", "delta"): log_grid(-1.5, 0.5),
    ("noisy_quadratic", "delta-spectral"): log_grid(-1.5, 0.5),
    ("noisy_quadratic", "deep"): log_grid(-1.5, 0.5),
    # the char-level GPT: 4 points per optimizer (benchmarks/char_gpt.py), edge extension as ever
    **{("char_gpt", o): log_grid(-1.5, 0) for o in ("sgd", "delta", "deep")},
    ("char_gpt", "adamw"): log_grid(-3, -1.5),
    **{("char_gpt", o): log_grid(-2, -0.5) for o in ("muon", "deep-ns")},
    ("char_gpt", "m3"): log_grid(-2.5, -1),
}

QUICK_GRID_SIZE = 3


def _ablation(**options):
    """deep-ns with some MLP-memory options changed (the char-GPT ablations)."""
    return dict(build=lambda model, lr, aux_lr, seed=0, **kw: build_deep_ns(model, lr, aux_lr, seed, options),
                grid=MUON_GRID, aux=True, deepopt=True, options=options)


def _weight_decay(recipe, decoupled):
    """``create_optimizer(model, recipe, weight_decay=0.1, decoupled_weight_decay=...)``: nanoGPT's
    weight decay, as a user brings it from AdamW."""
    def build_recipe(model, lr, seed=0, **kw):
        seeded = dict(seed=seed) if recipe == "deep" else {}
        return deepopt.create_optimizer(model, recipe, lr=lr, weight_decay=WEIGHT_DECAY,
                                        decoupled_weight_decay=decoupled, **seeded)
    return dict(build=build_recipe, grid=SGD_GRID, deepopt=True, recipe=recipe, decoupled=decoupled)


WEIGHT_DECAY = 0.1
#: not in the main suite: the deep-ns ablations and the weight-decay study of benchmarks/char_gpt.py
VARIANTS = {
    "deep-ns-mlr0": _ablation(memory_lr=0.0),
    "deep-ns-mlr2": _ablation(memory_lr=2.0),
    "deep-ns-dot": _ablation(objective="dot", memory_lr=0.01),
    "deep-ns-h64": _ablation(hidden=64),
    # the Gram form of Newton-Schulz (benchmarks/ns_step.py: does it train as the direct form?)
    "deep-ns-gram": _ablation(ns_form="gram"),
    "m3-gram": dict(build=lambda model, lr, aux_lr, **kw: build_m3(model, lr, aux_lr, dict(ns_form="gram")),
                    grid=M3_GRID, aux=True, deepopt=True, options=dict(ns_form="gram")),
    **{f"{recipe}-wd{'-coupled' if not decoupled else ''}": _weight_decay(recipe, decoupled)
       for recipe in ("sgd", "delta", "deep") for decoupled in (True, False)},
}


def spec(opt: str) -> dict:
    """The entry of ``opt`` in :data:`OPTIMIZERS` or :data:`VARIANTS`."""
    return OPTIMIZERS[opt] if opt in OPTIMIZERS else VARIANTS[opt]


def grid_for(task: str, opt: str, quick: bool = False) -> list[float] | None:
    grid = GRID_OVERRIDES.get((task, opt), spec(opt)["grid"])
    if grid is None:
        return None
    if quick:   # the middle values
        k = (len(grid) - QUICK_GRID_SIZE) // 2
        grid = grid[k:k + QUICK_GRID_SIZE]
    return list(grid)


def applicable(task, opt: str) -> bool:
    """MultiFrequency variants need layer structure (``task.mf_periods``); torch's Muon needs a
    2-D hidden matrix (``task.muon``); the rest run everywhere."""
    if opt == "muon" and not task.muon:
        return False
    return not spec(opt).get("mf") or task.mf_periods is not None


def build(opt: str, model, lr: float, *, aux_lr: float | None = None, seed: int = 0, mf_periods=None):
    return spec(opt)["build"](model, lr, aux_lr=aux_lr, seed=seed, mf_periods=mf_periods)
