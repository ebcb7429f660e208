"""saetron: fast, verified sparse-autoencoder training on language-model activations.

The top-level folders are mapped onto the `saetron.*` import names with `package_dir`
(`saetron` itself is a namespace package). Top-level `kernels`/`collect`/`bench` packages are
never installed: they would collide with PyPI distributions such as Hugging Face's `kernels`.
"""

from setuptools import setup

PACKAGE_DIRS = {
    "saetron.kernels": "kernels",
    "saetron.sae": "sae",
    "saetron.sae.architectures": "sae/architectures",
    "saetron.collect": "collect",
    "saetron.eval": "eval",
}

setup(
    name="saetron",
    version="0.1.0",
    description="Fused Triton kernels and an FSDP trainer for sparse autoencoders on LM activations",
    python_requires=">=3.10",
    packages=list(PACKAGE_DIRS),
    package_dir=PACKAGE_DIRS,
    install_requires=[
        # No upper pin and no CUDA index: the set-up script installs torch==2.13.0 only where no
        # torch is importable, so a user's CUDA build is kept.
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "safetensors>=0.4",
        "transformers>=4.46",
        "datasets>=2.19",
        "tqdm",
        "zstandard",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-benchmark>=4", "ruff>=0.6"],
        "pilot": ["gguf>=0.10", "accelerate>=0.30"],
        "peers": ["sae-lens>=6", "eai-sparsify>=1.1"],
        "eval": ["matplotlib>=3.7"],
    },
    entry_points={
        "console_scripts": [
            "saetron-collect=saetron.collect.__main__:cli",
            "saetron-train=saetron.sae.train:cli",
            "saetron-eval=saetron.eval.__main__:cli",
        ],
    },
)
