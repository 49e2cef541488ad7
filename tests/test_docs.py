"""README.md and docs/*.md: every link and repo path they name exists, README keeps the set-up
structure .ci/run reads, and README's quick start resumes bit-identically, run from its own code
blocks."""

import re
from pathlib import Path

import pytest
import torch

import deepopt

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README] + sorted((ROOT / "docs").glob("*.md"))

TEST_COMMAND = 'python -m pip install -e ".[test]" && python -m pytest -q tests'
MAIN_COMMAND = 'python -m pip install -e ".[examples]" && python examples/hope/train.py'
CPU_TORCH = "python -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"

# Files the docs name that a run writes (not in the repo).
GENERATED = {"ckpt.pt", "hope.pt", "transformer.pt", "train_log.json", "loss.png"}
# Path prefixes that are outputs, caches or scratch space.
OUTPUT_PREFIXES = ("out/", "/tmp/", "~/", "$")
FILE_SUFFIXES = {"py", "md", "json", "png", "txt", "sh", "cu", "cuh", "cpp", "h", "pt", "in", "cfg",
                 "toml", "yaml", "yml"}
TOP_DIRS = ("deepopt/", "tests/", "examples/", "benchmarks/", "csrc/", "docs/")
SKIP_DIRS = {".git", "__pycache__", ".hypothesis", ".pytest_cache", "build", "dist", "out", "runs",
             ".ci-venv"}


def _text(page):
    return page.read_text(encoding="utf-8")


def _without_fences(text):
    return re.sub(r"^```.*?^```[ \t]*$", "", text, flags=re.S | re.M)


def _section(text, heading):
    """The text from the line `heading` to the next heading of the same or a higher level."""
    lines = text.split("\n")
    start = [i for i, line in enumerate(lines) if line.strip() == heading]
    assert len(start) == 1, f"README needs exactly one {heading!r} heading"
    level = len(heading) - len(heading.lstrip("#"))
    out = []
    for line in lines[start[0] + 1:]:
        m = re.match(r"(#+) ", line)
        if m and len(m.group(1)) <= level:
            break
        out.append(line)
    return "\n".join(out)


def _fences(text):
    """(language, body) of every fenced code block."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```[ \t]*$", text, re.S | re.M)]


def _slug(heading):
    """GitHub's anchor for a heading."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def _anchors(page):
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.*)$", _without_fences(_text(page)), re.M)}


def _repo_basenames():
    names = set()
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT).parts
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel):
            continue
        names.add(path.name)
    return names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    missing = []
    for m in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+)\)", _without_fences(_text(page))):
        target = m.group(1)
        if re.match(r"[a-z]+:", target):            # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            missing.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            missing.append(f"{target} (no such heading)")
    assert not missing, f"{page.name}: broken links {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_backticked_repo_paths_exist(page):
    basenames = _repo_basenames()
    missing = []
    for span in re.findall(r"`([^`]+)`", _without_fences(_text(page))):
        for token in span.split():
            token = token.split("::")[0].strip("(),;:'\"")
            if not re.fullmatch(r"[\w.\-/]+", token) or token.startswith(OUTPUT_PREFIXES):
                continue
            suffix = token.rsplit(".", 1)[-1] if "." in token.rsplit("/", 1)[-1] else ""
            if "/" in token:
                if (suffix in FILE_SUFFIXES or token.startswith(TOP_DIRS)) and not (ROOT / token).exists():
                    missing.append(token)
            elif suffix in FILE_SUFFIXES and token not in GENERATED and token not in basenames:
                missing.append(token)
    assert not missing, f"{page.name}: names files that are not in the repo: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_references_to_a_design_document(page):
    text = _text(page)
    assert "DESIGN" not in text and "§" not in text, f"{page.name} cites DESIGN.md, which is not in the repo"


def test_setup_has_the_two_commands_ci_reads():
    text = _text(README)
    lines = text.split("\n")
    # .ci/run: sed -n '/<!-- test-command -->/,/^```$/p' README.md | grep -v -e '^```' -e '<!--'
    marks = [i for i, line in enumerate(lines) if "<!-- test-command -->" in line]
    assert len(marks) == 1
    assert lines[marks[0] + 1] == "```bash"
    end = next(i for i in range(marks[0] + 1, len(lines)) if lines[i] == "```")
    extracted = [l for l in lines[marks[0]:end + 1] if not l.startswith("```") and "<!--" not in l]
    assert extracted == [TEST_COMMAND]

    setup = _section(text, "## Set-up: two commands")
    blocks = _fences(setup)
    assert [lang for lang, _ in blocks] == ["bash", "bash"]
    assert [body.strip() for _, body in blocks] == [MAIN_COMMAND, TEST_COMMAND]
    assert "<!-- test-command -->\n```bash\n" + TEST_COMMAND in setup
    assert setup.index(CPU_TORCH) < setup.index("```"), "the CPU torch line comes before the commands"
    assert "4 min 42" not in text


def test_readme_tables_match_docs():
    """README's optimizer tables are copies of docs/optimizers.md's, and the recommended lrs are the
    defaults create_optimizer uses."""
    section = _section(_text(README), "## The optimizers and their recommended settings")
    docs = _text(ROOT / "docs" / "optimizers.md")
    rows = [line for line in section.split("\n") if line.startswith("|")]
    assert len(rows) >= 14
    assert [row for row in rows if row not in docs] == []
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 10))
    for row in rows:
        m = re.match(r'\| `"([\w-]+)"` \| [^|]+ \| ([\d.e-]+) \|', row)
        if m:
            opt = deepopt.create_optimizer(model, m.group(1))
            assert {g["lr"] for g in opt.param_groups} == {float(m.group(2))}, row


def _quick_start_blocks():
    blocks = [body for lang, body in _fences(_section(_text(README), "## Quick start: swap it into any training loop"))
              if lang == "python"]

    def one(pred, what):
        found = [b for b in blocks if pred(b)]
        assert len(found) == 1, f"README's quick start needs exactly one {what} block"
        return found[0]

    train = one(lambda b: "for x, y in loader:" in b, "training-loop")
    build, loop = train.split("for x, y in loader:")
    save = one(lambda b: "torch.save(" in b, "save")
    resume = one(lambda b: "torch.load(" in b, "resume")
    swaps = one(lambda b: b.count("opt = ") > 3 and "loader" not in b, "other-swaps")
    return build, "for x, y in loader:" + loop, save, resume, swaps


def _run(code, ns):
    exec(compile(code, "README.md (quick start)", "exec"), ns)
    return ns


def test_quick_start_resumes_bit_identically(tmp_path, monkeypatch):
    build, loop, save, resume, _ = _quick_start_blocks()
    for line in ('"model"', '"opt"', '"sched"'):
        assert line in save and line in resume
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 784, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(8)]

    torch.manual_seed(0)
    whole = _run(build + loop, {"loader": batches})
    torch.manual_seed(0)
    first = _run(build, {"loader": batches[:4]})
    init = [p.detach().clone() for p in first["model"].parameters()]
    _run(loop + save, first)
    assert (tmp_path / "ckpt.pt").exists()

    torch.manual_seed(1)                          # a fresh process: other init, other RNG state
    resumed = _run(build, {"loader": batches[4:]})
    _run(resume + loop, resumed)

    for p, q, p0 in zip(whole["model"].parameters(), resumed["model"].parameters(), init):
        assert torch.equal(p, q)
        assert not torch.equal(p, p0)
    assert whole["sched"].get_last_lr() == resumed["sched"].get_last_lr()
    assert whole["sched"].last_epoch == resumed["sched"].last_epoch == len(batches)
    s1, s2 = whole["opt"].state_dict()["state"], resumed["opt"].state_dict()["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        for key, v in s1[k].items():
            w = s2[k][key]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, (k, key)


def test_quick_start_other_swaps_build_and_step():
    build, _, _, _, swaps = _quick_start_blocks()
    ns = _run(build, {})
    x, y = torch.randn(4, 784), torch.randint(0, 10, (4,))
    for line in re.split(r"\n(?=opt = )", swaps.strip()):
        _run(line, ns)
        for _ in range(2):
            torch.nn.functional.cross_entropy(ns["model"](x), y).backward()
            ns["opt"].step()
            ns["opt"].zero_grad()


# ----------------------------------------------------------------------------- numbers from files
def _json(path):
    import json
    return json.loads((ROOT / path).read_text())


def _generated_tables():
    """(page, the table its result file gives now): each docs table of measured numbers is printed
    by the script that wrote the numbers, so a table edited by hand or a result file rerun
    without its page fails here."""
    from benchmarks import (char_gpt, deep_memory, distributed_deviation, matched_lr, ns_dtype_cpu, ns_step,
                            report, robustness, step_cost)
    from examples.hope import long_context
    from examples.hope.results import cms, gen_chunk, passkey_trained
    from examples.hope.results import sweep_and_ablate as hope
    return {
        "numerics: ns_dtype": ("docs/numerics.md", ns_dtype_cpu.table(
            _json("benchmarks/results/ns_dtype_cpu.json"), _json("benchmarks/results/ns_dtype_cpu_avx2.json"))),
        "distributed deviations": ("docs/distributed.md", distributed_deviation.table(
            _json("benchmarks/results/distributed_deviation.json"))),
        "deep memory ablation": ("docs/optimizers.md", deep_memory.table(_json("benchmarks/results/deep_memory.json"))),
        "deep memory ablation (README)": ("README.md", deep_memory.table(_json("benchmarks/results/deep_memory.json"),
                                                                         deep_memory.README_ROWS)),
        "benchmark summary": ("docs/benchmarks.md", report.summary_table(_json("benchmarks/results/results.json"))),
        "step cost": ("docs/benchmarks.md", step_cost.table(_json("benchmarks/results/step_cost.json"))),
        "iteration cost": ("docs/benchmarks.md", step_cost.iteration_table(_json("benchmarks/results/step_cost.json"))),
        "char gpt": ("docs/benchmarks.md", char_gpt.table(_json("benchmarks/results/char_gpt/char_gpt.json"))),
        "char gpt (README)": ("README.md", char_gpt.table(_json("benchmarks/results/char_gpt/char_gpt.json"),
                                                          char_gpt.OPTIMIZERS)),
        "robustness": ("docs/benchmarks.md", robustness.table(_json("benchmarks/results/robustness/robustness.json"))),
        "robustness (README)": ("README.md", robustness.table(_json("benchmarks/results/robustness/robustness.json"))),
        "matched-lr control": ("docs/benchmarks.md", matched_lr.table(_json("benchmarks/results/matched_lr.json"))),
        "matched-lr control (continual)": ("docs/benchmarks.md",
                                           matched_lr.continual_table(_json("benchmarks/results/matched_lr.json"))),
        "ns step": ("docs/benchmarks.md", ns_step.table(_json("benchmarks/results/ns_step.json"))),
        "ns ranks": ("docs/benchmarks.md", ns_step.ranks_table(_json("benchmarks/results/ns_step.json"))),
        "ns training": ("docs/benchmarks.md", ns_step.training_table(_json("benchmarks/results/ns_step.json"))),
        "hope ablations": ("docs/hope.md", hope.table(_json("examples/hope/results/ablations.json"))),
        "hope continual": ("docs/hope.md", hope.continual_table(_json("examples/hope/results/ablations.json"))),
        "hope long context": ("docs/hope.md", hope.long_context_table(_json("examples/hope/results/ablations.json"))),
        "hope 16x context": ("docs/hope.md", long_context.table(_json("examples/hope/results/long_context.json"))),
        "hope cms forgetting": ("docs/hope.md", cms.table(_json("examples/hope/results/cms.json"))),
        "hope generator chunk": ("docs/hope.md", gen_chunk.table(_json("examples/hope/results/gen_chunk.json"))),
        "hope passkey trained": ("docs/hope.md", passkey_trained.table([_json(f"examples/hope/results/{name}.json") for name in (
            "passkey_trained", "passkey_trained_seed2", "passkey_trained_no_spread", "passkey_trained_copy64",
            "passkey_trained_copy64_seed2", "passkey_trained_segments4", "passkey_trained_finetune_segments4",
            "passkey_trained_finetune_segments16", "passkey_trained_finetune_segments16_seed2")])),
    }


@pytest.mark.parametrize("name", ["numerics: ns_dtype", "distributed deviations", "deep memory ablation",
                                  "deep memory ablation (README)",
                                  "benchmark summary", "step cost", "iteration cost", "char gpt", "char gpt (README)",
                                  "robustness", "robustness (README)", "matched-lr control",
                                  "matched-lr control (continual)", "ns step", "ns ranks", "ns training",
                                  "hope ablations", "hope continual",
                                  "hope long context", "hope 16x context", "hope cms forgetting",
                                  "hope generator chunk", "hope passkey trained"])
def test_docs_tables_are_the_result_files(name):
    page, table = _generated_tables()[name]
    lines = [line.strip() for line in _text(ROOT / page).splitlines()]
    want = [line.strip() for line in table.strip().splitlines()]
    starts = [i for i, line in enumerate(lines) if line == want[0]]
    assert any(lines[i:i + len(want)] == want for i in starts), (
        f"{page} does not hold the table its result file gives now:\n{table}")


@pytest.mark.parametrize("page", ["README.md", "docs/benchmarks.md"])
def test_char_gpt_verdict_is_the_result_file(page):
    """The plain sentence on deep-ns against torch Muon, as benchmarks/char_gpt.py wrote it."""
    verdict = _json("benchmarks/results/char_gpt/char_gpt.json")["verdict"]
    assert verdict in " ".join(_text(ROOT / page).split()), verdict


@pytest.mark.parametrize("page", ["README.md", "docs/hope.md"])
def test_hope_long_context_and_cms_sentences_are_the_result_files(page):
    """README's HOPE line and docs/hope.md: the sentences long_context.py and cms.py wrote."""
    text = " ".join(_text(ROOT / page).split())
    for sentence in (_json("examples/hope/results/long_context.json")["summary"],
                     _json("examples/hope/results/cms.json")["verdict"]):
        assert sentence in text, sentence


@pytest.mark.parametrize("page", ["README.md", "docs/benchmarks.md"])
def test_ns_step_summary_is_the_result_file(page):
    from benchmarks import ns_step
    sentence = ns_step.summary(_json("benchmarks/results/ns_step.json"))
    assert sentence in " ".join(_text(ROOT / page).split()), sentence



def test_readme_gram_form_training_numbers_are_the_result_file():
    training = _json("benchmarks/results/ns_step.json")["training"]
    text = " ".join(_text(ROOT / "README.md").split())
    for rule in ("deep-ns", "m3"):
        row = training[rule]
        assert f"{row['paired_diff']:+.4f} ± {row['paired_ci']:.4f}" in text, rule
