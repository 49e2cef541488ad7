"""examples/quickstart.py: an interrupted run resumed from its checkpoint equals an uninterrupted one."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import quickstart  # noqa: E402


@pytest.mark.parametrize("optimizer", ["deep", "delta", "associative", "m3", "multifreq"])
def test_quickstart_resume_equals_uninterrupted(tmp_path, optimizer):
    whole = quickstart.main(["--optimizer", optimizer, "--steps", "30"])
    ckpt = str(tmp_path / "q.pt")
    quickstart.main(["--optimizer", optimizer, "--steps", "30", "--ckpt", ckpt, "--stop-after", "13"])
    resumed = quickstart.main(["--optimizer", optimizer, "--steps", "30", "--ckpt", ckpt])
    for p, q in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
