"""Checkpoints: npz and orbax round trips, optax migration, exact resume, errors.

The resume check runs in two fresh processes with 8 host CPU devices (this
file run as a script): one trains without stopping and saves at step K, the
other restores that checkpoint into a sharded target and finishes; the final
params must be bit-for-bit those of the uninterrupted run.
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys

import harness
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import optax_promotion

import adamfx

FORMATS = ('npz', 'orbax')
STEPS, K = 6, 3


def _save(fmt, path, tree):
  (adamfx.save_npz if fmt == 'npz' else adamfx.save_orbax)(path, tree)


def _restore(fmt, path, target):
  return (adamfx.restore_npz if fmt == 'npz' else adamfx.restore_orbax)(path, target)


def _path(tmp_path, fmt, name='ckpt'):
  return tmp_path / (f'{name}.npz' if fmt == 'npz' else name)


def _params():
  return {
      'w': jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float32).reshape(4, 3),
      'b': jnp.array([0.5, -0.25, 2.0], jnp.bfloat16),
  }


def _grads(i, params=None):
  params = _params() if params is None else params
  return jax.tree.map(
      lambda p: jnp.sin(jnp.arange(p.size, dtype=jnp.float32) * 0.7 + i).reshape(p.shape)
      .astype(p.dtype), params)


def _stepped(tx, steps=3, params=None):
  params = _params() if params is None else params
  state = tx.init(params)
  for i in range(steps):
    _, state = tx.update(_grads(i, params), state, params)
  return state


def _assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


STATES = {
    'adam': lambda: adamfx.adam(1e-2),
    'amsgrad_mu_bf16_nu_f16': lambda: adamfx.adam(
        1e-2, mu_dtype=jnp.bfloat16, nu_dtype=jnp.float16, amsgrad=True),
    'adamw_schedule': lambda: adamfx.adamw(optax.linear_schedule(1e-2, 0.0, 10), weight_decay=0.1),
    'inject_hyperparams': lambda: adamfx.inject_hyperparams(adamfx.adam)(learning_rate=1e-2),
    'adamax': lambda: adamfx.adamax(1e-2),
    'adam8bit': lambda: adamfx.adam8bit(1e-2, min_8bit_size=8, block_size=4),
}


@pytest.mark.parametrize('fmt', FORMATS)
@pytest.mark.parametrize('name', sorted(STATES))
def test_round_trip_is_exact(tmp_path, fmt, name):
  tx = STATES[name]()
  with optax_promotion():  # optax's schedule mixes int32 and float.
    state = _stepped(tx)
  path = _path(tmp_path, fmt)
  _save(fmt, path, state)
  # Restore into a fresh state, and into its shapes alone (nothing allocated).
  fresh = tx.init(_params())
  _assert_bitwise_equal(_restore(fmt, path, fresh), state)
  _assert_bitwise_equal(_restore(fmt, path, jax.eval_shape(lambda: fresh)), state)


@pytest.mark.parametrize('how', ['convert_state', 'npz', 'orbax_plain'])
@pytest.mark.parametrize('pair', ['adam', 'amsgrad'])
def test_optax_state_migrates_to_adamfx(tmp_path, how, pair):
  """A running optax job continues in adamfx with the same numbers."""
  params = {'w': _params()['w']}
  grads = lambda i: _grads(i, params)
  ref_tx = {'adam': optax.adam, 'amsgrad': optax.amsgrad}[pair](1e-2)
  new_tx = {'adam': adamfx.adam, 'amsgrad': adamfx.amsgrad}[pair](1e-2)

  def run(tx, state, params, steps):
    for i in steps:
      updates, state = tx.update(grads(i), state, params)
      params = optax.apply_updates(params, updates)
    return params, state

  with optax_promotion():
    p_k, s_k = run(ref_tx, ref_tx.init(params), params, range(3))
    p_ref, _ = run(ref_tx, s_k, p_k, range(3, 6))
  target = new_tx.init(params)
  if how == 'convert_state':
    migrated = adamfx.convert_state(s_k, target)
  elif how == 'npz':
    adamfx.save_npz(tmp_path / 'optax.npz', s_k)
    migrated = adamfx.restore_npz(tmp_path / 'optax.npz', target)
  else:  # A checkpoint written by orbax itself, as an optax user has one.
    import orbax.checkpoint as ocp

    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / 'optax_ckpt', s_k)
    ckptr.wait_until_finished()
    migrated = adamfx.restore_orbax(tmp_path / 'optax_ckpt', target)
  assert isinstance(migrated[0], adamfx.AdamState)
  for field in ('count', 'mu', 'nu') + (('nu_max',) if pair == 'amsgrad' else ()):
    _assert_bitwise_equal(getattr(migrated[0], field), getattr(s_k[0], field))
  p_new, _ = run(new_tx, migrated, p_k, range(3, 6))
  # float32: adamfx's arithmetic is optax's, in optax's order (the parity
  # suite holds it to ~1e-6); migration itself is bit-exact (above).
  np.testing.assert_allclose(p_new['w'], p_ref['w'], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- mismatches


@pytest.mark.parametrize('fmt', FORMATS)
def test_mismatched_checkpoints_name_what_differs(tmp_path, fmt):
  path = _path(tmp_path, fmt)
  _save(fmt, path, _stepped(adamfx.adam(1e-2)))
  other_shape = {'w': jnp.zeros((4, 4)), 'b': _params()['b']}
  cases = [
      (adamfx.adam(1e-2).init(other_shape),
       r"leaf `\[0\]\.mu\['w'\]`: the checkpoint holds shape \(4, 3\) float32, the target"
       r" expects shape \(4, 4\) float32"),
      (adamfx.adam(1e-2, mu_dtype=jnp.bfloat16).init(_params()),
       r"leaf `\[0\]\.mu\['w'\]`: the checkpoint holds shape \(4, 3\) float32, the target"
       r" expects shape \(4, 3\) bfloat16"),
      (adamfx.amsgrad(1e-2).init(_params()),
       r"2 leaves of the target are not in the checkpoint: `\[0\]\.nu_max\['b'\]`,"
       r" `\[0\]\.nu_max\['w'\]` \(the target keeps AMSGrad's `nu_max`"),
      (adamfx.adam(1e-2).init({'w': _params()['w']}),
       r'2 leaves of the checkpoint are not in the target: `0/mu/b`, `0/nu/b`'),
      (adamfx.adam(1e-2).init({**_params(), 'c': jnp.zeros(2)}),
       r"2 leaves of the target are not in the checkpoint: `\[0\]\.mu\['c'\]`"),
  ]
  for target, message in cases:
    with pytest.raises(adamfx.CheckpointError, match=message):
      _restore(fmt, path, target)


def test_convert_state_names_what_differs():
  with pytest.raises(ValueError, match=r"leaf `\[0\]\.nu\['w'\]`: the checkpoint holds shape"
                     r" \(4, 3\) float32, the target expects shape \(4, 3\) bfloat16"):
    adamfx.convert_state(
        optax.adam(1e-2).init(_params()),
        adamfx.adam(1e-2, nu_dtype=jnp.bfloat16).init(_params()))


# ---------------------------------------------------------------- corruption


def _flip(path, pos):
  data = bytearray(path.read_bytes())
  data[pos] ^= 0x5A
  path.write_bytes(bytes(data))


def _restores_exactly_or_raises(fmt, path, state):
  """A damaged checkpoint must raise CheckpointError or restore exactly."""
  try:
    restored = _restore(fmt, path, state)
  except adamfx.CheckpointError:
    return 'raised'
  _assert_bitwise_equal(restored, state)
  return 'exact'


def test_corrupt_npz_is_never_restored_silently(tmp_path):
  state = _stepped(adamfx.adam(1e-2), params={'w': jnp.ones((16, 64))})
  good = tmp_path / 'good.npz'
  adamfx.save_npz(good, state)
  size = good.stat().st_size
  outcomes = []
  for pos in range(0, size, max(1, size // 40)):  # every 1/40 of the file
    bad = tmp_path / 'bad.npz'
    shutil.copy(good, bad)
    _flip(bad, pos)
    outcomes.append(_restores_exactly_or_raises('npz', bad, state))
  # Most of the file is array data, guarded by its CRC-32.
  assert outcomes.count('raised') > len(outcomes) // 2, outcomes


def test_truncated_or_foreign_npz_raises_clearly(tmp_path):
  state = _stepped(adamfx.adam(1e-2))
  good = tmp_path / 'good.npz'
  adamfx.save_npz(good, state)
  cut = tmp_path / 'cut.npz'
  cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
  with pytest.raises(adamfx.CheckpointError, match=r'corrupt, truncated, or not written by'):
    adamfx.restore_npz(cut, state)
  plain = tmp_path / 'plain.npz'
  np.savez(plain, w=np.zeros(3))
  with pytest.raises(adamfx.CheckpointError, match=r'not an adamfx checkpoint'):
    adamfx.restore_npz(plain, state)
  with pytest.raises(FileNotFoundError, match=r'No checkpoint at'):
    adamfx.restore_npz(tmp_path / 'missing.npz', state)


# After a failed read, orbax's background coroutines report to a closed event
# loop; that is orbax's noise, not a result.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_corrupt_orbax_checkpoint_is_never_restored_silently(tmp_path):
  # Big enough that orbax stores the arrays in data files, not inline.
  state = _stepped(adamfx.adam(1e-2), params={'w': jnp.ones((64, 64))})
  good = tmp_path / 'good'
  adamfx.save_orbax(good, state)
  files = sorted(p.relative_to(good) for p in good.rglob('*') if p.is_file())
  outcomes = {}
  for rel in files:
    bad = tmp_path / 'bad'
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(good, bad)
    _flip(bad / rel, (bad / rel).stat().st_size // 2)
    outcomes[str(rel)] = _restores_exactly_or_raises('orbax', bad, state)
  assert 'raised' in outcomes.values(), outcomes
  shutil.rmtree(good / 'd')
  with pytest.raises(adamfx.CheckpointError, match=r'corrupt'):
    adamfx.restore_orbax(good, state)
  with pytest.raises(FileNotFoundError, match=r'No checkpoint at'):
    adamfx.restore_orbax(tmp_path / 'missing', state)
  gc.collect()  # orbax's leftover coroutines: reported here, not in a later test


# ------------------------------------------------- exact resume, new process


def _resume_tx():
  schedule = optax.linear_schedule(1e-2, 1e-3, STEPS)
  return adamfx.adamw(schedule, weight_decay=0.1, mu_dtype=jnp.bfloat16,
                      nu_dtype=jnp.float16, amsgrad=True)


def _worker(mode, out_dir):
  jax.config.update('jax_numpy_dtype_promotion', 'strict')
  from jax.sharding import AxisType
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  assert jax.device_count() == 8
  mesh = jax.make_mesh((4, 2), ('data', 'model'), axis_types=(AxisType.Auto,) * 2)
  p_sh = {'w': NamedSharding(mesh, P(None, 'model')), 'b': NamedSharding(mesh, P())}
  batch_sh = NamedSharding(mesh, P('data'))
  tx = _resume_tx()
  params = jax.device_put({'w': jnp.linspace(-1, 1, 64, dtype=jnp.float32).reshape(8, 8),
                           'b': jnp.zeros(8)}, p_sh)
  s_sh = adamfx.zero1_shardings(adamfx.state_layout(tx, params), mesh, 'data')

  def loss(p, x):
    return jnp.mean((jnp.tanh(x @ p['w'] + p['b']) - x) ** 2)

  def step(params, state, x):
    updates, state = tx.update(jax.grad(loss)(params, x), state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step, in_shardings=(p_sh, s_sh, batch_sh), out_shardings=(p_sh, s_sh),
                 donate_argnums=(0, 1))
  batch = lambda i: jax.device_put(jax.random.normal(jax.random.key(i), (16, 8)), batch_sh)

  if mode == 'full':
    state = jax.jit(tx.init, out_shardings=s_sh)(params)
    for i in range(STEPS):
      if i == K:
        tree = {'params': params, 'opt_state': state}
        adamfx.save_npz(os.path.join(out_dir, 'k.npz'), tree)
        adamfx.save_orbax(os.path.join(out_dir, 'k_orbax'), tree)
      params, state = step(params, state, batch(i))
    np.savez(os.path.join(out_dir, 'full.npz'), **jax.device_get(params))
    return
  # A target that allocates nothing: shapes, dtypes and the ZeRO-1 shardings.
  layout = adamfx.state_layout(tx, params)
  target = {
      'params': jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             params, p_sh),
      'opt_state': jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                layout, s_sh),
  }
  for fmt in FORMATS:
    name = 'k.npz' if fmt == 'npz' else 'k_orbax'
    tree = _restore(fmt, os.path.join(out_dir, name), target)
    for x, want in zip(jax.tree.leaves(tree), jax.tree.leaves(target)):
      assert x.sharding.is_equivalent_to(want.sharding, x.ndim), (x.sharding, want.sharding)
    p, s = tree['params'], tree['opt_state']
    for i in range(K, STEPS):
      p, s = step(p, s, batch(i))
    np.savez(os.path.join(out_dir, f'resumed_{fmt}.npz'), **jax.device_get(p))


def _run_worker(mode, out_dir):
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), mode, str(out_dir)],
                        env=harness.devices_env(8), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.mark.xdist_group('devices8')  # one worker runs the 8-device subprocesses
@pytest.mark.slow  # a second process; the in-process round trips of every contract row are the default run's
def test_resume_in_new_process_is_bit_exact(tmp_path):
  _run_worker('full', tmp_path)
  _run_worker('resume', tmp_path)
  with np.load(tmp_path / 'full.npz') as full:
    for fmt in FORMATS:
      with np.load(tmp_path / f'resumed_{fmt}.npz') as resumed:
        for k in ('w', 'b'):
          assert not np.array_equal(full[k], np.zeros_like(full[k]))
          assert full[k].tobytes() == resumed[k].tobytes(), (fmt, k)


if __name__ == '__main__':
  _worker(sys.argv[1], sys.argv[2])


def test_npz_keys_are_unambiguous(tmp_path):
  """{'a/b': x, 'a': {'b': y}} used to restore x into both leaves."""
  tree = {'a/b': jnp.ones(2), 'a': {'b': jnp.zeros(2)}, '%2F': jnp.full(2, 3.0)}
  adamfx.save_npz(tmp_path / 's.npz', tree)
  back = adamfx.restore_npz(tmp_path / 's.npz', jax.tree.map(jnp.empty_like, tree))
  jax.tree.map(np.testing.assert_array_equal, back, tree)


@pytest.mark.parametrize('fmt', ['npz', 'orbax'])
def test_8bit_state_refuses_another_block_size(tmp_path, fmt):
  """5000 elements: 20 blocks of 250 or of 256, the same scale shapes."""
  params = jnp.linspace(-1, 1, 5000)
  saved_tx = adamfx.adam8bit(1e-3, block_size=250, min_8bit_size=1)
  state = saved_tx.init(params)
  _, state = saved_tx.update(params, state, params)
  other = adamfx.adam8bit(1e-3, block_size=256, min_8bit_size=1).init(params)
  assert jax.tree.map(jnp.shape, other[0].mu.scale) == jax.tree.map(jnp.shape, state[0].mu.scale)
  save, restore = {'npz': (adamfx.save_npz, adamfx.restore_npz),
                   'orbax': (adamfx.save_orbax, adamfx.restore_orbax)}[fmt]
  path = tmp_path / ('s.npz' if fmt == 'npz' else 'ckpt')
  save(path, state)
  with pytest.raises(adamfx.CheckpointError, match='block_size 250 in the checkpoint vs 256'):
    restore(path, other)
  back = restore(path, saved_tx.init(params))
  jax.tree.map(np.testing.assert_array_equal, back, state)


def test_8bit_state_in_memory_refuses_another_block_size():
  params = jnp.linspace(-1, 1, 5000)
  state = adamfx.adam8bit(1e-3, block_size=250, min_8bit_size=1).init(params)
  tx = adamfx.adam8bit(1e-3, block_size=256, min_8bit_size=1)
  with pytest.raises(ValueError, match='block_size=250.*block_size=256'):
    tx.update(params, state, params)
  with pytest.raises(adamfx.CheckpointError, match='block_size'):
    adamfx.convert_state(state, tx.init(params))


# ------------------------------------------- issue 24: saves never lose a checkpoint


def _full_disk(*args, **kwargs):
  import errno  # noqa: PLC0415

  raise OSError(errno.ENOSPC, 'No space left on device (simulated)')


@pytest.mark.parametrize('failure', ['full_disk', 'str_leaf'])
def test_failed_orbax_save_keeps_the_last_checkpoint(tmp_path, monkeypatch, failure):
  """force=True used to delete the old checkpoint before writing the new one."""
  from orbax.checkpoint import type_handlers  # noqa: PLC0415

  good = adamfx.adam(1e-3).init({'w': jnp.arange(3.0)})
  path = tmp_path / 'ckpt'
  adamfx.save_orbax(path, good)
  newer = jax.tree.map(lambda x: x + 1, good)
  if failure == 'full_disk':
    async def serialize(*args, **kwargs):
      _full_disk()

    monkeypatch.setattr(type_handlers.ArrayHandler, 'serialize', serialize)
    with pytest.raises(OSError, match='No space left'):
      adamfx.save_orbax(path, newer, force=True)
    monkeypatch.undo()
  else:
    with pytest.raises(TypeError, match=r"save_orbax .*`\['note'\]` \(str"):
      adamfx.save_orbax(path, {'state': newer, 'note': 'a string'}, force=True)
  back = adamfx.restore_orbax(path, good)
  jax.tree.map(np.testing.assert_array_equal, back, good)
  assert sorted(os.listdir(tmp_path)) == ['ckpt']  # no partial copy left behind
  adamfx.save_orbax(path, newer, force=True)  # and a good save still replaces it
  jax.tree.map(np.testing.assert_array_equal, adamfx.restore_orbax(path, good), newer)
  assert sorted(os.listdir(tmp_path)) == ['ckpt']


def test_failed_npz_save_keeps_the_last_file_and_cleans_up(tmp_path, monkeypatch):
  good = {'w': jnp.arange(3.0)}
  path = tmp_path / 's.npz'
  adamfx.save_npz(path, good)

  def savez(f, **arrays):
    f.write(b'PK\x03\x04 half a zip')  # part of the file made it to disk
    _full_disk()

  monkeypatch.setattr(np, 'savez', savez)
  with pytest.raises(OSError, match='No space left'):
    adamfx.save_npz(path, {'w': jnp.ones(3)})
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path)) == ['s.npz']  # no s.npz.tmp-<pid>
  jax.tree.map(np.testing.assert_array_equal, adamfx.restore_npz(path, good), good)


def test_str_leaves_are_refused_at_save_and_restore(tmp_path, monkeypatch):
  """save_npz wrote a str leaf that restore_npz could not read (a raw TypeError)."""
  tree = {'w': jnp.ones(2), 'name': 'run-7'}
  with pytest.raises(TypeError, match=r"save_npz .*`\['name'\]` \(str 'run-7'\)"):
    adamfx.save_npz(tmp_path / 's.npz', tree)
  assert not os.listdir(tmp_path)
  # A file holding one anyway (written before the check existed).
  from adamfx._wrappers import checkpoint as _checkpoint  # noqa: PLC0415

  monkeypatch.setattr(_checkpoint, '_refuse_unstorable', lambda *a: None)
  adamfx.save_npz(tmp_path / 's.npz', tree)
  with pytest.raises(adamfx.CheckpointError, match=r"leaf `\['name'\]` as 'str"):
    adamfx.restore_npz(tmp_path / 's.npz', tree)


# ------------------------------------------------------------------ issue 18


@pytest.mark.parametrize('pair', ['adamax_into_adam', 'adam_into_adamax', 'adamax_into_lazy_adam',
                                  'adamax_into_torch_adam'])
def test_adamax_and_adam_states_do_not_convert_into_each_other(pair, tmp_path):
  """Defect 10: AdaMax's nu is max|g|, Adam's an average of g**2: convert_state
  and restore_npz refuse either into the other, naming the leaf; optax's
  states (which do not say) still convert."""
  params = {'w': jnp.ones(3), 'b': jnp.zeros(2)}
  src, dst = {
      'adamax_into_adam': (adamfx.adamax(0.01), adamfx.adam(0.01)),
      'adam_into_adamax': (adamfx.adam(0.01), adamfx.adamax(0.01)),
      'adamax_into_lazy_adam': (adamfx.adamax(0.01), adamfx.lazy_adam(0.01)),
      'adamax_into_torch_adam': (adamfx.adamax(0.01), adamfx.torch_adam(0.01)),
  }[pair]
  state = src.init(params)
  target = dst.init(params)
  if pair.endswith('torch_adam'):  # torch_adam's state is the bare FrameworkAdamState
    state = state[0]
  with pytest.raises(adamfx.CheckpointError, match=r"nu\['w'\]`: second_moment"):
    adamfx.convert_state(state, target)
  adamfx.save_npz(tmp_path / 's.npz', state)
  with pytest.raises(adamfx.CheckpointError, match=r"nu\['w'\]`: second_moment"):
    adamfx.restore_npz(tmp_path / 's.npz', target)
  with jax.numpy_dtype_promotion('standard'):
    ok = adamfx.convert_state(optax.adamax(0.01).init(params), adamfx.adamax(0.01).init(params))
  assert type(ok[0]).__name__ == 'AdaMaxState'
