"""bench/variants.py's reading of --variants (the benchmark itself is an experiment, not a test)."""

import pytest

from experiments.bench import variants


def test_variants_are_read_as_typed_fields():
  assert variants.parse("default") == {}
  assert variants.parse("attention_recompute=False") == {"attention_recompute": False}
  assert variants.parse("causal_query_chunk=128") == {"causal_query_chunk": 128}
  assert variants.parse("rms_norm_eps=1e-5") == {"rms_norm_eps": 1e-5}
  assert variants.parse("dtype=bfloat16") == {"dtype": "bfloat16"}


@pytest.mark.parametrize("bad", ["attention_recompute", "=1", "attention_recomputed=True"])
def test_a_bad_variant_is_named(bad):
  with pytest.raises(ValueError, match=f"--variants: {bad!r}"):
    variants.parse(bad)
