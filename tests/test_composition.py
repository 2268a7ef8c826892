"""Contracts every adamfx transformation keeps, and composition with optax.

One table (``CONTRACTS``, below) lists every public transformation, each
with optax's equivalent where optax has one, and drives every contract
check: each member must pass all of them. Numbers are compared with optax
(run under ``optax_promotion()``); ``nu_dtype``, which optax lacks, is
compared with optax.adam (float32 nu) at bfloat16 storage precision. Members
optax lacks (8-bit, Keras conventions) are compared with float64 NumPy
transcriptions of their documented algorithms (``numpy_reference``, from
tests/reference.py).

What is compared is the displacement ``params_T - params_0`` (the sum of the
updates), so a relative tolerance bites on the O(lr) steps themselves, not on
O(1) params. adamfx follows optax's operations in optax's order, so in float32
the two agree to a few ulps per step: 2e-6 relative (~30 ulps) after up to
ten steps; absolute tolerances are explained where they are set.
"""

import contextlib
import functools
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import harness
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
from conftest import optax_promotion

import adamfx

_RTOL = 2e-6
_ATOL = 1e-9
LR = 1e-2


# The contract table: every public transformation, one line each.
#
# A new member joins with ONE ``Contract(...)`` line and gets every check
# in this file that takes ``c``: x32 and x64; eager, jit, vmap and lax.scan
# (eager == jit); no recompilation (jit: second step; eager: new
# hyperparameter values); optax parity where optax has the transformation;
# dtypes of updates and state kept (float16, bfloat16, float32, float64,
# complex64 leaves in one tree); None leaves; empty trees; count saturation
# at int32 max; flax.nnx.Optimizer and an Equinox loop for several steps;
# npz and orbax round trips; bad gradient trees refused with a
# ValueError/TypeError. Its state only has to hold an Adam-like NamedTuple
# (fields count, mu, nu) somewhere, as any optax state. Where a check's
# expectation differs for a member (how its moments are stored, complex
# params refused), a field of the row says so, with the reason.


class Contract(NamedTuple):
  name: str
  make: Callable[[], optax.GradientTransformation]
  # optax's equivalent, for parity (None: optax has none).
  reference: Callable[[], optax.GradientTransformation] | None = None
  # dtype the state's mu/nu are pinned to, whatever the params' dtype
  # (None: they follow the params).
  mu_dtype: Any = None
  nu_dtype: Any = None
  # Tolerance against the reference, on displacements (sums of updates).
  rtol: float = 2e-6
  atol: float = 1e-6
  # The update is ``new_p - p`` with ``new_p`` rounded to the params' dtype, as
  # torch.optim.AdamW computes it (``p *= 1 - lr*wd`` first): exact differences
  # of rounded params, so eager and jit (FMA or not) may differ by a param ulp.
  param_rounded: bool = False
  # How the moments (mu, nu) are stored, for the dtype check:
  # ``packed``: pack_state's one buffer per params dtype, keyed by the dtype's
  # name, instead of one moment per leaf;
  # ``eight_bit``: moments of leaves (or packed buffers) of >= ``_C8`` elements are
  # uint8 codes + float32 block scales, smaller ones keep their compute dtype
  # (float32 for 16-bit floats), as adamfx/_formats/quant.py documents; 4-bit rows
  # (Blockwise4bit: uint8 codes, two a byte, + float32 scales) say it too.
  # ``wide_moments``: moments of 16-bit params are stored in float32 (the
  # framework-exact builders, as adamfx/_porting/conventions.py documents).
  packed: bool = False
  eight_bit: bool = False
  wide_moments: bool = False
  # False: complex params are refused with a TypeError naming the leaf (the
  # reason is on the row); the dtype check asserts that refusal, and runs the
  # real leaves alone.
  complex_params: bool = True
  # Where optax has no equivalent: a float64 NumPy reference (tests/reference.py),
  # built from the params (a tree), with ``init(leaves)`` and ``step(grads, params)``.
  numpy_reference: Callable[[Any], Any] | None = None
  # True: the member takes RowSparse gradients (lazy Adam); the composition
  # checks also feed it one (for the (4, 64) leaf).
  sparse: bool = False


_C8 = 256  # min_8bit_size in the table: the (4, 64) leaf is quantized, the bias not
# Float32 steps against a float64 NumPy reference: a float32 leaf's step sees b2 = 0.999
# rounded to float32 (0.999 + 1.3e-8) in its bias correction 1 - b2**t, 1.3e-5 relative of
# 1 - b2**t ~ 1e-3 t, so 6.5e-6 relative on sqrt(v_hat) and on the step (optax's float32 step
# has it too, so optax rows don't see it), plus 2e-6 of float32 arithmetic: rtol 2e-5.
_F64_RTOL = 2e-5


def _packed_positions(params):
  """Each leaf's buffer's place among pack_state's buffers (adam8bit, ``_C8``).

  pack_state keeps a leaf the tree quantizes in a buffer of its own
  (``'<dtype>_8bit_<leaf>'``), the others in one buffer per dtype
  (``'<dtype>'``), in a dict (its leaves in sorted key order). ``nu``'s
  stochastic rounding hashes the leaf's place in the state it is given, so a
  packed 8-bit leaf draws the bits of its buffer's place, not of its place in
  the params tree (documented in ``adamfx.pack_state``).
  """
  names = [f'{p.dtype.name}_8bit_{i}' if p.size >= _C8 else p.dtype.name
           for i, p in enumerate(jax.tree.leaves(params))]
  order = sorted(set(names))
  return [order.index(n) for n in names]


_B8 = adamfx.Blockwise8bit(min_size=_C8)
_B8_ROWS = adamfx.Blockwise8bit(block_size=64, min_size=_C8)  # lazy: a row is whole blocks
_B4 = adamfx.Blockwise4bit(min_size=_C8)


def _uniform4(count, leaf, salt, rows):
  """The 4-bit rows' stochastic-rounding draws, for ``reference.Adam4bit``.

  The random number generator, not the algorithm under test: ``_B4``'s bits
  (hashed from the step count, the leaf and the element; ``salt`` 0 for mu,
  1 for nu, 2 for nu_max) as uniforms in [0, 1) from their top 24 bits, as
  adamfx._formats.codec4.uniform documents. The count saturates at the int32 max,
  as the state's does.
  """
  count = jnp.int32(min(count, np.iinfo(np.int32).max))
  bits = np.asarray(_B4._bits(rows, count, leaf, salt == 0, moment=salt)).astype(np.uint64)
  return (bits >> 8).astype(np.float64) * 2.0**-24


def _ref4(**kw):
  return lambda p: reference.Adam4bit(LR, min_size=_C8, bits=_uniform4, **kw)

_MASK = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)  # decay matrices only
_inject = adamfx.inject_hyperparams
_oinject = optax.inject_hyperparams
_WD = dict(weight_decay=0.1)

CONTRACTS = [
    Contract('adam', lambda: adamfx.adam(LR), lambda: optax.adam(LR)),
    Contract('nadam', lambda: adamfx.nadam(LR), lambda: optax.nadam(LR)),
    Contract('amsgrad', lambda: adamfx.amsgrad(LR), lambda: optax.amsgrad(LR)),
    Contract('adamw', lambda: adamfx.adamw(LR, **_WD), lambda: optax.adamw(LR, **_WD)),
    Contract('adamw_mask', lambda: adamfx.adamw(LR, mask=_MASK, **_WD),
             lambda: optax.adamw(LR, mask=_MASK, **_WD)),
    Contract('nadamw', lambda: adamfx.nadamw(LR, **_WD), lambda: optax.nadamw(LR, **_WD)),
    Contract('adamax', lambda: adamfx.adamax(LR), lambda: optax.adamax(LR)),
    Contract('adamaxw', lambda: adamfx.adamaxw(LR, **_WD), lambda: optax.adamaxw(LR, **_WD)),
    Contract('scale_by_adam', adamfx.scale_by_adam, optax.scale_by_adam),
    Contract('scale_by_adamax', adamfx.scale_by_adamax, optax.scale_by_adamax),
    # bfloat16 storage rounds mu (or nu) to 8 significant bits (2^-9 = 2e-3
    # relative) each step, and optax also computes b1 * mu in bfloat16 where
    # adamfx uses float32: a few bfloat16 roundings apart over 3-10 steps, so
    # 2e-2 relative on displacements, and 2e-4 absolute (2e-2 of a typical
    # displacement, ~1e-2) where an element's steps cancel (a wrong bias
    # correction or moment is off by O(1)).
    Contract('adam_mu_bf16', lambda: adamfx.adam(LR, mu_dtype=jnp.bfloat16),
             lambda: optax.adam(LR, mu_dtype=jnp.bfloat16), mu_dtype=jnp.bfloat16,
             rtol=2e-2, atol=2e-4),
    # optax has no nu_dtype: the reference is optax.adam with float32 nu.
    Contract('adam_nu_bf16', lambda: adamfx.adam(LR, nu_dtype=jnp.bfloat16),
             lambda: optax.adam(LR), nu_dtype=jnp.bfloat16, rtol=2e-2, atol=2e-4),
    Contract('adam8bit', lambda: adamfx.adam8bit(LR, min_8bit_size=_C8), eight_bit=True,
             rtol=_F64_RTOL, numpy_reference=lambda p: reference.Adam8bit(LR, min_size=_C8)),
    Contract('adamw8bit', lambda: adamfx.adamw8bit(LR, min_8bit_size=_C8, **_WD),
             eight_bit=True, rtol=_F64_RTOL, numpy_reference=lambda p: reference.Adam8bit(LR, min_size=_C8, **_WD)),
    Contract('scale_by_adam8bit', lambda: adamfx.scale_by_adam8bit(min_8bit_size=_C8),
             eight_bit=True, rtol=_F64_RTOL, numpy_reference=lambda p: reference.Adam8bit(-1.0, min_size=_C8)),
    # moments=Blockwise8bit(): the 8-bit storage as a parameter of every member.
    Contract('amsgrad_8bit', lambda: adamfx.amsgrad(LR, moments=_B8), eight_bit=True,
             rtol=_F64_RTOL, numpy_reference=lambda p: reference.AMSGrad8bit(LR, min_size=_C8)),
    Contract('nadamw_8bit', lambda: adamfx.nadamw(LR, moments=_B8, **_WD), eight_bit=True,
             rtol=_F64_RTOL, numpy_reference=lambda p: reference.Adam8bit(LR, min_size=_C8, nesterov=True, **_WD)),
    Contract('adamw_8bit', lambda: adamfx.adamw(LR, moments=_B8, **_WD), eight_bit=True,
             rtol=_F64_RTOL, numpy_reference=lambda p: reference.Adam8bit(LR, min_size=_C8, **_WD)),
    Contract('lazy_adam_8bit', lambda: adamfx.lazy_adam(LR, moments=_B8_ROWS), eight_bit=True,
             sparse=True, rtol=_F64_RTOL,
             numpy_reference=lambda p: reference.Adam8bit(LR, min_size=_C8, block_size=64)),
    # moments=Blockwise4bit(): 4-bit codes (two a byte) + float32 block scales.
    Contract('adam4bit', lambda: adamfx.adam4bit(LR, min_4bit_size=_C8), eight_bit=True,
             rtol=_F64_RTOL, numpy_reference=_ref4()),
    Contract('adamw4bit', lambda: adamfx.adamw4bit(LR, min_4bit_size=_C8, **_WD),
             eight_bit=True, rtol=_F64_RTOL, numpy_reference=_ref4(**_WD)),
    Contract('amsgrad_4bit', lambda: adamfx.amsgrad(LR, moments=_B4), eight_bit=True,
             rtol=_F64_RTOL, numpy_reference=_ref4(amsgrad=True)),
    Contract('nadam_4bit', lambda: adamfx.nadam(LR, moments=_B4), eight_bit=True,
             rtol=_F64_RTOL, numpy_reference=_ref4(nesterov=True)),
    Contract('lazy_adam_4bit', lambda: adamfx.lazy_adam(LR, moments=_B4), eight_bit=True,
             rtol=_F64_RTOL, numpy_reference=_ref4()),
    Contract('inject_adam4bit', lambda: _inject(adamfx.adam4bit)(LR, min_4bit_size=_C8),
             eight_bit=True, rtol=_F64_RTOL, numpy_reference=_ref4()),
    Contract('pack_adam', lambda: adamfx.pack_state(adamfx.adam(LR)), lambda: optax.adam(LR),
             packed=True),
    Contract('pack_adamw', lambda: adamfx.pack_state(adamfx.adamw(LR, **_WD)),
             lambda: optax.adamw(LR, **_WD), packed=True),
    Contract('pack_amsgrad', lambda: adamfx.pack_state(adamfx.amsgrad(LR)),
             lambda: optax.amsgrad(LR), packed=True),
    # pack_state keeps the tree's numbers (issue 24): each 8-bit leaf its own blocks.
    Contract('pack_adam8bit', lambda: adamfx.pack_state(adamfx.adam8bit(LR, min_8bit_size=_C8)),
             packed=True, eight_bit=True, rtol=_F64_RTOL,
             numpy_reference=lambda p: reference.Adam8bit(
                 LR, min_size=_C8, positions=_packed_positions(p))),
    Contract('inject_adam', lambda: _inject(adamfx.adam)(LR),
             lambda: _oinject(optax.adam)(LR)),
    Contract('inject_nadam', lambda: _inject(adamfx.nadam)(LR),
             lambda: _oinject(optax.nadam)(LR)),
    Contract('inject_amsgrad', lambda: _inject(adamfx.amsgrad)(LR),
             lambda: _oinject(optax.amsgrad)(LR)),
    Contract('inject_adamw', lambda: _inject(adamfx.adamw)(LR, **_WD),
             lambda: _oinject(optax.adamw)(LR, **_WD)),
    Contract('inject_nadamw', lambda: _inject(adamfx.nadamw)(LR, **_WD),
             lambda: _oinject(optax.nadamw)(LR, **_WD)),
    Contract('inject_adamax', lambda: _inject(adamfx.adamax)(LR),
             lambda: _oinject(optax.adamax)(LR)),
    Contract('inject_adam8bit', lambda: _inject(adamfx.adam8bit)(LR, min_8bit_size=_C8),
             eight_bit=True, rtol=_F64_RTOL, numpy_reference=lambda p: reference.Adam8bit(LR, min_size=_C8)),
    Contract('inject_adamw8bit',
             lambda: _inject(adamfx.adamw8bit)(LR, min_8bit_size=_C8, **_WD), eight_bit=True,
             rtol=_F64_RTOL, numpy_reference=lambda p: reference.Adam8bit(LR, min_size=_C8, **_WD)),
    Contract('lazy_adam', lambda: adamfx.lazy_adam(LR), lambda: optax.adam(LR), sparse=True),
    Contract('lazy_adam_catch_up', lambda: adamfx.lazy_adam(LR, catch_up=True),
             lambda: optax.adam(LR), sparse=True),
    Contract('lazy_adamw', lambda: adamfx.lazy_adamw(LR, **_WD), lambda: optax.adamw(LR, **_WD),
             sparse=True),
    # NAdam and AMSGrad as flags of lazy Adam (issue 19): on dense gradients, optax's.
    Contract('lazy_nadam', lambda: adamfx.lazy_adam(LR, nesterov=True), lambda: optax.nadam(LR),
             sparse=True),
    Contract('lazy_amsgrad', lambda: adamfx.lazy_adam(LR, amsgrad=True),
             lambda: optax.amsgrad(LR), sparse=True),
    Contract('lazy_nadamw', lambda: adamfx.lazy_adamw(LR, nesterov=True, **_WD),
             lambda: optax.nadamw(LR, **_WD), sparse=True),
    Contract('lazy_amsgrad_8bit', lambda: adamfx.lazy_adam(LR, amsgrad=True, moments=_B8_ROWS),
             eight_bit=True, sparse=True, rtol=_F64_RTOL,
             numpy_reference=lambda p: reference.AMSGrad8bit(LR, min_size=_C8, block_size=64)),
    # The framework-exact builders take real params only, as torch and keras
    # (complex_params=False), and keep 16-bit params' moments in float32.
    Contract('torch_adam', lambda: adamfx.torch_adam(LR), lambda: optax.adam(LR),
             complex_params=False, wide_moments=True),
    Contract('torch_adamw', lambda: adamfx.torch_adamw(LR, **_WD),
             lambda: optax.adamw(LR, **_WD), param_rounded=True, complex_params=False,
             wide_moments=True),
    Contract('keras_adam', lambda: adamfx.keras_adam(LR), complex_params=False,
             wide_moments=True, rtol=_F64_RTOL, numpy_reference=lambda p: reference.KerasAdam(LR)),
    Contract('keras_adamw', lambda: adamfx.keras_adamw(LR, **_WD), complex_params=False,
             wide_moments=True, rtol=_F64_RTOL, numpy_reference=lambda p: reference.KerasAdam(LR, **_WD)),
    Contract('ema_params', lambda: adamfx.ema_params(adamfx.adam(LR)), lambda: optax.adam(LR)),
    # A wrapper: with k = 1 every mini-step updates, so it is held to plain adam
    # (its k > 1 numbers: test_contract_multisteps_matches_optax_multisteps).
    Contract('multisteps_adam',
             lambda: adamfx.MultiSteps(adamfx.adam(LR), 1).gradient_transformation(),
             lambda: optax.adam(LR)),
    # Issue 23's options (adamfx/_core/stable.py); optax has none of them, so their
    # numbers are held to optimi and a float64 transcription in
    # tests/test_stable.py. decouple_lr is AdamW with weight_decay / max_lr:
    # optax.adamw with that decay is its reference here.
    Contract('stable_adamw', lambda: adamfx.stable_adamw(LR, **_WD), rtol=_F64_RTOL, numpy_reference=lambda p: reference.Stable(
             LR, b2=0.99, eps=1e-6, clip=True, **_WD)),
    Contract('adam_cautious', lambda: adamfx.adam(LR, cautious=True),
             rtol=_F64_RTOL, numpy_reference=lambda p: reference.Stable(LR, cautious=True)),
    Contract('adamw_clip', lambda: adamfx.adamw(LR, update_clipping=True, **_WD),
             rtol=_F64_RTOL, numpy_reference=lambda p: reference.Stable(LR, clip=True, **_WD)),
    Contract('adamw_decouple_lr', lambda: adamfx.adamw(LR, weight_decay=1e-3, decouple_lr=True),
             lambda: optax.adamw(LR, weight_decay=1e-3 / LR)),
    Contract('nadamw_stable', lambda: adamfx.nadamw(LR, update_clipping=True, cautious=True,
                                                    decouple_lr=True, max_lr=LR, **_WD),
             rtol=_F64_RTOL, numpy_reference=lambda p: reference.Stable(LR, nesterov=True, clip=True, cautious=True,
                                                              decouple_lr=True, max_lr=LR, **_WD)),
    Contract('amsgrad_stable',
             lambda: adamfx.amsgrad(LR, update_clipping=True, cautious=True),
             rtol=_F64_RTOL, numpy_reference=lambda p: reference.Stable(LR, amsgrad=True, clip=True, cautious=True)),
    # Scaled by the table's learning rate: with unit steps (lr -1) the params jump by
    # O(1) (twice that where the cautious mask halves the kept fraction), the
    # trajectory's float32 rounding compounds through the gradient feedback, and some
    # displacements (sums of steps of both signs) miss _F64_RTOL; x64 agrees either way.
    Contract('scale_by_adam_stable',
             lambda: optax.chain(adamfx.scale_by_adam(update_clipping=True, cautious=True),
                                 optax.scale(-LR)),
             rtol=_F64_RTOL, numpy_reference=lambda p: reference.Stable(LR, clip=True, cautious=True)),
    Contract('adamw8bit_stable',
             lambda: adamfx.adamw8bit(LR, min_8bit_size=_C8, update_clipping=True, cautious=True,
                                      decouple_lr=True, **_WD), eight_bit=True,
             rtol=_F64_RTOL, numpy_reference=lambda p: reference.Stable8bit(
                 LR, min_size=_C8, clip=True, cautious=True, decouple_lr=True, **_WD)),
    Contract('lazy_adamw_stable',
             lambda: adamfx.lazy_adamw(LR, update_clipping=True, cautious=True, **_WD),
             rtol=_F64_RTOL, numpy_reference=lambda p: reference.Stable(LR, clip=True, cautious=True, **_WD)),
    Contract('inject_stable_adamw', lambda: _inject(adamfx.stable_adamw)(LR, **_WD),
             rtol=_F64_RTOL, numpy_reference=lambda p: reference.Stable(LR, b2=0.99, eps=1e-6, clip=True, **_WD)),
    # The framework-exact builders with the options, in their frameworks' arithmetic
    # (adamfx/_porting/conventions.py): a float64 transcription of each, with StableAdamW's
    # clip and the cautious reference code on it (reference.FrameworkStable).
    Contract('torch_adamw_clip', lambda: adamfx.torch_adamw(LR, update_clipping=True, **_WD),
             param_rounded=True, complex_params=False, wide_moments=True, rtol=_F64_RTOL,
             numpy_reference=lambda p: reference.FrameworkStable('torch', LR, clip=True, **_WD)),
    Contract('torch_adam_stable',
             lambda: adamfx.torch_adam(LR, weight_decay=0.1, amsgrad=True, update_clipping=True,
                                       cautious=True),
             complex_params=False, wide_moments=True, rtol=_F64_RTOL,
             numpy_reference=lambda p: reference.FrameworkStable(
                 'torch', LR, l2=0.1, amsgrad=True, clip=True, cautious=True)),
    Contract('keras_adam_cautious', lambda: adamfx.keras_adam(LR, cautious=True),
             complex_params=False, wide_moments=True, rtol=_F64_RTOL,
             numpy_reference=lambda p: reference.FrameworkStable('keras', LR, cautious=True)),
    # Keras' AdamW, like torch's, decays the param first (``p - p * wd * lr``, rounded):
    # its update is a difference of rounded params too (param_rounded).
    Contract('keras_adamw_stable',
             lambda: adamfx.keras_adamw(LR, update_clipping=True, cautious=True, **_WD),
             param_rounded=True, complex_params=False, wide_moments=True, rtol=_F64_RTOL,
             numpy_reference=lambda p: reference.FrameworkStable(
                 'keras', LR, clip=True, cautious=True, **_WD)),
    # param_rounding (issue 20) changes bfloat16/float16 leaves only: the
    # table's float32 trees keep optax's numbers; the mixed-dtype check runs
    # the rounding on its 16-bit leaves. Every builder x mode also runs in
    # tests/test_param_rounding.py (bf16 params, eager == jit, float32 unchanged).
    Contract('adam_kahan', lambda: adamfx.adam(LR, param_rounding='kahan'), lambda: optax.adam(LR)),
    Contract('adam_stochastic', lambda: adamfx.adam(LR, param_rounding='stochastic'),
             lambda: optax.adam(LR)),
    Contract('adam8bit_kahan',
             lambda: adamfx.adam8bit(LR, min_8bit_size=_C8, param_rounding='kahan'),
             eight_bit=True, rtol=_F64_RTOL,
             numpy_reference=lambda p: reference.Adam8bit(LR, min_size=_C8)),
    Contract('lazy_adam_kahan', lambda: adamfx.lazy_adam(LR, param_rounding='kahan'),
             lambda: optax.adam(LR)),
    Contract('torch_adamw_kahan', lambda: adamfx.torch_adamw(LR, param_rounding='kahan', **_WD),
             lambda: optax.adamw(LR, **_WD), param_rounded=True, complex_params=False,
             wide_moments=True),
    Contract('keras_adam_stochastic', lambda: adamfx.keras_adam(LR, param_rounding='stochastic'),
             complex_params=False, wide_moments=True, rtol=_F64_RTOL,
             numpy_reference=lambda p: reference.KerasAdam(LR)),
]
# The default run checks a spread of members, one of each kind (storage format: dense,
# pinned 16-bit, 8-bit, 4-bit, packed; wrapper: inject, MultiSteps; lazy; porting
# builder: torch, Keras; option: mask, stable, param_rounding; the scale_by_ form) in
# the table's cheap checks. The costly ones run on fewer rows: eager, jit, vmap, scan
# and the references, the dtypes and None leaves (~2 CPU seconds a row) on
# _DEFAULT_CORE, float64 on _DEFAULT_X64, and the checks inside other libraries' loops
# (MultiSteps, NNX, Equinox, schedules, injected hyperparameters, the saturating count)
# on _DEFAULT_WRAPPED: a dense, an 8-bit and a lazy member, the core's three step
# paths. Every other row runs every check under the `slow` marker, which .ci/run runs
# (so the whole table is checked there). Keeps the README's `pytest` within minutes.
_DEFAULT_RUN = frozenset({
    'adam', 'adamw_mask', 'scale_by_adam', 'adam_nu_bf16', 'adam8bit', 'pack_adam8bit',
    'inject_adamw', 'torch_adamw', 'keras_adamw', 'multisteps_adam', 'stable_adamw',
    'adamw4bit', 'adam_kahan', 'lazy_adam_8bit',
})
_DEFAULT_CORE = frozenset({
    'adam', 'adamw_mask', 'adam8bit', 'adamw4bit', 'lazy_adam_8bit', 'torch_adamw', 'adam_kahan'})
_DEFAULT_X64 = frozenset({'adam'})
_DEFAULT_WRAPPED = frozenset({'adam', 'adam8bit', 'lazy_adam_8bit'})


def _rows(default, x64=False):
  """The table's rows as the parameter ``c`` (and ``x64``, float32 and float64 runs):
  the rows in ``default`` (and ``_DEFAULT_X64`` under float64) in the default run,
  the others `slow`."""
  modes = ((False, True) if x64 else (None,))
  cases = []
  for mode in modes:
    for c in CONTRACTS:
      wanted = c.name in (_DEFAULT_X64 if mode else default)
      if mode is None:
        cases.append(harness.case(c, id=c.name, default=wanted))
      else:
        cases.append(harness.case(c, mode, id=f'{"x64" if mode else "x32"}-{c.name}',
                                  default=wanted))
  return pytest.mark.parametrize('c, x64' if x64 else 'c', cases)


contracts = _rows(_DEFAULT_RUN)
core_contracts = _rows(_DEFAULT_CORE, x64=True)
wrapped_contracts = _rows(_DEFAULT_WRAPPED)
core_contracts_x32 = _rows(_DEFAULT_CORE)
_BY_NAME = {c.name: c for c in CONTRACTS}


def _params(dtype=jnp.float32, batch=(), small=False):
  """A small nested tree of mixed shapes (and a scalar).

  ``small``: two leaves only, for checks whose compile time grows with the
  number of leaves and that do not need the nesting (vmap, scan).
  """
  rng = np.random.default_rng(0)

  def draw(shape):
    return jnp.asarray(rng.normal(size=batch + shape).astype(np.float32), dtype)

  if small:
    return {'w': draw((3, 4)), 'b': draw(())}
  return {'w': draw((3, 4)), 'b': draw((4,)), 'nested': [draw(())]}


def _grads(params, step):
  """Deterministic gradients of varying sign and scale, shaped like params.

  NumPy-made (no jax.random), so that jitted steps do not compile a PRNG.
  """
  def leaf(i, p):
    rng = np.random.default_rng(1000 * step + i)
    g = rng.normal(size=p.shape).astype(np.float32) * (1.0 + step)
    if jnp.issubdtype(p.dtype, jnp.complexfloating):
      g = g + 1j * rng.normal(size=p.shape).astype(np.float32)
    return jnp.asarray(g, p.dtype)

  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, [leaf(i, p) for i, p in enumerate(leaves)])


def _assert_moved_alike(got, want, start, rtol=_RTOL, atol=1e-6):
  """Compares the displacements ``got - start`` and ``want - start``.

  Params of size O(1) in float32 are rounded to ~6e-8 at each apply_updates,
  so displacements carry ~1e-7 absolute error per step: atol 1e-6 covers ten
  steps, 1e-4 of a displacement of ~1e-2.
  """
  delta = lambda p: jax.tree.map(
      lambda x, x0: np.asarray(x, np.float64) - np.asarray(x0, np.float64), p, start)
  _assert_close(delta(got), delta(want), rtol, atol)


def _assert_close(got, want, rtol=_RTOL, atol=_ATOL):
  jax.tree.map(
      lambda g, w: np.testing.assert_allclose(
          np.asarray(g, np.float64), np.asarray(w, np.float64), rtol=rtol, atol=atol),
      got, want)


def _dtypes(tree):
  return jax.tree.map(lambda x: jnp.asarray(x).dtype, tree)


# ---------------------------------------------------------------------------
# Contracts of every c.


@functools.cache
def _tx(name):
  """A member's transformation, built once: checks that jit its ``update`` on the
  same trees share one compilation (jit caches on the function), which a fresh
  ``make()`` per check would redo."""
  return _BY_NAME[name].make()


@functools.cache
def _stepper(name):
  """``(tx, step)`` for a member: one jitted step, shared by the checks below."""
  tx = _tx(name)

  @jax.jit
  def step(params, state, grads):
    u, state = tx.update(grads, state, params)
    return optax.apply_updates(params, u), u, state

  return tx, step


def _mixed_params(x64, complex_ok=True):
  """One tree with a leaf of every params dtype the contract covers.

  The (2, 150) bfloat16 leaf has >= ``_C8`` elements: 8-bit members quantize
  its moments, the (2, 3) leaves and the scalar stay unquantized.
  """
  base = jnp.array([[0.5, -1.0, 2.0], [0.0, 3.0, -0.25]], jnp.float32)
  tree = {
      'float16': base.astype(jnp.float16),
      'bfloat16': base.astype(jnp.bfloat16),
      'float32': base,
      'big_bfloat16': jnp.tile(base, (1, 50)).astype(jnp.bfloat16),
      'scalar_float32': base[0, 0],
  }
  if x64:
    tree['float64'] = base.astype(jnp.float64)
  if complex_ok:
    tree['complex64'] = jax.lax.complex(base, -base[::-1])
  return tree


_QUANTIZED = 'uint8 codes + float32 scales'


def _moment_kinds(tree):
  """Each moment leaf's dtype, or ``_QUANTIZED`` for an 8-bit QuantizedArray (or 4-bit)."""
  quantized = (adamfx.QuantizedArray, adamfx.Quantized4bit)

  def kind(x):
    if isinstance(x, quantized):
      assert (x.codes.dtype, x.scale.dtype) == (jnp.uint8, jnp.float32), x
      return _QUANTIZED
    return jnp.asarray(x).dtype

  return jax.tree.map(kind, tree, is_leaf=lambda x: isinstance(x, quantized))


def _expected_moment_kinds(c, params, name):
  """What the contract row says moment ``name`` of ``params`` is stored as."""
  pinned = getattr(c, f'{name}_dtype')

  def kind(dtype, size):
    dtype = jnp.dtype(dtype)
    real = jnp.issubdtype(dtype, jnp.floating)
    if c.eight_bit and real and size >= _C8:
      return _QUANTIZED
    if c.wide_moments or c.eight_bit:
      return jnp.dtype(jnp.float32) if real and dtype.itemsize < 4 else dtype
    if pinned is None:
      return dtype
    if name == 'mu' and not real:  # the complex dtype of the pinned precision
      with jax.numpy_dtype_promotion('standard'):
        return jnp.dtype(jnp.promote_types(pinned, jnp.complex64))
    return jnp.dtype(pinned)

  if c.packed and c.eight_bit:
    # Each leaf keeps its tree storage (issue 24): a leaf the tree quantizes
    # gets a buffer of its own, the others share float buffers by dtype
    # (split so that none reaches _C8). Compared as the sorted kinds.
    leaves = jax.tree.leaves(params)
    quantized = [kind(p.dtype, p.size) for p in leaves
                 if jnp.issubdtype(p.dtype, jnp.floating) and p.size >= _C8]
    rest = {str(kind(p.dtype, 0)) for p in leaves
            if not (jnp.issubdtype(p.dtype, jnp.floating) and p.size >= _C8)}
    return ('packed 8-bit', sorted(map(str, quantized)), sorted(rest))
  if c.packed:  # one buffer per dtype, of all that dtype's elements
    sizes = {}
    for p in jax.tree.leaves(params):
      sizes[p.dtype.name] = sizes.get(p.dtype.name, 0) + p.size
    return {k: kind(k, n) for k, n in sizes.items()}
  return jax.tree.map(lambda p: kind(p.dtype, p.size), params)


@core_contracts
def test_dtypes_of_updates_and_state_are_preserved(c, x64):
  """Updates come back in each leaf's dtype; the state keeps its dtypes.

  Leaves of float16, bfloat16, float32, complex64 (and float64 under x64) in
  one tree. State mu/nu are stored as the row says (each leaf's dtype unless
  pinned by mu_dtype/nu_dtype; packed buffers; 8-bit codes); the state's
  dtypes never change; count stays int32; everything stays finite over three
  steps. A member that takes no complex params refuses the complex leaf with
  a TypeError naming it, and runs the rest. Eager steps in the default mode
  (adamfx's eager fast path), jitted ones under x64 (the traced path), where
  the steps after the first reuse its compilation: the state after a step has
  the avals of the state from init (no weak types, no dtype drift).
  """
  with jax.enable_x64(x64):
    if not c.complex_params:
      with pytest.raises(TypeError, match=r"complex64"):
        c.make().init(_mixed_params(x64))
    params = _mixed_params(x64, complex_ok=c.complex_params)
    if x64:
      tx, step = _stepper(c.name)
    else:
      tx = c.make()
      step = lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), u, s))(
          *tx.update(g, s, p))
    state0 = state = tx.init(params)
    updates = []
    for i in range(3):
      params, u, state = step(params, state, _grads(params, i))
      updates.append(u)
      if x64 and i == 0:
        compiled = step._cache_size()
    if x64:
      assert step._cache_size() == compiled, 'the state after a step recompiled the step'
    for u in updates:
      assert _dtypes(u) == _dtypes(params)
      assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
    assert jax.tree.structure(state) == jax.tree.structure(state0)
    assert jax.tree.leaves(_dtypes(state)) == jax.tree.leaves(_dtypes(state0))
    adam_state = _adam_like(state)
    assert adam_state.count.dtype == jnp.int32
    for name in ('mu', 'nu'):
      got = _moment_kinds(getattr(adam_state, name))
      want = _expected_moment_kinds(c, params, name)
      if isinstance(want, tuple):  # ('packed 8-bit', quantized kinds, other kinds)
        kinds = [str(k) for k in got.values()]
        got = (want[0], sorted(k for k in kinds if k == _QUANTIZED),
               sorted({k for k in kinds if k != _QUANTIZED}))
      assert got == want


def _set_counts(state, value):
  """Every ``count`` field in a (nested) optax state set to ``value``.

  (``optax.tree.set`` stops at the outermost match, e.g. the count of
  InjectHyperparamsState, leaving the AdamState's inside untouched.)
  """
  def fix(path, x):
    if path and getattr(path[-1], 'name', None) == 'count':
      return jnp.asarray(value, jnp.int32)
    return x

  return jax.tree_util.tree_map_with_path(fix, state)


def _adam_states(state):
  """Every Adam-like state (a NamedTuple with count, mu, nu) inside ``state``."""
  return [s for s in jax.tree.leaves(state, is_leaf=_is_adam_like) if _is_adam_like(s)]


def _numpy_run(c, params, grads, count=0, move=True):
  """``c.numpy_reference`` from ``params`` over ``grads`` (trees), in float64.

  Returns the final params and the sum of the updates, as trees of float64
  arrays; ``count``: the step count to start from; ``move=False``: every step
  sees the initial params.
  """
  leaves, treedef = jax.tree.flatten(params)
  opt = c.numpy_reference(params)
  opt.init([np.asarray(p, np.float64) for p in leaves])
  opt.t = count
  p = [np.asarray(x, np.float64) for x in leaves]
  total = [np.zeros(x.shape) for x in p]
  for g in grads:
    u = opt.step([np.asarray(x, np.float64) for x in jax.tree.leaves(g)], p)
    p = [a + b for a, b in zip(p, u)] if move else p
    total = [a + b for a, b in zip(total, u)]
  return jax.tree.unflatten(treedef, p), jax.tree.unflatten(treedef, total)


def _reference_params(c, params, grads):
  """The params after ``grads`` (one tree per step) by optax's equivalent, or
  (where optax has none) by the row's float64 NumPy reference."""
  if c.reference is None:
    return _numpy_run(c, params, grads)[0]
  ref = c.reference()
  with optax_promotion():
    state = ref.init(params)
    for g in grads:
      u, state = ref.update(g, state, params)
      params = optax.apply_updates(params, u)
  return params


@contracts
def test_every_row_has_an_independent_reference(c):
  assert (c.reference is None) != (c.numpy_reference is None), (
      f'{c.name}: give the row optax\'s equivalent (reference=) or, where optax has none, '
      'a float64 NumPy transcription (numpy_reference=, tests/reference.py)')


@core_contracts_x32
def test_none_leaves(c):
  """A None in params and gradients stays None in updates and state; the other
  leaves move as optax (or the member) moves them on the tree without the Nones."""
  tx, step = _stepper(c.name)
  params = {'w': jnp.ones((2, 3)), 'frozen': None, 'b': [jnp.zeros(3), None]}
  state = tx.init(params)
  grads = {'w': jnp.full((2, 3), 0.5), 'frozen': None, 'b': [jnp.ones(3), None]}
  for _ in range(2):
    params, u, state = step(params, state, grads)
  assert u['frozen'] is None and u['b'][1] is None
  assert params['frozen'] is None
  for s in _adam_states(state):
    if c.packed:  # one float32 buffer of the 6 + 3 elements that are not None
      assert {k: v.size for k, v in s.mu.items()} == {'float32': 9}
    else:
      assert s.mu['frozen'] is None and s.nu['b'][1] is None
  drop = lambda t: {'w': t['w'], 'b': [t['b'][0]]}
  start = drop({'w': jnp.ones((2, 3)), 'frozen': None, 'b': [jnp.zeros(3), None]})
  want = _reference_params(c, start, [drop(grads)] * 2)
  _assert_moved_alike(drop(params), want, start, c.rtol, c.atol)


@contracts
@pytest.mark.parametrize('empty', [{}, [], ()], ids=['dict', 'list', 'tuple'])
def test_empty_trees(c, empty):
  tx = _tx(c.name)
  state = tx.init(empty)
  u, state = jax.jit(tx.update)(empty, state, empty)
  assert u == empty
  assert int(_adam_like(state).count) == 1


@wrapped_contracts
def test_count_saturates_at_int32_max(c):
  """From count = int32 max - 1, two steps: count stays at the maximum.

  optax increments with ``safe_increment`` too, so the updates at the
  saturated count equal optax's from the same state (members without an
  optax reference: the NumPy reference's, whose count does not saturate, at
  a count where ``b**count`` is 0 either way).
  """
  tx, step = _stepper(c.name)
  params = _params()
  top = jnp.iinfo(jnp.int32).max
  state = _set_counts(tx.init(params), top - 1)
  outs = []
  for i in range(2):
    _, u, state = step(params, state, _grads(params, i))
    outs.append(u)
  assert _adam_states(state)
  for s in _adam_states(state):
    assert int(s.count) == top
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(outs))
  # A param_rounded row's update is a difference of float32-rounded params
  # (``p * (1 - lr * wd)`` rounded first): it carries that rounding, up to
  # half an ulp of the param, which neither optax nor the NumPy reference has.
  atol = max(c.atol * LR, _param_ulps(params, 1)) if c.param_rounded else c.atol * LR
  if c.reference is None:
    _, first = _numpy_run(c, params, [_grads(params, 0)], count=top - 1, move=False)
    _, both = _numpy_run(c, params, [_grads(params, i) for i in range(2)], count=top - 1,
                         move=False)
    ru = jax.tree.map(lambda a, b: a - b, both, first)
    _assert_close(outs[-1], ru, c.rtol, atol)
    return
  ref = c.reference()
  with optax_promotion():
    rs = _set_counts(ref.init(params), top - 1)
    for i in range(2):
      ru, rs = ref.update(_grads(params, i), rs, params)
  _assert_close(outs[-1], ru, c.rtol, atol)


# ---------------------------------------------------------------------------
# Composition with optax combinators, against optax's own equivalent chains.


def _quadratic_run(tx, steps=30, *, reference=False, nan_at=()):
  """Minimises a nested quadratic with ``tx``, one jitted step at a time.

  Returns the params and the state after each step. At the steps in
  ``nan_at`` every gradient element is NaN.
  """
  target = _params()
  params = jax.tree.map(jnp.zeros_like, target)

  def loss(p):
    pairs = zip(jax.tree.leaves(p), jax.tree.leaves(target))
    return sum(jnp.sum(jnp.square(a - b) * (i + 1.0)) for i, (a, b) in enumerate(pairs))

  @jax.jit
  def step(params, state, poison):
    g = jax.tree.map(lambda x: x * poison, jax.grad(loss)(params))
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  ctx = optax_promotion() if reference else contextlib.nullcontext()
  history, states = [], []
  with ctx:
    state = tx.init(params)
    for i in range(steps):
      params, state = step(params, state, jnp.float32(np.nan if i in nan_at else 1.0))
      history.append(params)
      states.append(state)
  return history, states


def test_chain_with_clipping_and_warmup_cosine_schedule():
  sched = optax.warmup_cosine_decay_schedule(0.0, 0.05, 5, 40, 1e-3)
  got, _ = _quadratic_run(optax.chain(optax.clip_by_global_norm(1.0), adamfx.adam(sched)), 40)
  want, _ = _quadratic_run(
      optax.chain(optax.clip_by_global_norm(1.0), optax.adam(sched)), 40, reference=True)
  _assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('inject', [optax.inject_hyperparams, adamfx.inject_hyperparams],
                         ids=['optax', 'adamfx'])
def test_inject_hyperparams_and_change_them_mid_run(inject):
  """Inject lr, b1, b2, eps; change all four after 5 steps.

  Compared with optax.inject_hyperparams(optax.adam) making the same change,
  and with a freshly built adamfx.adam(new values) continuing from the same
  inner state (so the new values, not the old, are what took effect).
  """
  first = dict(learning_rate=0.05, b1=0.9, b2=0.999, eps=1e-8)
  second = dict(learning_rate=0.01, b1=0.5, b2=0.9, eps=1e-3)

  def run(tx, reference):
    ctx = optax_promotion() if reference else contextlib.nullcontext()
    params = _params()
    with ctx:
      state = tx.init(params)
      for i in range(10):
        if i == 5:
          for k, v in second.items():
            state.hyperparams[k] = jnp.asarray(v, state.hyperparams[k].dtype)
        u, state = tx.update(_grads(params, i), state, params)
        params = optax.apply_updates(params, u)
        if i == 4:
          mid = (params, state.inner_state)
    return params, state, mid

  got, state, (p5, inner5) = run(inject(adamfx.adam)(**first), False)
  want, _, _ = run(optax.inject_hyperparams(optax.adam)(**first), True)
  _assert_moved_alike(got, want, _params(), rtol=1e-5)
  for k, v in second.items():
    np.testing.assert_allclose(state.hyperparams[k], v, rtol=1e-7)
  fresh = adamfx.adam(**second)
  p, s = p5, inner5
  for i in range(5, 10):
    u, s = fresh.update(_grads(p, i), s, p)
    p = optax.apply_updates(p, u)
  _assert_moved_alike(got, p, _params(), rtol=1e-6)


def test_adamfx_inject_hyperparams_on_bfloat16_params():
  """adamfx.inject_hyperparams keeps b2 = 0.999 in float32 on bfloat16 params.

  optax's own inject_hyperparams casts b2 to bfloat16 (1.0): the step is NaN
  there; with adamfx.inject_hyperparams it equals the non-injected adamfx.adam
  (same float32 hyperparameters, to one bfloat16 ulp), and adamfx refuses the bfloat16
  decay from optax.inject_hyperparams with a TypeError naming the fix.
  """
  params = _params(jnp.bfloat16)
  grads = _grads(params, 0)
  tx = adamfx.inject_hyperparams(adamfx.adam)(learning_rate=1e-3)
  u, state = jax.jit(tx.update)(grads, tx.init(params), params)
  assert state.hyperparams['b2'].dtype == jnp.float32
  plain = adamfx.adam(1e-3)
  want, _ = jax.jit(plain.update)(grads, plain.init(params), params)
  # Equal to one bfloat16 ulp (up to 2**-7 relative): injected, 1 - b1 is
  # computed in float32 from the float32 b1 (not in Python from 0.9), an ulp
  # apart, which can flip the rounding of the stored bfloat16 mu the update
  # is read off.
  jax.tree.map(
      lambda x, y: np.testing.assert_allclose(
          np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=2.0**-7, atol=0),
      u, want)
  with optax_promotion():
    bad = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
    ou, _ = jax.jit(bad.update)(grads, bad.init(params), params)
  assert not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(ou))
  wrapped = optax.inject_hyperparams(adamfx.adam)(learning_rate=1e-3)
  with pytest.raises(TypeError, match='adamfx.inject_hyperparams'):
    wrapped.update(grads, wrapped.init(params), params)


def test_multisteps():
  # MultiSteps' own code mixes int32 and float under numpy promotion, so it
  # runs under optax_promotion for adamfx too (adamfx inside it is unchanged).
  got, _ = _quadratic_run(optax.MultiSteps(adamfx.adam(0.05), every_k_schedule=3), 12,
                          reference=True)
  want, _ = _quadratic_run(optax.MultiSteps(optax.adam(0.05), every_k_schedule=3), 12,
                           reference=True)
  _assert_close(got, want)
  # Between accumulation boundaries the params do not move.
  np.testing.assert_array_equal(got[0]['w'], 0.0)
  np.testing.assert_array_equal(got[1]['w'], 0.0)
  assert not np.array_equal(got[2]['w'], 0.0)


def test_masked():
  mask = {'w': True, 'b': False, 'nested': [True]}
  got, _ = _quadratic_run(optax.masked(adamfx.adam(0.05), mask), 10)
  want, _ = _quadratic_run(optax.masked(optax.adam(0.05), mask), 10, reference=True)
  _assert_close(got, want)


def test_multi_transform():
  labels = {'w': 'adam', 'b': 'sgd', 'nested': ['adamw']}

  def build(lib):
    return optax.multi_transform(
        {'adam': lib.adam(0.05), 'adamw': lib.adamw(0.05, weight_decay=0.1),
         'sgd': optax.sgd(0.01)}, labels)

  got, _ = _quadratic_run(build(adamfx), 10)
  want, _ = _quadratic_run(build(optax), 10, reference=True)
  _assert_close(got, want)


def test_apply_if_finite_skips_a_nan_step_and_keeps_state():
  """A NaN gradient at step 3: zero update, inner state untouched, then on."""
  def make(lib):
    return optax.apply_if_finite(lib.adam(0.05), max_consecutive_errors=5)

  got, states = _quadratic_run(make(adamfx), 8, nan_at=(3,))
  want, _ = _quadratic_run(make(optax), 8, reference=True, nan_at=(3,))
  _assert_close(got, want)
  jax.tree.map(np.testing.assert_array_equal, got[3], got[2])
  jax.tree.map(np.testing.assert_array_equal, states[3].inner_state, states[2].inner_state)
  assert int(states[3].notfinite_count) == 1 and int(states[4].notfinite_count) == 0
  assert int(states[7].total_notfinite) == 1
  assert not np.array_equal(got[4]['w'], got[3]['w'])  # stepping again
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(got[-1]))


@pytest.mark.usefixtures('x64')
def test_grad_through_unrolled_steps_with_eps_root():
  """d(loss after 6 Adam steps)/d(lr, initial params), float64, eps_root > 0.

  One coordinate has a zero gradient at every step (its target is its
  start), where sqrt(v + eps_root) keeps the derivative finite (with
  eps_root = 0 it is NaN there, in optax as in adamfx: d sqrt(v)/dv = inf
  times dv = 0; checked too, as the reason eps_root exists). Checked
  against central finite differences (h = 1e-6: truncation ~h^2 = 1e-12,
  cancellation ~1e-16 / 1e-6 = 1e-10; rtol 1e-6 covers both) and against
  jax.grad through optax.adam (the same mathematics: rtol 1e-10).
  """
  target = jnp.array([1.0, -2.0, 0.0, 0.5], jnp.float64)
  p0 = jnp.array([0.0, 0.0, 0.0, 0.3], jnp.float64)
  weights = jnp.array([1.0, 0.5, 2.0, 3.0], jnp.float64)
  loss = lambda p: jnp.sum(weights * jnp.square(p - target))

  def unrolled(lib, lr, params, eps_root=1e-8):
    tx = lib.adam(lr, eps_root=eps_root)
    state = tx.init(params)
    for _ in range(6):
      u, state = tx.update(jax.grad(loss)(params), state, params)
      params = optax.apply_updates(params, u)
    return loss(params)

  lr = jnp.float64(0.05)
  f = jax.jit(functools.partial(unrolled, adamfx))
  d_lr, d_p = jax.jit(jax.grad(f, argnums=(0, 1)))(lr, p0)
  assert np.all(np.isfinite(d_p)) and np.isfinite(d_lr)
  h = 1e-6
  fd_lr = (f(lr + h, p0) - f(lr - h, p0)) / (2 * h)
  fd_p = np.array([(f(lr, p0.at[i].add(h)) - f(lr, p0.at[i].add(-h))) / (2 * h)
                   for i in range(4)])
  np.testing.assert_allclose(d_lr, fd_lr, rtol=1e-6)
  np.testing.assert_allclose(d_p, fd_p, rtol=1e-6, atol=1e-9)
  with optax_promotion():
    o_lr, o_p = jax.jit(jax.grad(functools.partial(unrolled, optax), argnums=(0, 1)))(lr, p0)
  np.testing.assert_allclose(d_lr, o_lr, rtol=1e-10)
  np.testing.assert_allclose(d_p, o_p, rtol=1e-10, atol=1e-14)
  no_root = jax.jit(jax.grad(functools.partial(unrolled, adamfx, eps_root=0.0), argnums=1))
  assert np.isnan(no_root(lr, p0)[2])




def _cparams(x64=False, scale=1.0):
  """A quantizable (4, 64) weight and a bias (float64 under x64: a mixed tree)."""
  rng = np.random.default_rng(7)
  return {
      'w': jnp.asarray(scale * rng.normal(size=(4, 64)), jnp.float32),
      'b': jnp.asarray(scale * rng.normal(size=(3,)), jnp.float64 if x64 else jnp.float32),
  }


def _run(tx, params, grads, *, jit):
  """Steps ``tx``; returns the params, the state and the sum of the updates.

  The sum (float64) is what the checks compare: params of size O(1) round
  each step's O(lr) update to their own ulp, the updates are not rounded.
  """
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(params)
  total = jax.tree.map(lambda p: np.zeros(p.shape), params)
  for g in grads:
    u, state = update(g, state, params)
    total = jax.tree.map(lambda t, x: t + np.asarray(x, np.float64), total, u)
    params = optax.apply_updates(params, u)
  return params, state, total


def _same_steps(got, want, rtol=2e-6, atol=1e-9):
  """Sums of updates equal to float32 rounding: ``rtol``, and 8 float32 ulps of
  the largest entry absolute (where steps of opposite signs cancel)."""
  top = max([float(np.max(np.abs(w))) for w in jax.tree.leaves(want) if np.size(w)] + [0.0])
  _assert_close(got, want, rtol, max(atol, 8 * 2.0**-23 * top))


def _param_ulps(params, steps):
  """Two ulps of the largest param per step: the rounding of ``new_p``."""
  return max(2 * steps * float(np.max(np.abs(p))) * float(jnp.finfo(p.dtype).eps)
             for p in jax.tree.leaves(params))


def _contract_grads(params, n=3):
  return [_grads(params, i) for i in range(n)]


@core_contracts
def test_contract_eager_jit_vmap_scan_and_optax(c, x64):
  """Eager == jit == optax or the NumPy reference (x32 and x64); vmap and lax.scan
  == jit (x32)."""
  with jax.enable_x64(x64):
    params = _cparams(x64)
    grads = _contract_grads(params)
    tx = _tx(c.name)
    jitted, state, total = _run(tx, params, grads, jit=True)
    _, _, eager = _run(tx, params, grads, jit=False)
    ulps = _param_ulps(params, len(grads)) if c.param_rounded else 1e-9
    _same_steps(eager, total, atol=ulps)
    assert jax.tree.structure(state) == jax.tree.structure(tx.init(params))
    for leaf in jax.tree.leaves(jitted):
      assert leaf.dtype in (jnp.float32, jnp.float64)
    assert _dtypes(jitted) == _dtypes(params)

    if c.reference is not None:
      with optax_promotion():
        _, _, want = _run(c.reference(), params, grads, jit=True)
    else:
      _, want = _numpy_run(c, params, grads)
    _same_steps(total, want, c.rtol, c.atol)
    if x64:
      return  # vmap and scan trace the same step: once (x32) is enough, for time

    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *grads)

    def body(carry, g):
      p, s = carry
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), u

    _, us = jax.jit(lambda p: jax.lax.scan(body, (p, tx.init(p)), stacked))(params)
    _same_steps(jax.tree.map(lambda u: np.asarray(u, np.float64).sum(0), us), total)

    other = _cparams(x64, scale=3.0)
    batch = jax.tree.map(lambda a, b: jnp.stack([a, b]), params, other)
    bgrads = [jax.tree.map(lambda a, b: jnp.stack([a, -b]), g, g) for g in grads]
    state = jax.vmap(tx.init)(batch)
    vupdate = jax.jit(jax.vmap(tx.update))
    got, vtotal = batch, jax.tree.map(lambda p: np.zeros(p.shape), batch)
    for g in bgrads:
      u, state = vupdate(g, state, got)
      vtotal = jax.tree.map(lambda t, x: t + np.asarray(x, np.float64), vtotal, u)
      got = optax.apply_updates(got, u)
    _, _, second = _run(tx, other, [jax.tree.map(jnp.negative, g) for g in grads], jit=True)
    take = lambda tree, i: jax.tree.map(lambda x: x[i], tree)
    _same_steps(take(vtotal, 0), total)
    _same_steps(take(vtotal, 1), second)


class _Compiles:
  """Counts XLA compilations (``jax.monitoring``) inside a ``with`` block."""

  count = 0
  active = False

  def __enter__(self):
    _Compiles.count, _Compiles.active = 0, True
    return self

  def __exit__(self, *exc):
    _Compiles.active = False


def _on_event(event, duration, **kwargs):
  del duration, kwargs
  if _Compiles.active and event == '/jax/core/compile/backend_compile_duration':
    _Compiles.count += 1


jax.monitoring.register_event_duration_secs_listener(_on_event)


def _set_hyperparams(state, **values):
  """``state`` with new values of ``inject_hyperparams``' hyperparameters."""
  def fix(s):
    if isinstance(s, optax.InjectHyperparamsState):
      hps = dict(s.hyperparams)
      for k, v in values.items():
        if k in hps:
          hps[k] = jnp.asarray(v, hps[k].dtype)
      return s._replace(hyperparams=hps)
    return s

  is_inject = lambda s: isinstance(s, optax.InjectHyperparamsState)
  return jax.tree.map(fix, state, is_leaf=is_inject)


@contracts
def test_contract_no_recompile(c):
  """Jit: the second step reuses the first's compilation. Eager: steps with new
  gradient values (and, injected, new hyperparameter values) compile nothing."""
  params = _cparams()
  tx = _tx(c.name)
  step = jax.jit(tx.update)
  state = tx.init(params)
  grads = _contract_grads(params, 4)
  hps = [dict(learning_rate=LR * (1 + i), b1=0.9 - 0.01 * i, b2=0.999 - 1e-4 * i)
         for i in range(4)]
  hps = [{k: np.float32(v) for k, v in h.items()} for h in hps]
  _, s = step(grads[0], state, params)
  compiled = step._cache_size()
  for g in grads[1:]:
    _, s = step(g, s, params)
  assert step._cache_size() == compiled
  _, state = tx.update(grads[0], _set_hyperparams(state, **hps[0]), params)
  jax.block_until_ready(state)
  with _Compiles() as compiles:
    for g, h in zip(grads[1:], hps[1:]):
      _, state = tx.update(g, _set_hyperparams(state, **h), params)
    jax.block_until_ready(state)
  assert compiles.count == 0, f'{compiles.count} compilations in 3 eager steps'


def _adam_like(state):
  found = [s for s in jax.tree.leaves(state, is_leaf=_is_adam_like) if _is_adam_like(s)]
  assert found, f'no Adam-like state in {type(state).__name__}'
  return found[0]


def _is_adam_like(x):
  return isinstance(x, tuple) and {'count', 'mu', 'nu'} <= set(getattr(x, '_fields', ()))


@wrapped_contracts
def test_contract_flax_nnx_optimizer(c):
  """Several steps of nnx.Optimizer equal the same steps written with tx.update."""
  from flax import nnx

  class Model(nnx.Module):
    def __init__(self, p):
      self.w = nnx.Param(p['w'])
      self.b = nnx.Param(p['b'])

  params = _cparams()
  grads = _contract_grads(params, 4)
  model = Model(params)
  opt = nnx.Optimizer(model, c.make(), wrt=nnx.Param)
  for g in grads:
    # A linear loss whose gradient is g, taken the NNX way.
    loss = lambda m, g=g: jnp.sum(m.w[...] * g['w']) + jnp.sum(m.b[...] * g['b'])
    opt.update(model, nnx.grad(loss)(model))
  want, _, _ = _run(_tx(c.name), params, grads, jit=False)
  _assert_moved_alike({'w': model.w[...], 'b': model.b[...]}, want, params)  # params round to their ulp: 1e-6
  # The optimizer's own state counted every step (not the plain run's).
  counts = [int(x) for path, x in jax.tree_util.tree_leaves_with_path(nnx.state(opt, nnx.OptState))
            if any(getattr(k, 'key', None) == 'count' for k in path)]
  assert counts and set(counts) == {len(grads)}, counts


@wrapped_contracts
def test_contract_equinox_loop(c):
  """An eqx.filter_jit training loop over an Equinox module."""
  import equinox as eqx

  class Model(eqx.Module):
    w: jax.Array
    b: jax.Array

  params = _cparams()
  grads = _contract_grads(params, 3)
  tx = _tx(c.name)
  model = Model(params['w'], params['b'])
  state = tx.init(eqx.filter(model, eqx.is_inexact_array))

  @eqx.filter_jit
  def step(model, state, g):
    g = Model(g['w'], g['b'])
    u, state = tx.update(g, state, eqx.filter(model, eqx.is_inexact_array))
    return eqx.apply_updates(model, u), state

  for g in grads:
    model, state = step(model, state, g)
  # The same steps on the same tree (a packed state's blocks follow leaf order).
  as_model = lambda p: Model(p['w'], p['b'])
  want, _, _ = _run(tx, as_model(params), [as_model(g) for g in grads], jit=True)
  _assert_moved_alike(model, want, as_model(params))  # params round to their ulp: 1e-6


@contracts
def test_contract_checkpoint_round_trips(c, tmp_path):
  """npz and orbax: the restored state continues exactly as the original."""
  params = _cparams()
  grads = _contract_grads(params, 3)
  tx = _tx(c.name)
  step = jax.jit(tx.update)
  state = tx.init(params)
  for g in grads[:2]:
    _, state = step(g, state, params)
  want, _ = step(grads[2], state, params)
  for save, restore, path in [
      (adamfx.save_npz, adamfx.restore_npz, tmp_path / 'state.npz'),
      (adamfx.save_orbax, adamfx.restore_orbax, tmp_path / 'orbax'),
  ]:
    save(path, state)
    back = restore(path, tx.init(params))
    assert jax.tree.structure(back) == jax.tree.structure(state)
    jax.tree.map(np.testing.assert_array_equal, back, state)
    got, _ = step(grads[2], back, params)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def _bad_gradient_trees(params):
  w, b = params['w'], params['b']
  return {
      'reshaped': {'w': w.reshape(64, 4), 'b': b},
      'swapped': {'w': jnp.ones(3), 'b': jnp.ones((4, 64))},
      'missing': {'w': w},
      'extra': {'w': w, 'b': b, 'c': b},
      'flattened': {'w': jnp.concatenate([w.reshape(-1)[:-3], b])},
  }


@contracts
@pytest.mark.parametrize('jit', [False, True], ids=['eager', 'jit'])
def test_contract_bad_gradient_trees_are_refused(c, jit):
  """Gradients not shaped like the params: a ValueError/TypeError, never a result."""
  params = _cparams()
  tx = _tx(c.name)
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  for what, g in _bad_gradient_trees(params).items():
    with pytest.raises((ValueError, TypeError)) as info:
      update(g, state, params)
    assert 'jax' not in type(info.value).__module__, (what, info.value)


@wrapped_contracts
def test_contract_multisteps_matches_optax_multisteps(c):
  """adamfx.MultiSteps and optax.MultiSteps around the same member: the same steps.

  k = 2, 4 mini-steps (two updates), jitted. Both average with Welford's
  mean in float32 and call the member once per update on it, so the sums of
  updates agree to float32 rounding (``_same_steps``), and params stay put
  between updates.
  """
  params = _cparams()
  grads = _contract_grads(params, 4)
  got_p, state, got = _run(adamfx.MultiSteps(c.make(), 2).gradient_transformation(), params,
                           grads, jit=True)
  with optax_promotion():
    want_p, want_state, want = _run(optax.MultiSteps(c.make(), 2).gradient_transformation(),
                                    params, grads, jit=True)
  ulps = _param_ulps(params, 2) if c.param_rounded else 1e-9
  _same_steps(got, want, atol=ulps)
  assert int(state.gradient_step) == int(want_state.gradient_step) == 2
  assert jax.tree.structure(state.inner_opt_state) == jax.tree.structure(
      want_state.inner_opt_state)


# ---------------------------------------------------------------------------
# Issue 18: the compositions users write around each member.


_SPARSE_IDS = (0, 3, 3)


def _member_grads(c, params, step):
  """Dense contract gradients; for a sparse member, a RowSparse for 'w'
  (rows 0 and 3, row 3 twice)."""
  g = _grads(params, step)
  if c.sparse:
    g['w'] = adamfx.RowSparse(jnp.asarray(_SPARSE_IDS, jnp.int32), g['w'][:3], 4)
  return g


def _dense(tree):
  is_rs = lambda x: isinstance(x, adamfx.RowSparse)
  return jax.tree.map(lambda x: np.asarray(x.todense() if is_rs(x) else x, np.float64), tree,
                      is_leaf=is_rs)


@wrapped_contracts
def test_contract_schedule_in_a_chain_after_it_and_tree_arithmetic(c):
  """A schedule chained after the member (optax.scale_by_schedule) scales
  its updates by the schedule's value at each step -- on RowSparse updates
  too, the rows unmoved -- and gradients summed with a tree map (two halves)
  step as the whole; a sparse member's gradients summed over different ids
  are refused eagerly (NumPy products and sums of the member's own updates
  are the reference)."""
  sched = lambda count: 1.0 / (1.0 + count.astype(jnp.float32))
  params = _cparams()
  chained = optax.chain(c.make(), optax.scale_by_schedule(sched))
  plain = _tx(c.name)
  c_up, p_up = jax.jit(chained.update), jax.jit(plain.update)
  cs, ps, hs = chained.init(params), plain.init(params), plain.init(params)
  for t in range(2):
    g = _member_grads(c, params, t)
    half = jax.tree.map(lambda x: 0.5 * x, g)
    cu, cs = c_up(g, cs, params)
    pu, ps = p_up(g, ps, params)
    hu, hs = p_up(jax.tree.map(jnp.add, half, half), hs, params)
    jax.tree.map(lambda a, b, t=t: np.testing.assert_allclose(a, b / (1 + t), rtol=1e-6, atol=0),
                 _dense(cu), _dense(pu))
    jax.tree.map(np.testing.assert_array_equal, _dense(hu), _dense(pu))
  if c.sparse:
    rows = set(np.flatnonzero(np.abs(_dense(cu)['w']).sum(1)).tolist())
    assert rows <= set(_SPARSE_IDS)
    other = adamfx.RowSparse(jnp.asarray([1, 2, 0], jnp.int32), jnp.ones((3, 64)), 4)
    with pytest.raises(ValueError, match='ids were treated as numbers'):
      jax.tree.map(jnp.add, g['w'], other)


# Each member's builder and the arguments its contract row passes, for the
# inject_hyperparams check; wrappers (pack_state, inject_hyperparams,
# ema_params) and pinned-dtype rows reuse a row of their builder.
_BUILDERS = {
    'adam': (adamfx.adam, {}), 'nadam': (adamfx.nadam, {}), 'amsgrad': (adamfx.amsgrad, {}),
    'adamw': (adamfx.adamw, _WD), 'adamw_mask': (adamfx.adamw, dict(mask=_MASK, **_WD)),
    'nadamw': (adamfx.nadamw, _WD), 'adamax': (adamfx.adamax, {}),
    'adamaxw': (adamfx.adamaxw, _WD),
    'scale_by_adam': (adamfx.scale_by_adam, {}), 'scale_by_adamax': (adamfx.scale_by_adamax, {}),
    'adam8bit': (adamfx.adam8bit, dict(min_8bit_size=_C8)),
    'adamw8bit': (adamfx.adamw8bit, dict(min_8bit_size=_C8, **_WD)),
    'scale_by_adam8bit': (adamfx.scale_by_adam8bit, dict(min_8bit_size=_C8)),
    'lazy_adam': (adamfx.lazy_adam, {}), 'lazy_adam_catch_up': (adamfx.lazy_adam, dict(catch_up=True)),
    'lazy_adamw': (adamfx.lazy_adamw, _WD),
    'lazy_nadam': (adamfx.lazy_adam, dict(nesterov=True)),
    'lazy_amsgrad': (adamfx.lazy_adam, dict(amsgrad=True)),
    'lazy_nadamw': (adamfx.lazy_adamw, dict(nesterov=True, **_WD)),
    'lazy_amsgrad_8bit': (adamfx.lazy_adam, dict(amsgrad=True, moments=_B8_ROWS)),
    'torch_adam': (adamfx.torch_adam, {}), 'torch_adamw': (adamfx.torch_adamw, _WD),
    'keras_adam': (adamfx.keras_adam, {}), 'keras_adamw': (adamfx.keras_adamw, _WD),
    'stable_adamw': (adamfx.stable_adamw, _WD),
    'amsgrad_8bit': (adamfx.amsgrad, dict(moments=_B8)),
    'nadamw_8bit': (adamfx.nadamw, dict(moments=_B8, **_WD)),
    'adamw_8bit': (adamfx.adamw, dict(moments=_B8, **_WD)),
    'lazy_adam_8bit': (adamfx.lazy_adam, dict(moments=_B8_ROWS)),
    'adam_kahan': (adamfx.adam, dict(param_rounding='kahan')),
    'adam_stochastic': (adamfx.adam, dict(param_rounding='stochastic')),
    'adam8bit_kahan': (adamfx.adam8bit, dict(min_8bit_size=_C8, param_rounding='kahan')),
    'lazy_adam_kahan': (adamfx.lazy_adam, dict(param_rounding='kahan')),
    'torch_adamw_kahan': (adamfx.torch_adamw, dict(param_rounding='kahan', **_WD)),
    'keras_adam_stochastic': (adamfx.keras_adam, dict(param_rounding='stochastic')),
    'adam4bit': (adamfx.adam4bit, dict(min_4bit_size=_C8)),
    'adamw4bit': (adamfx.adamw4bit, dict(min_4bit_size=_C8, **_WD)),
    'amsgrad_4bit': (adamfx.amsgrad, dict(moments=_B4)),
    'nadam_4bit': (adamfx.nadam, dict(moments=_B4)),
    'lazy_adam_4bit': (adamfx.lazy_adam, dict(moments=_B4)),
    'adam_cautious': (adamfx.adam, dict(cautious=True)),
    'adamw_clip': (adamfx.adamw, dict(update_clipping=True, **_WD)),
    'adamw_decouple_lr': (adamfx.adamw, dict(weight_decay=1e-3, decouple_lr=True, max_lr=LR)),
    'nadamw_stable': (adamfx.nadamw, dict(update_clipping=True, cautious=True, decouple_lr=True,
                                          max_lr=LR, **_WD)),
    'amsgrad_stable': (adamfx.amsgrad, dict(update_clipping=True, cautious=True)),
    'scale_by_adam_stable': (adamfx.scale_by_adam, dict(update_clipping=True, cautious=True)),
    'adamw8bit_stable': (adamfx.adamw8bit, dict(min_8bit_size=_C8, update_clipping=True,
                                                cautious=True, decouple_lr=True, max_lr=LR,
                                                **_WD)),
    'lazy_adamw_stable': (adamfx.lazy_adamw, dict(update_clipping=True, cautious=True, **_WD)),
    'torch_adamw_clip': (adamfx.torch_adamw, dict(update_clipping=True, **_WD)),
    'torch_adam_stable': (adamfx.torch_adam, dict(weight_decay=0.1, amsgrad=True,
                                                  update_clipping=True, cautious=True)),
    'keras_adam_cautious': (adamfx.keras_adam, dict(cautious=True)),
    'keras_adamw_stable': (adamfx.keras_adamw, dict(update_clipping=True, cautious=True, **_WD)),
}
_REUSES = {'adam_mu_bf16': 'adam', 'adam_nu_bf16': 'adam', 'pack_adam': 'adam',
           'pack_adamw': 'adamw', 'pack_amsgrad': 'amsgrad', 'pack_adam8bit': 'adam8bit',
           'ema_params': 'adam', 'multisteps_adam': 'adam',
           'inject_stable_adamw': 'stable_adamw', 'inject_adam4bit': 'adam4bit', **{f'inject_{n}': n for n in
                                   ('adam', 'nadam', 'amsgrad', 'adamw', 'nadamw', 'adamax',
                                    'adam8bit', 'adamw8bit')}}


def _schedule_for(name, value):
  """A schedule of a hyperparameter that stays in its valid range."""
  v = float(value)
  if name in ('b1', 'b2', 'beta_1', 'beta_2'):
    return optax.linear_schedule(v, 0.95 * v, 3)
  if name in ('lr', 'learning_rate', 'weight_decay'):
    return optax.linear_schedule(v, 0.5 * v, 3)
  return optax.linear_schedule(v, 2 * v + 1e-8, 3)  # eps, eps_root, epsilon


@wrapped_contracts
def test_contract_inject_hyperparams_with_a_schedule_on_every_numeric_hyperparameter(c):
  """adamfx.inject_hyperparams takes a schedule for every numeric
  hyperparameter of the member's builder (all at once), and steps as
  optax.inject_hyperparams of the same builder (its numbers: the reference)."""
  import inspect

  assert c.name in _BUILDERS or c.name in _REUSES, f'add {c.name} to _BUILDERS or _REUSES'
  builder, kwargs = _BUILDERS[_REUSES.get(c.name, c.name)]
  sig = inspect.signature(builder)
  # optax's wrapper injects every argument it is given unless told (the
  # structural ones adamfx keeps static by itself; 8-bit's block_size: issue 18 item 9).
  static = tuple(k for k in ('mask', 'catch_up', 'min_8bit_size', 'min_4bit_size', 'block_size')
                 if k in sig.parameters)
  scheds = {}
  for name, param in sig.parameters.items():
    if name in static:
      continue
    value = kwargs.get(name, param.default)
    if name in ('learning_rate', 'lr') and value is inspect.Parameter.empty:
      value = LR
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      scheds[name] = _schedule_for(name, value)
  assert scheds, f'{c.name}: no numeric hyperparameter found'
  other = {k: v for k, v in kwargs.items() if k not in scheds}
  params = _cparams()
  got_tx = adamfx.inject_hyperparams(builder)(**scheds, **other)
  want_tx = optax.inject_hyperparams(builder, static_args=static)(
      **scheds, **other)
  outs = []
  for tx in (got_tx, want_tx):
    update = jax.jit(tx.update)
    with optax_promotion():  # optax's schedules mix int and float
      s, p = tx.init(params), params
      for t in range(3):
        u, s = update(_member_grads(_BY_NAME[_REUSES.get(c.name, c.name)], p, t), s, p)
        p = optax.apply_updates(p, u)
    outs.append((p, s))
  _assert_moved_alike(outs[0][0], outs[1][0], params, rtol=2e-6)
  for name in scheds:  # the schedules' values, as optax's wrapper holds them
    np.testing.assert_allclose(outs[0][1].hyperparams[name], outs[1][1].hyperparams[name],
                               rtol=1e-6)


def test_default_run_names_contract_rows():
  for rows in (_DEFAULT_RUN, _DEFAULT_CORE, _DEFAULT_X64, _DEFAULT_WRAPPED):
    assert rows <= set(_BY_NAME), sorted(rows - set(_BY_NAME))
  assert _DEFAULT_X64 <= _DEFAULT_CORE <= _DEFAULT_RUN and _DEFAULT_WRAPPED <= _DEFAULT_CORE
