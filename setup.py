"""deepopt-torch: Nested Learning's deep optimizers for PyTorch (import name: ``deepopt``).

PyPI's ``deepopt`` is an unrelated Bayesian-optimization package, hence the distribution name.
This file never imports torch and compiles nothing.
"""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
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
    package_data={"deepopt": ["csrc/*.cu", "csrc/*.cpp", "csrc/*.h"]},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6", "tqdm", "matplotlib", "mnist1d",
                 "triton>=3.6; platform_system == 'Linux' and platform_machine == 'x86_64'"],
        "triton": ["triton>=3.6"],
        "examples": ["tqdm", "matplotlib", "mnist1d"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Intended Audience :: Science/Research",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
