"""The scripts' shared command line (examples/cli.py): --help answers without torch and shows every
default, one vocabulary of flags, and a user error is one line without a traceback."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPTS = ["examples/hope/train.py", "examples/hope/recall.py", "examples/hope/continual.py",
           "examples/hope/results/make_results.py", "examples/quickstart.py", "examples/ddp_train.py",
           "benchmarks/step_throughput.py", "benchmarks/distributed_deviation.py",
           "examples/hope/results/sweep_and_ablate.py", "examples/hope/long_context.py",
           "examples/hope/results/cms.py", "examples/hope/results/context_throughput.py",
           "examples/hope/results/compile_throughput.py", "examples/hope/results/memory_cost.py",
           "examples/hope/results/gen_chunk.py", "examples/hope/results/passkey_trained.py",
           "benchmarks.run", "benchmarks.deep_memory", "benchmarks.m3_design", "benchmarks.ns_dtype_cpu",
           "benchmarks.step_cost", "benchmarks.matched_lr", "benchmarks.char_gpt", "benchmarks.robustness"]

# runs a script (a path, as `python path`) or a module (as `python -m name`) and reports, on its
# last stdout line, the exit status and which heavy modules it imported
PROBE = """
import os, runpy, sys
target = sys.argv[1]
sys.argv = [target, *sys.argv[2:]]
try:
    if target.endswith(".py"):
        sys.path[0] = os.path.dirname(os.path.abspath(target))
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as e:
    code = e.code
heavy = [m for m in ("torch", "numpy", "deepopt", "matplotlib") if m in sys.modules]
print(f"\\nPROBE {code} {','.join(heavy) or '-'}")
"""


def probe(target, *args):
    """(exit status, heavy modules imported, stdout before the report, stderr)."""
    p = subprocess.run([sys.executable, "-c", PROBE, target, *map(str, args)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr          # the probe itself (an exception other than SystemExit)
    *out, report = p.stdout.rstrip("\n").split("\n")
    _, code, heavy = report.split()
    return int(code), [] if heavy == "-" else heavy.split(","), "\n".join(out), p.stderr


def assert_one_line_error(code, stderr, *words):
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "error" in lines[0] and "Traceback" not in stderr, stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def help_entries(text):
    """Option -> its help, from the options section of --help."""
    entries, current = {}, None
    for line in text.split("options:", 1)[1].splitlines():
        m = re.match(r"  (-\S+)", line)
        if m:
            current = m.group(1).rstrip(",")
            entries[current] = line
        elif current and line.startswith("   "):
            entries[current] += " " + line.strip()
    return entries


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_is_fast_and_shows_every_default(script):
    code, heavy, out, err = probe(script, "--help")
    assert code == 0 and not err, err
    assert heavy == [], f"--help imported {heavy}"
    entries = help_entries(out)
    assert "-h" in entries
    missing = [opt for opt, text in entries.items() if opt != "-h" and "default" not in text]
    assert not missing, f"options whose --help shows no default: {missing}"


@pytest.mark.parametrize("script, old", [
    ("examples/hope/recall.py", ["--seeds", "0"]), ("examples/hope/recall.py", ["--models", "hope"]),
    ("examples/hope/recall.py", ["--eval-lens", "64"]), ("examples/hope/continual.py", ["--models", "hope"]),
    ("benchmarks.run", ["--seeds", "3"]), ("benchmarks.run", ["--tasks", "rosenbrock,mnist1d_mlp"]),
])
def test_old_spellings_are_one_line_errors(script, old):
    code, heavy, _, err = probe(script, *old)
    assert_one_line_error(code, err)
    assert heavy == []


def test_one_vocabulary():
    from benchmarks import run
    from examples import quickstart
    from examples.hope import continual, recall, train
    a = recall.parse_args(["--seed", "0", "1", "--model", "hope", "--eval-lengths", "32", "64",
                           "--optimizer", "adamw"])
    assert (a.seed, a.model, a.eval_lengths, a.optimizer) == ([0, 1], "hope", [32, 64], "adamw")
    assert recall.parse_args([]).model == "both"
    a = continual.parse_args(["--model", "transformer", "--eval-lengths", "128", "256"])
    assert (a.model, a.eval_lengths) == ("transformer", [128, 256])
    a = train.parse_args(["--seed", "3", "--model", "hope"])
    assert (a.seed, a.model, a.device) == (3, "hope", "auto")
    assert quickstart.parse_args(["--seed", "2"]).seed == 2
    a = run.parse_args(["--seed", "1", "2", "--tasks", "rosenbrock", "mnist1d_mlp", "--optimizers", "deep"])
    assert (a.seeds, a.tasks, a.optimizers) == ([1, 2], ["rosenbrock", "mnist1d_mlp"], ["adamw", "deep"])
    assert a.select_seed == 10   # LRs are selected on a seed that is not reported
    assert run.parse_args([]).seeds == [0, 1, 2] and run.parse_args(["--quick"]).seeds == [0, 1]


def test_benchmark_names_match_the_registries():
    from benchmarks import run
    from benchmarks.optimizers import OPTIMIZERS
    from benchmarks.tasks import TASKS
    assert run.TASK_NAMES == list(TASKS) and run.OPTIMIZER_NAMES == list(OPTIMIZERS)


def test_run_all_commands_parse():
    from examples.hope import continual, recall, train
    scripts = {"train.py": train, "recall.py": recall, "continual.py": continual}
    n = 0
    for line in (ROOT / "examples" / "hope" / "results" / "run_all.sh").read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["python"] and Path(words[1]).name in scripts:
            args = [w.replace("$s", "0") for w in words[2:]]
            scripts[Path(words[1]).name].parse_args(args)
            n += 1
    assert n == 6


@pytest.mark.parametrize("name, content, words", [
    ("missing.txt", None, ["does not exist"]),
    ("folder", "dir", ["is a directory"]),
    ("empty.txt", b"", ["is empty"]),
    ("twelve.txt", b"hello world\n", ["too short", "12 characters", "at least 1424"]),
    ("binary.bin", bytes(range(256)) * 40, ["not a text file", "NUL"]),
    ("latin1.txt", "caf\xe9 ".encode("latin-1") * 600, ["not UTF-8"]),
    ("short.txt", b"x" * 169, ["too short", "169 characters", "at least 1424"]),
])
def test_train_data_errors(tmp_path, name, content, words):
    """Each refused before torch loads, anything is written or a corpus is fetched."""
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    out = tmp_path / "out"
    code, heavy, stdout, err = probe("examples/hope/train.py", "--data", path, "--out", out)
    assert_one_line_error(code, err, *words)
    assert heavy == [] and not out.exists()


@pytest.mark.parametrize("args, flag", [(["--lr", "0"], "--lr"), (["--lr", "-1e-3"], "--lr"),
                                        (["--steps", "0"], "--steps"), (["--batch-size", "-4"], "--batch-size"),
                                        (["--model", "both2"], "--model")])
def test_train_bad_flags(args, flag):
    code, heavy, _, err = probe("examples/hope/train.py", *args)
    assert_one_line_error(code, err, flag)
    assert heavy == []


@pytest.mark.parametrize("script, args, words", [
    ("examples/quickstart.py", ["--lr", "0"], ["--lr", "> 0"]),
    ("examples/hope/recall.py", ["--train-len", "30"], ["--train-len"]),
    ("examples/hope/recall.py", ["--optimizer", "sgd"], ["--optimizer"]),
    ("examples/hope/continual.py", ["--ckpt-dir", "no/such/dir"], ["no checkpoint"]),
    ("benchmarks.run", ["--jobs", "0"], ["--jobs"]),
    ("benchmarks.run", ["--seed", "0", "10"], ["--select-seed", "reported"]),
    ("examples/hope/results/sweep_and_ablate.py", ["--seed", "0", "1"], ["--select-seed"]),
    ("examples/hope/long_context.py", ["--ckpt-dir", "no/such/dir"], ["no hope.pt or transformer.pt"]),
    ("examples/hope/results/passkey_trained.py", ["--share", "0"], ["--share", "(0, 1]"]),
    ("examples/hope/results/passkey_trained.py", ["--share", "0.6"], ["--copy-share", "[0, 0.4]"]),
    ("examples/hope/results/passkey_trained.py", ["--copy-len", "65"], ["--copy-len", "[2, 64]"]),
    ("examples/hope/results/passkey_trained.py", ["--segments", "2"], ["--segments 2", "--model hope"]),
    ("examples/hope/results/passkey_trained.py", ["--init", "a.pt"], ["--init needs --model hope"]),
    ("examples/hope/results/passkey_trained.py", ["--init", "no/such.pt", "--model", "hope"], ["--init no/such.pt", "no such file"]),
    ("examples/hope/results/passkey_trained.py", ["--steps", "0"], ["--steps 0", "--init"]),
])
def test_other_user_errors(script, args, words):
    code, _, _, err = probe(script, *args)
    assert_one_line_error(code, err, *words)
