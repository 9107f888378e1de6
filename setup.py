"""genlip_megatron: GenLIP ("Let ViT Speak") pretraining on megatron-core."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

setup(
    name="genlip_megatron",
    version="0.1.0",
    description="Megatron-core training stack for GenLIP vision encoders",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    # Supported = the range the two CI lanes bracket (docs/versions.md):
    # main lane Python 3.11 / torch 2.13 / megatron-core 0.16.1, newest-stack lane (.ci/
    # newest_stack.sh) Python 3.13 / torch 2.10 / megatron-core 0.19.2, tested 2026-11-29.
    python_requires=">=3.11",
    packages=find_packages(include=["genlip_megatron", "genlip_megatron.*"]),
    include_package_data=True,
    package_data={"genlip_megatron": ["convert/hf/*.py"]},
    install_requires=[
        # torch: install the build for your machine first (CPU wheel, or the CUDA build of NGC).
        # >= 2.7: torch.distributed.checkpoint's no_dist, which megatron-core 0.19 and
        # convert/megatron_io.py use (compat/versions.py; 2.6 lacks it).
        "torch>=2.7",
        # < 0.20: compat/ patches megatron internals by name; each group's scope was checked
        # against the 0.16.1 and 0.19.2 sources (compat.SCOPES). Widen after checking 0.20.
        "megatron-core>=0.16.1,<0.20",
        "packaging",  # compat/versions.py (megatron-core depends on it too)
        "numpy",
        "PyYAML",
        "psutil",  # megatron dist_checkpointing torch_dist saves need it (undeclared upstream)
        "safetensors",
        "tokenizers",
        "webdataset",
        "pillow",
        "tqdm",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]>=2.6", "nvidia-dali-cuda120>=2.0"],
        "dali": ["nvidia-dali-cuda120>=2.0"],
        "logging": ["tensorboard", "wandb"],
        "hf": ["transformers>=4.53"],
        "test": ["pytest>=8", "transformers>=4.53", "tensorboard"],
    },
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
    ],
    entry_points={
        "console_scripts": [
            "genlip-pretrain=genlip_megatron.run:main",
        ],
    },
)
