"""dsv3_jax: a JAX/Flax reimplementation of DeepSeek-V3."""
from setuptools import find_packages, setup

# Ranges that work with jax 0.10.x (Python 3.11, CPU) and jax 0.11.x (Python 3.12, CUDA 13).
INSTALL_REQUIRES = [
    "jax[cpu]>=0.10,<0.12",
    "flax>=0.12,<0.14",
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.11,<0.14",
    "ml-collections>=1.0,<2",
    "einops>=0.8,<0.9",
    "clu>=0.0.12",
    "numpy>=1.26",
    "tensorflow-datasets>=4.9.8,<5",
    "array_record>=0.7",        # the TFDS corpus's file format (read without TensorFlow)
    "tokenizers>=0.21,<1",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
]

TEST_REQUIRES = [
    "pytest>=8",
    "pytest-xdist>=3.5",
    "safetensors>=0.5",         # the tests cross-check our safetensors reader/writer with it
    # The CPU torch that lies on disk (no download); the parity oracle runs on it.
    "torch==2.13.0",
    "transformers>=5.0,<6",
    # tests/test_notebooks.py executes the ablation notebooks (notebooks/*.ipynb)
    "nbclient>=0.10",
    "nbformat>=5.10",
    "ipykernel>=6.29",
]

setup(
    name="dsv3_jax",
    version="0.1.0",
    description="DeepSeek-V3 in JAX/Flax: MLA, DeepSeekMoE, aux-loss-free balancing, MTP, FP8",
    packages=find_packages(include=["dsv3_jax", "dsv3_jax.*", "kernels_pallas", "kernels_pallas.*",
                                    "experiments", "experiments.*"]),
    package_data={"dsv3_jax": ["assets/*"]},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES},
)
