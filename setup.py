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


# Each floor is the oldest release the floor lane of .ci/run installs and passes the whole suite with
# (.ci/floors pins every `>=` below to its version).
TRANSFORMERS = ["transformers>=5.0.0"]  # halo_ops.integrations.transformers (4.x fails under TRL's default
# gradient checkpointing with bf16 on CPU, for TRL's own trainers too)
TRL = ["trl>=1.16.0", *TRANSFORMERS]  # halo_ops.integrations.trl: TRL 1.16's trainers and fused head
TEST = [
    "pytest>=8.0.0",
    "hypothesis>=6.100.0",
    "pytest-benchmark>=4.0.0",
    *TRL,
    "liger-kernel>=0.8.1",  # the oracle of the Liger drop-ins, which keep 0.8's signatures
    "datasets>=4.7.0",  # trl 1.16's floor
    "peft>=0.13.0",
    "accelerate>=1.10.1",  # trl 1.16's floor
    "numpy>=2.0.0",  # pyarrow (under datasets) refuses numpy 1
    "matplotlib>=3.9.0",  # the demo's plot (3.8 is built against numpy 1)
    "deepspeed>=0.16.4; platform_system == 'Linux'",  # the ZeRO-3 test (older releases need a GPU to import)
]
BENCH = ["pytest-benchmark>=4.0.0", *TRL, "liger-kernel>=0.8.1", "cut-cross-entropy>=25.1.1", "matplotlib>=3.9.0"]

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
        "torch>=2.7.1",
        # Triton wheels exist for Linux x86_64/aarch64; elsewhere the chunked PyTorch path runs. 3.3.1 is
        # torch 2.7.1's own; the interpreter of older releases mis-runs the kernels.
        "triton>=3.3.1; platform_system == 'Linux'",
    ],
    extras_require={"test": TEST, "bench": BENCH, "transformers": TRANSFORMERS, "trl": TRL},
    license="Apache-2.0",
)
