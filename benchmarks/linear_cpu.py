"""Time and memory vs sequence length: chunked causal linear attention vs causal softmax.

    python benchmarks/linear_cpu.py [--lengths 4096,8192,...] [--methods linear_chunked,...]
        [--heads 4] [--dim 64] [--chunk 64] [--reps 3] [--out linear_cpu.json]

For every length T it times (median and minimum of ``--reps`` runs, after a compile+warm-up
run) the jitted forward and forward+backward (``jax.grad`` of a sum) of

- ``attnjax.ops.linear.linear_attention(causal=True, form='chunked')`` (elu+1, normalised),
- ``attnjax.ops.linear.lightning_attention(form='chunked')`` (per-head decay),
- causal softmax attention: ``jax.nn.dot_product_attention(is_causal=True)`` and, when the
  core is importable, ``attnjax.attention(q, k, v, mask=attnjax.masks.causal())``,
- the gated / delta-rule family (issue 22), each as ``*_chunked`` and ``*_recurrent``:
  ``gated_linear_attention`` (``gla``), ``delta_rule_attention`` (``deltanet``),
  ``gated_delta_rule_attention`` (``gated_deltanet``) and ``ssd_attention`` (``ssd``); their
  gates are computed from the inputs (``log_alpha = log_sigmoid(4 q) / 16``,
  ``beta = sigmoid(sum_h q)``, L2-normalised keys for the delta rule), so gradients flow
  through them. ``*_recurrent`` methods run only at ``--recurrent-lengths`` (default 8192).

Ratios printed (medians and minima of the ``--reps`` runs): fwd+bwd
time(T=65536)/time(T=8192) per method (target <= 9), and for the gated family recurrent /
chunked at T=8192 (target >= 3); on a shared machine use ``--reps 5`` or more and read
the minima. ``--dtype bfloat16`` runs the inputs in bf16 and reports the largest
|bf16 - float32| output difference per row (target <= 2e-2, relative to max(1, |float32|)).

Memory is XLA's compiled estimate (``memory_analysis()``: temporaries + outputs) of the
forward+backward program. Softmax runs are skipped when their ``[B, N, T, T]`` float32
logits alone would exceed ``--softmax-mem-gb``. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from attnjax.ops import linear as L


def _memory_bytes(compiled):
  try:
    m = compiled.memory_analysis()
    return int(m.temp_size_in_bytes + m.output_size_in_bytes)
  except Exception:  # memory analysis is optional on some backends
    return None


def _time(fn, args, reps):
  jitted = jax.jit(fn)
  compiled = jitted.lower(*args).compile()
  jax.block_until_ready(compiled(*args))          # warm-up
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times), min(times), _memory_bytes(compiled)


def _fwd_bwd(f):
  return jax.grad(lambda q, k, v: jnp.sum(f(q, k, v)), argnums=(0, 1, 2))


def _methods(args, N):
  decay = jnp.linspace(0.9, 0.999, N)
  methods = {
      'linear_chunked': lambda q, k, v: L.linear_attention(
          q, k, v, causal=True, chunk_size=args.chunk),
      'lightning_chunked': lambda q, k, v: L.lightning_attention(
          q, k, v, decay=decay, chunk_size=args.chunk),
      'softmax_jax_nn': lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True),
  }
  try:
    import attnjax
    from attnjax import masks
    attention = attnjax.attention
    methods['softmax_attnjax'] = lambda q, k, v: attention(q, k, v, mask=masks.causal())
  except (ImportError, AttributeError) as e:
    print(f'attnjax.attention unavailable ({type(e).__name__}: {e}); skipping it')
  methods.update(_gated_methods(args))
  return methods


def _gated_inputs(q, k, v):
  log_alpha = jax.nn.log_sigmoid(4.0 * q.astype(jnp.float32)) / 16.0
  beta = jax.nn.sigmoid(jnp.sum(q.astype(jnp.float32), -1))
  k_unit = k * jax.lax.rsqrt(jnp.sum(k * k, -1, keepdims=True) + 1e-6)
  return log_alpha, beta, k_unit


def _gated_methods(args):
  def gla(form):
    def f(q, k, v):
      la, _, _ = _gated_inputs(q, k, v)
      return L.gated_linear_attention(q, k, v, la, form=form, chunk_size=args.chunk)
    return f

  def delta(form):
    def f(q, k, v):
      _, beta, ku = _gated_inputs(q, k, v)
      return L.delta_rule_attention(q, ku, v, beta, form=form, chunk_size=args.chunk)
    return f

  def gdelta(form):
    def f(q, k, v):
      la, beta, ku = _gated_inputs(q, k, v)
      return L.gated_delta_rule_attention(q, ku, v, beta, la[..., 0], form=form,
                                          chunk_size=args.chunk)
    return f

  def ssd(form):
    def f(q, k, v):
      N = q.shape[2]
      dt = jax.nn.softplus(q[..., 0].astype(jnp.float32)) * 0.1
      A = -jnp.linspace(1.0, 4.0, N)
      return L.ssd_attention(v, dt, A, k, q, D=jnp.ones((N,)), form=form,
                             chunk_size=args.chunk)
    return f

  out = {}
  for name, make in (('gla', gla), ('deltanet', delta), ('gated_deltanet', gdelta),
                     ('ssd', ssd)):
    out[f'{name}_chunked'] = make('chunked')
    out[f'{name}_recurrent'] = make('recurrent')
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--lengths', default='4096,8192,16384,32768,65536')
  p.add_argument('--methods', default=None,
                 help='comma-separated subset of the method names (default: all)')
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--heads', type=int, default=4)
  p.add_argument('--dim', type=int, default=64)
  p.add_argument('--chunk', type=int, default=64)
  p.add_argument('--reps', type=int, default=3)
  p.add_argument('--softmax-mem-gb', type=float, default=2.0)
  p.add_argument('--recurrent-lengths', default='8192',
                 help='lengths at which the *_recurrent methods run')
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  p.add_argument('--out', default='linear_cpu.json')
  args = p.parse_args()
  lengths = [int(x) for x in args.lengths.split(',')]
  B, N, H = args.batch, args.heads, args.dim
  methods = _methods(args, N)
  if args.methods:
    wanted = args.methods.split(',')
    unknown = sorted(set(wanted) - set(methods))
    if unknown:
      p.error(f'--methods: unknown {unknown}; expected a subset of {sorted(methods)}')
    methods = {name: methods[name] for name in wanted}
  rec_lengths = {int(x) for x in args.recurrent_lengths.split(',') if x}
  dtype = jnp.dtype(args.dtype)
  rows = []
  for T in lengths:
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(T), 3)
    q = jax.random.normal(kq, (B, T, N, H)) * H ** -0.5
    k = jax.random.normal(kk, (B, T, N, H)) * H ** -0.5
    v = jax.random.normal(kv, (B, T, N, H))
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    for name, f in methods.items():
      if name.endswith('_recurrent') and T not in rec_lengths:
        continue
      row = dict(method=name, T=T, B=B, N=N, H=H, chunk=args.chunk, dtype=args.dtype)
      if name.startswith('softmax') and B * N * T * T * 4 > args.softmax_mem_gb * 2 ** 30:
        row.update(skipped=f'[B,N,T,T] logits exceed {args.softmax_mem_gb} GB')
      else:
        try:
          row['fwd_s'], row['fwd_min_s'], _ = _time(f, (q, k, v), args.reps)
          row['fwd_bwd_s'], row['fwd_bwd_min_s'], row['fwd_bwd_mem_bytes'] = _time(
              _fwd_bwd(f), (q, k, v), args.reps)
          if dtype != jnp.float32:
            lo = jax.jit(f)(q, k, v).astype(jnp.float32)
            hi = jax.jit(f)(*(x.astype(jnp.float32) for x in (q, k, v))).astype(jnp.float32)
            row['finite'] = bool(jnp.all(jnp.isfinite(lo)))
            row['max_rel_err_vs_f32'] = float(
                jnp.max(jnp.abs(lo - hi)) / jnp.maximum(1.0, jnp.max(jnp.abs(hi))))
        except Exception as e:  # report, do not hide: the row says why
          row.update(skipped=f'{type(e).__name__}: {str(e)[:120]}')
      rows.append(row)
      _print_row(row)
  ratios = {}
  for name in methods:
    for stat, key in (('median', 'fwd_bwd_s'), ('min', 'fwd_bwd_min_s')):
      t = {r['T']: r.get(key) for r in rows if r['method'] == name}
      if t.get(8192) and t.get(65536):
        ratios.setdefault(name, {})[stat] = t[65536] / t[8192]
  for name, r in ratios.items():
    print(f"{name}: fwd+bwd time(T=65536) / time(T=8192) = {r['median']:.2f} (medians), "
          f"{r['min']:.2f} (minima)  (linear scaling = 8)")
  speedups = {}
  for name in methods:
    if name.endswith('_chunked'):
      base = name[:-len('_chunked')]
      for stat, key in (('median', 'fwd_bwd_s'), ('min', 'fwd_bwd_min_s')):
        t = {r['method']: r.get(key) for r in rows if r['T'] == 8192}
        if t.get(name) and t.get(f'{base}_recurrent'):
          speedups.setdefault(base, {})[stat] = t[f'{base}_recurrent'] / t[name]
      if base in speedups:
        print(f"{base}: fwd+bwd recurrent / chunked at T=8192 = {speedups[base]['median']:.2f} "
              f"(medians), {speedups[base]['min']:.2f} (minima)  (target >= 3)")
  meta = dict(jax=jax.__version__, backend=jax.default_backend(), machine=platform.machine(),
              processor=platform.processor(), devices=str(jax.devices()))
  with open(args.out, 'w') as fh:
    json.dump(dict(meta=meta, args=vars(args), rows=rows, ratio_65536_over_8192=ratios,
                   recurrent_over_chunked_8192=speedups), fh, indent=2)
  print(f'wrote {args.out}')


def _print_row(r):
  if 'skipped' in r:
    print(f"{r['method']:<24} T={r['T']:>6}  skipped: {r['skipped']}", flush=True)
    return
  mem = r.get('fwd_bwd_mem_bytes')
  mem_s = f'{mem / 2 ** 20:9.1f} MiB' if mem is not None else '      n/a'
  err = ''
  if 'max_rel_err_vs_f32' in r:
    err = f"  finite={r['finite']} |bf16-f32|/max(1,|f32|)={r['max_rel_err_vs_f32']:.2e}"
  print(f"{r['method']:<24} T={r['T']:>6}  fwd {r['fwd_s'] * 1e3:9.1f} ms  "
        f"fwd+bwd {r['fwd_bwd_s'] * 1e3:9.1f} ms (min {r['fwd_bwd_min_s'] * 1e3:9.1f})  "
        f"mem(fwd+bwd) {mem_s}{err}", flush=True)


if __name__ == '__main__':
  main()
