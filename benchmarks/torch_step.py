r"""The PyTorch side of benchmarks/train_step.py: the same AlexNet, SGD and metrics in torch.

Run by train_step.py, in a Python of its own that never imports JAX:

    python benchmarks/torch_step.py '{"variant": "paper", "batch": 64, "mode": "train", ...}'

prints a `timing.RESULT_PREFIX` line with the step times and the peak memory. The keys are
those `spec` in train_step.py writes.
"""

import contextlib
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# pylint: disable=g-import-not-at-top,g-bad-import-order
import numpy as np
import torch
import torch.nn.functional as F

from alexnet_jax import torch_reference
from benchmarks import timing
# pylint: enable=g-import-not-at-top,g-bad-import-order


def torch_runner(config, mode: str, batch: dict[str, np.ndarray],
                 state_dict: dict[str, np.ndarray] | None, device: str, channels_last: bool,
                 compile_model: bool):
  """Returns run(n): n PyTorch steps of the project's net and optimizer, synchronising at the end.

  Args:
    config: the benchmark's config (`timing.make_config`).
    mode: 'train' (forward, backward, SGD) or 'eval' (forward only).
    batch: from `timing.make_batch`.
    state_dict: weights to load (the Flax params through `convert`, so that both frameworks
      run the same arithmetic), or None for torch's own initialisation.
    device: 'cpu' or 'cuda'.
    channels_last, compile_model: PyTorch's own speed options.
  """
  m = config.model
  model = torch_reference.TorchAlexNet(
      m.variant, config.num_classes, config.image_size, m.dropout_rate, m.lrn_depth_radius,
      m.lrn_bias, m.lrn_alpha, m.lrn_beta)
  if state_dict is not None:
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})
  memory_format = torch.channels_last if channels_last else torch.contiguous_format
  model = model.to(device, memory_format=memory_format)
  images = torch.from_numpy(batch['image'].transpose(0, 3, 1, 2).astype(np.float32)).to(
      device, memory_format=memory_format)
  labels = torch.from_numpy(batch['label']).long().to(device)
  forward = torch.compile(model) if compile_model else model
  autocast = (torch.autocast(device, dtype=torch.bfloat16)
              if m.dtype == 'bfloat16' else contextlib.nullcontext())
  optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate,
                              momentum=config.momentum, weight_decay=config.weight_decay)

  def metrics(logits):
    # The metrics train_step / eval_step report, kept on the device like theirs.
    top5 = logits.topk(5, dim=-1).indices == labels[:, None]
    return top5[:, 0].float().mean(), top5.any(-1).float().mean()

  def train_step():
    optimizer.zero_grad(set_to_none=True)
    with autocast:
      logits = forward(images).float()
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    optimizer.step()
    return loss.detach(), metrics(logits.detach())

  def eval_step():
    with torch.inference_mode(), autocast:
      probs = forward(images).float().softmax(-1)
    return -probs.gather(1, labels[:, None]).log().sum(), metrics(probs)

  model.train(mode == 'train')
  step = train_step if mode == 'train' else eval_step

  def run(n: int) -> None:
    for _ in range(n):
      step()
    if device == 'cuda':
      torch.cuda.synchronize()
  return run


def configure(device: str, tf32: str) -> None:
  """This process's threads (CPU) or TF32 use (GPU), as train_step.py sets JAX's."""
  if device == 'cpu':
    # The same number of threads as XLA's CPU pool, which uses every core.
    torch.set_num_threads(os.cpu_count())
  elif tf32 != 'default':
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32 == 'on'


def main(spec: dict) -> None:
  device = spec['device']
  if device == 'cuda' and not torch.cuda.is_available():
    raise SystemExit('JAX runs on a GPU but this PyTorch build sees no CUDA device; install a '
                     'CUDA build of torch, or run on CPU with JAX_PLATFORMS=cpu.')
  configure(device, spec['tf32'])
  config = timing.make_config(spec['variant'], spec['batch'], spec['dtype'], 1,
                              image_size=spec['image_size'], num_classes=spec['num_classes'])
  batch = timing.make_batch(config)

  def build():
    run = torch_runner(config, spec['mode'], batch, None, device, spec['channels_last'],
                       spec['compile'])
    return run, (torch.cuda.max_memory_allocated if device == 'cuda' else None)
  result = timing.measure_alone(build, spec['warmup'], spec['steps'])
  result['device'] = torch.cuda.get_device_name() if device == 'cuda' else timing.cpu_name()
  timing.print_result(result)


if __name__ == '__main__':
  main(json.loads(sys.argv[1]))
