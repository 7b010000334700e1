from setuptools import setup

# kernels/ holds only @triton.jit code and is installed as the subpackage
# nfd_fast.kernels; benchmarks/ is installed as nfd_fast.benchmarks so that
# `nfd-fast bench` finds its runner from any working directory.
setup(
    name="nfd_fast",
    version="0.1.0",
    description="Fused Triton kernels for neural fields and diffusion models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=[
        "nfd_fast",
        "nfd_fast.ops",
        "nfd_fast.nn",
        "nfd_fast.diffusion",
        "nfd_fast.models",
        "nfd_fast.kernel_report",
        "nfd_fast.kernels",
        "nfd_fast.benchmarks",
    ],
    package_dir={"nfd_fast.kernels": "kernels", "nfd_fast.benchmarks": "benchmarks"},
    package_data={"nfd_fast": ["py.typed"], "nfd_fast.benchmarks": ["results/*.json"]},
    # torch is not pinned: a GPU user keeps the CUDA build they already have.
    # tqdm: progress bars; pillow: PNG previews and images for `nfd-fast fit`; matplotlib:
    # the demos' figures and the benchmark chart; scipy: the approach models' scattered-data
    # interpolation baselines
    install_requires=["torch>=2.1", "numpy", "tqdm", "pillow", "matplotlib", "scipy"],
    extras_require={
        "triton": ["triton>=3.2"],
        # einops: the tests write public SIREN code the way it is written (with einops) to
        # check accelerate on it; hypothesis: property-based tests of the ops
        "test": ["pytest>=7", "pytest-benchmark>=4", "triton>=3.2", "ninja", "einops",
                 "hypothesis"],
    },
    entry_points={"console_scripts": ["nfd-fast=nfd_fast.cli:main"]},
)
