"""``adamfx.adam4bit`` and ``adamfx.adamw4bit``: Adam(W) with :class:`adamfx.Blockwise4bit` moments."""

from __future__ import annotations

from typing import Any
from typing import Optional

import optax

from adamfx._builders import adam as _adam
from adamfx._core.driver import ScalarOrSchedule
from adamfx._formats.blockwise4bit import Blockwise4bit


def adam4bit(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    nesterov: bool = False,
    block_size: int = 128,
    min_4bit_size: int = 4096,
    rank1: bool = False,
    update_clipping: bool = False,
    cautious: bool = False,
    param_rounding: str = 'nearest',
) -> optax.GradientTransformationExtraArgs:
  r"""Adam with 4-bit blockwise moments: about 1.06 bytes of state per parameter.

  ``adamfx.adam(learning_rate, b1, b2, eps, eps_root, nesterov=nesterov,
  moments=adamfx.Blockwise4bit(block_size, min_4bit_size, rank1=rank1))``,
  bit for bit: the update :math:`-\alpha_t \hat m_t / (\sqrt{\hat v_t +
  \bar\varepsilon} + \varepsilon)` of :func:`adamfx.adam`, with ``mu`` and
  ``nu`` kept between steps as 4-bit codes (two a byte) and one float32
  scale per block of ``block_size`` (see :class:`adamfx.Blockwise4bit` for
  the maps and the stochastic rounding; for its other options, pass the
  format to :func:`adamfx.adam` yourself).

  Args:
    learning_rate: :math:`\alpha`, a number >= 0 or an optax schedule.
    b1: decay of the first moment, in [0, 1); default 0.9.
    b2: decay of the second moment, in [0, 1); default 0.999.
    eps: added to the root of the second moment, >= 0; default 1e-8.
    eps_root: added inside the root, >= 0; default 0.
    nesterov: NAdam's momentum.
    block_size: elements per quantization block, even; default 128.
    min_4bit_size: leaves with fewer elements keep float32 moments; default 4096.
    rank1: rank-1 normalisation of 2-D leaves' second moment (Li et al.).
    update_clipping: StableAdamW's update clipping, as in :func:`adamfx.adam`.
    cautious: cautious updates, as in :func:`adamfx.adam`.
    param_rounding: ``'nearest'`` (default), ``'kahan'`` or ``'stochastic'``, as in :func:`adam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Raises:
    ValueError: for hyperparameters outside their ranges, an odd or
      non-positive ``block_size`` or a negative ``min_4bit_size``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import adamfx
    >>> loss = lambda w: jnp.sum((w - 3.0) ** 2)
    >>> params = jnp.zeros(8192)
    >>> tx = adamfx.adam4bit(learning_rate=0.1)
    >>> state = tx.init(params)
    >>> state[0].mu.codes.nbytes + state[0].mu.scale.nbytes  # vs 32768 in float32
    4352
    >>> step = jax.jit(tx.update)
    >>> for _ in range(200):
    ...   updates, state = step(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(jnp.allclose(params, 3.0, atol=5e-2))
    True

  References:
    Li, Chen & Zhu, `Memory Efficient Optimizers with 4-bit States
    <https://arxiv.org/abs/2309.01507>`_, NeurIPS 2023.
  """
  return _adam.adam(
      learning_rate, b1, b2, eps, eps_root, nesterov=nesterov,
      moments=Blockwise4bit(block_size, min_4bit_size, rank1=rank1),
      update_clipping=update_clipping, cautious=cautious, param_rounding=param_rounding,
  )


def adamw4bit(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: None = None,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: Optional[Any] = None,
    *,
    nesterov: bool = False,
    block_size: int = 128,
    min_4bit_size: int = 4096,
    rank1: bool = False,
    update_clipping: bool = False,
    cautious: bool = False,
    decouple_lr: bool = False,
    max_lr: Optional[Any] = None,
    param_rounding: str = 'nearest',
) -> optax.GradientTransformationExtraArgs:
  r"""AdamW with 4-bit blockwise moments (see :func:`adam4bit`, :func:`adamfx.adamw`).

  ``adamfx.adamw(..., moments=adamfx.Blockwise4bit(block_size, min_4bit_size,
  rank1=rank1))`` bit for bit:

  .. math::

    \theta_t \leftarrow \theta_{t-1} - \alpha_t \left(\hat m_t /
      (\sqrt{\hat v_t + \bar\varepsilon} + \varepsilon)
      + \lambda \theta_{t-1}\right)

  Args:
    learning_rate: :math:`\alpha`, a number >= 0 or an optax schedule.
    b1: decay of the first moment, in [0, 1); default 0.9.
    b2: decay of the second moment, in [0, 1); default 0.999.
    eps: added to the root of the second moment, >= 0; default 1e-8.
    eps_root: added inside the root, >= 0; default 0.
    mu_dtype: None (4-bit moments have no dtype); here so that the
      arguments keep :func:`adamfx.adamw`'s (and optax's) positions.
    weight_decay: :math:`\lambda` >= 0, or a schedule; default 1e-4.
    mask: a tree of booleans (or a function of the params returning one)
      selecting the leaves to decay.
    nesterov: NAdamW's momentum.
    block_size: elements per quantization block, even; default 128.
    min_4bit_size: leaves with fewer elements keep float32 moments; default 4096.
    rank1: rank-1 normalisation of 2-D leaves' second moment.
    update_clipping: StableAdamW's update clipping, as in :func:`adamfx.adamw`.
    cautious: cautious updates, as in :func:`adamfx.adamw`.
    decouple_lr: fully decoupled weight decay, as in :func:`adamfx.adamw`.
    max_lr: the peak learning rate for ``decouple_lr``, as in :func:`adamfx.adamw`.
    param_rounding: ``'nearest'`` (default), ``'kahan'`` or ``'stochastic'``, as in :func:`adam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

  Raises:
    ValueError: for hyperparameters outside their ranges.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import adamfx
    >>> tx = adamfx.adamw4bit(1e-2, weight_decay=0.1)
    >>> params = {'w': jnp.ones(2)}
    >>> updates, _ = jax.jit(tx.update)({'w': jnp.zeros(2)}, tx.init(params), params)
    >>> updates['w']
    Array([-0.001, -0.001], dtype=float32)

  References:
    Loshchilov & Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, ICLR 2019.
  """
  return _adam.adamw(
      learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask, nesterov=nesterov,
      moments=Blockwise4bit(block_size, min_4bit_size, rank1=rank1),
      update_clipping=update_clipping, cautious=cautious, decouple_lr=decouple_lr,
      max_lr=max_lr, param_rounding=param_rounding,
  )
