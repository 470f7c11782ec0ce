from setuptools import find_packages, setup

setup(
    name="tropd-megatron",
    version="0.1.0",
    description="Trust Region On-Policy Distillation (TrOPD) of LLMs at Megatron scale",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # the launchers and recipes install beside the library: `python -m launch.plan` and
    # `from recipes import get_recipe` work from any directory
    packages=find_packages(include=["tropd_megatron", "tropd_megatron.*", "launch", "recipes"]),
    # torch is not pinned here: on CPU machines `make` installs the local CPU wheel first;
    # on GPU clusters the container's CUDA torch is used as is.
    # math-verify grades evaluation answers (evaluation/answers.py)
    install_requires=["torch>=2.4", "sentencepiece", "math-verify[antlr4_13_2]"],
    extras_require={
        "megatron": ["megatron-core>=0.16.1,<0.20", "psutil", "tqdm", "omegaconf", "einops",
                     "safetensors", "transformers>=4.51"],  # Hugging Face checkpoints and tokenizers
        "nemo": ["nemo-run", "leptonai<0.47"],
        "demo": ["tensorboard", "matplotlib"],
        "data": ["pyarrow", "datasets"],  # Parquet and datasets-folder prompt files
        "wandb": ["wandb"],  # logging.wandb
        "modelopt": ["nvidia-modelopt"],  # tropd_megatron.losses.modelopt (ModelOpt distillation criteria)
        "dev": ["pytest>=8", "pytest-timeout", "ruff"],  # ruff: make lint (ruff.toml)
    },
)
