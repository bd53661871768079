"""Imagenette in 30 minutes on 2 CPU cores: the paper's network, a budgeted recipe.

Prepare the data once (the 128-px canvases this config trains on), then train:

    python -m alexnet_jax.prepare --config=configs/imagenette_30min.py \
        --config.dataset=folder --config.data_dir=../shared/data/imagenette2-224 \
        --output=/tmp/imagenette_128
    python -m alexnet_jax.main --config=configs/imagenette_30min.py \
        --config.data_dir=/tmp/imagenette_128 --workdir=/tmp/imagenette_30min

The network is the paper's (groups, LRN, overlapping pools, dropout); what differs from
configs/imagenette.py is the budget: the resolution, the epochs that fit, a schedule that
decays to zero at the end of the budget, label smoothing and light dropout.
docs/results.md ("Time to accuracy") records what each choice measured.
"""

import ml_collections

from configs import imagenette


def get_config() -> ml_collections.ConfigDict:
  """Returns the 30-minute CPU configuration for Imagenette."""
  config = imagenette.get_config()
  # Canvases prepared at resize_size by alexnet_jax.prepare: a small JPEG to decode per image.
  config.dataset = 'prepared'
  config.data_dir = ml_collections.FieldReference(None, field_type=str)
  # 112 px (resize 128, the paper's 256/224 ratio): at equal epochs as accurate as 128 px
  # (70.4% and 70.2% at epoch 8) and 1.4x faster a step, so 19 epochs fit where 128 px fits
  # about 14 (docs/results.md, runs A, C and D); 224 px would fit about 5.
  config.image_size = 112
  config.resize_size = 128
  config.batch_size = 64
  config.eval_batch_size = 128
  # lr 0.01 at batch 64: configs/imagenette_cpu.py's rate, which the probe trained with; 0.02
  # ended 0.1 points lower (docs/results.md, runs D and E).
  config.learning_rate = 0.01
  # Decays linearly to zero over the run: the budgeted-training schedule (Li, Yumer, Ramanan
  # 2020), +2.2 top-1 for CaffeNet at 128 px against a step schedule (Mishkin et al. 2017).
  config.lr_schedule = 'linear'
  config.warmup_epochs = 1.0
  # 0.1: Szegedy et al. 2016, the value FFCV and Bag of Tricks use; the paper has none.
  config.label_smoothing = 0.1
  # 0.1 instead of the paper's 0.5: at this budget regularisation costs more than it saves.
  # 0.3 (+2.6 top-1 for CaffeNet at 128 px on ImageNet, Mishkin et al. 2017) gave 76.1% and
  # 76.2% (two seeds), 0.1 gave 76.8%, 0 gave 76.1%; stronger augmentation (random-resized
  # crops) 74.9% (docs/results.md, runs D, F, H, I, G).
  config.model.dropout_rate = 0.1
  # 27.7 minutes on 2 cores with the evaluations (docs/results.md, runs D and H); a 20th epoch
  # (85 s) would fit too, by their step time (not run): 19 leaves room for a busier machine.
  config.num_epochs = 19.0
  # An evaluation costs ~10 s, and the save that comes with it slows the steps beside it
  # (its asynchronous write shares the 2 cores): three, at epochs 6.5, 13 and 19.
  config.eval_every_epochs = 6.5
  config.log_every_steps = 50
  config.checkpoint_every_steps = 10_000  # Saves at the evaluations only (as above).
  config.cache = True  # The 3,925 val canvases decoded once: 0.2 GB at 128 px.
  return config
