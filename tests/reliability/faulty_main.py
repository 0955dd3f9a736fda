"""`python -m collab_rl.main` with one SIGKILL planted at a chosen moment: the preemption victim.

Run as `python tests/reliability/faulty_main.py --config ... --workdir ...` (the arguments of
`collab_rl.main`) with FAULT=<moment>:<step> and FAULT_LOG=<file> in the environment:

  step:N  step N's update has been dispatched and its result is not awaited: killed in the step.
  save:N  the asynchronous save of step N has been started (`save` returned) and the process dies
          before it is known to be committed: killed during the save.
  eval:N  the evaluation at step N has been dispatched: killed in the evaluation.

The process appends one JSON line to FAULT_LOG, saying what it saw, then sends itself SIGKILL: no
handler, no atexit, no flush, as when a VM is preempted or the OOM killer strikes. Everything else
is the LM trainer and the entry point unchanged; a FAULT whose step this run never reaches is inert.
"""

from __future__ import annotations

import json
import os
import signal

from absl import app, flags

from collab_rl import checkpoint as ckpt_lib
from collab_rl import main as main_lib
from collab_rl.trainers import lm

MOMENT, _STEP = os.environ["FAULT"].split(":")
STEP = int(_STEP)
TMP_MARK = ".orbax-checkpoint-tmp"


def _die(**seen) -> None:
  with open(os.environ["FAULT_LOG"], "a", encoding="utf-8") as f:
    f.write(json.dumps({"moment": MOMENT, "step": STEP, **seen}) + "\n")
  os.kill(os.getpid(), signal.SIGKILL)


_build = lm.build


def _faulty_build(config, mesh) -> lm.Built:
  built = _build(config, mesh)
  current = {"step": None}  # the step being computed; read once from the state, then counted

  def step_fn(state, batch):
    if current["step"] is None:
      current["step"] = int(state.step)
    current["step"] += 1
    out = built.step_fn(state, batch)
    if MOMENT == "step" and current["step"] == STEP:
      _die(in_flight=not out[0].step.is_ready())
    return out

  def eval_fn(params, batch):
    loss = built.eval_fn(params, batch)
    if MOMENT == "eval" and current["step"] == STEP:
      _die(in_flight=not loss.is_ready())
    return loss

  return built._replace(step_fn=step_fn, eval_fn=eval_fn)


_save = ckpt_lib.Checkpointer.save


def _faulty_save(self, step, state, **kwargs) -> bool:
  saved = _save(self, step, state, **kwargs)
  if MOMENT == "save" and saved and int(step) == STEP:
    names = os.listdir(self.directory) if os.path.isdir(self.directory) else []
    _die(in_flight=str(step) not in names, tmp=sorted(n for n in names if TMP_MARK in n))
  return saved


lm.build = _faulty_build
ckpt_lib.Checkpointer.save = _faulty_save

if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main_lib.main, flags_parser=main_lib.parse_flags)
