"""Datasets: TFDS builders (array_record, no TensorFlow) over the tasks and CollabLLM records,
and grain loaders sharded by JAX process. `python -m collab_rl.data prepare --help` builds them.

Modules: `collabllm` (record validation), `builders` (TFDS builders, atomic `prepare`), `loader`
(grain pipelines, records back to `Intent`s).
"""
