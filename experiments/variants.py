"""The `--config path.py:arg` variant string every config here parses: `runlocal,task=doc_edit`.

Flags stand alone (`runlocal`); options are `key=value`, checked against their allowed values
when a config lists them. Anything else is an error that names the config and what it knows.
"""

from __future__ import annotations

from typing import Mapping, Sequence


def parse(arg: str | None, config_name: str, *, flags: Sequence[str] = ("runlocal",),
          options: Mapping[str, tuple[str, Sequence[str] | None]] | None = None) -> dict:
  """Returns {flag: bool} for each flag and {option: value} (the default when not given).

  `options` maps a key to (default, allowed values or None for any value).
  """
  options = dict(options or {})
  out: dict = {f: False for f in flags}
  out.update({k: default for k, (default, _) in options.items()})
  known = ", ".join([*flags, *(f"{k}=" for k in options)])
  for item in (arg or "").split(","):
    if not item:
      continue
    key, sep, value = item.partition("=")
    if not sep and key in flags:
      out[key] = True
    elif sep and key in options:
      allowed = options[key][1]
      if allowed is not None and value not in allowed:
        raise ValueError(f"unknown {key} {value!r} for {config_name} (known: {tuple(allowed)})")
      out[key] = value
    else:
      raise ValueError(f"unknown variant {item!r} for {config_name} (known: {known})")
  return out
