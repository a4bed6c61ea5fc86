"""halo-ops: fused linear log-prob and KTO loss kernels (one import package, ``halo_ops``)."""

from setuptools import find_packages, setup

# One import package. The top-level folders kernels/ and integrations/ ship inside it, because `kernels`
# (the Hugging Face kernel hub) and `integrations` are too generic to be top-level modules.
PACKAGE_FOLDERS = {"halo_ops": "halo_ops", "halo_ops.kernels": "kernels", "halo_ops.integrations": "integrations"}


def shipped_packages() -> list[str]:
    """Every package under each mapped folder, found on disk, so that no subpackage can be left out."""
    packages = []
    for package, folder in PACKAGE_FOLDERS.items():
        packages += [package] + [f"{package}.{sub}" for sub in find_packages(folder)]
    return sorted(set(packages))


TEST = [
    "pytest>=8",
    "hypothesis>=6.100",
    "pytest-benchmark>=4",
    "transformers>=4.56.2",
    "trl>=1.16",
    "liger-kernel>=0.5",
    "datasets>=3",
    "peft>=0.13",
    "accelerate>=1.0",
    "numpy>=1.26",
    "matplotlib>=3.8",  # the demo's plot
    "deepspeed>=0.15; platform_system == 'Linux'",  # the ZeRO-3 test
]
BENCH = ["pytest-benchmark>=4", "trl>=1.16", "liger-kernel>=0.5", "cut-cross-entropy>=25.1", "matplotlib>=3.8"]

setup(
    name="halo-ops",
    version="0.1.0",
    description="Triton kernels for KTO and other human-aware losses that never build the [tokens, vocab] logits",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=shipped_packages(),
    package_dir=PACKAGE_FOLDERS,
    package_data={"halo_ops.kernels": ["tuned_configs.json"]},  # block configs timed by bench/autotune.py
    install_requires=[
        "torch>=2.4",
        # Triton wheels exist for Linux x86_64/aarch64; elsewhere the chunked PyTorch path runs.
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={"test": TEST, "bench": BENCH},
    license="Apache-2.0",
)
