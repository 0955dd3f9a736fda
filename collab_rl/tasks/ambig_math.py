"""ambig_math: the user wants the value of a small arithmetic expression (MATH-Chat's analog).

Intent: `n1 op1 n2 op2 n3` (digits, + - *). The first request reads `calc 3 + ? * 2` when slots
are missing. The answer is the expression itself, `answer 3 + 7 * 2`, which the metric evaluates
with the usual precedence: the skill under test is getting the missing operands, not mental
arithmetic. Accuracy: the answer's value equals the intended one (an equivalent expression counts).
"""

from __future__ import annotations

import jax.numpy as jnp

from collab_rl.tasks import slots as slots_lib

DIGITS = tuple(str(d) for d in range(10))
OPS = ("+", "-", "*")


class AmbigMath(slots_lib.SlotTask):
  name = "ambig_math"
  slots = (slots_lib.Slot("n1", DIGITS), slots_lib.Slot("op1", OPS), slots_lib.Slot("n2", DIGITS),
           slots_lib.Slot("op2", OPS), slots_lib.Slot("n3", DIGITS))
  request_template = ("calc", 0, 1, 2, 3, 4)
  answer_template = ("answer", 0, 1, 2, 3, 4)

  @staticmethod
  def evaluate(values_BxK):
    """Value of n1 op1 n2 op2 n3 with * before + and -."""
    a, o1, b, o2, c = (values_BxK[:, i] for i in range(5))

    def apply(x, op, y):
      return jnp.where(op == 0, x + y, jnp.where(op == 1, x - y, x * y))

    star1, star2 = o1 == 2, o2 == 2
    right_first = star2 & ~star1  # a op1 (b * c)
    return jnp.where(right_first, apply(a, o1, apply(b, o2, c)), apply(apply(a, o1, b), o2, c))

  def metric(self, intent, answer_BxK):
    valid = jnp.all(answer_BxK >= 0, 1)
    return (valid & (self.evaluate(answer_BxK) == self.evaluate(intent.values_BxK))).astype(
        jnp.float32)
