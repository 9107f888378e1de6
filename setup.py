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
    python_requires=">=3.11",
    packages=find_packages(include=["genlip_megatron", "genlip_megatron.*"]),
    include_package_data=True,
    package_data={"genlip_megatron": ["convert/hf/*.py"]},
    install_requires=[
        # torch: install the build for your machine first (CPU wheel, or the CUDA build of NGC).
        "torch>=2.6",
        "megatron-core>=0.16.1",
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
    entry_points={
        "console_scripts": [
            "genlip-pretrain=genlip_megatron.training.run:main",
        ],
    },
)
