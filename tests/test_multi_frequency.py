"""Tests for deepopt.multi_frequency.MultiFrequency."""

import copy
import pickle
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepopt.multi_frequency import MultiFrequency

SHAPES = [(3, 4), (5,), (2, 3)]


def make_params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def grads_for(step, params, seed=1):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]


def set_grads(params, grads, mask=None):
    for i, (p, gr) in enumerate(zip(params, grads)):
        p.grad = None if (mask is not None and not mask[i]) else gr.clone()


INNERS = {
    "sgd": lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=0.01),
    "adamw": lambda groups: torch.optim.AdamW(groups, lr=0.01, weight_decay=0.1),
}


def build(params, period, inner="sgd", reduce="sum"):
    groups = [
        {"params": params[:2], "update_every": period},
        {"params": params[2:]},  # default period 1
    ]
    return MultiFrequency(INNERS[inner](groups), reduce=reduce)


def snapshot(opt):
    return copy.deepcopy(opt.state_dict())


def assert_tensors_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# --------------------------------------------------------------------------- the CMS rule
@settings(deadline=None, max_examples=8)
@given(
    period=st.integers(1, 4),
    inner=st.sampled_from(sorted(INNERS)),
    reduce=st.sampled_from(["sum", "mean"]),
    masks=st.lists(st.lists(st.booleans(), min_size=3, max_size=3), min_size=9, max_size=9),
)
def test_slow_group_steps_only_at_multiples_with_reduced_grads(period, inner, reduce, masks):
    params = make_params()
    opt = build(params, period, inner, reduce)
    # Oracles: bare inner optimizers on clones. Slow params see the fp32 sum (or mean),
    # accumulated with the same ops, only at t = C, 2C, ...; the fast param sees every grad.
    slow = [torch.nn.Parameter(p.detach().clone()) for p in params[:2]]
    fast = [torch.nn.Parameter(p.detach().clone()) for p in params[2:]]
    slow_ref = INNERS[inner]([{"params": slow}])
    fast_ref = INNERS[inner]([{"params": fast}])
    sums = [None, None]
    for t in range(1, len(masks) + 1):
        grads = grads_for(t, params)
        before = [p.detach().clone() for p in params[:2]]
        set_grads(params, grads, masks[t - 1])
        user_grads = [p.grad for p in params]
        opt.step()
        # the user's grad objects are back in place
        assert all(p.grad is g for p, g in zip(params, user_grads))
        opt.zero_grad(set_to_none=True)

        for i in range(2):
            if masks[t - 1][i]:
                gi = grads[i].to(torch.float32)
                sums[i] = gi.clone() if sums[i] is None else sums[i].add_(gi)
        set_grads(fast, grads[2:], masks[t - 1][2:])
        fast_ref.step()
        if t % period == 0:
            for q, s in zip(slow, sums):
                q.grad = None if s is None else (s if reduce == "sum" else s / period)
            slow_ref.step()
            sums = [None, None]
        else:
            assert_tensors_equal([p.detach() for p in params[:2]], before)
        assert_tensors_equal([p.detach() for p in params[:2]], [q.detach() for q in slow])
        assert_tensors_equal([p.detach() for p in params[2:]], [q.detach() for q in fast])
    # the counter of each group is the number of wrapper steps
    assert [g["mf_step"] for g in opt.state_dict()["param_groups"]] == [len(masks)] * 2


@pytest.mark.parametrize("inner", sorted(INNERS))
def test_period_one_is_bit_identical_to_bare_inner(inner):
    params = make_params()
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = MultiFrequency(
        INNERS[inner]([{"params": params[:1], "update_every": 1}, {"params": params[1:]}])
    )
    ref = INNERS[inner]([{"params": ref_params[:1]}, {"params": ref_params[1:]}])
    for t in range(1, 8):
        grads = grads_for(t, params)
        set_grads(params, grads)
        set_grads(ref_params, grads)
        opt.step()
        ref.step()
    assert_tensors_equal([p.detach() for p in params], [p.detach() for p in ref_params])
    for p, q in zip(params, ref_params):
        for k, v in ref.state[q].items():
            assert torch.equal(torch.as_tensor(opt.state[p][k]), torch.as_tensor(v))
    assert opt._grad_sums == {}


def test_bf16_params_accumulate_in_fp32():
    params = make_params(torch.bfloat16)
    opt = build(params, 3, "sgd")
    expected = None
    for t in range(1, 3):
        grads = grads_for(t, params)
        set_grads(params, grads)
        opt.step()
        opt.zero_grad()
        g = grads[0].float()
        expected = g.clone() if expected is None else expected.add_(g)
    acc = opt.state_dict()["state"][0]["mf_grad_sum"]
    assert acc.dtype == torch.float32
    assert torch.equal(acc, expected)


# --------------------------------------------------------------------------- state dicts
def run(opt, params, steps, start=1, zero=True):
    for t in range(start, start + steps):
        set_grads(params, grads_for(t, params))
        opt.step()
        if zero:
            opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("inner", sorted(INNERS))
def test_resume_mid_period_is_bit_identical(inner):
    params = make_params()
    opt = build(params, 4, inner, "mean")
    run(opt, params, 6)
    sd = snapshot(opt)
    # inner state is clean: no mf_ keys; sums only in the wrapper's state dict
    assert all(not k.startswith("mf_") for s in opt.inner.state_dict()["state"].values() for k in s)
    assert "mf_grad_sum" in sd["state"][0] and "mf_grad_sum" not in sd["state"][2]
    assert [g["mf_step"] for g in sd["param_groups"]] == [6, 6]
    saved_params = [p.detach().clone() for p in params]

    run(opt, params, 6, start=7)

    params2 = [torch.nn.Parameter(p.clone()) for p in saved_params]
    opt2 = build(params2, 4, inner, "mean")
    opt2.load_state_dict(sd)
    assert all(not k.startswith("mf_") for s in opt2.inner.state.values() for k in s)
    assert [g["mf_step"] for g in opt2.inner.param_groups] == [6, 6]   # each counter lives in its group
    run(opt2, params2, 6, start=7)
    assert_tensors_equal([p.detach() for p in params], [p.detach() for p in params2])
    assert [g["mf_step"] for g in opt2.param_groups] == [g["mf_step"] for g in opt.param_groups] == [12, 12]


def test_load_state_dict_keeps_live_views_and_scheduler_reaches_inner():
    params = make_params()
    opt = build(params, 2, "sgd")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    assert getattr(opt.step, "_wrapped_by_lr_sched", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(opt, params, 1)
        sched.step()
        sd = snapshot(opt)
        opt.load_state_dict(sd)  # replaces the inner's group list
        assert opt.param_groups is opt.inner.param_groups
        assert opt.state is opt.inner.state and opt.defaults is opt.inner.defaults
        run(opt, params, 1, start=2)
        sched.step()
    assert opt._opt_called
    assert [g["lr"] for g in opt.inner.param_groups] == [pytest.approx(0.025)] * 2
    assert sched.get_last_lr() == [g["lr"] for g in opt.inner.param_groups]
    # setters write through
    new_groups = list(opt.inner.param_groups)
    opt.param_groups = new_groups
    assert opt.inner.param_groups is new_groups


def test_tensor_lr_scheduler():
    params = make_params()
    inner = torch.optim.SGD([{"params": params, "update_every": 2}], lr=torch.tensor(0.1))
    opt = MultiFrequency(inner)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5**e)
    run(opt, params, 2)
    sched.step()
    assert torch.equal(inner.param_groups[0]["lr"], torch.tensor(0.05))


def test_load_state_dict_validates_before_changing():
    params = make_params()
    opt = build(params, 3)
    run(opt, params, 2)
    sd = snapshot(opt)
    sd["state"][0]["mf_grad_sum"] = torch.zeros(7)
    before = snapshot(opt)
    with pytest.raises(ValueError, match="mf_grad_sum"):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert torch.equal(after["state"][0]["mf_grad_sum"], before["state"][0]["mf_grad_sum"])
    bad = snapshot(opt)
    bad["param_groups"][0]["update_every"] = 0
    with pytest.raises(ValueError, match="update_every"):
        opt.load_state_dict(bad)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_round_trip_with_slow_group_not_stepped(tmp_path):
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    params = make_params()
    opt = build(params, 5, "adamw")
    run(opt, params, 3)  # the slow group has sums but no inner state yet
    assert params[0] not in opt.inner.state or not opt.inner.state[params[0]]
    saved_params = [p.detach().clone() for p in params]
    dcp.save({"optim": opt.state_dict()}, checkpoint_id=str(tmp_path))

    # a template of the same structure with other values (other grads, fewer steps)
    params2 = [torch.nn.Parameter(p.clone()) for p in saved_params]
    opt2 = build(params2, 5, "adamw")
    for p in params2:
        p.grad = torch.ones_like(p)
    opt2.step()
    opt2.zero_grad()
    with torch.no_grad():  # the model weights are restored separately (not optimizer state)
        for p, q in zip(params2, saved_params):
            p.copy_(q)
    target = {"optim": opt2.state_dict()}
    assert target["optim"]["param_groups"][0]["mf_step"] == 1
    dcp.load(target, checkpoint_id=str(tmp_path))
    opt2.load_state_dict(target["optim"])
    assert [g["mf_step"] for g in opt2.param_groups] == [3, 3]

    run(opt, params, 7, start=4)
    run(opt2, params2, 7, start=4)
    assert_tensors_equal([p.detach() for p in params], [p.detach() for p in params2])


# --------------------------------------------------------------------------- AMP, errors
def test_gradscaler_inf_step_changes_nothing():
    params = make_params()
    inner = torch.optim.AdamW([{"params": params[:2], "update_every": 3}, {"params": params[2:]}])
    opt = MultiFrequency(inner)
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    except Exception as e:  # pragma: no cover - depends on the torch build
        pytest.skip(f"no CPU GradScaler: {e}")
    if not scaler.is_enabled():  # pragma: no cover
        pytest.skip("GradScaler disabled on CPU")
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ref = MultiFrequency(
        torch.optim.AdamW([{"params": ref_params[:2], "update_every": 3}, {"params": ref_params[2:]}])
    )
    scale = 2.0**4
    for t in range(1, 3):  # normal steps: unscaled grads are exact (power-of-two scale)
        grads = grads_for(t, params)
        assert scaler.scale(torch.ones(())).item() == scale  # initialises the scaler
        set_grads(params, [g * scale for g in grads])
        scaler.step(opt)
        scaler.update()
        set_grads(ref_params, grads)
        ref.step()
    before = snapshot(opt)
    before_params = [p.detach().clone() for p in params]
    grads = grads_for(3, params)
    grads[2][0] = float("inf")
    scaler.scale(torch.ones(()))
    set_grads(params, grads)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < scale
    after = opt.state_dict()
    assert_tensors_equal([p.detach() for p in params], before_params)
    assert [g["mf_step"] for g in after["param_groups"]] == [2, 2]
    assert torch.equal(after["state"][0]["mf_grad_sum"], before["state"][0]["mf_grad_sum"])
    assert_tensors_equal([p.detach() for p in params], [p.detach() for p in ref_params])


def test_amp_scaling_flag_is_false_even_for_fused_inner():
    params = make_params()
    try:
        inner = torch.optim.AdamW(params, fused=True)
    except Exception as e:  # pragma: no cover
        pytest.skip(f"no fused CPU AdamW: {e}")
    assert getattr(inner, "_step_supports_amp_scaling", False)
    assert MultiFrequency(inner)._step_supports_amp_scaling is False


def test_inner_raising_loses_nothing():
    params = make_params()
    opt = build(params, 2, "adamw")
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ref = build(ref_params, 2, "adamw")
    masks = {1: [False, True, True], 2: [True, False, True]}
    for o, ps in ((opt, params), (ref, ref_params)):
        set_grads(ps, grads_for(1, ps), masks[1])
        o.step()
        o.zero_grad()
    before = snapshot(opt)

    def boom(inner, *_):  # scribbles on the grads it was given, then fails
        for g in inner.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.grad.mul_(0)
        raise RuntimeError("boom")

    handle = opt.inner.register_step_pre_hook(boom)
    # step 2 is due: param 0 has no sum yet, param 1 has a sum but no grad
    set_grads(params, grads_for(2, params), masks[2])
    user_grads = [p.grad for p in params]
    user_values = [None if g is None else g.clone() for g in user_grads]
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    assert all(p.grad is g for p, g in zip(params, user_grads))
    # the slow group's grads were never handed to the inner (period-1 groups pass theirs through)
    assert torch.equal(user_grads[0], user_values[0]) and user_grads[1] is None
    after = opt.state_dict()
    assert [g["mf_step"] for g in after["param_groups"]] == [1, 1]
    assert torch.equal(after["state"][1]["mf_grad_sum"], before["state"][1]["mf_grad_sum"])
    handle.remove()
    params[2].grad = user_values[2].clone()  # the hook scribbled on the passed-through grad
    opt.step()  # retry the same step
    opt.zero_grad()
    set_grads(ref_params, grads_for(2, ref_params), masks[2])
    ref.step()
    ref.zero_grad()
    run(opt, params, 3, start=3)
    run(ref, ref_params, 3, start=3)
    assert_tensors_equal([p.detach() for p in params], [p.detach() for p in ref_params])


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2", None])
def test_invalid_update_every(bad):
    params = make_params()
    with pytest.raises(ValueError, match="update_every"):
        MultiFrequency(torch.optim.SGD([{"params": params, "update_every": bad}], lr=0.1))
    opt = MultiFrequency(torch.optim.SGD(params[:1], lr=0.1))
    with pytest.raises(ValueError, match="update_every"):
        opt.add_param_group({"params": params[1:], "update_every": bad})
    assert len(opt.param_groups) == 1


def test_invalid_reduce_and_inner():
    params = make_params()
    with pytest.raises(ValueError, match="reduce"):
        MultiFrequency(torch.optim.SGD(params, lr=0.1), reduce="max")
    with pytest.raises(TypeError, match="Optimizer"):
        MultiFrequency(params)


def test_add_param_group_delegates_and_counts_from_zero():
    params = make_params()
    opt = MultiFrequency(torch.optim.SGD(params[:1], lr=0.1))
    run(opt, params[:1], 3)
    opt.add_param_group({"params": params[1:], "update_every": 2})
    assert opt.inner.param_groups[1]["update_every"] == 2
    before = params[1].detach().clone()
    run(opt, params, 1, start=4)
    assert torch.equal(params[1].detach(), before)  # its first due step is its own 2nd step
    run(opt, params, 1, start=5)
    assert not torch.equal(params[1].detach(), before)
    assert [g["mf_step"] for g in opt.param_groups] == [5, 2]


# --------------------------------------------------------------------------- helpers, protocol
def test_groups_by_name():
    model = torch.nn.Sequential(
        torch.nn.Linear(2, 3), torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)
    )
    groups = MultiFrequency.groups_by_name(
        model, {r"^1\.": 4, r"weight": 2, r"^9\.": 8}, lr=0.5, weight_decay=0.0
    )
    named = {id(p): n for n, p in model.named_parameters()}
    got = [(sorted(named[id(p)] for p in g["params"]), g["update_every"]) for g in groups]
    assert got == [
        (["1.bias", "1.weight"], 4),  # first match wins over r"weight"
        (["0.weight", "2.weight"], 2),
        (["0.bias", "2.bias"], 1),  # unmatched; the r"^9\." group is empty and omitted
    ]
    assert all(g["lr"] == 0.5 and g["weight_decay"] == 0.0 for g in groups)
    opt = MultiFrequency(torch.optim.SGD(groups, lr=0.1))
    assert [g["update_every"] for g in opt.param_groups] == [4, 2, 1]
    with pytest.raises(ValueError, match="update_every"):
        MultiFrequency.groups_by_name(model, {r"weight": 0})


def test_deepcopy_pickle_and_repr():
    params = make_params()
    opt = build(params, 3, "adamw")
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)  # patches opt.step
    run(opt, params, 2)
    text = repr(opt)
    assert text.startswith("MultiFrequency(reduce='sum'") and "AdamW" in text
    assert "update_every: 3" in text
    clones = [copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))]
    run(opt, params, 2, start=3)
    for clone in clones:
        cparams = [p for g in clone.param_groups for p in g["params"]]
        assert cparams[0] is not params[0]
        # the sums are keyed by the copied params
        assert {id(k) for k in clone._grad_sums} == {id(p) for p in cparams[:2]}
        run(clone, cparams, 2, start=3)
        assert_tensors_equal([p.detach() for p in params], [p.detach() for p in cparams])


def test_closure_and_step_hooks():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    opt = MultiFrequency(torch.optim.SGD([{"params": model.parameters(), "update_every": 2}], lr=0.1))
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    inner_closures = []
    opt.inner.register_step_pre_hook(lambda o, a, k: inner_closures.append((a, k)))
    w0 = model.weight.detach().clone()
    n = [0]

    def closure():
        n[0] += 1
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    with torch.no_grad():  # the wrapper enables grad for the closure
        loss1 = opt.step(closure)
        g1 = model.weight.grad.clone()
        loss2 = opt.step(closure)
    assert n[0] == 2 and calls == ["pre", "post", "pre", "post"]
    assert isinstance(loss1, torch.Tensor) and torch.equal(loss1, loss2)  # no update in between
    # the inner step ran twice without a closure (hook args are (optimizer,) + step args)
    assert len(inner_closures) == 2
    assert all(a[1:] == () and not k for a, k in inner_closures)
    assert torch.equal(model.weight.detach(), w0.add(g1 + g1, alpha=-0.1))
