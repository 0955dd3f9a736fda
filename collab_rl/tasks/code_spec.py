"""code_spec: the user wants a small list program (BigCodeBench-Chat's analog).

Intent: a four-stage pipeline over a list of digits,
`filter <pred> <bound> map <fn> <arg> sort <order> take <count>`, six slots named
`pred bound fn arg order count`. The first request reads
`write code filter gt ? map mul 2 sort desc take ?` when slots are missing; the answer is the
program, `answer filter gt 3 map mul 2 sort desc take 3`.

Semantics, on fixed-size arrays with a keep mask: `filter` keeps the items where
`item <pred> bound` holds (gt lt eq ne); `map` applies `item <fn> arg` (add sub mul) to the values;
`sort` orders the kept values (asc or desc) and moves them to the front; `take` keeps the first
`count` (1 to 5) of them. The output is that list: values and length.

Metric: pass rate on hidden tests (`Intent.extra`: 6 lists of 8 digits per episode): a test
passes when the candidate's output equals the intended program's, so an equivalent program
(`map add 0` for `map mul 1`) passes and a wrong parameter may still pass some tests. The six
lists together hold every digit at least once and bounds run from 1 to 8, so every filter keeps
an item in some test and the later stages can be told apart (not always: `eq` makes the order
moot, `mul 0` the values). Answers that do not fit the template score 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from collab_rl.tasks import slots as slots_lib

DIGITS = tuple(str(d) for d in range(10))
# 0 and 9 would allow `lt 0` and `gt 9`, which keep nothing on any list and leave the rest of the
# program unidentifiable.
BOUNDS = DIGITS[1:-1]
PREDS = ("gt", "lt", "eq", "ne")
FNS = ("add", "sub", "mul")
ORDERS = ("asc", "desc")
COUNTS = ("1", "2", "3", "4", "5")
NUM_TESTS, TEST_LEN = 6, 8
_DROPPED = 10_000  # sort key of filtered-out items: above any mapped value (9 * 9 at most)


def run_program(values_BxK: jax.Array, inputs_BxTxN: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The output of the programs (slot value indices) on every test: (values_BxTxN, zero past
  the length; lengths_BxT)."""
  pred, bound, fn, arg, order, count = (values_BxK[:, i, None, None] for i in range(6))
  x = inputs_BxTxN
  bound = bound + 1  # BOUNDS start at 1
  keep_BxTxN = jnp.select([pred == 0, pred == 1, pred == 2], [x > bound, x < bound, x == bound],
                          x != bound)
  y_BxTxN = jnp.select([fn == 0, fn == 1], [x + arg, x - arg], x * arg)
  desc = order == 1
  # One ascending sort does both orders: descending sorts the negated values.
  sort_key_BxTxN = jnp.where(keep_BxTxN, jnp.where(desc, -y_BxTxN, y_BxTxN), _DROPPED)
  sorted_BxTxN = jnp.sort(sort_key_BxTxN, -1)
  sorted_BxTxN = jnp.where(desc, -sorted_BxTxN, sorted_BxTxN)
  len_BxT = jnp.minimum(jnp.sum(keep_BxTxN, -1), count[..., 0] + 1).astype(jnp.int32)
  inside_BxTxN = jnp.arange(x.shape[-1]) < len_BxT[..., None]
  return jnp.where(inside_BxTxN, sorted_BxTxN, 0).astype(jnp.int32), len_BxT


class CodeSpec(slots_lib.SlotTask):
  name = "code_spec"
  slots = (slots_lib.Slot("pred", PREDS), slots_lib.Slot("bound", BOUNDS),
           slots_lib.Slot("fn", FNS), slots_lib.Slot("arg", DIGITS),
           slots_lib.Slot("order", ORDERS), slots_lib.Slot("count", COUNTS))
  request_template = ("write", "code", "filter", 0, 1, "map", 2, 3, "sort", 4, "take", 5)
  answer_template = ("answer", "filter", 0, 1, "map", 2, 3, "sort", 4, "take", 5)

  def sample_extra(self, key, values_BxK) -> jax.Array:
    """[B, tests, len] digits: uniform, except that every digit occurs in some test."""
    b = values_BxK.shape[0]
    n = NUM_TESTS * TEST_LEN
    # One draw for everything: every jax.random call compiles its own copy of the hash.
    u_Bx2N = jax.random.uniform(key, (b, 2 * n))
    fill_BxN = jnp.floor(u_Bx2N[:, :n] * 10).astype(jnp.int32)
    # The first ten cells hold 0..9; the shuffle below scatters them over the tests.
    digits_BxN = fill_BxN.at[:, :10].set(jnp.arange(10, dtype=jnp.int32))
    shuffle_BxN = jnp.argsort(u_Bx2N[:, n:], 1)
    digits_BxN = jnp.take_along_axis(digits_BxN, shuffle_BxN, 1)
    return digits_BxN.reshape(b, NUM_TESTS, TEST_LEN)

  def metric(self, intent, answer_BxK):
    valid_B = jnp.all(answer_BxK >= 0, 1)
    tests_BxTxN = intent.extra
    want_BxTxN, want_len_BxT = run_program(intent.values_BxK, tests_BxTxN)
    got_BxTxN, got_len_BxT = run_program(jnp.maximum(answer_BxK, 0), tests_BxTxN)
    # Both outputs are zero past their lengths, so equal lengths + equal arrays = equal lists.
    passed_BxT = (got_len_BxT == want_len_BxT) & jnp.all(got_BxTxN == want_BxTxN, -1)
    return jnp.where(valid_B, jnp.mean(passed_BxT.astype(jnp.float32), 1), 0.0)
