"""torch ``optimizer.state_dict()`` to and from :class:`FrameworkAdamState`.

A torch Adam/AdamW run continues in JAX with :func:`torch_adam` /
:func:`torch_adamw` from the state :func:`from_torch_state` reads, with the
same numbers; :func:`to_torch_state` writes a state dict that
``optimizer.load_state_dict`` takes back. torch's parameter ``i``, counted
over its param groups in order, is the ``i``-th leaf of
``jax.tree.leaves(params)``. torch is imported only by :func:`to_torch_state`
(which must build torch tensors); :func:`from_torch_state` also takes NumPy
arrays.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adamfx._core import checks as _checks
from adamfx._core import numerics as _numerics
from adamfx._porting.conventions import FrameworkAdamState

__all__ = ['from_torch_state', 'to_torch_state']

_is_state = lambda x: isinstance(x, FrameworkAdamState)


def _to_numpy(value: Any, what: str) -> np.ndarray:
  """A torch tensor (any device, bfloat16 included) or array-like as NumPy."""
  if hasattr(value, 'detach') and hasattr(value, 'cpu'):  # a torch tensor
    value = value.detach().cpu()
    name = str(value.dtype).replace('torch.', '')
    if name == 'bfloat16':
      return value.float().numpy().astype(jnp.bfloat16)  # exact
    return value.numpy()
  try:
    return np.asarray(value)
  except Exception as e:  # noqa: BLE001
    raise TypeError(f'{what} is not an array or torch tensor: {value!r}.') from e


def _dtype_of(p: Any) -> np.dtype:
  dtype = getattr(p, 'dtype', None)
  return np.dtype(np.result_type(p) if dtype is None else dtype)


def _torch_indices(state_dict: Mapping[str, Any]) -> list[Any]:
  if not isinstance(state_dict, Mapping) or 'state' not in state_dict:
    raise TypeError(
        '`state_dict` must be a torch optimizer.state_dict(): a dict with'
        f' "state" and "param_groups", got {type(state_dict).__name__}.'
    )
  groups = state_dict.get('param_groups')
  if groups is None:
    return sorted(state_dict['state'])
  return [i for g in groups for i in g['params']]


def _find_state(tree: Any, what: str) -> FrameworkAdamState:
  found = [x for x in jax.tree.leaves(tree, is_leaf=_is_state) if _is_state(x)]
  if len(found) != 1:
    raise ValueError(
        f'`{what}` must hold exactly one FrameworkAdamState (the state of'
        ' adamfx.torch_adam / torch_adamw, possibly inside a chain), found'
        f' {len(found)}.'
    )
  return found[0]


def _packed_layout(into: Any) -> Any:
  """The params layout when ``into``'s FrameworkAdamState sits inside
  :func:`adamfx.pack_state` (its moments are per-dtype buffers), else None."""
  from adamfx._wrappers.flat import PackedState  # pylint: disable=import-outside-toplevel

  is_packed = lambda x: isinstance(x, PackedState)
  for node in jax.tree.leaves(into, is_leaf=is_packed):
    if is_packed(node) and any(_is_state(x) for x in jax.tree.leaves(node.inner, is_leaf=_is_state)):
      return node.layout
  return None


def from_torch_state(
    state_dict: Mapping[str, Any], params: Any, *, into: Any = None
) -> Any:
  """Reads a torch Adam/AdamW ``optimizer.state_dict()`` as adamfx state.

  Maps ``step`` to ``count`` and ``exp_avg``, ``exp_avg_sq`` and
  ``max_exp_avg_sq`` to ``mu``, ``nu`` and ``nu_max``; torch's parameter
  ``i`` (in param-group order) is the ``i``-th leaf of
  ``jax.tree.leaves(params)``. :func:`torch_adam` / :func:`torch_adamw`
  (with torch's hyperparameters) then continue the run with torch's numbers.

  Args:
    state_dict: ``optimizer.state_dict()`` of ``torch.optim.Adam`` or
      ``AdamW``; its tensors may also be NumPy arrays. A state dict of an
      optimizer that has not stepped yet (no entries in ``state``) gives
      zero moments and count 0, as in torch. adamfx keeps one step count for
      all params, so a mix of stepped params and params torch never stepped
      (frozen for a while, added later) is refused with a ``ValueError``.
    params: the JAX params, a tree whose leaves match torch's params in
      order, shape and dtype.
    into: optional, the state of a transformation that holds a
      ``torch_adam``/``torch_adamw`` state (e.g. ``optax.chain(...).init(params)``,
      ``ema_params(...)``'s or ``pack_state(...)``'s); the result is ``into``
      with that part replaced, its moments in ``into``'s dtypes and layout
      (packed buffers under ``pack_state``).

  Returns:
    A :class:`FrameworkAdamState` (moments in the params' dtype, at least
    float32; ``nu_max`` when the state dict has ``max_exp_avg_sq`` or its
    group says ``amsgrad``), or ``into`` updated.

  Raises:
    ValueError: a different number of params, a shape or dtype that does not
      match, steps that differ between params; the message names the torch
      index and the JAX leaf path.
    TypeError: ``state_dict`` is not an optimizer state dict.
  """
  indices = _torch_indices(state_dict)
  torch_state = state_dict['state']
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  if len(indices) != len(leaves_with_path):
    raise ValueError(
        f'The torch state dict has {len(indices)} params (in its param_groups),'
        f' but `params` has {len(leaves_with_path)} leaves: parameter i in torch'
        ' must be leaf i of jax.tree.leaves(params).'
    )
  groups = state_dict.get('param_groups') or []
  amsgrad = any(g.get('amsgrad', False) for g in groups) or any(
      'max_exp_avg_sq' in s for s in torch_state.values()
  )
  target = None if into is None else _find_state(into, 'into')
  layout = None if into is None else _packed_layout(into)
  steps = {}
  mu, nu, nu_max = [], [], []
  for k, (index, (path, p)) in enumerate(zip(indices, leaves_with_path)):
    name = _checks._leaf_name(path)
    p_shape = tuple(np.shape(p))
    p_dtype = _dtype_of(p)
    cdt = _numerics.compute_dtype(p_dtype)
    if target is not None and layout is not None:  # pack_state: one buffer per params dtype
      cdt = target.mu[np.dtype(jax.dtypes.canonicalize_dtype(p_dtype)).name].dtype
    elif target is not None:
      cdt = jax.tree.leaves(target.mu)[k].dtype
    entry = torch_state.get(index)
    if entry is None or len(entry) == 0:
      zeros = np.zeros(p_shape, cdt)
      mu.append(zeros)
      nu.append(zeros)
      nu_max.append(zeros)
      steps[index] = 0
      continue
    step = float(_to_numpy(entry['step'], f'torch param {index} step'))
    if step != int(step) or step < 0:
      raise ValueError(f'torch param {index} (JAX leaf {name}) has step {step}, not a count.')
    steps[index] = int(step)
    keys = ['exp_avg', 'exp_avg_sq'] + (['max_exp_avg_sq'] if amsgrad else [])
    outs = (mu, nu, nu_max)
    for key, out in zip(keys, outs):
      if key not in entry:
        raise ValueError(f'torch param {index} (JAX leaf {name}) has no {key!r}.')
      arr = _to_numpy(entry[key], f'torch param {index} {key}')
      if arr.shape != p_shape:
        raise ValueError(
            f'torch param {index} {key} has shape {arr.shape}, but JAX leaf {name}'
            f' has shape {p_shape}.'
        )
      if arr.dtype != p_dtype:
        raise ValueError(
            f'torch param {index} {key} has dtype {arr.dtype.name}, but JAX leaf'
            f' {name} has dtype {p_dtype.name}: convert the params or the torch'
            ' model so that they agree.'
        )
      out.append(arr.astype(cdt))
  counts = set(steps.values())
  if len(counts) > 1:
    first = next(iter(steps))
    odd = next(i for i in steps if steps[i] != steps[first])
    raise ValueError(
        f'torch params took different numbers of steps (param {first}:'
        f' {steps[first]}, param {odd}: {steps[odd]}); adamfx keeps one count'
        ' for all params.'
    )
  count = counts.pop() if counts else 0
  if count > np.iinfo(np.int32).max:
    raise ValueError(f'torch step {count} does not fit adamfx\'s int32 count.')

  def place(values, ref):
    if ref is None:
      return jax.tree.unflatten(treedef, [jnp.asarray(v) for v in values])
    if layout is not None:  # into pack_state(torch_adam(...))'s buffers, in packing order
      groups: dict[str, list[Any]] = {}
      for v, (_, _, dtype) in zip(values, layout[1]):
        groups.setdefault(np.dtype(dtype).name, []).append(np.ravel(v))
      return {k: jax.device_put(jnp.asarray(np.concatenate(groups[k]), r.dtype),
                                getattr(r, 'sharding', None)) for k, r in ref.items()}
    return jax.tree.map(
        lambda v, r: jax.device_put(jnp.asarray(v, r.dtype), getattr(r, 'sharding', None)),
        jax.tree.unflatten(treedef, values), ref,
    )

  new = FrameworkAdamState(
      count=jnp.asarray(count, jnp.int32),
      mu=place(mu, None if target is None else target.mu),
      nu=place(nu, None if target is None else target.nu),
      nu_max=None,
  )
  if target is not None:
    if (target.nu_max is None) == amsgrad:
      raise ValueError(
          f'The torch state {"has" if amsgrad else "has no"} amsgrad maximum, but'
          f' `into` was initialised with amsgrad={not amsgrad}.'
      )
    if amsgrad:
      new = new._replace(nu_max=place(nu_max, target.nu_max))
    return jax.tree.map(lambda x: new if _is_state(x) else x, into, is_leaf=_is_state)
  if amsgrad:
    new = new._replace(nu_max=place(nu_max, None))
  return new


def to_torch_state(
    state: Any,
    params: Any,
    *,
    param_groups: Sequence[Mapping[str, Any]] | None = None,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
) -> dict[str, Any]:
  """Writes a :func:`torch_adam` / :func:`torch_adamw` state as a torch state dict.

  The result loads with ``optimizer.load_state_dict`` into a
  ``torch.optim.Adam``/``AdamW`` over the same params (leaf ``i`` of
  ``jax.tree.leaves(params)`` is torch's parameter ``i``), which then
  continues with the same numbers. Needs torch.

  Args:
    state: a :class:`FrameworkAdamState`, or a state holding exactly one.
    params: the JAX params the state belongs to (moments are written in
      their dtypes, as torch keeps them).
    param_groups: the torch optimizer's own ``optimizer.state_dict()['param_groups']``
      (recommended: load_state_dict replaces the optimizer's
      hyperparameters with the dict's); their ``params`` lists must count
      as many params as ``params`` has leaves. Without it, one group is
      written from the keyword arguments below.
    lr, betas, eps, weight_decay, maximize, decoupled_weight_decay: the one
      group's hyperparameters (torch's names and defaults; ``amsgrad`` is
      read from the state). For AdamW pass ``weight_decay`` and
      ``decoupled_weight_decay=True``.

  Returns:
    ``{'state': {i: {'step', 'exp_avg', 'exp_avg_sq'[, 'max_exp_avg_sq']}},
    'param_groups': [...]}`` with torch tensors.

  Raises:
    ImportError: torch is not installed.
    ValueError: ``params`` does not match the state, or ``param_groups``
      counts another number of params.
  """
  try:
    import torch
  except ImportError as e:  # pragma: no cover - torch is optional
    raise ImportError('to_torch_state needs torch: pip install torch.') from e
  s = _find_state(state, 'state')
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  fields = {'exp_avg': s.mu, 'exp_avg_sq': s.nu}
  if s.nu_max is not None:
    fields['max_exp_avg_sq'] = s.nu_max
  flat = {}
  for key, tree in fields.items():
    leaves = jax.tree.leaves(tree)
    if len(leaves) != len(leaves_with_path):
      raise ValueError(
          f'`params` has {len(leaves_with_path)} leaves but state {key} has {len(leaves)}.'
      )
    flat[key] = leaves
  n = len(leaves_with_path)
  if param_groups is None:
    param_groups = [{
        'lr': lr, 'betas': tuple(betas), 'eps': eps, 'weight_decay': weight_decay,
        'amsgrad': s.nu_max is not None, 'maximize': maximize, 'foreach': None,
        'capturable': False, 'differentiable': False, 'fused': None,
        'decoupled_weight_decay': decoupled_weight_decay, 'params': list(range(n)),
    }]
  else:
    param_groups = [dict(g) for g in param_groups]
  indices = [i for g in param_groups for i in g['params']]
  if len(indices) != n:
    raise ValueError(
        f'`param_groups` count {len(indices)} params but `params` has {n} leaves.'
    )
  count = float(np.asarray(jax.device_get(s.count)))
  out = {}
  for k, (index, (path, p)) in enumerate(zip(indices, leaves_with_path)):
    p_dtype = _dtype_of(p)
    entry = {'step': torch.tensor(count)}
    for key, leaves in flat.items():
      arr = np.asarray(jax.device_get(leaves[k]))
      if arr.shape != tuple(np.shape(p)):
        raise ValueError(
            f'state {key} leaf {_checks._leaf_name(path)} has shape {arr.shape},'
            f' but the param has shape {tuple(np.shape(p))} (torch param {index}).'
        )
      if p_dtype == jnp.bfloat16:
        entry[key] = torch.from_numpy(arr.astype(np.float32)).to(torch.bfloat16)
      else:
        entry[key] = torch.from_numpy(arr.astype(p_dtype).copy())
    out[index] = entry
  return {'state': out, 'param_groups': param_groups}
