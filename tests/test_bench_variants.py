"""How bench/variants.py reads --variants (`tiny_llama.parse_variant`) and
bench/compile_options.py its --options (`common.parse_xla_options`); the benchmarks themselves
are experiments, not tests."""

import pytest

from experiments.bench import common
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


def test_compile_options_are_read_as_typed_xla_fields():
  assert common.parse_xla_options("default") == {}
  assert common.parse_xla_options("xla_cpu_use_fusion_emitters=false") == {
      "xla_cpu_use_fusion_emitters": False}
  assert common.parse_xla_options(
      "xla_backend_optimization_level=1;xla_llvm_disable_expensive_passes=True") == {
          "xla_backend_optimization_level": 1, "xla_llvm_disable_expensive_passes": True}


@pytest.mark.parametrize("bad", ["fusion_emitters=false", "xla_cpu_use_fusion_emitters",
                                 "xla_backend_optimization_level=", "default;xla_a=1"])
def test_a_bad_compile_option_is_named(bad):
  with pytest.raises(ValueError, match=f"--options: {bad!r}"):
    common.parse_xla_options(bad)
