"""Blockwise 8-bit storage of Adam's moments (Dettmers et al. 2022).

A thin format object over the codec of :mod:`adamfx._formats.quant` (the dynamic
code map, :class:`adamfx.QuantizedArray`, the chunked fused step).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adamfx._core import checks as _checks
from adamfx._core import numerics as _numerics
from adamfx._formats import quant as _quant


@dataclasses.dataclass(frozen=True)
class Blockwise8bit:
  """Adam's moments in 8 bits per element: uint8 codes and a float32 scale per block.

  Each leaf with at least ``min_size`` real floating elements keeps each
  moment as a :class:`adamfx.QuantizedArray` (codes of the dynamic map,
  signed for ``mu``, unsigned for ``nu`` and AMSGrad's ``nu_max``, and one
  float32 absmax per block of ``block_size``): 2.03 bytes per parameter for
  two moments instead of 8. Smaller leaves keep their moments in float32.
  The update is Adam's float32 arithmetic on the decoded moments. ``mu``'s
  codes are the nearest map value; ``nu``'s (and ``nu_max``'s) are rounded
  stochastically, unbiased, with bits hashed from (step count, leaf,
  element), so a small ``nu`` in a block whose largest element stays large
  decays as it should instead of stalling on its code (issue 24).

  ``adamfx.adam(lr, moments=adamfx.Blockwise8bit())`` is
  :func:`adamfx.adam8bit` bit for bit; every member that keeps Adam's two
  moments takes it (AdamW, NAdam(W), AMSGrad, lazy Adam).

  Args:
    block_size: elements per block (one float32 scale each), an int >= 1;
      default 256.
    min_size: leaves with fewer elements keep float32 moments; an int >= 0,
      default 4096 (bitsandbytes').

  Raises:
    ValueError: for a ``block_size`` < 1 or a negative ``min_size``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adamfx
    >>> tx = adamfx.adamw(1e-3, moments=adamfx.Blockwise8bit(min_size=256))
    >>> state = tx.init({'w': jnp.zeros((4, 256)), 'b': jnp.zeros(4)})
    >>> state[0].mu['w'].codes.dtype, state[0].mu['b'].dtype
    (dtype('uint8'), dtype('float32'))

  References:
    Dettmers, Lewis, Shleifer & Zettlemoyer, `8-bit Optimizers via Block-wise
    Quantization <https://arxiv.org/abs/2110.02861>`_, ICLR 2022.
  """

  block_size: int = 256
  min_size: int = 4096

  def __post_init__(self):
    # None (the 8-bit aliases' defaults) gives the defaults; concrete integer
    # arrays (optax.inject_hyperparams' init) are read as ints.
    block_size, min_size = _quant._check_8bit_args(self.block_size, self.min_size)
    object.__setattr__(self, 'block_size', block_size)
    object.__setattr__(self, 'min_size', min_size)

  def applies(self, param: Any) -> bool:
    """Whether ``param``'s moments are quantized (else stored in float32)."""
    dtype = jnp.dtype(param.dtype)
    size = math.prod(np.shape(param))
    return bool(jnp.issubdtype(dtype, jnp.floating) and size >= max(self.min_size, 1))

  def init(self, param: Any, signed: bool) -> Any:
    """Zeros for one leaf's moment (``param`` may be a ShapeDtypeStruct)."""
    return _quant.init_moment(param, signed, self.block_size, self.min_size)

  def decode(self, stored: Any, signed: bool) -> Any:
    """The moment as a float32 array shaped like the param."""
    if isinstance(stored, _quant.QuantizedArray):
      return _quant.dequantize(stored, signed=signed, block_size=self.block_size)
    return stored

  def encode(self, x: Any, signed: bool, *, count: Any, leaf_index: int, like: Any) -> Any:
    """``x`` stored as ``like`` is (quantized or not)."""
    if isinstance(like, _quant.QuantizedArray):
      # nu's codes are stochastically rounded, as in the fused step (issue 24).
      bits = None if signed else _quant.nu_bits(
          tuple(np.shape(x)), self.block_size, count, leaf_index)
      return _quant.quantize(x, signed=signed, block_size=self.block_size, bits=bits)
    return x.astype(like.dtype)

  def config(self) -> dict[str, Any]:
    """What a checkpoint records of this format."""
    return {'format': 'Blockwise8bit', 'block_size': self.block_size, 'min_size': self.min_size}

  def nbytes(self, param: Any) -> int:
    """Bytes of one moment of ``param``: codes and scales, or float32."""
    shape = tuple(np.shape(param))
    n = math.prod(shape)
    if not self.applies(param):
      return n * np.dtype(_numerics.compute_dtype(param.dtype)).itemsize
    return n + 4 * math.prod(_quant.scale_shape(shape, self.block_size))

  def is_stored(self, x: Any) -> bool:
    """Whether ``x`` is one stored (quantized) moment, a pytree leaf of the state."""
    return isinstance(x, _quant.QuantizedArray)

  def param_like(self, stored: Any) -> Any:
    """An array shaped like the param ``stored`` belongs to."""
    return stored.codes if isinstance(stored, _quant.QuantizedArray) else stored

  def prepare(self, tree: Any, signed: bool, what: str) -> Any:
    """Moments handed back by a container (Flax NNX mappings) as QuantizedArrays;
    a state quantized with another block size, or made by a float-moment
    optimiser (a large leaf with float moments), is refused."""
    tree = _quant._as_quantized(tree, signed, self.block_size, what)
    for path, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=self._is_leaf)[0]:
      if x is None or self.is_stored(x) or not jnp.issubdtype(x.dtype, jnp.floating):
        continue
      size = math.prod(np.shape(x))
      if size >= max(self.min_size, 1):
        raise TypeError(
            f'state.{what} leaf {_checks._leaf_name(path)} holds'
            f' {jnp.dtype(x.dtype).name} moments of {size} elements, but {self!r}'
            ' keeps this leaf in 8 bits (min_8bit_size): the state was made by another'
            ' optimiser (adamfx.adam?). Update it with the optimiser that made it, or'
            ' init this one.'
        )
    return tree

  def _is_leaf(self, x: Any) -> bool:
    return x is None or self.is_stored(x)

  def step(self, g, m, v, vm, leaf_index, math):
    """The fused 8-bit step of one leaf (see :func:`adamfx._formats.quant.leaf_step`)."""
    return _quant.leaf_step(
        g, m, v, vm, math.count, math.hps, nesterov=math.nesterov, amsgrad=math.amsgrad,
        block_size=self.block_size, step_size=math.step_size, leaf_index=leaf_index,
    )

  def gather_rows(self, stored: Any, ids: Any, take: Any) -> Any:
    """Rows ``ids`` of a stored moment, for lazy Adam; ``take(array, ids)`` is
    the caller's row gather (zeros for ids out of range, mesh-aware).

    A quantized leaf's blocks must lie within its rows (the last axis a
    multiple of ``block_size``), so that a row's codes and scales are its own.
    """
    if not isinstance(stored, _quant.QuantizedArray):
      return take(stored, ids)
    shape = tuple(stored.codes.shape)
    if len(shape) < 2 or shape[-1] % self.block_size:
      raise ValueError(
          f'Lazy Adam with moments={self!r} needs a table whose rows are whole'
          f' blocks (last axis a multiple of block_size={self.block_size}), got'
          f' a leaf of shape {shape}: pass Blockwise8bit(block_size=b) with b'
          f' dividing {shape[-1] if shape else 1}.'
      )
    return _quant.QuantizedArray(take(stored.codes, ids), take(stored.scale, ids),
                                 self.block_size, stored.signed)

  def scatter_rows(self, stored: Any, ids: Any, rows: Any, put: Any) -> Any:
    """``stored`` with rows ``ids`` set to ``rows``; ``put(array, ids, values)``
    is the caller's row scatter (ids out of range dropped)."""
    if not isinstance(stored, _quant.QuantizedArray):
      return put(stored, ids, rows)
    return _quant.QuantizedArray(put(stored.codes, ids, rows.codes),
                                 put(stored.scale, ids, rows.scale),
                                 self.block_size, stored.signed)
