"""Installs lut_jax: LUT pre-training for vision transformers in JAX/Flax."""

import pathlib

import setuptools

ROOT = pathlib.Path(__file__).parent

# The core: models, losses, masking, the sharded step, checkpoints, and pre-training on the
# on-device input path (input.backend="device") with TensorBoard files: no TensorFlow.
INSTALL_REQUIRES = [
    # Floors are the first releases with what the code uses: jax.sharding.AxisType (0.6),
    # optax.tree (0.2.5), Orbax preservation policies for keep-latest-and-best (0.12).
    "jax>=0.6",
    "flax>=0.10",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.12",
    "ml_collections>=1.0",
    "clu>=0.0.12",  # its metrics only; its writers need TensorFlow ([data])
    "numpy>=1.26",
    "absl-py>=1.0",  # flags and logging of every command line
    # local and gs:// paths alike; 1.13: Path.is_file() is False for a missing file (before,
    # "not a directory"), which the pre-trained weights locator relies on.
    "etils[epath]>=1.13",
    "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
    "safetensors>=0.4",  # the torch-free timm / Hugging Face export (lut-export)
    "pillow>=10",  # PNG images in the TensorBoard files
]

EXTRAS_REQUIRE = {
    # tf.data input pipelines (any tfds data set, image folders), evaluation and CLU's
    # TensorBoard writers. tensorflow-cpu has wheels for Linux x86-64 only; elsewhere
    # (macOS arm64, Linux aarch64) the tensorflow package is the CPU build.
    "data": [
        "tensorflow-cpu>=2.16; sys_platform == 'linux' and platform_machine == 'x86_64'",
        "tensorflow>=2.16; sys_platform != 'linux' or platform_machine != 'x86_64'",
        "tensorboard>=2.16",
        "tensorflow-datasets>=4.9",
        # tfds' dataset builders (download_and_prepare) need it on Python 3.11 via etils.
        "importlib_resources>=6",
        "pillow>=10",
        # The photos behind the small segmentation task (configs/segmentation.py's default).
        "scikit-image>=0.22",
    ],
    "analysis": ["matplotlib>=3.8", "pillow>=10"],  # lut-analyze's figures
    # Reading PyTorch checkpoints (.pth) and the timm comparisons.
    "torch": ["torch>=2.1", "timm>=1.0"],
}
EXTRAS_REQUIRE["test"] = [
    *EXTRAS_REQUIRE["data"], *EXTRAS_REQUIRE["analysis"],
    "pytest>=8",
    "pytest-xdist>=3.5",
    "chex>=0.1.87",
    # PyTorch references for parity tests only; never imported by the core.
    # torchvision from PyPI loads only beside this torch build on these machines.
    "torch==2.14.1",
    "torchvision==0.29.1",
    "timm>=1.0",  # brings huggingface_hub and fsspec (hf-hub: and in-memory path tests)
    # The architecture contract (.importlinter, tests/test_architecture.py): layers and
    # acyclic_siblings contracts; checked with 2.17.
    "import-linter>=2.17",
]

setuptools.setup(
    name="lut_jax",
    version="0.1.0",
    description="LUT (Learning with Unmasked Tokens, ECCV 2024) pre-training in JAX/Flax",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    license="Apache-2.0",
    classifiers=["License :: OSI Approved :: Apache Software License",
                 "Programming Language :: Python :: 3",
                 "Topic :: Scientific/Engineering :: Artificial Intelligence"],
    # configs/ stays at the top of the repository and is installed as lut_jax.configs, so
    # that `--config=fashion_mnist` works without the source tree (config_lib).
    packages=[*setuptools.find_packages(include=["lut_jax", "lut_jax.*"]), "lut_jax.configs"],
    package_dir={"lut_jax.configs": "configs"},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["lut-pretrain=lut_jax.cli.pretrain:run",
                                      "lut-eval=lut_jax.cli.evaluate:run",
                                      "lut-analyze=lut_jax.cli.analyze:run",
                                      "lut-export=lut_jax.weights.export:run"]},
)
