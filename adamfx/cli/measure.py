"""What every bench measures alike: timings' statistics, the bytes a compiled
step allocates, and the machine it ran on (:mod:`adamfx.cli.bench`,
:mod:`adamfx.cli.bench_sparse`, :mod:`adamfx.cli.step_bench`)."""

from __future__ import annotations

import os
import platform
import statistics
from typing import Any


def new_bytes(compiled) -> int | None:
  """Bytes a compiled step allocates beyond its (donated) inputs."""
  try:
    m = compiled.memory_analysis()
    return int(m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)
  except Exception:  # noqa: BLE001 (not every backend reports it)
    return None


def stats(xs: list[float]) -> dict[str, float]:
  return {'median': statistics.median(xs) * 1e3, 'min': min(xs) * 1e3, 'max': max(xs) * 1e3}


def machine() -> dict[str, Any]:
  import jax
  import optax

  info = {
      'platform': platform.platform(), 'processor': platform.processor() or platform.machine(),
      'cpus': os.cpu_count(), 'python': platform.python_version(), 'jax': jax.__version__,
      'optax': optax.__version__, 'device': str(jax.devices()[0].device_kind),
      'backend': jax.default_backend(),
  }
  try:
    info['loadavg'] = os.getloadavg()
  except OSError:
    pass
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          info['cpu_model'] = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  try:
    import torch

    info['torch'] = torch.__version__
  except ImportError:
    pass
  return info


def describe(m: dict[str, Any]) -> str:
  """One line naming the machine of :func:`machine`, for a table's heading."""
  return (
      f'{m.get("cpu_model", m["processor"])}, {m["cpus"]} CPUs, {m["backend"]} ({m["device"]}),'
      f' jax {m["jax"]}, optax {m["optax"]}'
      + (f', torch {m["torch"]}' if 'torch' in m else '')
      + (f'; load average {m["loadavg"][0]:.1f}' if 'loadavg' in m else '')
  )
