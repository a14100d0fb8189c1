"""sparse-ops: structurally sparse lottery tickets, structured, converted and made fast."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="sparse-ops",
    version="0.1.0",
    description=(
        "Structure lottery tickets (refill, regroup, elastic), convert them to Triton-backed "
        "inference modules, and measure the speedup"
    ),
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    # The repository's kernels/ and bench/ folders install as sparse_ops_kernels and
    # sparse_ops_bench: bare `kernels` and `bench` are other distributions' import names
    # (Hugging Face's `kernels`, which transformers uses), and installing both would
    # shadow one of them. tests/test_packaging.py checks it. bench/scripts/ (the runnable
    # one-offs, `python -m sparse_ops_bench.scripts.NAME`) installs as
    # sparse_ops_bench.scripts; its gpu_run.sh and bench/results/ stay in the checkout
    # (the script runs the checkout's tests/).
    packages=[
        *find_packages(include=["sparse_ops", "sparse_ops.*"]),
        *[
            f"sparse_ops_kernels{p[len('kernels') :]}"
            for p in find_packages(include=["kernels", "kernels.*"])
        ],
        *[
            f"sparse_ops_bench{p[len('bench') :]}"
            for p in find_packages(include=["bench", "bench.*"])
        ],
    ],
    package_dir={"sparse_ops_kernels": "kernels", "sparse_ops_bench": "bench"},
    # Each kernel's autotune config table (config sets, quick lists, spill tables).
    package_data={"sparse_ops_kernels": ["*.json"]},
    install_requires=[
        # CPU machines: install the CPU wheel first (pip install torch==2.13.0); a bare
        # "torch" may otherwise resolve to a multi-GB CUDA build.
        "torch>=2.4",
        "numpy>=1.24",
        "safetensors>=0.4",
        "triton>=3.0; platform_system == 'Linux'",
        "mtkahypar>=1.4",  # regroup's partitioner
        "scikit-learn>=1.2",  # the embedded digits dataset (no download)
        "matplotlib>=3.5",  # the plots of `sparse-ops bench` and `sparse-ops demo`
        "Pillow>=9.1",  # decoding --data imagefolder (JPEG/PNG); matplotlib needs it too
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6"],
        "dev": ["ruff>=0.6"],
    },
    entry_points={
        "console_scripts": ["sparse-ops=sparse_ops.cli:main"],
        # Subcommands that live in bench/ (sparse_ops never imports bench).
        "sparse_ops.commands": [
            "bench = sparse_ops_bench.cli:register_bench",
            "demo = sparse_ops_bench.cli:register_demo",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
