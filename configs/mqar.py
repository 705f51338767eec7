r"""Multi-query associative recall with a causal LM: the default experiment of train.py.

  python train.py                                   # this config, ./workdir/mqar
  python train.py --config configs/mqar.py:variant=sliding_window,size=M
  python train.py --config configs/mqar.py:runlocal --config.num_steps=50

Arguments: size (T/S/M/B), variant (attnjax.variants name), pairs, vocab, seq_len,
steps, runlocal (tiny and fast: smoke test).
"""

from attnjax.train import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, size='S', variant='mha', pairs=6, vocab=64, seq_len=48,
                           steps=600, runlocal=False)
  c = config_lib.base_config()
  c.task = 'lm'
  c.data.name = 'mqar'
  c.data.params.vocab_size = a.vocab
  c.data.params.num_pairs = a.pairs
  c.data.params.seq_len = a.seq_len
  c.data.num_train = 10000
  c.data.num_test = 1000
  c.model = config_lib.model_config('lm', a.size, variant=a.variant, seq_len=a.seq_len,
                                    vocab_size=a.vocab)
  c.num_steps = a.steps
  c.batch_size = 32
  c.eval_batch_size = 100
  c.log_every = 50
  c.checkpoint_every = 200
  c.schedule.learning_rate = 3e-3
  c.schedule.warmup_steps = 100
  if a.runlocal:
    c.model = config_lib.model_config('lm', 'T', variant=a.variant, seq_len=a.seq_len,
                                      vocab_size=a.vocab)
    config_lib.apply_runlocal(c)
  return c
