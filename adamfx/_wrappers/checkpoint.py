"""Save and restore optimiser state: orbax-checkpoint, plain NumPy ``.npz``, optax.

A checkpoint is read back *into a target*: a pytree of arrays or
``jax.ShapeDtypeStruct`` with the structure, shapes, dtypes and shardings the
caller wants (typically ``tx.init(params)`` or ``jax.eval_shape(tx.init,
params)``). Leaves are matched by their path in the tree (``0/mu/w`` for
``state[0].mu['w']``), not by their order, so a state saved from
``optax.adam`` restores into :func:`adamfx.adam` (same fields, see
:class:`adamfx.AdamState`). Every difference -- a leaf missing on either side,
another shape or dtype, a checksum that does not match -- raises a
``ValueError`` naming the leaf; nothing is cast, padded or dropped silently.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_NPZ_META = '__adamfx_meta__'
_FORMAT = 'adamfx-checkpoint'
_VERSION = 1


class CheckpointError(ValueError):
  """A checkpoint is unreadable, corrupt, or does not match its target."""


# ----------------------------------------------------------------- tree paths


def _key_part(key: Any) -> str:
  """One path component, with '%' and '/' escaped so that paths are unambiguous.

  ``{'a/b': x}`` and ``{'a': {'b': y}}`` must not both be ``a/b``.
  """
  for attr in ('key', 'idx', 'name'):
    if hasattr(key, attr):
      key = getattr(key, attr)
      break
  return str(key).replace('%', '%25').replace('/', '%2F')


# The code map of 8-bit moments, recorded with every checkpoint that holds
# them: a change of the map (or of the block size) changes what codes mean.
_CODE_MAP = 'bitsandbytes-dynamic-7bit-exponent-v1'


def _configs(tree: Any) -> dict[str, dict[str, Any]]:
  """Per leaf path, the configuration that gives the leaf its meaning.

  For the leaves of an 8-bit moment: its block size, map sign and code map;
  for the leaves of a :func:`adamfx.pack_state` state: the packed layout (the
  params' paths, shapes and dtypes, in packing order).
  """
  from adamfx._formats.blockwise4bit import Quantized4bit  # noqa: PLC0415
  from adamfx._formats.quant import QuantizedArray  # noqa: PLC0415
  from adamfx._wrappers.flat import PackedState  # noqa: PLC0415 (import cycle)

  is_node = lambda x: isinstance(x, (QuantizedArray, Quantized4bit, PackedState))
  out: dict[str, dict[str, Any]] = {}

  def visit(prefix, tree, inherited):
    for path, node in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]:
      here = '/'.join(p for p in (prefix, '/'.join(_key_part(k) for k in path)) if p)
      if isinstance(node, PackedState):
        layout = {'packed_layout': node.describe_layout()}
        visit(f'{here}/inner' if here else 'inner', node.inner, {**inherited, **layout})
      elif isinstance(node, QuantizedArray):
        config = {**inherited, 'block_size': node.block_size, 'signed': bool(node.signed),
                  'code_map': _CODE_MAP}
        for child in ('codes', 'scale'):
          out[f'{here}/{child}' if here else child] = config
      elif isinstance(node, Quantized4bit):
        # 4-bit moments: the code format, block size, map and rank-1 flag.
        config = {**inherited, **node.config()}
        for child in ('codes', 'scale') + (('col',) if node.rank1 else ()):
          out[f'{here}/{child}' if here else child] = config
      elif inherited:
        out[here] = dict(inherited)

  visit('', tree, {})
  for path, kind in _second_moments(tree).items():
    out[path] = {**out.get(path, {}), 'second_moment': kind}
  return out


def _second_moments(tree: Any) -> dict[str, str]:
  """Per leaf path of an adamfx ``nu``, what it holds: AdaMax's ``max |g|`` or
  Adam's average of ``g**2`` (issue 18: an AdaMax state restored into Adam
  stepped by -0.0213 where Adam's own gives -0.0100). optax's states name no
  kind (optax.adamax keeps ScaleByAdamState), so they convert either way."""
  from adamfx._core.driver import AdaMaxState  # noqa: PLC0415
  from adamfx._core.driver import AdamState  # noqa: PLC0415
  from adamfx._porting.conventions import FrameworkAdamState  # noqa: PLC0415 (import cycle)
  from adamfx._sparse.lazy import LazyAdamState  # noqa: PLC0415

  kinds = {AdaMaxState: 'max |g| (AdaMax)', AdamState: 'average of g**2 (Adam)',
           FrameworkAdamState: 'average of g**2 (Adam)', LazyAdamState: 'average of g**2 (Adam)'}
  is_state = lambda x: type(x) in kinds
  out = {}
  for path, node in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_state)[0]:
    if is_state(node):
      for sub, _ in jax.tree_util.tree_flatten_with_path(node.nu)[0]:
        keys = (*path, jax.tree_util.GetAttrKey('nu'), *sub)
        out['/'.join(_key_part(k) for k in keys)] = kinds[type(node)]
  return out


def _check_configs(saved: dict[str, Any], target: Any, where: str) -> None:
  """CheckpointError naming each leaf whose configuration differs."""
  want = _configs(target)
  names = {path: name for path, name, _ in _flatten(target)}
  problems = []
  for path in sorted(set(want) | set(saved)):
    if path not in names:
      continue
    got, config = dict(saved.get(path, {})), dict(want.get(path, {}))
    if ('second_moment' in got) != ('second_moment' in config):  # optax's, or older files
      got.pop('second_moment', None)
      config.pop('second_moment', None)
    if got == config:
      continue
    diffs = []
    for key in sorted(set(got) | set(config)):
      if got.get(key) == config.get(key):
        continue
      if key == 'packed_layout':
        diffs.append(_layout_difference(got.get(key), config.get(key)))
      else:
        diffs.append(f'{key} {got.get(key)!r} in the checkpoint vs {config.get(key)!r} in the'
                     ' target')
    problems.append(f'leaf `{names[path]}`: {", ".join(diffs)}')
  if problems:
    raise CheckpointError(
        f'The checkpoint {where} was saved with another configuration: '
        + '; '.join(problems[:6])
        + (f' and {len(problems) - 6} more' if len(problems) > 6 else '')
        + '. Build the optimiser (8-bit block_size, min_8bit_size; Blockwise4bit\'s'
        ' block_size, min_size, maps, rank1; pack_state over the same params) as the'
        ' checkpoint was saved.'
    )


def _layout_difference(got: Any, want: Any) -> str:
  if got is None:
    return 'the target is packed (pack_state), the checkpoint is not'
  if want is None:
    return 'the checkpoint is packed (pack_state), the target is not'
  for i, (g, w) in enumerate(zip(got, want)):
    if g != w:
      return (f'packed layout differs at param {i}: {g[0]} {tuple(g[1])} {g[2]} in the'
              f' checkpoint vs {w[0]} {tuple(w[1])} {w[2]} in the target')
  return f'packed layout of {len(got)} params in the checkpoint vs {len(want)} in the target'


def _flatten(tree: Any) -> list[tuple[str, str, Any]]:
  """``(path, pretty_name, leaf)`` for every leaf; ``None`` has no leaves."""
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    canon = '/'.join(_key_part(k) for k in path)
    out.append((canon, jax.tree_util.keystr(tuple(path)) or '<root>', leaf))
  return out


def _dtype_name(dtype: Any) -> str:
  return jnp.dtype(dtype).name


def _describe(shape: Any, dtype: Any) -> str:
  return f'shape {tuple(shape)} {_dtype_name(dtype)}'


def _target_spec(leaf: Any) -> tuple[tuple[int, ...], str]:
  if hasattr(leaf, 'shape') and hasattr(leaf, 'dtype'):
    return tuple(leaf.shape), _dtype_name(leaf.dtype)
  arr = np.asarray(leaf)
  return tuple(arr.shape), _dtype_name(arr.dtype)


def _check_against(
    saved: dict[str, tuple[tuple[int, ...], str]],
    target: list[tuple[str, str, Any]],
    where: str,
) -> None:
  """Raises CheckpointError listing every path/shape/dtype difference."""
  want = {path: _target_spec(leaf) for path, _, leaf in target}
  names = {path: name for path, name, _ in target}
  missing = [p for p in want if p not in saved]
  extra = [p for p in saved if p not in want]
  problems = []
  if missing:
    shown = ', '.join(f'`{names[p]}`' for p in missing[:6])
    more = f' and {len(missing) - 6} more' if len(missing) > 6 else ''
    hint = ''
    if all('nu_max' in p.split('/') for p in missing):
      hint = (' (the target keeps AMSGrad\'s `nu_max`, the checkpoint does'
              ' not: build the optimiser with amsgrad=False, or start nu_max'
              ' from the restored nu yourself)')
    problems.append(f'{len(missing)} leaves of the target are not in the'
                    f' checkpoint: {shown}{more}{hint}')
  if extra:
    shown = ', '.join(f'`{p}`' for p in extra[:6])
    more = f' and {len(extra) - 6} more' if len(extra) > 6 else ''
    problems.append(f'{len(extra)} leaves of the checkpoint are not in the'
                    f' target: {shown}{more}')
  for path, (shape, dtype) in want.items():
    if path not in saved:
      continue
    s_shape, s_dtype = saved[path]
    if (tuple(s_shape), s_dtype) != (shape, dtype):
      problems.append(
          f'leaf `{names[path]}`: the checkpoint holds'
          f' {_describe(s_shape, s_dtype)}, the target expects'
          f' {_describe(shape, dtype)}'
      )
  if problems:
    raise CheckpointError(
        f'The checkpoint {where} does not match the target: '
        + '; '.join(problems)
        + '. Build the target with the optimiser and params the checkpoint'
        ' was saved with (same tree, shapes, mu_dtype/nu_dtype, amsgrad).'
    )


def _host(x: Any) -> np.ndarray:
  """The whole value of ``x`` on this host (gathers a multi-process array)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _storable(leaf: Any) -> bool:
  """Whether a leaf is an array of a dtype that both savers write and restore."""
  dtype = getattr(leaf, 'dtype', None)
  if dtype is None:
    try:
      dtype = np.asarray(leaf).dtype
    except Exception:  # noqa: BLE001 (anything NumPy cannot make an array of)
      return False
  try:
    dtype = jnp.dtype(dtype)
  except TypeError:
    return False
  return dtype == jnp.bool_ or any(
      jnp.issubdtype(dtype, kind)
      for kind in (jnp.floating, jnp.integer, jnp.complexfloating, jnp.unsignedinteger)
  )


def _refuse_unstorable(flat: list[tuple[str, str, Any]], who: str) -> None:
  """TypeError naming every leaf a checkpoint could write but not read back.

  A ``str`` leaf becomes a NumPy ``<U..`` array that ``restore_npz`` cannot
  view from raw bytes, and orbax refuses it halfway through a save: both are
  refused before anything is written, so the previous checkpoint stays.
  """
  bad = [(name, leaf) for _, name, leaf in flat if not _storable(leaf)]
  if bad:
    shown = ', '.join(f'`{name}` ({type(leaf).__name__} {leaf!r:.40})' for name, leaf in bad[:6])
    more = f' and {len(bad) - 6} more' if len(bad) > 6 else ''
    raise TypeError(
        f'{who} can only store arrays of numbers or booleans; {len(bad)} leaves are not:'
        f' {shown}{more}. Keep them out of the saved tree (save them separately,'
        ' e.g. as JSON).'
    )


def _crc(arr: np.ndarray) -> int:
  return zlib.crc32(np.ascontiguousarray(arr).view(np.uint8).reshape(-1).data)


def _place(host: np.ndarray, ref: Any) -> jax.Array:
  """Puts ``host`` where ``ref`` (a target leaf) says: its sharding, or default."""
  sharding = getattr(ref, 'sharding', None)
  uncommitted = isinstance(ref, jax.Array) and not getattr(ref, '_committed', True)
  if sharding is None or uncommitted:
    return jnp.asarray(host)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _build(target: Any, values: dict[str, Any]) -> Any:
  leaves, treedef = jax.tree_util.tree_flatten(target)
  flat = _flatten(target)
  assert len(flat) == len(leaves)
  return jax.tree_util.tree_unflatten(treedef, [values[p] for p, _, _ in flat])


# ------------------------------------------------------------- in memory


def convert_state(state: Any, target: Any) -> Any:
  """Copies ``state``'s leaves into ``target``'s tree, matched by path.

  Migrates a running job from optax: ``optax.adam``'s state
  ``(ScaleByAdamState(count, mu, nu), EmptyState())`` becomes adamfx's
  ``(AdamState(count, mu, nu, nu_max=None), EmptyState())`` with the same
  values, placed with the target's shardings. Shapes and dtypes must match
  exactly.

  Args:
    state: the source pytree (an optax or adamfx optimiser state, ...).
    target: a pytree of arrays or ``jax.ShapeDtypeStruct`` giving the
      structure, shapes, dtypes and shardings wanted, e.g. ``tx.init(params)``.

  Returns:
    A pytree with the structure of ``target`` and the values of ``state``.

  Raises:
    CheckpointError: (a ``ValueError``) naming every leaf that is missing on
      either side or differs in shape or dtype.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import adamfx
    >>> params = {'w': jnp.ones(2)}
    >>> old = optax.adam(1e-3).init(params)
    >>> new = adamfx.convert_state(old, adamfx.adam(1e-3).init(params))
    >>> type(new[0]).__name__, new[0].nu_max
    ('AdamState', None)
  """
  source = {path: leaf for path, _, leaf in _flatten(state)}
  saved = {p: _target_spec(leaf) for p, leaf in source.items()}
  flat = _flatten(target)
  _check_against(saved, flat, 'given')
  _check_configs(_configs(state), target, 'given')
  values = {p: _place(_host(source[p]), ref) for p, _, ref in flat}
  return _build(target, values)


# ------------------------------------------------------------------- npz


def save_npz(path: str | os.PathLike, tree: Any) -> None:
  """Saves a pytree of arrays (an optimiser state, params, ...) to ``.npz``.

  Each leaf is stored whole, as its raw bytes, with its path, shape, dtype
  (bfloat16 and other ml_dtypes included) and a CRC-32 checksum; a sharded
  array is gathered first (across processes too; process 0 writes). The file
  is written to a temporary name and renamed, so a crash never leaves a
  half-written checkpoint under ``path``.

  Args:
    path: the file to write (``.npz`` is not appended).
    tree: a pytree of arrays of numbers or booleans; ``None`` leaves are
      skipped.

  Raises:
    TypeError: naming each leaf that is not an array of numbers or booleans
      (a ``str``, say: it could not be restored), before anything is written.
    OSError: if the file cannot be written; the previous file at ``path`` is
      then unchanged and the temporary file removed.

  Examples:
    >>> import os, tempfile
    >>> import jax.numpy as jnp
    >>> import adamfx
    >>> tx = adamfx.adam(1e-3)
    >>> state = tx.init({'w': jnp.ones(3)})
    >>> path = os.path.join(tempfile.mkdtemp(), 'state.npz')
    >>> adamfx.save_npz(path, state)
    >>> restored = adamfx.restore_npz(path, state)
    >>> restored[0].mu['w']
    Array([0., 0., 0.], dtype=float32)
  """
  flat = _flatten(tree)
  _refuse_unstorable(flat, 'save_npz')
  arrays, leaves = {}, []
  for i, (canon, name, leaf) in enumerate(flat):
    host = _host(leaf)
    raw = np.ascontiguousarray(host).view(np.uint8).reshape(-1)
    arrays[f'a{i}'] = raw
    leaves.append({
        'path': canon, 'name': name, 'shape': list(host.shape),
        'dtype': _dtype_name(host.dtype), 'crc32': _crc(host),
    })
  if jax.process_index() != 0:
    return
  meta = {'format': _FORMAT, 'version': _VERSION, 'leaves': leaves, 'configs': _configs(tree)}
  arrays[_NPZ_META] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
  path = os.fspath(path)
  tmp = f'{path}.tmp-{os.getpid()}'
  try:
    with open(tmp, 'wb') as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    # A failed write (a full disk, an interrupt) leaves the previous
    # checkpoint under `path` as it was, and no half-written temporary.
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _corrupt(path: Any, what: str, err: BaseException) -> CheckpointError:
  return CheckpointError(
      f'Cannot read the checkpoint {os.fspath(path)!r}: {what}'
      f' ({type(err).__name__}: {err}). The file is corrupt, truncated, or not'
      ' written by adamfx.save_npz.'
  )


def restore_npz(path: str | os.PathLike, target: Any) -> Any:
  """Restores a pytree saved by :func:`save_npz` into ``target``'s tree.

  Args:
    path: the file written by :func:`save_npz`.
    target: a pytree of arrays or ``jax.ShapeDtypeStruct`` with the wanted
      structure, shapes, dtypes and shardings (e.g. ``tx.init(params)``, or
      ``jax.eval_shape`` of it with ``sharding`` set). Leaves are placed with
      the target leaf's sharding.

  Returns:
    A pytree with the structure of ``target`` holding the saved values.

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    CheckpointError: (a ``ValueError``) if the file is corrupt or truncated
      (a checksum fails: the leaf is named), or its leaves differ from the
      target's (each missing/extra leaf, shape or dtype is named).
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f'No checkpoint at {os.fspath(path)!r}.')
  try:
    npz = np.load(path, allow_pickle=False)
  except Exception as e:  # numpy raises many kinds here.
    raise _corrupt(path, 'not a readable .npz file', e) from e
  with npz:
    try:
      meta = json.loads(bytes(npz[_NPZ_META]).decode())
    except KeyError as e:
      raise CheckpointError(
          f'{os.fspath(path)!r} is a .npz file but not an adamfx checkpoint'
          f' (no {_NPZ_META} entry): write it with adamfx.save_npz.'
      ) from e
    except Exception as e:
      raise _corrupt(path, 'its metadata is unreadable', e) from e
    if meta.get('format') != _FORMAT:
      raise CheckpointError(f'{os.fspath(path)!r}: unknown format {meta.get("format")!r}.')
    records = {rec['path']: (i, rec) for i, rec in enumerate(meta['leaves'])}
    saved = {p: (tuple(rec['shape']), rec['dtype']) for p, (_, rec) in records.items()}
    flat = _flatten(target)
    _check_against(saved, flat, repr(os.fspath(path)))
    _check_configs(meta.get('configs', {}), target, repr(os.fspath(path)))
    values = {}
    for canon, name, ref in flat:
      i, rec = records[canon]
      try:
        raw = npz[f'a{i}']
      except Exception as e:  # zipfile: Bad CRC-32, EOF ...
        raise _corrupt(path, f'leaf `{name}` is damaged', e) from e
      try:
        dtype = jnp.dtype(rec['dtype'])
      except TypeError as e:  # e.g. a str leaf of an older save_npz
        raise CheckpointError(
            f'The checkpoint {os.fspath(path)!r} holds leaf `{name}` as'
            f' {rec["dtype"]!r}, not an array dtype adamfx can restore.'
        ) from e
      expected = int(np.prod(rec['shape'], dtype=np.int64)) * dtype.itemsize
      if raw.dtype != np.uint8 or raw.size != expected:
        raise CheckpointError(
            f'The checkpoint {os.fspath(path)!r} is corrupt: leaf `{name}`'
            f' holds {raw.size} bytes, its {_describe(rec["shape"], dtype)}'
            f' needs {expected}.'
        )
      host = raw.view(dtype).reshape(rec['shape'])
      if _crc(host) != rec['crc32']:
        raise CheckpointError(
            f'The checkpoint {os.fspath(path)!r} is corrupt: the checksum of'
            f' leaf `{name}` does not match the one saved with it.'
        )
      values[canon] = _place(host, ref)
  return _build(target, values)


# ----------------------------------------------------------------- orbax


def _ocp():
  try:
    import orbax.checkpoint as ocp
  except ImportError as e:  # pragma: no cover
    raise ImportError(
        'orbax-checkpoint is needed for save_orbax/restore_orbax: pip install'
        ' "adamfx[checkpoint]".'
    ) from e
  return ocp


def save_orbax(path: str | os.PathLike, tree: Any, *, force: bool = False) -> None:
  """Saves a pytree (sharded arrays included) with orbax-checkpoint.

  ``orbax.checkpoint.StandardCheckpointer`` writes each shard from the
  process that holds it. adamfx adds a CRC-32 of every leaf (when the whole
  array is addressable from this process) to the checkpoint's custom
  metadata, which :func:`restore_orbax` checks.

  Args:
    path: the checkpoint directory (absolute, or made absolute here).
    tree: a pytree of arrays (numbers or booleans).
    force: replace an existing checkpoint at ``path``. The new checkpoint is
      written beside it (``path + '.adamfx-new'``) and moved into place only
      once complete, so a save that fails (a full disk, an interrupt) leaves
      the previous checkpoint as it was and removes its partial copy.

  Raises:
    TypeError: naming each leaf that is not an array of numbers or booleans
      (a ``str``, say), before anything is written.
    ValueError: if ``path`` exists and ``force`` is False.

  Examples:
    >>> import os, tempfile
    >>> import jax.numpy as jnp
    >>> import adamfx
    >>> state = adamfx.adam(1e-3).init({'w': jnp.ones(3)})
    >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
    >>> adamfx.save_orbax(path, state)
    >>> adamfx.restore_orbax(path, state)[0].count
    Array(0, dtype=int32)
  """
  ocp = _ocp()
  path = os.path.abspath(path)
  flat = _flatten(tree)
  _refuse_unstorable(flat, 'save_orbax')
  if os.path.exists(path) and not force:
    raise ValueError(
        f'A checkpoint already exists at {path!r}; pass force=True to replace it.')
  leaves = []
  for canon, name, leaf in flat:
    crc = None
    if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable:
      crc = _crc(np.asarray(leaf))
    leaves.append({'path': canon, 'name': name, 'crc32': crc})
  meta = {'format': _FORMAT, 'version': _VERSION, 'leaves': leaves, 'configs': _configs(tree)}
  # Written beside `path` under a name of its own (the same on every process,
  # each writing its shards), and moved over the old checkpoint only once
  # complete: orbax's own force=True deletes `path` before it writes, so a
  # save that then failed (a full disk, a leaf it cannot store) lost the
  # last good checkpoint.
  new, old = f'{path}.adamfx-new', f'{path}.adamfx-old'
  primary = jax.process_index() == 0
  # Directories made before save() returns, not in a thread of orbax's that a
  # failed save leaves running (it would make the temporary after cleanup).
  ckptr = ocp.StandardCheckpointer(
      async_options=ocp.options.AsyncOptions(create_directories_asynchronously=False))
  try:
    try:
      ckptr.save(new, tree, force=True, custom_metadata={'adamfx': meta})
    finally:
      # Also after a failed save: orbax may still be making its temporary
      # directory in a thread of its own; let it finish before cleaning up.
      try:
        ckptr.wait_until_finished()
      finally:
        ckptr.close()
    if primary:
      # Between the two renames the old checkpoint is at `old`: never gone.
      if os.path.isdir(old):
        shutil.rmtree(old)
      if os.path.exists(path):
        os.replace(path, old)
      os.replace(new, path)
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    if primary:  # the partial copy, and orbax's own temporary beside it
      for leftover in glob.glob(glob.escape(new) + '*'):
        shutil.rmtree(leftover, ignore_errors=True)
    raise
  if jax.process_count() > 1:  # no process reads `path` before it is in place
    from jax.experimental import multihost_utils  # noqa: PLC0415

    multihost_utils.sync_global_devices(f'adamfx.save_orbax {path}')


def _orbax_leaf(x: Any) -> bool:
  return hasattr(x, 'shape') and hasattr(x, 'dtype')


def restore_orbax(path: str | os.PathLike, target: Any) -> Any:
  """Restores an orbax checkpoint into ``target``'s tree, checking it first.

  Works on any checkpoint written by ``orbax.checkpoint.StandardCheckpointer``
  (or :func:`save_orbax`), including one of an ``optax.adam`` state: leaves
  are matched by path, so the optax state restores into adamfx's. Each
  leaf is read straight into the target leaf's sharding (each process reads
  only its shards).

  Args:
    path: the checkpoint directory.
    target: a pytree of arrays or ``jax.ShapeDtypeStruct`` with the wanted
      structure, shapes, dtypes and shardings.

  Returns:
    A pytree with the structure of ``target`` holding the saved values.

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    CheckpointError: (a ``ValueError``) if the checkpoint is unreadable or
      corrupt (a checksum written by :func:`save_orbax` fails: the leaf is
      named), or its leaves differ from the target's.
  """
  ocp = _ocp()
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'No checkpoint at {path!r}.')
  ckptr = ocp.StandardCheckpointer()
  try:
    try:
      step_meta = ckptr.metadata(path)
      item = getattr(step_meta, 'item_metadata', step_meta)
      tree_meta = getattr(item, 'tree', item)
      custom = getattr(step_meta, 'custom_metadata', None) or {}
    except Exception as e:  # orbax/tensorstore errors vary.
      raise CheckpointError(
          f'Cannot read the metadata of the orbax checkpoint {path!r}'
          f' ({type(e).__name__}: {e}): it is corrupt, incomplete, or not an'
          ' orbax checkpoint.'
      ) from e
    saved_flat = [
        ('/'.join(_key_part(k) for k in p), leaf)
        for p, leaf in jax.tree_util.tree_flatten_with_path(
            tree_meta, is_leaf=_orbax_leaf)[0]
    ]
    saved = {p: (tuple(m.shape), _dtype_name(m.dtype)) for p, m in saved_flat}
    flat = _flatten(target)
    if not saved and flat:
      raise CheckpointError(
          f'The orbax checkpoint {path!r} lists no arrays: its metadata'
          ' (_METADATA, _sharding, manifest) is missing or unreadable, so the checkpoint is corrupt'
          ' or incomplete.'
      )
    _check_against(saved, flat, repr(path))
    adamfx_meta = custom.get('adamfx') if isinstance(custom, dict) else None
    if adamfx_meta:  # written by save_orbax; a foreign checkpoint has none
      _check_configs(adamfx_meta.get('configs', {}), target, repr(path))
    refs = {p: ref for p, _, ref in flat}
    names = {p: name for p, name, _ in flat}

    def abstract(p, m):
      canon = '/'.join(_key_part(k) for k in p)
      ref = refs[canon]
      sharding = getattr(ref, 'sharding', None)
      if sharding is None or (isinstance(ref, jax.Array) and not ref._committed):
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding)

    item = jax.tree_util.tree_map_with_path(abstract, tree_meta, is_leaf=_orbax_leaf)
    try:
      restored = ckptr.restore(path, item)
    except Exception as e:
      raise CheckpointError(
          f'Cannot read the orbax checkpoint {path!r} ({type(e).__name__}:'
          f' {e}): its data files are corrupt or incomplete.'
      ) from e
  finally:
    ckptr.close()
  crcs = {}
  meta = custom.get('adamfx') if isinstance(custom, dict) else None
  if meta:
    crcs = {rec['path']: rec['crc32'] for rec in meta['leaves']}
  values = {}
  for p, x in jax.tree_util.tree_flatten_with_path(restored)[0]:
    canon = '/'.join(_key_part(k) for k in p)
    ref = refs[canon]
    if crcs.get(canon) is not None and x.is_fully_addressable:
      if _crc(np.asarray(x)) != crcs[canon]:
        raise CheckpointError(
            f'The orbax checkpoint {path!r} is corrupt: the checksum of leaf'
            f' `{names[canon]}` does not match the one saved with it.'
        )
    if isinstance(ref, jax.Array) and not ref._committed:
      x = jnp.asarray(np.asarray(x))
    values[canon] = x
  return _build(target, values)
