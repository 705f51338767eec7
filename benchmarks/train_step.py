r"""Train-step time of the default LM: attnjax attention vs flax.nnx.MultiHeadAttention.

One process, one Trainer code path, two models that differ only in the attention layer:

  attnjax   the default config (configs/mqar.py): attnjax.layers.MultiHeadAttention
            (RoPE, causal mask object, attnjax.attention 'auto' dispatch)
  nnx_mha   the same LM with every attention layer replaced by flax.nnx.MultiHeadAttention
            (causal mask array, flax's dot_product_attention; no RoPE, so it does *less*
            work per layer)

Both are timed on the same fixed batch with the real jitted, donated train step; the
variants are interleaved and the median over repeats is reported, as ms/step and as the
ratio nnx_mha / attnjax (> 1 means attnjax is faster).

  python benchmarks/train_step.py                       # default config
  python benchmarks/train_step.py --config configs/mqar.py:size=M --steps 20 --repeats 5

With ``--context N`` it instead compares context parallelism: the same attnjax config on
the same devices with mesh ``context=1`` (data parallel only) and ``context=N`` (the rest
data parallel), reporting ms/step and the per-device memory of the compiled train step
(``memory_analysis``: arguments + temporaries). On CPU it forces N host devices
(``--context_impl ring|allgather`` picks ``config.parallel.context_impl``):

  python benchmarks/train_step.py --context 4 --config configs/mqar.py:size=S --steps 5
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _register_nnx_mha():
  import jax.numpy as jnp
  from flax import nnx

  from attnjax import variants

  class NNXAttention(nnx.Module):
    """flax.nnx.MultiHeadAttention behind the attnjax variant-layer call signature."""

    def __init__(self, *, d_model, num_heads, head_dim=None, causal=False, rngs, **_ignored):
      head_dim = head_dim or d_model // num_heads
      self.causal = causal
      self.mha = nnx.MultiHeadAttention(num_heads=num_heads, in_features=d_model,
                                        qkv_features=num_heads * head_dim, out_features=d_model,
                                        use_bias=False, decode=False, rngs=rngs)

    def __call__(self, x, *, segment_ids=None, positions=None, cache=None, deterministic=True):
      del segment_ids, positions, cache
      t = x.shape[1]
      mask = nnx.make_causal_mask(jnp.ones((x.shape[0], t), jnp.int32)) if self.causal else None
      return self.mha(x, mask=mask, deterministic=deterministic)

  def factory(*, d_model, num_heads, num_kv_heads=None, head_dim=None, rngs, **options):
    del num_kv_heads
    return NNXAttention(d_model=d_model, num_heads=num_heads, head_dim=head_dim,
                        causal=bool(options.get('causal', False)), rngs=rngs)

  if 'nnx_mha' not in variants.names():
    variants.register('nnx_mha', factory, kind='sequence')


def _load_config(spec: str):
  path, _, arg = spec.partition(':')
  mod_spec = importlib.util.spec_from_file_location('bench_cfg', os.path.join(ROOT, path))
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(arg or None)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--config', default='configs/mqar.py')
  ap.add_argument('--steps', type=int, default=20, help='timed steps per repeat')
  ap.add_argument('--repeats', type=int, default=5)
  ap.add_argument('--json', default='', help='write results here')
  ap.add_argument('--context', type=int, default=0,
                  help='compare mesh context=N against context=1 (context parallelism)')
  ap.add_argument('--context_impl', default='ring', choices=('ring', 'allgather'))
  args = ap.parse_args()
  if args.context:
    return context_main(args)

  import jax
  import numpy as np

  from attnjax.train import trainer as trainer_lib
  _register_nnx_mha()

  trainers, states = {}, {}
  batch_np = None
  for name in ('attnjax', 'nnx_mha'):
    c = _load_config(args.config)
    if name == 'nnx_mha':
      c.model.attention = {'name': 'nnx_mha'}
    t = trainer_lib.Trainer(c, None)
    if batch_np is None:
      batch_np = next(iter(t.train_ds))
    state = t.init()
    batch = t.global_batch(batch_np)
    t0 = time.perf_counter()
    state, m = t.step(state, batch)            # compile + first step
    jax.block_until_ready(m)
    print(f'{name:8s} params={t.num_params:,} compile+first step {time.perf_counter() - t0:.2f}s',
          flush=True)
    trainers[name], states[name] = (t, batch), state

  times = {name: [] for name in trainers}
  for _ in range(args.repeats):
    for name, (t, batch) in trainers.items():
      state = states[name]
      t0 = time.perf_counter()
      for _ in range(args.steps):
        state, m = t.step(state, batch)
      jax.block_until_ready((state, m))
      times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
      states[name] = state

  med = {k: statistics.median(v) for k, v in times.items()}
  c = _load_config(args.config)
  seq = dict(c.data.params).get('seq_len')
  print(f'\nconfig={args.config} batch={c.batch_size} seq_len={seq} '
        f'backend={jax.default_backend()} devices={jax.device_count()}')
  print(f'{"model":10s} {"ms/step (median)":>18s} {"min":>8s} {"max":>8s}')
  for k, v in times.items():
    print(f'{k:10s} {med[k]:18.2f} {min(v):8.2f} {max(v):8.2f}')
  ratio = med['nnx_mha'] / med['attnjax']
  print(f'ratio nnx_mha / attnjax = {ratio:.3f} '
        f'({"attnjax faster" if ratio >= 1 else "attnjax slower"})')
  result = {'config': args.config, 'backend': jax.default_backend(), 'ms_per_step': med,
            'all_ms_per_step': times, 'ratio_nnx_over_attnjax': ratio}
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=2)
  del np


def _device_memory(trainer, state, batch) -> int:
  """Bytes per device of the compiled train step: arguments + temporaries (+ outputs not
  aliased to donated arguments)."""
  with trainer._ctx():  # pylint: disable=protected-access
    comp = trainer._train_step.lower(state, trainer.rest, batch).compile()  # pylint: disable=protected-access
  ma = comp.memory_analysis()
  return int(ma.argument_size_in_bytes + ma.temp_size_in_bytes + ma.output_size_in_bytes
             - ma.alias_size_in_bytes)


def context_main(args):
  """Context 1 vs context N, same process, same devices."""
  n = args.context
  if n < 1:
    raise SystemExit(f'--context must be >= 1; got {n}')
  flag = f'--xla_force_host_platform_device_count={n}'
  if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + flag).strip()
  import jax

  from attnjax.train import trainer as trainer_lib
  rows = {}
  batch_np = None
  for ctx in sorted({1, n}):
    c = _load_config(args.config)
    c.mesh = dict(data=-1, fsdp=1, tensor=1, context=ctx)
    c.parallel.context_impl = args.context_impl
    t = trainer_lib.Trainer(c, None)
    if batch_np is None:
      batch_np = next(iter(t.train_ds))
    state = t.init()
    batch = t.global_batch(batch_np)
    mem = _device_memory(t, state, batch)
    t0 = time.perf_counter()
    state, m = t.step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      for _ in range(args.steps):
        state, m = t.step(state, batch)
      jax.block_until_ready((state, m))
      times.append((time.perf_counter() - t0) / args.steps * 1e3)
    rows[ctx] = {'mesh': dict(t.mesh.shape), 'ms_per_step': statistics.median(times),
                 'bytes_per_device': mem, 'compile_s': compile_s,
                 'loss': float(m['loss'])}
  c = _load_config(args.config)
  seq = dict(c.data.params).get('seq_len')
  print(f'\nconfig={args.config} batch={c.batch_size} seq_len={seq} '
        f'backend={jax.default_backend()} devices={jax.device_count()} '
        f'context_impl={args.context_impl}')
  print(f'{"context":>8s} {"mesh":>34s} {"ms/step":>9s} {"MiB/device":>11s} {"loss":>8s}')
  for ctx, r in rows.items():
    mesh = ','.join(f'{k}={v}' for k, v in r['mesh'].items())
    print(f'{ctx:8d} {mesh:>34s} {r["ms_per_step"]:9.2f} '
          f'{r["bytes_per_device"] / 2**20:11.2f} {r["loss"]:8.4f}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'config': args.config, 'context_impl': args.context_impl,
                 'backend': jax.default_backend(), 'rows': rows}, f, indent=2)


if __name__ == '__main__':
  main()
