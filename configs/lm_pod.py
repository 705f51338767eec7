r"""A ~1B-parameter decoder LM for a 256-chip slice (data 16 x fsdp 16), and its dry run.

  python train.py --config configs/lm_pod.py:dry --dry_run     # here: 2 layers, 64 fake devices
  python train.py --config configs/lm_pod.py --dry_run         # full depth, 256 fake devices
  # the real pod: docs/training.md ("Dry run on a pod-sized mesh" has the launch lines)

Model (LLaMA-style, attnjax.models 'lm'): d_model 2048, 20 blocks, 16 query heads and 4
key/value heads (GQA) of width 128, gated SiLU MLP of width 5632, RoPE, untied 32768-token
vocabulary: 1.036e9 parameters (907M in the blocks, 2 x 67M embedding/unembedding).
bfloat16 compute with float32 parameters and AdamW state, the layers scanned
(``scan_layers``: one compiled block whatever the depth) and rematerialised (``remat_policy
= 'full'``: only each block's input is kept for the backward pass).

Mesh: ``chips = data x fsdp x context``; parameters and optimizer state are split over
``fsdp`` (ZeRO-3), the batch over ``data x fsdp``, the sequence over ``context``. The
global batch is ``seqs_per_rank x data x fsdp`` sequences of ``seq_len`` tokens (default 2
x 256 x 4096 = 2.1M tokens per step).

Data: the built-in MQAR task at the model's vocabulary and length (a stand-in: point
``config.data.tfds_name`` at a prepared array_record dataset with ``inputs`` / ``targets``
/ ``weights`` int32/float32 ``[seq_len]`` fields for real text).

Attention implementation (``impl``, default 'xla': plain XLA ops). The jitted step is
partitioned by GSPMD, which splits XLA ops over the mesh but not a kernel's custom call:
under ``impl=auto`` (Pallas on TPU/GPU, the C++ kernel on CPU) or ``xla_chunked`` the
dry run shows every device all-gathering the whole global batch's Q/K/V (4 GiB per
device per layer here), while 'xla' keeps attention batch-parallel. Calling the kernels
inside ``shard_map`` from the layers is the fix that would let ``impl=auto`` scale.

Arguments: layers (20), chips (256), fsdp (16), context (1), seq_len (4096),
seqs_per_rank (2), variant (mha), impl (xla; 'auto' = attnjax's choice), steps (10000),
dry (= layers=2, chips=64: the dry run on this machine; fsdp stays 16, so the per-device
parameter and optimizer bytes per layer are those of the pod).
"""

from attnjax.train import config_lib

D_MODEL, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, MLP_DIM, VOCAB = 2048, 16, 4, 128, 5632, 32768


def get_config(arg=None):
  a = config_lib.parse_arg(arg, layers=20, chips=256, fsdp=16, context=1, seq_len=4096,
                           seqs_per_rank=2, variant='mha', impl='xla', steps=10000,
                           dry=False)
  if a.dry:
    a.layers, a.chips = (2 if a.layers == 20 else a.layers), (64 if a.chips == 256 else a.chips)
  for key in ('layers', 'chips', 'fsdp', 'context', 'seq_len', 'seqs_per_rank', 'steps'):
    v = a[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f'config argument {key}={v!r} must be a positive int.')
  if a.chips % (a.fsdp * a.context):
    raise ValueError(f'config argument chips={a.chips} must be divisible by fsdp * context = '
                     f'{a.fsdp} * {a.context}.')
  data = a.chips // (a.fsdp * a.context)

  c = config_lib.base_config()
  c.task = 'lm'
  c.data.name = 'mqar'
  c.data.params.vocab_size = VOCAB
  c.data.params.seq_len = a.seq_len
  c.data.params.num_pairs = min(512, max(1, (a.seq_len - 2) // 4))
  c.data.num_train, c.data.num_test = 8192, 256

  c.model = config_lib.model_config('lm', None, variant=a.variant, seq_len=a.seq_len,
                                    vocab_size=VOCAB)
  if a.impl != 'auto':
    c.model.attention.implementation = a.impl
  c.model.d_model, c.model.num_layers = D_MODEL, a.layers
  c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = NUM_HEADS, NUM_KV_HEADS, HEAD_DIM
  c.model.mlp_dim = MLP_DIM
  c.model.dtype = 'bfloat16'
  c.model.remat_policy = 'full'
  c.model.scan_layers = True

  c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.context = data, a.fsdp, 1, a.context
  c.batch_size = a.seqs_per_rank * data * a.fsdp
  c.eval_batch_size = c.batch_size
  c.eval_max_examples = 256
  c.num_steps = a.steps
  c.log_every, c.eval_every, c.checkpoint_every = 50, 1000, 1000
  c.optimizer.weight_decay, c.optimizer.b2 = 0.1, 0.95
  c.schedule.learning_rate = 3e-4
  c.schedule.warmup_steps = min(1000, a.steps)
  c.progress_bar = False
  return c
