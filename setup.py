from setuptools import find_packages, setup

setup(
    name="megatron-llamapro",
    version="0.1.0",
    description="LLaMA Pro block expansion on megatron-core: conversion, expansion, frozen-block training",
    packages=find_packages(include=["megatron_llamapro", "megatron_llamapro.*"]),
    python_requires=">=3.11",
    install_requires=[
        "megatron-core==0.16.1",
        # 2.13.0 is the CPU wheel on developer/CI machines; the GPU machine keeps its preinstalled CUDA torch.
        "torch>=2.11",
        "psutil",
        "sentencepiece",
        "safetensors",
        "transformers",
        "tokenizers",
        "numpy",
        "tqdm",
        "tensorboard",
        "pyyaml",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]>=2.11,<2.12"],
        "mpi": ["mpi4py"],
        "plot": ["matplotlib"],
        "test": ["pytest", "pytest-timeout"],
    },
)
