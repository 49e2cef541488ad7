"""Mutation testing: delete or neutralise each term of each update rule, in each implementation,
and check that the fast test subset fails (the mutant is "killed").

    python tests/mutants.py                 # all mutants, 6-45 s each on 2 cores (10 min)
    python tests/mutants.py --list          # the mutants, numbered
    python tests/mutants.py 3 7             # some of them

Each mutant replaces one exact snippet of one file (the script checks that it occurs exactly
once), runs ``pytest -x`` on the fast subset in a copy of the working tree, and restores nothing
in place: the tree is never modified. The score and each survivor are printed; a survivor is a
missing test, unless it is listed in EQUIVALENT with the reason it cannot change any result.
The CUDA C++ kernels (csrc/) have no mutants here: their tests run only on a GPU.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAST = ["tests/test_oracles.py", "tests/test_reductions.py", "tests/test_parity.py", "tests/test_fused.py",
        "tests/test_contract.py", "tests/test_multi_frequency.py", "tests/test_memory.py",
        "tests/test_newton_schulz.py", "tests/test_functional.py"]

# (name, file, original snippet, replacement)
MUTANTS = [
    # DeepMomentum (Python: for-loop, foreach; the fused path calls the same _readout_of)
    ("deep: MLP read-out deleted", "deepopt/deep_momentum.py",
     "u = u.add(deep * scale) if linear_memory else deep.mul(scale).to(u.dtype)",
     "u = u if linear_memory else deep.mul(scale).to(u.dtype)"),
    ("deep: MLP inner step deleted", "deepopt/deep_momentum.py",
     "    Fn.mlp_memory_step_(mlp_in, mlp_out, keys, g_matrix * unit, objective=objective,",
     "    (lambda *a, **k: None)(mlp_in, mlp_out, keys, g_matrix * unit, objective=objective,"),
    ("deep: inner ridge deleted", "deepopt/functional.py",
     "    eta, lam = memory_lr, memory_decay",
     "    eta, lam = memory_lr, 0.0"),
    ("deep: B's proximal step loses its curvature (explicit)", "deepopt/functional.py",
     "    system = curvature.to(work).mul(eta).add_(eye, alpha=1 + eta * lam)",
     "    system = curvature.to(work).mul(0).add_(eye, alpha=1 + eta * lam)"),
    ("deep: A's proximal step unnormalised", "deepopt/functional.py",
     "    step_in = d_in * (eta / (1 + eta * (trace + lam)))",
     "    step_in = d_in * eta"),
    ("deep: l2 objective loses its target", "deepopt/functional.py",
     "        d_out = (hidden @ mlp_out.mT - target) / rows",
     "        d_out = (hidden @ mlp_out.mT) / rows"),
    ("deep: Newton-Schulz output deleted", "deepopt/deep_momentum.py",
     '    if output != "newton_schulz":\n        return updates',
     "    if True:\n        return updates"),
    ("Newton-Schulz ignores ns_dtype (always bf16)", "deepopt/newton_schulz.py",
     "            cast = torch.empty(len(sub), *us[sub[0]].shape, dtype=dtype, device=device)",
     "            cast = torch.empty(len(sub), *us[sub[0]].shape, dtype=torch.bfloat16, device=device)"),
    ("Newton-Schulz scales its input in place", "deepopt/newton_schulz.py",
     "            x = cast.mT if tall else cast\n",
     "            if len(sub) == 1 and us[sub[0]].dtype == dtype:\n                cast = us[sub[0]][None]\n"
     "            x = cast.mT if tall else cast\n"),
    ("Newton-Schulz: the Gram form never restarts", "deepopt/newton_schulz.py",
     "    return set(range(_GRAM_FIRST_RESTART, steps, _GRAM_RESTART_EVERY))",
     "    return set()"),
    ("Newton-Schulz: Polar Express without its safety factor", "deepopt/newton_schulz.py",
     "_POLAR_EXPRESS_SAFETY = 1.01", "_POLAR_EXPRESS_SAFETY = 1.0"),
    ("Newton-Schulz: Gram form's polynomial loses its identity term", "deepopt/newton_schulz.py",
     "        H.diagonal(dim1=-2, dim2=-1).add_(a)", "        H.diagonal(dim1=-2, dim2=-1).add_(0)"),
    ("row shards: the MLP's gradients not summed over the shards", "deepopt/functional.py",
     "    flat = sums(torch.cat([t.reshape(-1) for t in grads]))",
     "    flat = torch.cat([t.reshape(-1) for t in grads])"),
    ("row shards: the MLP's row mean over one shard's rows", "deepopt/functional.py",
     "    rows = max(keys.shape[-2] if rows is None else rows, 1)",
     "    rows = max(keys.shape[-2], 1)"),
    # HOPE's linear memory with inner momentum (deepopt/memory.py)
    ("memory: momentum steps enter M undecayed by beta (W = D)", "deepopt/memory.py",
     "        W = D @ B                                                        # weight of token j in M_t",
     "        W = D"),
    ("memory: carried momentum state S_s deleted from M", "deepopt/memory.py",
     "        M = M_next + carry[..., -1, :, None] * S",
     "        M = M_next"),
    ("memory: carried momentum state S_s deleted from the reads", "deepopt/memory.py",
     "            ys.append(y + carry * linear_memory_read(S, qc))",
     "            ys.append(y)"),
    # retention toward an anchor and the chunkwise write (deepopt/memory.py)
    ("memory: anchor deleted from the chunk loop's state", "deepopt/memory.py",
     "        if anchor is not None:\n            M_next = M_next + anchor",
     "        if anchor is not None:\n            M_next = M_next"),
    ("memory: anchor deleted from the chunk loop's reads", "deepopt/memory.py",
     "            if anchor is not None:\n                y = y + linear_memory_read(anchor, qc)",
     "            if anchor is not None:\n                y = y"),
    ("memory: anchor deleted from the chunkwise maps", "deepopt/memory.py",
     "        M = M_next if anchor is None else torch.addcmul(M_next, 1 - keep_n, anchor)",
     "        M = M_next"),
    ("memory: anchor deleted from the chunkwise reads", "deepopt/memory.py",
     "        y = y + ((1 - decay).reshape(*lead, N * c, 1) * qc.reshape(*lead, N * c, dk)) @ anchor.transpose(-1, -2)",
     "        y = y"),
    ("memory: chunkwise map loses its write", "deepopt/memory.py",
     "    P = (w * d).transpose(-1, -2) @ kc + keep * torch.eye(dk, dtype=k.dtype, device=k.device)",
     "    P = keep * torch.eye(dk, dtype=k.dtype, device=k.device)"),
    ("memory: chunkwise state passing skips the offsets", "deepopt/memory.py",
     "        M_next = M @ P_n if b is None else M @ P_n + b[n]",
     "        M_next = M @ P_n"),
    ("memory: chunkwise write weights lose the retention", "deepopt/memory.py",
     "    w = ((A[..., -1:] - A).exp() * ec)[..., None]",
     "    w = ec[..., None]"),
    ("memory: chunkwise reads lose the chunk's own steps", "deepopt/memory.py",
     "    r = decay * qc + S @ d",
     "    r = decay * qc"),
    ("memory: chunkwise reads of given values lose the values", "deepopt/memory.py",
     "        y = y + S @ vc",
     "        y = y"),
    ("deep: no-linear-memory read-out keeps M", "deepopt/deep_momentum.py",
     "u = u.add(deep * scale) if linear_memory else deep.mul(scale).to(u.dtype)",
     "u = u.add(deep * scale)"),
    # DeltaMomentum
    ("delta: matrix forget term deleted (Python)", "deepopt/functional.py",
     "        return buf.mul_(momentum).sub_(retention, alpha=delta)",
     "        return buf.mul_(momentum)"),
    ("delta: elementwise forget term deleted (Python)", "deepopt/functional.py",
     "    return buf.mul_(retention)\n",
     "    return buf.mul_(momentum)\n"),
    ("delta: spectral keys use the Frobenius norm", "deepopt/functional.py",
     'scale = torch.linalg.matrix_norm(gh, keepdim=True) if keys == "matrix" else spectral_norm_estimate(gh)',
     "scale = torch.linalg.matrix_norm(gh, keepdim=True)"),
    ("delta: forget term deleted (Triton, elementwise keys)", "deepopt/_triton_kernels.py",
     "    return tl.maximum(momentum - delta * (k * k), 0.0)",
     "    return momentum + 0.0 * k"),
    ("delta: forget term deleted (Triton, matrix keys)", "deepopt/_triton_kernels.py",
     "nb = (b * momentum - delta * r) + write_rate * g",
     "nb = (b * momentum - 0.0 * r) + write_rate * g"),
    # M3
    ("m3: slow memory deleted", "deepopt/m3.py",
     '    u = x.add(state["slow_output"], alpha=slow_weight) if slow_weight != 0 else x',
     "    u = x"),
    ("m3: preconditioned update keeps its own RMS, not Muon's", "deepopt/m3.py",
     "                                          like=as_matrix(x), sums=sums).reshape(x.shape)",
     "                                          like=None, sums=sums).reshape(x.shape)"),
    ("m3: slow memory's sum not rescaled to Muon's RMS", "deepopt/m3.py",
     "    return u * (target / now.clamp_min(torch.finfo(now.dtype).tiny))",
     "    return u"),
    ("m3: slow memory never written", "deepopt/m3.py",
     '    slow = state["slow_buffer"].lerp_(state["chunk_sum"] / chunk, 1 - slow_momentum)',
     '    slow = state["slow_buffer"]'),
    ("m3: slow output never stored", "deepopt/m3.py",
     '        states[i]["slow_output"].copy_(slow_output)', "        pass"),
    ("m3: preconditioner deleted", "deepopt/functional.py",
     "    return v * (rms(u if like is None else like, sums) / rms(v, sums).clamp_min(tiny))",
     "    return u.to(d.dtype)"),
    ("m3: preconditioner keeps the 1/|g| scale", "deepopt/functional.py",
     "    return v * (rms(u if like is None else like, sums) / rms(v, sums).clamp_min(tiny))",
     "    return v"),
    ("m3: second moment not written (Triton)", "deepopt/_triton_kernels.py",
     "    return v * beta2 + one_minus_beta2 * (g * g)",
     "    return v + 0.0 * g"),
    # Adam value map: bias corrections
    ("adam: bias correction 1 deleted (for-loop)", "deepopt/functional.py",
     "    bias_correction1 = 1 - beta1 ** t\n",
     "    bias_correction1 = 1\n"),
    ("adam: bias correction 2 deleted (foreach)", "deepopt/functional.py",
     "    bias_correction2 = [1 - beta2 ** s.item() for s in steps]",
     "    bias_correction2 = [1 for s in steps]"),
    ("adam: bias correction 1 deleted (Triton)", "deepopt/_triton_kernels.py",
     "        bc1 = 1.0 - _pow(beta1, e)",
     "        bc1 = 1.0 + 0.0 * _pow(beta1, e)"),
    # Nesterov
    ("nesterov deleted (for-loop)", "deepopt/functional.py",
     "    if lerp:\n        return g.lerp(buf, momentum)\n    return g.add(buf, alpha=momentum)",
     "    if lerp:\n        return g.lerp(buf, momentum)\n    return buf"),
    ("nesterov deleted (foreach)", "deepopt/functional.py",
     "    return torch._foreach_add(gs, bufs, alpha=momentum)",
     "    return bufs"),
    ("nesterov deleted (Triton)", "deepopt/_triton_kernels.py",
     "        return g + momentum * b\n",
     "        return b + 0.0 * g\n"),
    # weight decay
    ("coupled weight decay deleted (Python)", "deepopt/functional.py",
     "        g = g.add(param, alpha=weight_decay)",
     "        g = g"),
    ("coupled weight decay deleted (foreach)", "deepopt/functional.py",
     "            grads = torch._foreach_add(grads, params, alpha=weight_decay)",
     "            grads = grads"),
    ("decoupled weight decay deleted (for-loop)", "deepopt/functional.py",
     "            param.mul_(1 - lr * weight_decay)",
     "            pass"),
    ("decoupled weight decay deleted (foreach)", "deepopt/functional.py",
     "            torch._foreach_mul_(params, 1 - lr * weight_decay)",
     "            pass"),
    ("weight decay deleted (Triton)", "deepopt/_triton_kernels.py",
     "        g = g + wd * p",
     "        g = g + 0.0 * p"),
    # maximize
    ("maximize deleted (Python)", "deepopt/functional.py",
     "    g = -grad if maximize else grad",
     "    g = grad"),
    ("maximize deleted (foreach)", "deepopt/functional.py",
     "    if maximize:\n        grads = torch._foreach_neg(grads)",
     "    if False:\n        grads = torch._foreach_neg(grads)"),
    ("maximize deleted (Triton)", "deepopt/_triton_kernels.py",
     "    if MAXIMIZE:\n        g = -g",
     "    if MAXIMIZE:\n        g = g"),
    # the momentum write itself
    ("momentum write forgets the past (Triton)", "deepopt/_triton_kernels.py",
     "        return b * momentum + write_rate * g",
     "        return 0.0 * b + write_rate * g"),
    # MultiFrequency
    ("multifrequency: slow groups drop their accumulated gradients", "deepopt/multi_frequency.py",
     "                        acc.add_(grad.to(acc.dtype))",
     "                        pass"),
    ("multifrequency: mean reduction deleted", "deepopt/multi_frequency.py",
     "            total = torch.div(total, period)",
     "            total = total"),
]

#: mutants that cannot change any result, with the reason (none so far)
EQUIVALENT: dict[str, str] = {}


def apply(tree: Path, mutant) -> None:
    _, rel, original, replacement = mutant
    path = tree / rel
    text = path.read_text()
    count = text.count(original)
    if count != 1:
        raise SystemExit(f"mutant {mutant[0]!r}: the snippet occurs {count} times in {rel} (expected once)")
    path.write_text(text.replace(original, replacement))


def run_mutant(mutant, timeout: int) -> tuple[bool, float, str]:
    """(killed, seconds, evidence) of the fast subset on a copy of the tree with ``mutant`` applied
    (``None``: the unmutated baseline)."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", "__pycache__", ".ci-venv", ".venv", ".device-deps", "results",
                                                                  ".hypothesis", "*.egg-info", "build"))
        if mutant is not None:
            apply(tree, mutant)
        env = {**os.environ, "PYTHONPATH": str(tree), "HYPOTHESIS_PROFILE": "ci"}
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *FAST],
                              cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        killed = done.returncode != 0
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("FAILED")]
        # (no output at all: pytest could not start, e.g. another interpreter without the test tools)
        tail = (done.stdout.strip() or done.stderr.strip() or "no output").splitlines()[-1]
        return killed, time.perf_counter() - t0, lines[0] if lines else tail


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("which", nargs="*", type=int, help="mutant numbers (default: all)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--timeout", type=int, default=900)
    args = ap.parse_args(argv)
    chosen = [(i, m) for i, m in enumerate(MUTANTS, 1) if not args.which or i in args.which]
    if args.list:
        for i, m in chosen:
            print(f"{i:3d}  {m[0]}  ({m[1]})")
        return 0
    for _, m in chosen:   # every snippet must be found before anything runs
        apply_check = (ROOT / m[1]).read_text().count(m[2])
        if apply_check != 1:
            raise SystemExit(f"mutant {m[0]!r}: the snippet occurs {apply_check} times in {m[1]}")
    # a kill means "the tests failed": first make sure they pass without a mutant, in this interpreter
    failed, seconds, evidence = run_mutant(None, args.timeout)
    if failed:
        raise SystemExit(f"the fast subset fails without any mutant ({evidence}): nothing could be scored")
    print(f"  0 baseline   {seconds:5.0f}s  no mutant: the fast subset passes  <- {evidence}", flush=True)
    survivors = []
    for i, m in chosen:
        killed, seconds, evidence = run_mutant(m, args.timeout)
        status = "killed" if killed else ("equivalent" if m[0] in EQUIVALENT else "SURVIVED")
        print(f"{i:3d} {status:10s} {seconds:5.0f}s  {m[0]}  <- {evidence}", flush=True)
        if not killed and m[0] not in EQUIVALENT:
            survivors.append(m[0])
    killed_n = len(chosen) - len(survivors) - sum(1 for _, m in chosen if m[0] in EQUIVALENT)
    print(f"\nscore: {killed_n}/{len(chosen)} killed"
          + (f", {len(chosen) - killed_n - len(survivors)} equivalent" if EQUIVALENT else "")
          + (f"; survivors: {survivors}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
