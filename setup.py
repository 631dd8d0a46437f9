"""mtrain: DeepSeek-V3-style MoE training with TP/EP/DP/PP and DualPipe."""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

# The Hydra tree lives in configs/ and the Triton kernels in kernels/ at the top
# of the repository; both install as sub-packages of mtrain so that no generic
# top-level name ("kernels", "configs") is claimed.

setup(
    name="mtrain",
    version="0.1.0",
    description="Train DeepSeek-V3-style Mixture-of-Experts models with TP/EP/DP/PP and DualPipe",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mtrain", "mtrain.*"]) + ["mtrain.kernels", "mtrain.configs"],
    package_dir={"mtrain.kernels": "kernels", "mtrain.configs": "configs"},
    package_data={"mtrain.configs": ["*.yaml", "*/*.yaml", "*/*/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "numpy",
        "matplotlib",
        "tqdm",
        "safetensors",
        "tokenizers>=0.15",
        "wandb>=0.17",
    ],
    extras_require={
        # triton runs the kernels' tests on CPU under TRITON_INTERPRET=1.
        # transformers is the reference for DeepSeek-V3's semantics and the HF checkpoint format.
        "dev": ["pytest>=7", "pytest-timeout", "triton>=3.0", "hydra-submitit-launcher>=1.2", "tensorboard",
                "transformers>=4.57"],
        "gpu": ["transformer-engine[pytorch]", "triton>=3.0"],
        "tensorboard": ["tensorboard"],
        "slurm": ["hydra-submitit-launcher>=1.2"],
    },
    entry_points={
        "console_scripts": [
            "mtrain-train=mtrain.cli.train:main",
            "mtrain-plan=mtrain.cli.plan:main",
            "mtrain-sbatch=mtrain.launch.sbatch:main",
            "mtrain-schedule=mtrain.cli.schedule:main",
            "mtrain-convert=mtrain.cli.convert:main",
            "mtrain-eval=mtrain.cli.eval:main",
        ],
    },
)
