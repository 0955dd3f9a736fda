"""XLA_FLAGS for a test's subprocess: its own device count, the test process's other flags.

The other flags are the compiler settings `conftest.py` chose for the suite (LLVM -O1, the
elemental fusion emitters): a subprocess compiles as the tests around it do, and processes
compared bit for bit (reliability/) compile alike.
"""

import os
import re


def xla_flags(devices: int) -> str:
  others = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                  os.environ.get("XLA_FLAGS", ""))
  return " ".join([f"--xla_force_host_platform_device_count={devices}", *others.split()])
