"""Dense storage of Adam's moments: one array per leaf, in a floating dtype.

``Dense(dtype)`` is what ``mu_dtype``/``nu_dtype`` select; the core's dense
step (:func:`adamfx._core.driver._family_update`) does the arithmetic in at least
float32 and stores each moment in its dtype (16-bit ``nu`` with stochastic
rounding, see :mod:`adamfx._core.rounding`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from adamfx._core import checks as _checks
from adamfx._core import numerics as _numerics
from adamfx._core import rounding as _rounding


@dataclasses.dataclass(frozen=True)
class Dense:
  """Adam's moments stored as arrays shaped like the params, in ``dtype``.

  The default storage, what ``mu_dtype``/``nu_dtype`` select:
  ``adamfx.adam(lr, moments=adamfx.Dense(jnp.bfloat16))`` is
  ``adamfx.adam(lr, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)``.

  Args:
    dtype: floating dtype of both moments; None (default) keeps each leaf's
      dtype. Complex params keep a complex first moment of that precision.

  Raises:
    TypeError: if ``dtype`` is not a floating dtype.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adamfx
    >>> tx = adamfx.adam(1e-3, moments=adamfx.Dense(jnp.bfloat16))
    >>> tx.init(jnp.zeros(3))[0].nu.dtype
    dtype(bfloat16)
  """

  dtype: Any = None

  def __post_init__(self):
    canonical = _checks.check_state_dtype('dtype', self.dtype)
    object.__setattr__(self, 'dtype', None if canonical is None else np.dtype(canonical))

  def applies(self, param: Any) -> bool:
    """Dense storage quantizes nothing."""
    del param
    return False

  def init(self, param: Any, signed: bool) -> Any:
    """Zeros for one leaf's moment (``signed``: the first moment)."""
    dtype = self.dtype
    if signed and dtype is not None and jnp.issubdtype(param.dtype, jnp.complexfloating):
      dtype = jnp.complex128 if jnp.finfo(dtype).bits == 64 else jnp.complex64
    return _numerics.zeros_like(param, dtype)

  def decode(self, stored: Any, signed: bool) -> Any:
    """The moment in at least float32."""
    del signed
    return stored.astype(_numerics.compute_dtype(stored.dtype))

  def encode(self, x: Any, signed: bool, *, count: Any, leaf_index: int, like: Any) -> Any:
    """``x`` stored in ``like``'s dtype (16-bit second moments stochastically rounded)."""
    if signed:
      return _numerics.saturate(x, like.dtype)
    return _numerics.keep_positive(
        _rounding.store_second_moment(x, like.dtype, count, leaf_index), x)

  def config(self) -> dict[str, Any]:
    """What a checkpoint records of this format."""
    return {'format': 'Dense', 'dtype': None if self.dtype is None else self.dtype.name}

  def nbytes(self, param: Any) -> int:
    """Bytes of one moment of ``param``."""
    dtype = np.dtype(param.dtype if self.dtype is None else self.dtype)
    return int(np.prod(param.shape, dtype=np.int64)) * dtype.itemsize

  def dtypes(self, mu_dtype: Any, nu_dtype: Any) -> tuple[Any, Any]:
    """``(mu_dtype, nu_dtype)``: the explicit ones win, else this format's dtype."""
    return (
        self.dtype if mu_dtype is None else mu_dtype,
        self.dtype if nu_dtype is None else nu_dtype,
    )
