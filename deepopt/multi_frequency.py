r"""Multi-frequency parameter-group scheduler: the Continuum Memory System (CMS) update rule.

Nested Learning (Behrouz et al., 2025) treats a model as a chain of memories that are updated
at different frequencies. A level with period (chunk size) ``C`` keeps its weights fixed for
``C`` steps and then applies all the gradient signal it saw in that chunk at once:

.. math::

    \theta_{i+1} = \theta_i - \sum_{t=i-C}^{i} \eta_t\, f(\theta_t; x_t)
        \quad \text{if } i \equiv 0 \pmod C, \qquad
    \theta_{i+1} = \theta_i \quad \text{otherwise.}

:class:`MultiFrequency` turns any optimizer into this rule, one period per parameter group.
It is an implementation detail of *when* the inner optimizer sees gradients, not *how* it uses
them: with ``reduce="sum"`` and ``torch.optim.SGD`` (no momentum) as inner optimizer the update
at a due step is exactly ``theta -= lr * sum_t g_t``, i.e. the rule above with ``eta_t`` equal to
the learning rate at the due step for the whole chunk; with any other inner optimizer (momentum,
Adam, deepopt's memories) the chunk sum (or mean) is fed to it as a single gradient.
"""

from __future__ import annotations

import numbers
import re
from collections import OrderedDict
from typing import Any, Callable, Mapping

import torch
from torch.optim import Optimizer

__all__ = ["MultiFrequency"]

_SUM_KEY = "mf_grad_sum"
_STEP_KEY = "mf_step"
_PREFIX = "mf_"


def _check_period(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(
            f"Invalid update_every value {value!r} in {where}: "
            "update_every must be an int >= 1 (the group steps every update_every wrapper steps)"
        )
    return int(value)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class MultiFrequency(Optimizer):
    r"""Step each parameter group of ``inner`` at its own frequency (paper's CMS rule).

    A param group may carry ``update_every=C`` (int >= 1, default 1). With wrapper steps
    counted ``t = 1, 2, ...`` per group, a group with period ``C`` is stepped by the inner
    optimizer only at ``t = C, 2C, ...``, with the sum (``reduce="sum"``) or the mean
    (``reduce="mean"``, sum / C) of the gradients it received during those ``C`` steps:

    .. math::

        \theta_{i+1} = \theta_i - \sum_{t=i-C}^{i} \eta_t\, f(\theta_t; x_t)
            \ \text{if } i \equiv 0 \pmod C, \quad \theta_{i+1} = \theta_i \ \text{otherwise.}

    (``eta_t`` is the group's lr at the due step; SGD as inner optimizer with ``reduce="sum"``
    gives the rule exactly, other inner optimizers receive the chunk sum as one gradient.)

    Behaviour:

    * Gradient sums are kept in fp32 (``promote_types(grad.dtype, float32)``) in a private
      per-parameter store, added inside :meth:`step` (never in hooks), so they survive the
      training loop's ``zero_grad()``. Parameters whose ``.grad`` is ``None`` at a step add
      nothing. A group with period 1 and nothing accumulated passes the user's gradients
      through untouched, so period-1 groups equal the bare inner optimizer bit for bit.
    * On a due step the group's ``.grad`` are temporarily replaced by the sum/mean (cast to the
      gradient dtype) for the inner call; groups that are not due are hidden from the inner
      step (their ``.grad`` set to ``None`` for the call). Consequently **everything the inner
      optimizer does to a parameter, weight decay included, happens only on its group's due
      steps**: with period ``C`` the weight decay is applied once per ``C`` steps (scale
      ``weight_decay`` or ``lr`` accordingly). After the inner call the user's own ``.grad``
      tensors are put back. If the inner step raises, gradients, sums and counters are left as
      they were.
    * ``closure`` is evaluated once by the wrapper (with grad enabled) before accumulating; the
      inner optimizer is called without it; its loss is returned.
    * ``param_groups``, ``state`` and ``defaults`` are the inner optimizer's (live views, so LR
      schedulers and ``load_state_dict`` stay consistent). No per-level lr scaling is applied:
      give each group the lr it should have.
    * Each group's step counter is its own key ``group["mf_step"]``, so it stays with its group
      when groups are reordered, copied or removed.
    * :meth:`state_dict` is the inner's with each accumulated sum under the parameter's state
      key ``"mf_grad_sum"`` (the groups carry ``"mf_step"``); :meth:`load_state_dict` strips the
      ``mf_`` keys before handing the rest to the inner optimizer, then restores them.
      Resuming is bit-identical.
    * torch's global step hooks (``register_optimizer_step_pre_hook`` / ``_post_hook``) fire once
      per wrapper step, for the wrapper; the inner's own hooks fire on each inner step.
    * A ``nonfinite="skip"``/``"raise"`` policy of a deepopt inner sees only the groups that are
      due: gradients of the other groups are accumulated unchecked.
    * ``_step_supports_amp_scaling`` is always ``False``: ``GradScaler`` unscales through
      ``param_groups`` and skips the whole wrapper step on inf/NaN, so counters and sums do not
      move on a skipped step.
    * Groups added later (:meth:`add_param_group`) start counting at 0. Change a group's
      ``update_every`` only at one of its due steps (the counter is not reset).
    * ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` runs a zero-lr
      ``step()`` when the inner state is still empty (torch's ``_init_optim_state``); on the
      wrapper that step advances the counters. Save ``opt.state_dict()`` directly (it works with
      ``dcp.save``/``dcp.load``) or call it only once the inner optimizer has state.

    Args:
        inner: the optimizer to drive (any ``torch.optim.Optimizer``).
        reduce: ``"sum"`` (default) or ``"mean"`` of the gradients over a period.

    Example::

        groups = MultiFrequency.groups_by_name(model, {r"^cms\.2\.": 16, r"^cms\.1\.": 4})
        opt = MultiFrequency(torch.optim.AdamW(groups, lr=1e-3), reduce="mean")
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10_000)
        for x, y in loader:
            loss_fn(model(x), y).backward()
            opt.step()          # cms.2.* moves every 16 steps, cms.1.* every 4, the rest every step
            opt.zero_grad()     # the pending sums are kept
            sched.step()
    """

    # GradScaler must unscale through param_groups and skip the wrapper step on inf.
    _step_supports_amp_scaling = False

    def __init__(self, inner: Optimizer, reduce: str = "sum") -> None:
        # Optimizer.__init__ is deliberately not called: it would build its own group list.
        if not isinstance(inner, Optimizer):
            raise TypeError(
                f"MultiFrequency wraps a torch.optim.Optimizer, got {type(inner).__name__}"
            )
        if reduce not in ("sum", "mean"):
            raise ValueError(f"Invalid reduce value {reduce!r}: reduce must be 'sum' or 'mean'")
        for i, group in enumerate(inner.param_groups):
            _check_period(group.get("update_every", 1), f"param group {i}")
        torch._C._log_api_usage_once("python.optimizer")
        self.inner = inner
        self.reduce = reduce
        self._grad_sums: dict[torch.Tensor, torch.Tensor] = {}
        for group in inner.param_groups:
            group.setdefault(_STEP_KEY, 0)   # the counter lives in its group, so it moves with it
        self._init_hooks()
        self._patch_step_function()

    def _init_hooks(self) -> None:
        for name in (
            "_optimizer_step_pre_hooks",
            "_optimizer_step_post_hooks",
            "_optimizer_state_dict_pre_hooks",
            "_optimizer_state_dict_post_hooks",
            "_optimizer_load_state_dict_pre_hooks",
            "_optimizer_load_state_dict_post_hooks",
        ):
            if name not in self.__dict__:
                setattr(self, name, OrderedDict())

    # ----------------------------------------------------------------- live views of inner
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.inner.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.inner.state

    @state.setter
    def state(self, value) -> None:
        self.inner.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.inner.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.inner.defaults = value

    # ----------------------------------------------------------------- object protocol
    def __getstate__(self) -> dict[str, Any]:
        # Like torch: hooks and an lr scheduler's patched ``step`` are not carried over.
        return {
            "inner": self.inner,
            "reduce": self.reduce,
            "_grad_sums": self._grad_sums,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_hooks()
        self._patch_step_function()

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.inner).splitlines())
        return f"{type(self).__name__}(reduce={self.reduce!r},\n{inner}\n)"

    # ----------------------------------------------------------------- delegation
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict):
            _check_period(
                param_group.get("update_every", 1), f"param group {len(self.param_groups)}"
            )
        self.inner.add_param_group(param_group)
        self.param_groups[-1].setdefault(_STEP_KEY, 0)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def _step_inner(self) -> None:
        """``inner.step()`` without torch's global step hooks: those fire once per wrapper step
        (on the wrapper), not a second time on the inner. The inner's own hooks still run."""
        inner = self.inner
        unhooked = getattr(type(inner).step, "__wrapped__", None)
        patched = vars(inner).get("step")
        if unhooked is None or (patched is not None and not hasattr(patched, "_wrapped_by_lr_sched")):
            inner.step()   # not torch's hook wrapper, or patched by someone else: call it as it is
            return
        args, kwargs = (), {}
        for hook in list(inner._optimizer_step_pre_hooks.values()):
            result = hook(inner, args, kwargs)
            if result is not None:
                args, kwargs = result
        unhooked(inner, *args, **kwargs)
        inner._optimizer_step_code()
        for hook in list(inner._optimizer_step_post_hooks.values()):
            hook(inner, args, kwargs)
        if patched is not None:   # an LR scheduler built on the inner counts this step
            inner._opt_called = True

    # ----------------------------------------------------------------- the step
    def _reduced_grad(
        self, p: torch.Tensor, grad: torch.Tensor | None, acc: torch.Tensor | None, period: int
    ) -> torch.Tensor:
        """The gradient the inner optimizer sees on a due step; never aliases ``acc`` or ``grad``."""
        if grad is not None and grad.is_sparse:
            raise RuntimeError("MultiFrequency does not accumulate sparse gradients")
        if acc is None:
            total = grad.to(_acc_dtype(grad.dtype))
        elif grad is None:
            total = acc
        else:
            total = acc + grad.to(acc.dtype)
        if self.reduce == "mean":
            total = torch.div(total, period)
        out = total.to(grad.dtype if grad is not None else p.dtype)
        if out is acc or out is grad:
            out = out.clone()
        return out

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Accumulate this step's gradients and step the groups that are due.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss; it is
                called once, with grad enabled, before the gradients are read.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        plan = []
        for i, group in enumerate(self.param_groups):
            period = _check_period(group.get("update_every", 1), f"param group {i}")
            plan.append((group, period, (group.setdefault(_STEP_KEY, 0) + 1) % period == 0))

        saved: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        with torch.no_grad():
            try:
                for group, period, due in plan:
                    params = group["params"]
                    if due:
                        if period == 1 and not any(p in self._grad_sums for p in params):
                            continue  # nothing pending: the inner sees the user's grads
                        for p in params:
                            grad, acc = p.grad, self._grad_sums.get(p)
                            if grad is None and acc is None:
                                continue
                            new_grad = self._reduced_grad(p, grad, acc, period)
                            saved.append((p, grad))
                            p.grad = new_grad
                    else:
                        for p in params:
                            if p.grad is not None:
                                if p.grad.is_sparse:
                                    raise RuntimeError(
                                        "MultiFrequency does not accumulate sparse gradients"
                                    )
                                saved.append((p, p.grad))
                                p.grad = None
                self._step_inner()
            finally:
                for p, grad in reversed(saved):
                    p.grad = grad

            # The inner step succeeded: commit sums and counters.
            for group, period, due in plan:
                for p in group["params"]:
                    if due:
                        self._grad_sums.pop(p, None)
                        continue
                    grad = p.grad
                    if grad is None:
                        continue
                    acc = self._grad_sums.get(p)
                    if acc is None:
                        self._grad_sums[p] = grad.detach().to(_acc_dtype(grad.dtype), copy=True)
                    else:
                        acc.add_(grad.to(acc.dtype))
                group[_STEP_KEY] += 1
        return loss

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus ``mf_grad_sum`` (per param) and ``mf_step``
        (per group). Tensors are references, as in torch: copy before training on."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        inner_sd = self.inner.state_dict()   # its groups carry their mf_step
        state = dict(inner_sd["state"])
        packed_groups = []
        for group, packed in zip(self.param_groups, inner_sd["param_groups"]):
            packed = dict(packed)
            packed[_STEP_KEY] = int(group.get(_STEP_KEY, 0))
            packed_groups.append(packed)
            for p, idx in zip(group["params"], packed["params"]):
                acc = self._grad_sums.get(p)
                if acc is not None:
                    entry = dict(state.get(idx, {}))
                    entry[_SUM_KEY] = acc
                    state[idx] = entry
        sd = dict(inner_sd)
        sd["state"] = state
        sd["param_groups"] = packed_groups
        for hook in self._optimizer_state_dict_post_hooks.values():
            out = hook(self, sd)
            if out is not None:
                sd = out
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore sums and counters from the ``mf_`` keys, then load the rest into the inner."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, state_dict)
            if out is not None:
                state_dict = out
        groups = self.param_groups
        saved_groups = state_dict["param_groups"]
        if len(groups) != len(saved_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, "
                f"the optimizer has {len(groups)}"
            )
        id_map: dict[Any, torch.Tensor] = {}
        inner_groups, counters = [], []
        for i, (group, saved) in enumerate(zip(groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"loaded state dict's parameter group {i} has {len(saved['params'])} "
                    f"parameters, the optimizer's has {len(group['params'])}"
                )
            _check_period(saved.get("update_every", 1), f"loaded param group {i}")
            step = int(saved.get(_STEP_KEY, 0))
            if step < 0:
                raise ValueError(f"loaded param group {i} has a negative {_STEP_KEY} ({step})")
            counters.append(step)
            id_map.update(zip(saved["params"], group["params"]))
            inner_groups.append({k: v for k, v in saved.items() if not k.startswith(_PREFIX)})
        inner_state, sums = {}, {}
        for idx, entry in state_dict["state"].items():
            rest = {k: v for k, v in entry.items() if not k.startswith(_PREFIX)}
            if _SUM_KEY in entry:
                p = id_map.get(idx)
                acc = entry[_SUM_KEY]
                if p is None:
                    raise ValueError(f"loaded state has {_SUM_KEY} for unknown parameter {idx!r}")
                if not isinstance(acc, torch.Tensor) or acc.shape != p.shape:
                    raise ValueError(
                        f"loaded {_SUM_KEY} for parameter {idx!r} has shape "
                        f"{getattr(acc, 'shape', None)}, the parameter has {tuple(p.shape)}"
                    )
                sums[p] = acc
            if rest:
                inner_state[idx] = rest
        inner_sd = dict(state_dict)
        inner_sd["state"] = inner_state
        inner_sd["param_groups"] = inner_groups
        self.inner.load_state_dict(inner_sd)
        for group, step in zip(self.param_groups, counters):
            group[_STEP_KEY] = step
        with torch.no_grad():
            self._grad_sums = {
                p: acc.detach().to(device=p.device, dtype=_acc_dtype(p.dtype), copy=True)
                for p, acc in sums.items()
            }
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    # ----------------------------------------------------------------- helpers
    @classmethod
    def groups_by_name(
        cls,
        model: torch.nn.Module,
        periods: Mapping[str, int],
        **group_defaults: Any,
    ) -> list[dict[str, Any]]:
        """Param groups for the levels of ``model``, by parameter name.

        Each named parameter goes to the first regex of ``periods`` that matches its name
        (``re.search``), in a group with that ``update_every``; unmatched parameters go to a
        period-1 group (last). Empty groups are left out. ``group_defaults`` (e.g. ``lr``,
        ``weight_decay``) are copied into every group.

        Example: ``MultiFrequency.groups_by_name(model, {r"^levels\\.1\\.": 8}, lr=1e-3)``.
        """
        if "params" in group_defaults or "update_every" in group_defaults:
            raise TypeError("groups_by_name: 'params' and 'update_every' are set by the helper")
        patterns = []
        for pattern, period in periods.items():
            patterns.append((re.compile(pattern), _check_period(period, f"pattern {pattern!r}")))
        buckets: list[list[torch.Tensor]] = [[] for _ in patterns]
        rest: list[torch.Tensor] = []
        for name, p in model.named_parameters():
            for k, (regex, _) in enumerate(patterns):
                if regex.search(name):
                    buckets[k].append(p)
                    break
            else:
                rest.append(p)
        groups = [
            {**group_defaults, "params": params, "update_every": period}
            for (_, period), params in zip(patterns, buckets)
            if params
        ]
        if rest:
            groups.append({**group_defaults, "params": rest, "update_every": 1})
        return groups
