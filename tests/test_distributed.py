"""DDP, FSDP2 and distributed checkpoints with 2 and 4 gloo ranks on CPU (workers in _dist_worker.py).

For every optimizer config: parameters are identical across ranks, and equal a single-process
run on the same global batch within float tolerance (all-reduce order differs from a local sum;
Newton-Schulz runs in bf16, where a last-bit input difference moves the output ~1e-3). For the
Newton-Schulz rules: each matrix is orthogonalised once per step, on the owner the flop balance
gives it, and each rank receives exactly the bytes it must (fewer than FSDP2's all-gather of the
params). DCP checkpoints saved on 2 ranks resume on 1 and on 4, those saved on 4 or on 1 on 2.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _dist_worker as W
from deepopt import newton_schulz as NS

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")
NAMES = list(W.CONFIGS)
NS_NAMES = sorted(W.NS_CONFIGS)
WORLDS = (2, 4)
#: cross-world resumes cover the optimizers whose state DCP loads in place (MultiFrequency's inner
#: state does not exist before its first step: it resumes through dcp_to_torch_save, on one process)
RESHARD_NAMES = [n for n in NAMES if not n.startswith("multifreq")]


def tolerance(name):
    # measured: <= 5e-7 everywhere on 2 and 4 ranks (benchmarks/results/distributed_deviation.json),
    # against a largest parameter change of 0.085-0.13 over the run; Newton-Schulz gets room for one
    # flipped bf16 rounding
    return dict(rtol=0, atol=1e-5) if name in W.NS_CONFIGS else dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("dist")


def _load(out_dir, tag, world):
    per_rank = [torch.load(out_dir / f"{tag}-rank{r}.pt", weights_only=True) for r in range(world)]
    for r, result in enumerate(per_rank):
        assert not isinstance(result, str), f"{tag} failed on rank {r}:\n{result}"
    return per_rank


def _traffic(out_dir, tag, world):
    return [torch.load(out_dir / f"{tag}-rank{r}-traffic.pt", weights_only=True) for r in range(world)]


@pytest.fixture(scope="module")
def engines_ran(out_dir):
    for world in WORLDS:
        mp.start_processes(W.run, args=(world, W.ENGINES, NAMES, str(out_dir)), nprocs=world, start_method="spawn")
    for name in RESHARD_NAMES:   # one process saves, 2 ranks resume
        W.save_single_process(name, str(out_dir))
    for world, saved_on in ((4, 2), (2, 4), (2, 1)):
        mp.start_processes(W.run, args=(world, ("dcp_resume",), RESHARD_NAMES, str(out_dir), saved_on),
                           nprocs=world, start_method="spawn")
    return True


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
@pytest.mark.parametrize("name", NAMES)
def test_matches_single_process_and_ranks_agree(engines_ran, out_dir, engine, world, name):
    ranks = _load(out_dir, f"{engine}-w{world}-{name}", world)
    for other in ranks[1:]:
        for a, b in zip(ranks[0], other):
            assert torch.equal(a, b), f"{engine}/{name}: ranks disagree"
    for a, b in zip(ranks[0], W.single_process(name)):
        torch.testing.assert_close(a, b, **tolerance(name))


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", NS_NAMES)
def test_ddp_with_a_process_group_matches_and_ranks_agree_bit_for_bit(engines_ran, out_dir, world, name):
    ranks = _load(out_dir, f"ddp_ns-w{world}-{name}", world)
    for other in ranks[1:]:
        for a, b in zip(ranks[0], other):
            assert torch.equal(a, b)
    # the same results as every rank computing every matrix (the owner's result is broadcast)
    for a, b in zip(ranks[0], _load(out_dir, f"ddp-w{world}-{name}", world)[0]):
        assert torch.equal(a, b)


def _expected_owners(shapes, world):
    return NS.balanced_owners([NS.ns_flops(s) for s in shapes], world)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("engine", ["ddp_ns", "fsdp2"])
@pytest.mark.parametrize("name", NS_NAMES)
def test_each_matrix_is_orthogonalised_once_on_its_owner(engines_ran, out_dir, engine, world, name):
    traffic = _traffic(out_dir, f"{engine}-w{world}-{name}", world)
    reference = W.single_process_traffic(name)   # what one process orthogonalises, step by step
    for step, shapes in enumerate(reference):
        done = [traffic[r][step]["orthogonalised"] for r in range(world)]
        owners = _expected_owners(shapes, world)
        for r in range(world):   # exactly the matrices the flop balance gives rank r
            assert sorted(done[r]) == sorted(s for s, o in zip(shapes, owners) if o == r), (step, r, done)
        flops = [sum(NS.ns_flops(s) for s in done[r]) for r in range(world)]
        assert max(flops) <= sum(flops) / world + max(NS.ns_flops(s) for s in shapes)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("engine", ["ddp_ns", "fsdp2"])
@pytest.mark.parametrize("name", NS_NAMES)
def test_bytes_received_are_the_minimum(engines_ran, out_dir, engine, world, name):
    traffic = _traffic(out_dir, f"{engine}-w{world}-{name}", world)
    reference = W.single_process_traffic(name)
    # the Newton-Schulz dtype is what travels: fp32 where the config asks, else "auto" (bf16 on CPUs
    # that multiply it natively, fp32 on the others)
    auto = NS.resolve_ns_dtype("auto", torch.device("cpu"))
    itemsize = 4 if name in ("deep_ns_l2", "m3_gram") else auto.itemsize
    params = sum(p.numel() for p in W.make_model().parameters())
    for step, shapes in enumerate(reference):
        owners = _expected_owners(shapes, world)
        for r in range(world):
            got = traffic[r][step]["received"]
            if engine == "ddp_ns":   # every result this rank did not compute, nothing more
                minimum = sum(s[0] * s[1] for s, o in zip(shapes, owners) if o != r)
            else:                    # the other ranks' rows of its matrices, and its rows of the others'
                rows = [[len(c) for c in torch.empty(s[0]).chunk(world)] + [0] * world for s in shapes]
                minimum = sum((s[0] - rows[i][r]) * s[1] if o == r else rows[i][r] * s[1]
                              for i, (s, o) in enumerate(zip(shapes, owners)))
                # FSDP2's all-gather of the fp32 params moves (world - 1) / world of them to each
                # rank; a bf16 Newton-Schulz of every matrix moves at most that, fp32 twice, and
                # M3's chunk boundaries orthogonalise each matrix twice
                per_matrix = len(shapes) / len(reference[0])
                assert got <= (world - 1) / world * params * 4 * per_matrix * itemsize / 2
            assert got == minimum * itemsize, (step, r, got, minimum * itemsize)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", NS_NAMES + ["deep"])
def test_fsdp2_all_reduces_only_the_row_sums(engines_ran, out_dir, world, name):
    """Per matrix and step, whatever the rows: DeepMomentum's gradient scale (one fp32) and its
    MLP's gradients and curvature (h x d, d x h, h x h); M3 two RMS values (three with the
    preconditioner), each a (sum, count) pair of fp64."""
    opt = W.CONFIGS[name](W.make_model())
    matrices = [p for p in opt.param_groups[0]["params"] if p.ndim >= 2]
    if name.startswith("deep"):
        h = opt.defaults["hidden"]
        expected = sum(4 + 4 * (2 * h * p.shape[1] + h * h) for p in matrices)
    else:
        expected = len(matrices) * (3 if name in ("m3_preconditioned", "m3_gram") else 2) * 16
    for rank_steps in _traffic(out_dir, f"fsdp2-w{world}-{name}", world):
        assert [t["reduced"] for t in rank_steps] == [expected] * W.STEPS


@pytest.mark.parametrize("name", NAMES)
def test_dcp_checkpoint_from_two_ranks_resumes_on_one(engines_ran, out_dir, name):
    sharded_run = _load(out_dir, f"dcp-w2-{name}", 2)[0]
    for a, b in zip(sharded_run, W.resume_single_process(name, str(out_dir), saved_on=2)):
        torch.testing.assert_close(a, b, **tolerance(name))


@pytest.mark.parametrize("saved_on, resumed_on", [(2, 4), (4, 2), (1, 2)])
@pytest.mark.parametrize("name", RESHARD_NAMES)
def test_dcp_checkpoint_resumes_on_another_world_size(engines_ran, out_dir, name, saved_on, resumed_on):
    uninterrupted = _load(out_dir, f"dcp-w{saved_on}-{name}", saved_on)[0]
    resumed = _load(out_dir, f"dcp_resume-from{saved_on}-w{resumed_on}-{name}", resumed_on)
    for other in resumed[1:]:
        for a, b in zip(resumed[0], other):
            assert torch.equal(a, b)
    for a, b in zip(uninterrupted, resumed[0]):
        torch.testing.assert_close(a, b, **tolerance(name))


def _torchrun(*args):
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(root, "examples", "ddp_train.py"), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "terminate called" not in done.stderr, done.stderr[-4000:]
    return [line for line in done.stdout.splitlines() if line.startswith("step")]


def test_ddp_example_resumes_from_its_dcp_checkpoint(tmp_path):
    args = ["--engine", "fsdp2", "--optimizer", "deep", "--steps", "30"]
    whole = _torchrun(*args)
    _torchrun(*args, "--ckpt", str(tmp_path / "ckpt"), "--stop-after", "12")
    resumed = _torchrun(*args, "--ckpt", str(tmp_path / "ckpt"))
    assert resumed[-1] == whole[-1], (whole, resumed)
