"""DDP, FSDP2 and distributed checkpoints with 2 gloo ranks on CPU (workers in _dist_worker.py).

For every optimizer config: parameters are identical across ranks, and equal a single-process
run on the same global batch within float tolerance (all-reduce order differs from a local sum;
Newton-Schulz runs in bf16, where a last-bit input difference moves the output ~1e-3).
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _dist_worker as W

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")
NAMES = list(W.CONFIGS)
WORLD = 2


def tolerance(name):
    # measured: <= 6e-8 everywhere (benchmarks/results/distributed_deviation.json), against a
    # largest parameter change of 0.085-0.13 over the run; bf16 Newton-Schulz gets room for one flipped rounding
    return dict(rtol=0, atol=1e-5) if name in W.NS_CONFIGS else dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("dist")


def _results(out_dir, engine, name):
    per_rank = [torch.load(out_dir / f"{engine}-{name}-rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for r, result in enumerate(per_rank):
        assert not isinstance(result, str), f"{engine}/{name} failed on rank {r}:\n{result}"
    return per_rank


@pytest.fixture(scope="module")
def engines_ran(out_dir):
    for engine in ("ddp", "fsdp2", "dcp"):
        mp.start_processes(W.run, args=(WORLD, engine, NAMES, str(out_dir)), nprocs=WORLD, start_method="spawn")
    return True


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
@pytest.mark.parametrize("name", NAMES)
def test_matches_single_process_and_ranks_agree(engines_ran, out_dir, engine, name):
    rank0, rank1 = _results(out_dir, engine, name)
    for a, b in zip(rank0, rank1):
        assert torch.equal(a, b), f"{engine}/{name}: ranks disagree"
    reference = W.single_process(name)
    for a, b in zip(rank0, reference):
        torch.testing.assert_close(a, b, **tolerance(name))


@pytest.mark.parametrize("name", ["deep", "deep_ns_l2", "m3"])
def test_fsdp2_spreads_whole_matrix_work_round_robin(engines_ran, out_dir, name):
    calls = [torch.load(out_dir / f"fsdp2-{name}-rank{r}-calls.pt")["whole"] for r in range(WORLD)]
    model = W.make_model()
    matrices = sum(1 for p in W.CONFIGS[name](model).param_groups[0]["params"] if p.ndim >= 2)
    assert sum(calls) == matrices * W.STEPS, calls      # each matrix update computed once ...
    assert all(0 < c < matrices * W.STEPS for c in calls), calls   # ... and shared by the ranks


@pytest.mark.parametrize("name", NAMES)
def test_dcp_checkpoint_from_two_ranks_resumes_on_one(engines_ran, out_dir, name):
    sharded_run, _ = _results(out_dir, "dcp", name)
    resumed = W.resume_single_process(name, str(out_dir))
    for a, b in zip(sharded_run, resumed):
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
    return [line for line in done.stdout.splitlines() if line.startswith("step")]


def test_ddp_example_resumes_from_its_dcp_checkpoint(tmp_path):
    args = ["--engine", "fsdp2", "--optimizer", "deep", "--steps", "30"]
    whole = _torchrun(*args)
    _torchrun(*args, "--ckpt", str(tmp_path / "ckpt"), "--stop-after", "12")
    resumed = _torchrun(*args, "--ckpt", str(tmp_path / "ckpt"))
    assert resumed[-1] == whole[-1], (whole, resumed)
