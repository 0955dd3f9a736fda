"""`python -m collab_rl.data prepare --task NAME [--input FILE.jsonl] --data_dir DIR`.

Task datasets: `--task ambig_math|doc_edit|code_spec` with split sizes `--num_train`,
`--num_validation`, `--num_test`. CollabLLM records: `--task collabllm --input FILE.jsonl`, split
by `--validation_fraction` / `--test_fraction`. A bad record prints `file:line: field: problem`
and exits 1, leaving any earlier dataset in place.
"""

from __future__ import annotations

import sys

from absl import app, flags

TASKS = ("ambig_math", "doc_edit", "code_spec")
COLLABLLM = "collabllm"

_TASK = flags.DEFINE_enum("task", None, [*TASKS, COLLABLLM], "Dataset to prepare.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Root directory of the datasets.")
_INPUT = flags.DEFINE_string("input", None, "CollabLLM-format JSONL file (task collabllm).")
# Defaults live in builders / collabllm (None here), which import too much to load before --help.
_NUM_TRAIN = flags.DEFINE_integer("num_train", None, "Task episodes in train (default 100000).")
_NUM_VALIDATION = flags.DEFINE_integer("num_validation", None,
                                       "Task episodes in validation (default 2000).")
_NUM_TEST = flags.DEFINE_integer("num_test", None, "Task episodes in test (default 2000).")
_MAX_CHARS = flags.DEFINE_integer("max_chars", None,
                                  "Longest text field of a CollabLLM record (default 65536).")
_VAL_FRACTION = flags.DEFINE_float("validation_fraction", 0.1,
                                   "Share of CollabLLM records held out for validation.")
_TEST_FRACTION = flags.DEFINE_float("test_fraction", 0.1,
                                    "Share of CollabLLM records held out for test.")


def _fail(message: str) -> None:
  sys.stderr.write(f"error: {message}\n")
  sys.exit(1)


def main(argv: list[str]) -> None:
  if argv[1:] != ["prepare"]:
    raise app.UsageError(f"expected the command `prepare`, got {argv[1:]}")
  if _TASK.value is None or _DATA_DIR.value is None:
    raise app.UsageError("--task and --data_dir are required")
  if (_TASK.value == COLLABLLM) != (_INPUT.value is not None):
    raise app.UsageError("--input FILE.jsonl is required for --task collabllm, and only for it")
  import jax  # after flag parsing, so that --jax_* flags take effect

  # Episodes are data, not training: sample them on the host, leaving any accelerator free.
  jax.config.update("jax_platforms", "cpu")
  from collab_rl.data import builders, collabllm  # pylint: disable=g-import-not-at-top

  try:
    if _TASK.value == COLLABLLM:
      max_chars = (collabllm.DEFAULT_MAX_CHARS if _MAX_CHARS.value is None
                   else _MAX_CHARS.value)
      path = builders.prepare_collabllm(
          _INPUT.value, _DATA_DIR.value, max_chars=max_chars,
          validation_fraction=_VAL_FRACTION.value, test_fraction=_TEST_FRACTION.value)
    else:
      given = {"train": _NUM_TRAIN.value, "validation": _NUM_VALIDATION.value,
               "test": _NUM_TEST.value}
      sizes = {s: builders.DEFAULT_TASK_SIZES[s] if n is None else n for s, n in given.items()}
      path = builders.prepare_task(_TASK.value, _DATA_DIR.value, sizes)
  except collabllm.RecordError as e:
    _fail(str(e))
  except (OSError, ModuleNotFoundError, ValueError) as e:
    _fail(f"{_TASK.value}: {e}")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  info = tfds.builder_from_directory(path).info
  sizes = ", ".join(f"{s}={info.splits[s].num_examples}" for s in builders.SPLITS
                    if s in info.splits)
  print(f"wrote {path}: {sizes}")


if __name__ == "__main__":
  app.run(main)
