"""How bench/variants.py reads --variants (`tiny_llama.parse_variant`; the benchmark itself is
an experiment, not a test)."""

import pytest

from experiments.bench import tiny_llama


def test_variants_are_read_as_typed_fields():
  assert tiny_llama.parse_variant("default") == {}
  assert tiny_llama.parse_variant("attention_recompute=False") == {"attention_recompute": False}
  assert tiny_llama.parse_variant("causal_query_chunk=128") == {"causal_query_chunk": 128}
  assert tiny_llama.parse_variant("rms_norm_eps=1e-5") == {"rms_norm_eps": 1e-5}
  assert tiny_llama.parse_variant("dtype=bfloat16") == {"dtype": "bfloat16"}


@pytest.mark.parametrize("bad", ["attention_recompute", "=1", "attention_recomputed=True"])
def test_a_bad_variant_is_named(bad):
  with pytest.raises(ValueError, match=f"--variants: {bad!r}"):
    tiny_llama.parse_variant(bad)
