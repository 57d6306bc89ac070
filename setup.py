"""phds_jax: MoE-PHDS (one MoE checkpoint for flexible runtime sparsity) in JAX/Flax."""

from setuptools import find_packages, setup

# Minimum versions are the ones verified to install and pass the test suite here (Python 3.11).
INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "jaxlib>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "grain>=0.2.18",
    "tensorflow-datasets>=4.9.10",
    "chex>=0.1.92",
    "absl-py>=2.1",
    "ml-collections>=1.0",
    "safetensors>=0.5",
    "tokenizers>=0.21",
    "tqdm>=4.66",
    "matplotlib>=3.9",
    "numpy>=2.0",
    "jinja2>=3.1.6",  # chat templates, rendered as transformers renders them
    "pyarrow>=15",  # parquet sources
    "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
    "importlib_resources>=6",  # tensorflow-datasets needs it to prepare datasets but does not declare it
    "fastapi>=0.165",  # python -m phds_jax.serve: the OpenAI-compatible HTTP server
    "uvicorn>=0.54",
    "pydantic>=2.14",  # the server's request models
]

EXTRAS_REQUIRE = {
    # transformers + CPU torch are only the independent reference of the tests; the library never imports them.
    # torch is pinned: pip takes the CPU wheel; a looser range pulls a multi-GB CUDA build.
    "test": ["pytest>=8", "torch==2.13.0", "transformers>=5.0,<6",
             "openai>=3.57", "httpx>=0.28",  # the server's tests and benchmarks/serve_load are its clients
             "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29"],  # tests/test_notebooks.py runs colab/
    "gpu": ["jax[cuda12]>=0.10.2"],
    "tpu": ["jax[tpu]>=0.10.2"],
}

setup(
    name="phds_jax",
    version="0.1.0",
    description="MoE-PHDS in JAX/Flax: one Mixture-of-Experts checkpoint served at any top-k.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["phds_jax", "phds_jax.*", "configs"]),
    package_data={"phds_jax": ["assets/**/*"]},
    include_package_data=True,
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    license="Apache-2.0",
)
