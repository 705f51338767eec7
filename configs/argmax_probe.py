r"""Argmax position probe with a bidirectional encoder (sequence classification).

Each input is ``seq_len`` distinct tokens; the label is the position of the largest. The
encoder must compare every token with every other one, so the probe separates attention
patterns that see the whole sequence (mha) from local ones (sliding_window, neighborhood).

  python train.py --config configs/argmax_probe.py
  python train.py --config configs/argmax_probe.py:variant=sliding_window
"""

from attnjax.train import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, size='S', variant='mha', seq_len=16, vocab=64, steps=800,
                           runlocal=False)
  c = config_lib.base_config()
  c.task = 'classification'
  c.data.name = 'argmax_probe'
  c.data.params.vocab_size = a.vocab
  c.data.params.seq_len = a.seq_len
  c.data.num_train, c.data.num_test = 10000, 1000
  c.model = config_lib.model_config('encoder', a.size, variant=a.variant, seq_len=a.seq_len,
                                    vocab_size=a.vocab, num_classes=a.seq_len, head='sequence',
                                    pool='cls')
  c.num_steps, c.batch_size, c.eval_batch_size = a.steps, 64, 100
  c.log_every, c.checkpoint_every = 50, 200
  c.schedule.learning_rate = 2e-3
  if a.runlocal:
    c.model = config_lib.model_config('encoder', 'T', variant=a.variant, seq_len=a.seq_len,
                                      vocab_size=a.vocab, num_classes=a.seq_len,
                                      head='sequence', pool='cls')
    config_lib.apply_runlocal(c)
  return c
