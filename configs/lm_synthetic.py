r"""Causal LM on a synthetic sequence task: selective copy (default) or MQAR.

  python train.py --config configs/lm_synthetic.py
  python train.py --config configs/lm_synthetic.py:task=mqar,variant=alibi
"""

from attnjax.train import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, size='S', variant='mha', task='selective_copy', seq_len=48,
                           vocab=16, tokens=6, steps=800, runlocal=False)
  if a.task not in ('selective_copy', 'mqar'):
    raise ValueError(f"config argument task={a.task!r} must be 'selective_copy' or 'mqar'.")
  c = config_lib.base_config()
  c.task = 'lm'
  c.data.name = a.task
  c.data.params.vocab_size = a.vocab
  c.data.params.seq_len = a.seq_len
  if a.task == 'selective_copy':
    c.data.params.num_tokens = a.tokens
  else:
    c.data.params.num_pairs = a.tokens
  c.data.num_train, c.data.num_test = 10000, 1000
  size = 'T' if a.runlocal else a.size
  c.model = config_lib.model_config('lm', size, variant=a.variant, seq_len=a.seq_len,
                                    vocab_size=a.vocab)
  c.num_steps, c.batch_size, c.eval_batch_size = a.steps, 32, 100
  c.log_every, c.checkpoint_every = 50, 200
  c.schedule.learning_rate = 3e-3
  if a.runlocal:
    config_lib.apply_runlocal(c)
  return c
