"""The shared parser of `--config path.py:arg` variant strings."""

import pytest

from experiments import variants


def test_flags_options_and_defaults():
  v = variants.parse("runlocal,task=doc_edit", "cfg",
                     options={"task": ("ambig_math", ("ambig_math", "doc_edit")),
                              "window": ("2", None)})
  assert v == {"runlocal": True, "task": "doc_edit", "window": "2"}
  assert variants.parse(None, "cfg") == {"runlocal": False}


@pytest.mark.parametrize("arg, match", [
    ("fast", "unknown variant 'fast' for cfg \\(known: runlocal, task=\\)"),
    ("task=chess", "unknown task 'chess' for cfg"),
    ("runlocal=1", "unknown variant 'runlocal=1'"),
])
def test_bad_variants_name_the_config(arg, match):
  with pytest.raises(ValueError, match=match):
    variants.parse(arg, "cfg", options={"task": ("ambig_math", ("ambig_math",))})
