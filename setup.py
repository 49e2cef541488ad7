"""deepopt-torch: Nested Learning's deep optimizers for PyTorch (import name: ``deepopt``).

PyPI's ``deepopt`` is an unrelated Bayesian-optimization package, hence the distribution name.
This file never imports torch and compiles nothing.
"""

import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

here = Path(__file__).parent
CSRC_SUFFIXES = (".cu", ".cuh", ".cpp", ".h")


class build_py_with_csrc(build_py):
    """Copy the CUDA sources of the top-level csrc/ into the wheel as deepopt/csrc/, where
    deepopt/_cuda_ext.py compiles them on first use (nothing is compiled here)."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "deepopt" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for source in sorted((here / "csrc").iterdir()):
            if source.suffix in CSRC_SUFFIXES:
                shutil.copy2(source, target / source.name)
readme = (here / "README.md").read_text(encoding="utf-8") if (here / "README.md").exists() else ""

setup(
    name="deepopt-torch",
    version="0.1.0",
    description="Deep optimizers from Nested Learning (momentum as associative memory, delta-rule "
                "momentum, Deep Momentum, M3, multi-frequency updates) as drop-in torch.optim optimizers",
    long_description=readme,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["deepopt", "deepopt.*"]),
    cmdclass={"build_py": build_py_with_csrc},
    # the lowest torch the whole suite has run on (deepopt uses torch.optim's private helpers
    # _to_scalar, _default_to_fused_or_foreach and _group_tensors_by_device_and_dtype)
    install_requires=["torch>=2.13", "numpy"],
    extras_require={
        # test tools pinned to the versions the suite passed with: hypothesis draws different
        # examples on another release even with derandomize=True, and a new release must not turn
        # main red on a fresh machine. triton 3.6.0 is the lowest the kernels support.
        "test": ["pytest==9.2.0", "hypothesis==6.170.17", "tqdm>=4.66", "matplotlib>=3.8", "mnist1d==0.0.2.post1",
                 "triton==3.6.0; platform_system == 'Linux' and platform_machine == 'x86_64'"],
        "triton": ["triton>=3.6"],
        "examples": ["tqdm", "matplotlib", "mnist1d"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Intended Audience :: Science/Research",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
