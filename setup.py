"""Installs lut_jax: LUT pre-training for vision transformers in JAX/Flax."""

import pathlib

import setuptools

ROOT = pathlib.Path(__file__).parent

INSTALL_REQUIRES = [
    # Floors are the first releases with what the code uses: jax.sharding.AxisType (0.6),
    # optax.tree (0.2.5), Orbax preservation policies for keep-latest-and-best (0.12).
    "jax>=0.6",
    "flax>=0.10",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.12",
    "ml_collections>=1.0",
    "clu>=0.0.12",
    "numpy>=1.26",
    "absl-py>=1.0",  # flags and logging of every command line
    "etils[epath]>=1.5",  # local and gs:// paths alike
    # clu's metric writers and tfds.load import TensorFlow at import time but neither
    # declares it; the core (models, losses, step, checkpoints) never imports it.
    "tensorflow-cpu>=2.16",
    "tensorboard>=2.16",
    "tensorflow-datasets>=4.9",
    # tfds' dataset builders (download_and_prepare) need it on Python 3.11 via etils.epath.
    "importlib_resources>=6",
    "pillow>=10",
    "matplotlib>=3.8",
]

TEST_REQUIRES = [
    "pytest>=8",
    "pytest-xdist>=3.5",
    "chex>=0.1.87",
    "scikit-image>=0.22",
    # PyTorch references for parity tests only; never imported by the package.
    # torchvision from PyPI loads only beside this torch build on these machines.
    "torch==2.14.1",
    "torchvision==0.29.1",
    "timm>=1.0",
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
    packages=setuptools.find_packages(include=["lut_jax", "lut_jax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES},
    entry_points={"console_scripts": ["lut-pretrain=lut_jax.main:run",
                                      "lut-eval=lut_jax.eval_main:run",
                                      "lut-analyze=lut_jax.analyze:run",
                                      "lut-export=lut_jax.evaluation.export:run"]},
)
