"""The torch.optim contract, for every deepopt optimizer (modelled on PyTorch's test/test_optim.py:
test_state_dict_deterministic, test_can_load_older_state_dict, test_step_is_noop_when_params_have_no_grad,
test_step_is_noop_for_zero_grads, test_foreach_matches_forloop, test_tensor_lr, test_complex,
test_step_pre_hook / post_hook, test_deepcopy_copies_all_public_attrs, test_optimizer_can_be_printed,
test_load_nontensor_step, test_state_dict_with_cuda_params (dtype half)).

The configurations come from the one registry, tests/optim_db.py."""

import copy
import io

import pytest
import torch

import deepopt
from _util import assert_equal_params, clone_params, make_params

from optim_db import BY_NAME, ENTRIES, NAMES, OPTIMIZER_NAMES

# every configuration of the registry, MultiFrequency wrappers included
CONFIGS = {e.name: e.make for e in ENTRIES}
ALL = NAMES


def shapes_for(name):
    return list(BY_NAME[name].shapes)


def set_grads(params, gen, scale=1.0):
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * scale).to(p.dtype)


def run(opt, params, steps, gen):
    for _ in range(steps):
        set_grads(params, gen)
        opt.step()


def snapshot(opt):
    return copy.deepcopy(opt.state_dict())


def states_equal(sd_a, sd_b):
    if sd_a["state"].keys() != sd_b["state"].keys():
        return False
    for k in sd_a["state"]:
        sa, sb = sd_a["state"][k], sd_b["state"][k]
        if sa.keys() != sb.keys():
            return False
        for key in sa:
            if not torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])):
                return False
    return True


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("foreach", [False, True])
def test_state_dict_round_trip_resumes_bit_identically(name, foreach):
    params = make_params(shapes_for(name))
    a = clone_params(params)
    opt_a = CONFIGS[name](a, foreach=foreach)
    gen = torch.Generator().manual_seed(0)
    run(opt_a, a, 5, gen)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in a], "optim": opt_a.state_dict()}, buffer)
    gen_state = gen.get_state()
    run(opt_a, a, 5, gen)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    b = clone_params(saved["params"])
    opt_b = CONFIGS[name](b, foreach=foreach)
    opt_b.load_state_dict(saved["optim"])
    gen.set_state(gen_state)
    run(opt_b, b, 5, gen)
    assert_equal_params(a, b)
    assert states_equal(opt_a.state_dict(), opt_b.state_dict())


@pytest.mark.parametrize("name", ALL)
def test_bf16_params_keep_fp32_state_across_load_and_resume_identically(name):
    params = make_params(shapes_for(name), dtype=torch.bfloat16)
    a = clone_params(params)
    opt_a = CONFIGS[name](a)
    gen = torch.Generator().manual_seed(0)
    run(opt_a, a, 300, gen)
    saved_params, saved_state, gen_state = [p.detach().clone() for p in a], snapshot(opt_a), gen.get_state()
    run(opt_a, a, 20, gen)

    b = clone_params(saved_params)
    opt_b = CONFIGS[name](b)
    opt_b.load_state_dict(saved_state)
    for p in b:
        for key, value in opt_b.state[p].items():
            if key != "step" and torch.is_tensor(value):
                assert value.dtype == torch.float32, f"{key} came back as {value.dtype}"
    gen.set_state(gen_state)
    run(opt_b, b, 20, gen)
    assert_equal_params(a, b)


@pytest.mark.parametrize("name", ALL)
def test_state_dtype_param_keeps_state_in_param_dtype(name):
    p = clone_params(make_params(shapes_for(name), dtype=torch.bfloat16))
    opt = CONFIGS[name](p, state_dtype="param")
    run(opt, p, 2, torch.Generator().manual_seed(0))
    for q in p:
        for key, value in opt.state[q].items():
            if key != "step":
                assert value.dtype == torch.bfloat16


@pytest.mark.parametrize("name", ALL)
def test_can_load_older_state_dict_without_newer_flags(name):
    params = clone_params(make_params(shapes_for(name)))
    opt = CONFIGS[name](params)
    gen = torch.Generator().manual_seed(0)
    run(opt, params, 3, gen)
    old = snapshot(opt)
    for group in old["param_groups"]:
        for flag in ("foreach", "fused", "maximize", "state_dtype", "nonfinite"):
            group.pop(flag)
    other = CONFIGS[name](clone_params([p.detach() for p in params]))
    other.load_state_dict(old)
    for group in other.param_groups:
        assert group["maximize"] is False and group["nonfinite"] == "propagate" and group["foreach"] is None
    run(other, other.param_groups[0]["params"], 2, gen)


@pytest.mark.parametrize("name", ALL)
def test_step_is_noop_when_params_have_no_grad(name):
    params = clone_params(make_params(shapes_for(name)))
    before = [p.detach().clone() for p in params]
    opt = CONFIGS[name](params)
    for _ in range(3):
        opt.step()
    assert_equal_params(params, before)
    assert len(opt.state) == 0


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("foreach", [False, True])
def test_step_is_noop_for_zero_grads_from_fresh_state(name, foreach):
    params = clone_params(make_params(shapes_for(name)))
    before = [p.detach().clone() for p in params]
    opt = CONFIGS[name](params, foreach=foreach)
    for group in opt.param_groups:
        group["weight_decay"] = 0.0
    for _ in range(4):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    assert_equal_params(params, before)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_foreach_matches_forloop(name, dtype):
    """Bit for bit, as torch's paths are; except where torch's own differ: on CPU its foreach kernels
    round a bf16 decoupled weight-decay factor to bf16 and deepopt's foreach path does too (so it
    equals torch's foreach path, tests/test_reductions.py), so there the decay is switched off."""
    entry = BY_NAME[name]
    extra = [(3, 7), (1,)] if any(len(s) < 2 for s in entry.shapes) else [(3, 7)]
    base = make_params(shapes_for(name) + extra, dtype)
    a, b = clone_params(base), clone_params(base)
    opt_a, opt_b = CONFIGS[name](a, foreach=False), CONFIGS[name](b, foreach=True)
    if dtype == torch.bfloat16 and entry.decoupled_weight_decay:
        for group in opt_a.param_groups + opt_b.param_groups:
            group["weight_decay"] = 0.0
    gen = torch.Generator().manual_seed(3)
    for _ in range(10):
        for pa, pb in zip(a, b):
            pa.grad = torch.randn(pa.shape, generator=gen).to(dtype)
            pb.grad = pa.grad.clone()
        opt_a.step()
        opt_b.step()
    assert_equal_params(a, b)
    assert states_equal(opt_a.state_dict(), opt_b.state_dict())


def test_grads_are_not_modified_by_a_step():
    for name in ALL:
        for foreach in (False, True):
            params = clone_params(make_params(shapes_for(name)))
            opt = CONFIGS[name](params, foreach=foreach, maximize=True)
            set_grads(params, torch.Generator().manual_seed(0))
            grads = [p.grad.clone() for p in params]
            opt.step()
            assert all(torch.equal(p.grad, g) for p, g in zip(params, grads)), name


@pytest.mark.parametrize("name", ["deep", "deep_ns_l2", "delta", "m3"])
def test_maximize_equals_minimizing_the_negated_gradient(name):
    base = make_params(shapes_for(name))
    a, b = clone_params(base), clone_params(base)
    opt_a, opt_b = CONFIGS[name](a, maximize=True), CONFIGS[name](b)
    for group in opt_a.param_groups + opt_b.param_groups:
        group["weight_decay"] = 0.0
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        for pa, pb in zip(a, b):
            pa.grad = torch.randn(pa.shape, generator=gen)
            pb.grad = -pa.grad
        opt_a.step()
        opt_b.step()
    assert_equal_params(a, b)


@pytest.mark.parametrize("preconditioner, oracle", [(None, torch.optim.SGD), ("adam", torch.optim.Adam)])
@pytest.mark.parametrize("foreach", [False, True])
def test_complex_params_match_torch(preconditioner, oracle, foreach):
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(4, 3, dtype=torch.complex64, generator=gen), torch.randn(5, dtype=torch.complex64,
                                                                                 generator=gen)]
    a, b = clone_params(base), clone_params(base)
    ours = deepopt.AssociativeMomentum(a, lr=0.05, momentum=0.9, preconditioner=preconditioner, foreach=foreach)
    theirs = oracle(b, lr=0.05, momentum=0.9, foreach=foreach) if oracle is torch.optim.SGD else \
        oracle(b, lr=0.05, betas=(0.9, 0.999), foreach=foreach)
    for _ in range(5):
        for pa, pb in zip(a, b):
            pa.grad = torch.randn(pa.shape, dtype=pa.dtype, generator=gen)
            pb.grad = pa.grad.clone()
        ours.step()
        theirs.step()
    assert_equal_params(a, b)


@pytest.mark.parametrize("name", ["delta", "deep", "m3"])
def test_complex_params_raise_a_clear_error(name):
    p = torch.randn(4, 3, dtype=torch.complex64, requires_grad=True)
    opt = CONFIGS[name]([p])
    p.grad = torch.randn_like(p)
    with pytest.raises(RuntimeError, match="complex"):
        opt.step()


@pytest.mark.parametrize("name", ALL)
def test_sparse_grad_raises_before_anything_changes(name):
    params = clone_params(make_params(shapes_for(name)))
    opt = CONFIGS[name](params)
    run(opt, params, 2, torch.Generator().manual_seed(0))
    before, state_before = [p.detach().clone() for p in params], snapshot(opt)
    set_grads(params, torch.Generator().manual_seed(1))
    params[-1].grad = params[-1].grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert_equal_params(params, before)
    assert states_equal(snapshot(opt), state_before)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)   # a wrapper's slow groups accumulate before any check
@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_nonfinite_gradient_leaves_everything_unchanged(name, policy):
    params = clone_params(make_params(shapes_for(name)))
    opt = CONFIGS[name](params, nonfinite=policy)
    run(opt, params, 3, torch.Generator().manual_seed(0))
    before, state_before = [p.detach().clone() for p in params], snapshot(opt)
    set_grads(params, torch.Generator().manual_seed(1))
    params[-1].grad.view(-1)[0] = float("nan")
    if policy == "raise":
        with pytest.raises(FloatingPointError):
            opt.step()
    else:
        opt.step()
    assert_equal_params(params, before)
    assert states_equal(snapshot(opt), state_before)
    set_grads(params, torch.Generator().manual_seed(2))   # finite again: steps resume
    opt.step()
    assert not torch.equal(params[0], before[0])


@pytest.mark.parametrize("name", ALL)
def test_closure_hooks_deepcopy_and_repr(name):
    params = clone_params(make_params(shapes_for(name)))
    opt = CONFIGS[name](params)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    gen = torch.Generator().manual_seed(0)

    def closure():
        set_grads(params, gen)
        return torch.tensor(1.5)

    assert opt.step(closure).item() == 1.5
    assert calls == ["pre", "post"]
    twin = copy.deepcopy(opt)
    assert states_equal(twin.state_dict(), opt.state_dict())
    text = repr(opt)
    assert type(opt).__name__ in text and "lr" in text
    opt.zero_grad()
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_add_param_group_and_scheduler(name):
    params = clone_params(make_params(shapes_for(name)))
    opt = CONFIGS[name](params[:1])
    opt.add_param_group({"params": params[1:], "lr": 0.001})
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    before = [p.detach().clone() for p in params]
    run(opt, params, 1, torch.Generator().manual_seed(0))
    sched.step()
    assert opt.param_groups[1]["lr"] == 0.0005
    assert all(not torch.equal(p, q) for p, q in zip(params, before))


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 4)
        self.b = torch.nn.Linear(4, 2, bias=False)


def test_load_state_dict_of_another_optimizer_fails_clearly_and_changes_nothing():
    model = _Model()
    torch_sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3)) if False else None
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    torch_sgd.step()
    ours = deepopt.DeepMomentum(model.parameters(), lr=0.1)
    ours.step()
    before = snapshot(ours)
    with pytest.raises(ValueError, match=r"param 0 of group 0 .*momentum_buffer.*expected"):
        ours.load_state_dict(torch_sgd.state_dict())
    assert states_equal(snapshot(ours), before)


def test_load_state_dict_with_wrong_shape_fails_clearly():
    model = _Model()
    opt = deepopt.DeltaMomentum(model.parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    sd = snapshot(opt)
    sd["state"][1]["momentum_buffer"] = torch.zeros(7)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"param 1 of group 0 .*'momentum_buffer' has shape \(7,\), expected \(4,\)"):
        opt.load_state_dict(sd)
    assert states_equal(snapshot(opt), before)


def test_torch_sgd_and_adam_checkpoints_load():
    model = _Model()
    for oracle, ours in [(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                          deepopt.AssociativeMomentum(model.parameters(), lr=0.1, momentum=0.9)),
                         (torch.optim.Adam(model.parameters(), lr=0.1),
                          deepopt.AssociativeMomentum(model.parameters(), lr=0.1, preconditioner="adam"))]:
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        oracle.step()
        ours.load_state_dict(oracle.state_dict())
        assert states_equal(ours.state_dict(), oracle.state_dict())


BAD_ARGS = [
    (deepopt.AssociativeMomentum, dict(lr=-1.0), "lr"),
    (deepopt.AssociativeMomentum, dict(momentum=1.0), "momentum"),
    (deepopt.AssociativeMomentum, dict(momentum=-0.1), "momentum"),
    (deepopt.AssociativeMomentum, dict(weight_decay=-1e-3), "weight_decay"),
    (deepopt.AssociativeMomentum, dict(dampening=0.5, nesterov=True), "nesterov"),
    (deepopt.AssociativeMomentum, dict(preconditioner="adam", dampening=0.5), "dampening"),
    (deepopt.AssociativeMomentum, dict(preconditioner="adam", beta2=1.0), "beta2"),
    (deepopt.AssociativeMomentum, dict(preconditioner="shampoo"), "preconditioner"),
    (deepopt.AssociativeMomentum, dict(state_dtype=torch.int32), "state_dtype"),
    (deepopt.AssociativeMomentum, dict(nonfinite="ignore"), "nonfinite"),
    (deepopt.DeltaMomentum, dict(delta=0.95, momentum=0.9), "delta"),
    (deepopt.DeltaMomentum, dict(delta=-0.1), "delta"),
    (deepopt.DeltaMomentum, dict(keys="rows"), "keys"),
    (deepopt.DeltaMomentum, dict(eps=0.0), "eps"),
    (deepopt.DeepMomentum, dict(hidden=0), "hidden"),
    (deepopt.DeepMomentum, dict(memory_lr=-1.0), "memory_lr"),
    (deepopt.DeepMomentum, dict(memory_decay=-0.1), "memory_decay"),
    (deepopt.DeepMomentum, dict(memory_lr=float("inf")), "memory_lr"),
    (deepopt.DeepMomentum, dict(objective="cosine"), "objective"),
    (deepopt.DeepMomentum, dict(output="tanh"), "output"),
    (deepopt.DeepMomentum, dict(nesterov=True, dampening=0.5), "nesterov"),
    (deepopt.DeepMomentum, dict(ns_steps=0), "ns_steps"),
    (deepopt.DeepMomentum, dict(adjust_lr="sqrt"), "adjust_lr"),
    (deepopt.DeepMomentum, dict(memory_init=0.0), "memory_init"),
    (deepopt.DeepMomentum, dict(linear_memory="yes"), "linear_memory"),
    (deepopt.M3, dict(eps=-0.1), "eps"),
    (deepopt.M3, dict(chunk=0), "chunk"),
    (deepopt.M3, dict(slow_momentum=1.5), "slow_momentum"),
    (deepopt.M3, dict(slow_weight=-1.0), "slow_weight"),
    (deepopt.M3, dict(beta2=-0.5), "beta2"),
]


@pytest.mark.parametrize("cls, kwargs, name", BAD_ARGS, ids=[f"{c.__name__}-{n}" for c, _, n in BAD_ARGS])
def test_bad_hyperparameters_raise_naming_the_parameter(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls([torch.zeros(3, 3, requires_grad=True)], **kwargs)
    opt = cls([torch.zeros(3, 3, requires_grad=True)])
    with pytest.raises(ValueError, match=name):   # groups are checked too
        opt.add_param_group({"params": [torch.zeros(2, 2, requires_grad=True)], **kwargs})
    assert len(opt.param_groups) == 1


def test_fused_true_raises_clearly_where_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)   # CPU tensors outside the interpreter
    try:
        import triton  # noqa: F401
        reason = "CUDA tensors"
    except ImportError:   # without Triton that is the reason given
        reason = "Triton is not installed"
    with pytest.raises(RuntimeError, match=f"fused=True.*{reason}"):
        deepopt.DeepMomentum([torch.zeros(2, 2, requires_grad=True)], fused=True)
    with pytest.raises(RuntimeError, match="cannot be `True` together"):
        deepopt.AssociativeMomentum([torch.zeros(2, 2, requires_grad=True)], fused=True, foreach=True)


def test_m3_rejects_vectors_and_points_to_matrix_groups():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'0.bias'.*matrix_groups"):
        deepopt.M3(model.named_parameters(), lr=0.01)


def test_m3_matrix_groups_route_embeddings_head_and_vectors_to_adamw():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 8)
            self.hidden = torch.nn.Linear(8, 8)
            self.norm = torch.nn.LayerNorm(8)
            self.out = torch.nn.Linear(8, 10)

    net = Net()
    groups = deepopt.M3.matrix_groups(net, lr=1e-3)
    assert [p is net.hidden.weight for p in groups[0]["params"]] == [True]
    assert groups[1]["algorithm"] == "adamw" and groups[1]["lr"] == 1e-3
    assert len(groups[1]["params"]) == len(list(net.parameters())) - 1
    opt = deepopt.M3(groups, lr=0.02)
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert set(opt.state[net.embed.weight]) == {"step", "exp_avg", "exp_avg_sq"}


def test_deep_momentum_init_uses_its_own_generator():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    p = torch.randn(4, 6, requires_grad=True)
    q = torch.randn(4, 6, requires_grad=True)
    torch.manual_seed(123)
    opt_a = deepopt.DeepMomentum([p], seed=7)
    p.grad = torch.ones_like(p)
    opt_a.step()
    assert torch.equal(torch.rand(3), expected), "the optimizer consumed the global RNG"
    opt_b = deepopt.DeepMomentum([q], seed=7)
    q.grad = torch.ones_like(q)
    opt_b.step()
    assert torch.equal(opt_a.state[p]["mlp_in"].shape and opt_a.state[p]["mlp_in"], opt_b.state[q]["mlp_in"])
    opt_c = deepopt.DeepMomentum([q.detach().clone().requires_grad_()], seed=8)
    opt_c.param_groups[0]["params"][0].grad = torch.ones(4, 6)
    opt_c.step()
    assert not torch.equal(opt_c.state[opt_c.param_groups[0]["params"][0]]["mlp_in"], opt_b.state[q]["mlp_in"])


@pytest.mark.parametrize("name", ["associative", "deep", "m3"])
def test_torch_compile_of_a_training_step(name):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8, bias=False))
    twin = copy.deepcopy(model)
    x, y = torch.randn(16, 6), torch.randn(16, 8)

    def make(m):
        ps = [p for p in m.parameters() if p.ndim == 2] if name == "m3" else list(m.parameters())
        return CONFIGS[name](ps)

    def train_step(m, opt):
        loss = torch.nn.functional.mse_loss(m(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    opt, opt_twin = make(model), make(twin)
    compiled = torch.compile(train_step, backend="aot_eager")
    for _ in range(5):
        loss_c = compiled(model, opt)
        loss_e = train_step(twin, opt_twin)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_grad_scaler_skips_inf_steps_and_unscales(name):
    """GradScaler end to end: an inf step changes nothing; a finite step equals the unscaled one."""
    base = make_params(shapes_for(name))
    a, b = clone_params(base), clone_params(base)
    opt_a, opt_b = CONFIGS[name](a), CONFIGS[name](b)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=gen) for p in a]
        if step == 1:
            grads[0].view(-1)[0] = float("inf")
        before_a, state_before = [p.detach().clone() for p in a], snapshot(opt_a)
        opt_a.zero_grad()
        scaler.scale(sum((p * g).sum() for p, g in zip(a, grads))).backward()   # grads = scale * g
        scaler.step(opt_a)
        scaler.update()
        if step == 1:
            assert_equal_params(a, before_a)
            assert states_equal(snapshot(opt_a), state_before)
            continue
        for p, g in zip(b, grads):
            p.grad = g
        opt_b.step()
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- torch's generic suite
def _trained(name, steps=3, **kw):
    params = clone_params(make_params(shapes_for(name)))
    opt = CONFIGS[name](params, **kw)
    run(opt, params, steps, torch.Generator().manual_seed(0))
    return params, opt


def _param_groups_equal(groups_a, groups_b):
    """``state_dict()["param_groups"]``: same keys, same values (tensor lr compared by value)."""
    if len(groups_a) != len(groups_b):
        return False
    for ga, gb in zip(groups_a, groups_b):
        if ga.keys() != gb.keys():
            return False
        for key in ga:
            va, vb = ga[key], gb[key]
            same = torch.equal(torch.as_tensor(va), torch.as_tensor(vb)) if torch.is_tensor(va) else va == vb
            if not same:
                return False
    return True


@pytest.mark.parametrize("name", ALL)
def test_load_state_dict_and_deepcopy_change_neither_param_groups_nor_state(name):
    """torch's SGD round-trips ``state_dict()`` unchanged; so must every deepopt configuration."""
    params, opt = _trained(name)
    saved = snapshot(opt)
    other = CONFIGS[name](clone_params([p.detach() for p in params]))
    other.load_state_dict(copy.deepcopy(saved))
    assert _param_groups_equal(other.state_dict()["param_groups"], saved["param_groups"]), \
        f"{set(other.state_dict()['param_groups'][0]) ^ set(saved['param_groups'][0])}"
    assert states_equal(other.state_dict(), saved)
    twin = copy.deepcopy(opt)
    assert _param_groups_equal(twin.state_dict()["param_groups"], saved["param_groups"])
    assert states_equal(twin.state_dict(), saved)


@pytest.mark.parametrize("name", ALL)
def test_load_nontensor_step(name):
    """Older torch Adam checkpoints store ``step`` as a Python number; it loads, and the run
    continues exactly as from the tensor-step checkpoint (torch's test_load_nontensor_step)."""
    params, opt = _trained(name)
    saved = snapshot(opt)
    if not any("step" in s for s in saved["state"].values()):
        pytest.skip(f"{name} keeps no step counter")
    old = copy.deepcopy(saved)
    for s in old["state"].values():
        if "step" in s:
            s["step"] = float(s["step"])
    results = []
    for checkpoint in (saved, old):
        ps = clone_params([p.detach() for p in params])
        o = CONFIGS[name](ps)
        o.load_state_dict(copy.deepcopy(checkpoint))
        run(o, ps, 3, torch.Generator().manual_seed(9))
        assert all(torch.is_tensor(s["step"]) for s in o.state.values() if "step" in s)
        results.append((ps, o))
    assert_equal_params(results[0][0], results[1][0])
    assert states_equal(results[0][1].state_dict(), results[1][1].state_dict())


@pytest.mark.parametrize("make", [
    lambda p: deepopt.AssociativeMomentum(p, lr=0.1, momentum=0.0),
    lambda p: deepopt.AssociativeMomentum(p, lr=0.1, momentum=0.0, weight_decay=0.1, foreach=True),
    lambda p: deepopt.DeltaMomentum(p, lr=0.1, momentum=0.0, delta=0.0),
    lambda p: deepopt.DeltaMomentum(p, lr=0.1, momentum=0.0, delta=0.0, keys="elementwise", foreach=True),
], ids=["associative", "associative-foreach", "delta", "delta-foreach"])
def test_a_configuration_without_state_leaves_no_state(make):
    params = clone_params(make_params([(4, 3), (5,)]))
    opt = make(params)
    run(opt, params, 2, torch.Generator().manual_seed(0))
    assert opt.state_dict()["state"] == {} and len(opt.state) == 0


@pytest.mark.parametrize("name", ALL)
def test_a_failed_first_step_leaves_no_state_entries(name):
    params = clone_params(make_params(shapes_for(name)))
    opt = CONFIGS[name](params)
    set_grads(params, torch.Generator().manual_seed(0))
    params[-1].grad = params[-1].grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert opt.state_dict()["state"] == {}


@pytest.mark.parametrize("name", ALL)
def test_named_params_work_and_mixing_named_with_unnamed_raises_clearly(name):
    entry = BY_NAME[name]
    if entry.wrapper:
        pytest.skip("the wrapper takes an optimizer, not params")
    params = clone_params(make_params(shapes_for(name)))
    named = [(f"w{i}", p) for i, p in enumerate(params)]
    opt = CONFIGS[name](named)
    run(opt, params, 2, torch.Generator().manual_seed(0))
    assert opt.state_dict()["param_groups"][0]["param_names"] == [n for n, _ in named]
    for mixed in ([named[0], params[1]], [params[0], named[1]]):
        with pytest.raises(ValueError, match=r"with/without names.*params\[1\]"):
            CONFIGS[name](mixed)
    # a 2-row tensor after a named pair must not be unpacked as a (name, tensor) pair
    with pytest.raises(ValueError, match="with/without names"):
        CONFIGS[name]([named[0], torch.zeros(2, 3, requires_grad=True)])


@pytest.mark.parametrize("name", ALL)
def test_global_step_hooks_fire_once_per_step(name):
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    params = clone_params(make_params(shapes_for(name)))
    opt = CONFIGS[name](params)
    calls, own = [], []
    handles = [register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("pre", type(o).__name__))),
               register_optimizer_step_post_hook(lambda o, a, k: calls.append(("post", type(o).__name__)))]
    opt.register_step_pre_hook(lambda o, a, k: own.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: own.append("post"))
    try:
        run(opt, params, 3, torch.Generator().manual_seed(0))
    finally:
        for h in handles:
            h.remove()
    assert calls == [("pre", type(opt).__name__), ("post", type(opt).__name__)] * 3
    assert own == ["pre", "post"] * 3


def test_multifrequency_inner_hooks_still_fire_on_inner_steps():
    p = torch.zeros(3, requires_grad=True)
    inner = deepopt.AssociativeMomentum([p], lr=0.1)
    calls = []
    inner.register_step_pre_hook(lambda o, a, k: calls.append("inner-pre"))
    inner.register_step_post_hook(lambda o, a, k: calls.append("inner-post"))
    opt = deepopt.MultiFrequency(inner)
    p.grad = torch.ones(3)
    opt.step()
    assert calls == ["inner-pre", "inner-post"]


def test_multifrequency_counters_travel_with_their_groups():
    """The counter is the group's own ``mf_step``: reordering or removing groups keeps each
    group's phase (a list indexed by position would not)."""
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    opt = deepopt.MultiFrequency(deepopt.AssociativeMomentum(
        [{"params": [a], "update_every": 3}, {"params": [b], "update_every": 2}], lr=1.0, momentum=0.0))

    def step():
        a.grad, b.grad = torch.ones(2), torch.ones(3)
        opt.step()

    step()                                   # a: 1 of 3, b: 1 of 2
    opt.param_groups.reverse()               # b's group first now
    assert [g["mf_step"] for g in opt.param_groups] == [1, 1]
    step()                                   # b due (2 of 2), a not (2 of 3)
    assert torch.equal(b, torch.full((3,), -2.0)) and torch.equal(a, torch.zeros(2))
    del opt.param_groups[0]                  # drop b's group: a keeps its own count
    step()                                   # a due (3 of 3)
    assert torch.equal(a, torch.full((2,), -3.0))
    assert opt.state_dict()["param_groups"][0]["mf_step"] == 3


def test_multifrequency_counters_round_trip_through_state_dict_in_the_groups():
    a = torch.zeros(2, requires_grad=True)
    opt = deepopt.MultiFrequency(deepopt.AssociativeMomentum([{"params": [a], "update_every": 4}], lr=1.0))
    for _ in range(3):
        a.grad = torch.ones(2)
        opt.step()
    saved = snapshot(opt)
    twin = deepopt.MultiFrequency(deepopt.AssociativeMomentum(
        [{"params": [a.detach().clone().requires_grad_()], "update_every": 4}], lr=1.0))
    twin.load_state_dict(saved)
    assert twin.param_groups[0]["mf_step"] == 3
    assert _param_groups_equal(twin.state_dict()["param_groups"], saved["param_groups"])


CLASSES = [deepopt.AssociativeMomentum, deepopt.DeltaMomentum, deepopt.DeepMomentum, deepopt.M3]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("kwargs, error, message", [
    (dict(lr=-1.0), ValueError, r"^Invalid learning rate: -1.0 \(lr must lie in \[0.0, inf\)\)"),
    (dict(lr=torch.tensor([0.1, 0.2])), ValueError, r"^Tensor lr must be 1-element"),
    (dict(lr=0.1, momentum=-0.5), ValueError, r"^Invalid momentum value: -0.5 \(momentum must lie in \[0.0, 1.0\)\)"),
    (dict(lr=0.1, weight_decay=-1.0), ValueError, r"^Invalid weight_decay value: -1.0"),
    (dict(lr=0.1, foreach=True, fused=True), RuntimeError, r"^`fused` and `foreach` cannot be `True` together."),
], ids=["lr", "tensor-lr", "momentum", "weight_decay", "fused-foreach"])
def test_hyperparameters_are_checked_before_params_in_torchs_words(cls, kwargs, error, message):
    """torch checks hyperparameters before it reads ``params``: ``Optimizer(None, lr=-1)`` gets
    the lr's error, not a TypeError about ``None``. Messages begin as torch's do."""
    with pytest.raises(error, match=message):
        cls(None, **kwargs)
    with pytest.raises(error, match=message):
        cls([torch.zeros(3, 3, requires_grad=True)], **kwargs)


def test_delta_default_follows_momentum_and_the_error_says_why():
    p = torch.zeros(3, 3, requires_grad=True)
    opt = deepopt.DeltaMomentum([p], lr=0.1, momentum=0.3)   # delta=None: min(0.5, momentum) = 0.3
    p.grad = torch.ones(3, 3)
    opt.step()
    with pytest.raises(ValueError, match=r"Invalid delta value: 0.5 \(delta must lie in \[0.0, momentum=0.3\]: "
                                         r"delta <= momentum keeps"):
        deepopt.DeltaMomentum([p], lr=0.1, momentum=0.3, delta=0.5)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_hyperparameters_edited_in_param_groups_are_checked_at_step_before_anything_changes(name):
    params = clone_params(make_params(shapes_for(name)))
    opt = CONFIGS[name](params)
    run(opt, params, 2, torch.Generator().manual_seed(0))
    before, state_before = [p.detach().clone() for p in params], snapshot(opt)
    group = opt.param_groups[0]
    good, group["momentum"] = group["momentum"], 1.5
    set_grads(params, torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="momentum"):
        opt.step()
    assert_equal_params(params, before)
    assert states_equal(snapshot(opt), state_before)
    group["momentum"] = good   # fixed: steps resume
    opt.step()
    assert not torch.equal(params[0], before[0])


@pytest.mark.parametrize("save_with, load_into, message", [
    (lambda p: deepopt.AssociativeMomentum(p, lr=0.1, preconditioner="adam"),
     lambda p: deepopt.AssociativeMomentum(p, lr=0.1), r"saved with preconditioner='adam'.*preconditioner=None"),
    (lambda p: deepopt.DeltaMomentum(p, lr=0.1),
     lambda p: deepopt.AssociativeMomentum(p, lr=0.1), r"options \['delta', 'keys'\].*another optimizer"),
    (lambda p: deepopt.AssociativeMomentum(p, lr=0.1),
     lambda p: deepopt.DeltaMomentum(p, lr=0.1), r"options \['beta2', 'preconditioner'\].*another optimizer"),
    (lambda p: deepopt.DeltaMomentum(p, lr=0.1, keys="elementwise"),
     lambda p: deepopt.DeltaMomentum(p, lr=0.1), r"saved with keys='elementwise'"),
    (lambda p: deepopt.DeepMomentum(p, lr=0.1, objective="dot"),
     lambda p: deepopt.DeepMomentum(p, lr=0.1), r"saved with objective='dot'"),
    (lambda p: deepopt.M3(p, lr=0.1, precondition=False),
     lambda p: deepopt.M3(p, lr=0.1), r"saved with precondition=False"),
], ids=["adam-into-sgd", "delta-into-associative", "associative-into-delta", "keys", "objective", "precondition"])
def test_a_checkpoint_of_another_algorithm_fails_clearly_and_changes_nothing(save_with, load_into, message):
    p = torch.randn(4, 3, requires_grad=True)
    saver = save_with([p])
    p.grad = torch.randn(4, 3)
    saver.step()
    q = p.detach().clone().requires_grad_()
    loader = load_into([q])
    q.grad = torch.randn(4, 3)
    loader.step()
    before, groups_before = snapshot(loader), copy.deepcopy(loader.state_dict()["param_groups"])
    with pytest.raises(ValueError, match=message):
        loader.load_state_dict(saver.state_dict())
    assert states_equal(snapshot(loader), before)
    assert _param_groups_equal(loader.state_dict()["param_groups"], groups_before)


def test_plain_hyperparameters_are_restored_from_a_checkpoint_as_torch_does():
    p = torch.randn(4, 3, requires_grad=True)
    saver = deepopt.DeltaMomentum([p], lr=0.05, momentum=0.8, delta=0.3)
    p.grad = torch.randn(4, 3)
    saver.step()
    loader = deepopt.DeltaMomentum([p.detach().clone().requires_grad_()], lr=0.1)
    loader.load_state_dict(saver.state_dict())
    group = loader.param_groups[0]
    assert (group["lr"], group["momentum"], group["delta"]) == (0.05, 0.8, 0.3)
