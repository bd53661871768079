"""The paper's recipe: AlexNet on ILSVRC-2012 (Krizhevsky, Sutskever, Hinton, 2012).

Every knob the code reads lives here, with where its default comes from. The other configs
start from this one and change only what differs.

    python -m alexnet_jax.main --config=configs/imagenet.py --workdir=/tmp/alexnet \
        --config.data_dir=/path/to/tensorflow_datasets
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the paper's ImageNet training configuration."""
  config = ml_collections.ConfigDict()

  # ---------------------------------------------------------------- data
  # 'imagenet2012' (TFDS, manual download), 'folder' (ROOT/{train,val}/CLASS/*),
  # 'digits' (scikit-learn's bundled 8x8 digits, no download), 'fake' (synthetic, throughput
  # only), or any other TFDS name such as 'imagenette/full-size-v2'.
  config.dataset = 'imagenet2012'
  # TFDS data dir, or the image-folder root when dataset == 'folder'. None: TFDS's default.
  config.data_dir = ml_collections.FieldReference(None, field_type=str)
  # Where TFDS looks for ILSVRC2012_img_{train,val}.tar. None: <data_dir>/downloads/manual.
  config.manual_dir = ml_collections.FieldReference(None, field_type=str)
  config.train_split = 'train'
  config.eval_split = 'validation'  # ILSVRC-2012 val; the paper reports on it.
  config.num_classes = 1000
  # 3: RGB (paper; grey files are repeated to RGB). 1: grey, colour files reduced to their
  # luminance (d2l's Fashion-MNIST); needs pca_lighting_std=0, no 'channel' mean, no std.
  config.input_channels = 3

  # ------------------------------------------------------ preprocessing
  config.image_size = 224  # Paper: 224 (with conv1 padding as torchvision; Caffe crops 227).
  config.resize_size = 256  # Paper: shorter side to 256 ...
  config.center_crop_train = True  # ... then the central 256x256 before random crops (paper).
  # 'paper': random image_size crop of the resized image; 'random_resized': Inception-style
  # area/aspect crop (the modern default of torchvision and Flax's ImageNet example).
  config.train_crop = 'paper'
  # The smallest image share a 'random_resized' crop covers: 0.08 (Inception, torchvision's
  # RandomResizedCrop); fast.ai's Imagenette training uses 0.35.
  config.crop_area_min = 0.08
  config.random_flip = True  # Paper: horizontal reflections.
  config.pca_lighting_std = 0.1  # Paper: alpha ~ N(0, 0.1) on the RGB eigenbasis; 0 turns it off.
  # 'channel': subtract the per-channel ImageNet mean (torchvision/Flax habit, our default);
  # 'pixel': the paper's mean image of the training set (computed once and cached, see README);
  # 'none'. Images are scaled to [0, 255] before subtraction, as in the paper and Caffe.
  config.mean_subtraction = 'channel'
  config.mean_image_path = ml_collections.FieldReference(None, field_type=str)
  # Paper/Caffe: pixels stay on the 0-255 scale. True: divide by the per-channel ImageNet std
  # (torchvision), which 'he' init assumes: unit-variance inputs.
  config.divide_by_std = False
  # d2l (torchvision's ToTensor alone): divide by 255, pixels on [0, 1]. Not with divide_by_std.
  config.divide_by_255 = False
  # 1: centre crop (Caffe/torchvision numbers); 10: the paper's 10-crop, which becomes the 5
  # unmirrored crops where random_flip is off; 5: those 5 crops.
  config.eval_crops = 1
  config.on_bad_image = 'skip'  # 'skip' (warn, count) or 'raise' on undecodable files.

  # ------------------------------------------------------------ tf.data
  config.shuffle_buffer_size = 16_384
  config.cache = False  # Cache decoded eval data in memory (small datasets only).
  config.num_parallel_calls = -1  # -1: tf.data.AUTOTUNE.
  config.private_threadpool_size = 0  # 0: TF's default (all cores).
  config.deterministic = True  # Same seed, same batches; False trades that for speed.
  config.prefetch_to_device = 2  # Batches staged on device ahead of the step.

  # -------------------------------------------------------------- model
  config.model = ml_collections.ConfigDict()
  # 'paper' (grouped, LRN), 'torchvision' (one weird trick) or 'd2l' (Dive into Deep
  # Learning's: the paper's widths, no groups, no LRN, conv1 padded by 1).
  config.model.variant = 'paper'
  # conv1's padding. None: the variant's own, 2 for 'paper' and 'torchvision' (torchvision's:
  # 224 px then gives the paper's 55x55) and 1 for 'd2l' (its code). 0 with image_size=227:
  # Caffe's and CS231n's geometry (55x55x96 after conv1, as the lecture slides).
  config.model.conv1_padding = ml_collections.FieldReference(None, field_type=int)
  # 'paper': N(0, 0.01), bias 1 in conv2/4/5/fc6/fc7. 'caffe': bias 0.1, fc6/7 std 0.005.
  # 'he': Kaiming-normal, zero bias (quick modern runs). 'xavier': d2l's Xavier-uniform
  # weights, biases at torch's default U(+-1/sqrt(fan_in)).
  config.model.init = 'paper'
  config.model.dropout_rate = 0.5  # Paper.
  config.model.dtype = 'float32'  # Compute dtype; 'bfloat16' for speed on GPU/TPU.
  # Which convolution and max-pool programs (same numbers to rounding). 'xla': XLA's own ops,
  # the network as written (cuDNN on GPU), XLA's default kernels. 'cpu': fast_ops' forms, and
  # the commands set XLA:CPU's Eigen convolutions (cpu_convolutions.XLA_FLAG); on a 2-core CPU the
  # convs and pools took 1.9x less time than XLA's defaults (torchvision), and 3.2x less
  # than XLA's ops on the same Eigen kernels (paper; docs/benchmarks.md).
  # 'partitionable': grouped convs that split by group over the 'model' axis. 'auto' (ours):
  # 'partitionable' under parallelism='model', 'cpu' on a CPU backend, else 'xla'.
  config.model.ops = 'auto'
  # LRN in TensorFlow's convention (alpha not divided by the window): the paper's literal
  # k=2, n=5, alpha=1e-4, beta=0.75. Caffe's bvlc_alexnet: bias=1.0, alpha=2e-5.
  config.model.lrn_depth_radius = 2
  config.model.lrn_bias = 2.0
  config.model.lrn_alpha = 1e-4
  config.model.lrn_beta = 0.75

  # ---------------------------------------------------------- optimizer
  # 'paper_momentum': v <- m v - lr (g + wd w); w <- w + v (the learning rate inside the
  # velocity, as the paper writes it). 'sgd': optax.sgd / PyTorch, lr applied after momentum.
  config.optimizer = 'paper_momentum'
  config.learning_rate = 0.01  # Paper.
  config.momentum = 0.9  # Paper.
  config.weight_decay = 5e-4  # Paper.
  # The paper's update names the weights w only; Caffe's bvlc_alexnet sets decay_mult 0 on
  # biases. True decays biases too.
  config.weight_decay_on_biases = False
  config.label_smoothing = 0.0  # Paper: none.

  # --------------------------------------------------- learning rate
  # 'plateau': divide by plateau_factor when best_metric (val top-1) stops improving (paper,
  # three times);
  # 'step': multiply by plateau_factor at each epoch in step_epochs; 'cosine' and 'linear'
  # (decay to zero over the run; linear: budgeted training, Li et al. 2020); 'constant'.
  config.lr_schedule = 'plateau'
  config.plateau_factor = 0.1  # Paper: divide by 10.
  # Evaluations of best_metric without improvement before a drop (our choice).
  config.plateau_patience = 3
  config.plateau_min_delta = 1e-3  # Smallest top-1 gain that counts as improvement.
  # 'abs': a gain of more than min_delta (PyTorch ReduceLROnPlateau's threshold_mode='abs');
  # 'rel': more than best * min_delta (PyTorch's default 'rel').
  config.plateau_threshold_mode = 'abs'
  config.plateau_max_drops = 3  # Paper: "reduced three times prior to termination".
  config.step_epochs = (30, 60, 80)
  config.warmup_epochs = 0.0

  # ------------------------------------------------------------- run
  config.batch_size = 128  # Paper: global batch, split over all devices.
  config.eval_batch_size = 256
  config.num_epochs = 90.0  # Paper: "roughly 90 cycles".
  config.num_train_steps = -1  # > 0 overrides num_epochs.
  config.steps_per_eval = -1  # -1: the whole eval split.
  config.eval_every_epochs = 1.0
  # What each evaluation measures (alexnet_jax/evaluators.py): a name -> {'kind':
  # 'classification' | 'per_class' | 'knn', 'every_epochs', and the kind's own settings}. The
  # default is the paper's validation top-1/top-5 at config.eval_crops, every
  # eval_every_epochs; add e.g. 'knn': {'kind': 'knn', 'k': 20} for fc7 nearest neighbours.
  config.evaluators = ml_collections.ConfigDict({'eval': {'kind': 'classification'}})
  # '<evaluator>/<metric>' the plateau rule and the best checkpoint read. Paper: the
  # validation error rate drives the learning-rate drops.
  config.best_metric = 'eval/top1'
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3  # Plus the best by best_metric.
  config.seed = 0
  config.num_devices = 0  # 0: all local devices; N: the first N (e.g. to compare counts).
  # 'pmap' (jax.pmap, what Flax's ImageNet example uses) or 'mesh' (jax.jit over a Mesh of
  # all devices, global arrays with a NamedSharding, as big_vision does); the same training.
  # 'model': the paper's model parallelism (docs/parallelism.md), a Mesh ('batch', 'model').
  config.parallelism = 'pmap'
  # With parallelism='model': devices on the 'model' axis, each holding 1/N of every layer's
  # kernels (the paper split over 2 GPUs, section 3.2); the 'batch' axis is the remaining
  # devices (all of them / N). Must divide each host's device count.
  config.model_parallel_size = 2

  config.on_nonfinite = 'stop'  # 'stop' the run, or 'skip' the step and count it.
  config.allow_config_change = False  # Resume a workdir written with another config.
  # Weights a fresh run starts from (the workdir's own checkpoints win on a rerun): an .npz of
  # `alexnet_jax.convert`, a torch .pth state_dict (torchvision's names), or a workdir of this
  # project. fc8 stays freshly initialised when its class count differs. None: the paper's
  # training from scratch.
  config.init_from = ml_collections.FieldReference(None, field_type=str)
  return config
