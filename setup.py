"""collab_rl: multiturn-aware reward training for collaborative language models, in JAX."""

import setuptools

# Ranges are pinned to the minor versions the code is tested with: JAX, Flax, Orbax and grain
# change their APIs between minor releases.
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "jaxlib>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "ml-collections>=1.1,<2",
    "absl-py>=2.3,<3",
    "tensorflow-datasets>=4.9.10,<4.10",
    "array-record>=0.8,<0.9",
    "grain>=0.2.18,<0.3",
    "tokenizers>=0.22,<0.24",
    "safetensors>=0.6,<0.9",
    "tensorboardX>=2.6,<2.7",
    "tqdm>=4.66,<5",
    "matplotlib>=3.9,<3.12",
    "numpy>=2.0,<2.5",
    "jinja2>=3.1,<4",
    # BLEU of the language tier's document records (tasks/verifiers.py).
    "sacrebleu>=2.5,<2.7",
]

EXTRAS_REQUIRE = {
    "test": [
        "pytest>=8,<10",
        # The README's test command runs the suite in 2 worker processes (`-n 2`): one process
        # keeps only about one of CI's 2 cores busy (tracing and most of XLA's compile are serial).
        "pytest-xdist>=3.6,<4",
        # Parity tests build tiny checkpoints with transformers; the CPU build of torch is enough.
        "torch==2.13.0",
        "transformers>=5,<6",
    ],
    # On a TPU VM: the TPU runtime. Off it: XLA's TPU compiler for the compiled memory check
    # (python -m experiments.memory_plan --collabllm --compile), no TPU needed. Not in [test]:
    # with libtpu installed JAX probes for TPUs at start-up.
    "tpu": ["jax[tpu]>=0.10.2,<0.11"],
}

setuptools.setup(
    name="collab_rl",
    version="0.1.0",
    description="Multiturn-aware reward RL for collaborative LMs, in JAX/Flax.",
    packages=setuptools.find_packages(include=["collab_rl", "collab_rl.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
