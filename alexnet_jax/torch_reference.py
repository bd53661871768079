"""AlexNet in plain PyTorch: the independent reference for tests, benchmarks and weight conversion.

The 'paper' and 'torchvision' variants of `models.AlexNet`, written without reference to it:
  'torchvision': torchvision's `AlexNet` layer for layer, with its parameter names
    (`features.N`, `classifier.N`), so a torchvision `state_dict` loads as is.
  'paper': grouped `nn.Conv2d(groups=2)` for conv2, conv4, conv5 and `nn.LocalResponseNorm`
    after conv1 and conv2, in the same `features` / `classifier` layout. No adaptive pool, so
    fc6's input size is worked out from `image_size` when the model is built.
conv1 is padded by 2 in both, as torchvision does; `conv1_padding=0` is Caffe's conv1 (227 px).
'd2l' is not here: tests/test_d2l.py builds it from the book's own code.

Only tests, benchmarks and `convert` import this module; the JAX code never needs torch.
"""

import torch
from torch import nn

VARIANTS = ('paper', 'torchvision')


def _paper_features(conv1_padding: int, lrn_depth_radius: int, lrn_bias: float,
                    lrn_alpha: float, lrn_beta: float) -> nn.Sequential:
  size = 2 * lrn_depth_radius + 1
  # torch divides alpha by the window size; the TensorFlow convention (ours) does not.
  lrn = lambda: nn.LocalResponseNorm(size, alpha=lrn_alpha * size, beta=lrn_beta, k=lrn_bias)
  return nn.Sequential(
      nn.Conv2d(3, 96, kernel_size=11, stride=4, padding=conv1_padding),
      nn.ReLU(inplace=True),
      lrn(),
      nn.MaxPool2d(kernel_size=3, stride=2),
      nn.Conv2d(96, 256, kernel_size=5, padding=2, groups=2),
      nn.ReLU(inplace=True),
      lrn(),
      nn.MaxPool2d(kernel_size=3, stride=2),
      nn.Conv2d(256, 384, kernel_size=3, padding=1),
      nn.ReLU(inplace=True),
      nn.Conv2d(384, 384, kernel_size=3, padding=1, groups=2),
      nn.ReLU(inplace=True),
      nn.Conv2d(384, 256, kernel_size=3, padding=1, groups=2),
      nn.ReLU(inplace=True),
      nn.MaxPool2d(kernel_size=3, stride=2),
  )


def _torchvision_features(conv1_padding: int) -> nn.Sequential:
  return nn.Sequential(
      nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=conv1_padding),
      nn.ReLU(inplace=True),
      nn.MaxPool2d(kernel_size=3, stride=2),
      nn.Conv2d(64, 192, kernel_size=5, padding=2),
      nn.ReLU(inplace=True),
      nn.MaxPool2d(kernel_size=3, stride=2),
      nn.Conv2d(192, 384, kernel_size=3, padding=1),
      nn.ReLU(inplace=True),
      nn.Conv2d(384, 256, kernel_size=3, padding=1),
      nn.ReLU(inplace=True),
      nn.Conv2d(256, 256, kernel_size=3, padding=1),
      nn.ReLU(inplace=True),
      nn.MaxPool2d(kernel_size=3, stride=2),
  )


class TorchAlexNet(nn.Module):
  """AlexNet on NCHW float images [N, 3, H, W] -> logits [N, num_classes].

  Args:
    variant: 'paper' or 'torchvision'.
    num_classes: width of the last layer.
    image_size: side of the (square) input; sets fc6's width in the paper variant only.
    dropout_rate: dropout probability (after fc6/fc7 in 'paper', before them in 'torchvision').
    lrn_depth_radius, lrn_bias, lrn_alpha, lrn_beta: LRN constants in TensorFlow's convention
      (window 2r + 1, alpha not divided by it), as `models.AlexNet` takes them.
    conv1_padding: conv1's padding (2: torchvision's; 0: Caffe's, for 227 px images).
  """

  def __init__(self, variant: str = 'paper', num_classes: int = 1000, image_size: int = 224,
               dropout_rate: float = 0.5, lrn_depth_radius: int = 2, lrn_bias: float = 2.0,
               lrn_alpha: float = 1e-4, lrn_beta: float = 0.75, conv1_padding: int = 2):
    super().__init__()
    if variant == 'torchvision':
      self.features = _torchvision_features(conv1_padding)
      self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
      self.classifier = nn.Sequential(
          nn.Dropout(p=dropout_rate),
          nn.Linear(256 * 6 * 6, 4096),
          nn.ReLU(inplace=True),
          nn.Dropout(p=dropout_rate),
          nn.Linear(4096, 4096),
          nn.ReLU(inplace=True),
          nn.Linear(4096, num_classes),
      )
    elif variant == 'paper':
      self.features = _paper_features(conv1_padding, lrn_depth_radius, lrn_bias, lrn_alpha,
                                      lrn_beta)
      self.avgpool = nn.Identity()
      with torch.no_grad():  # One blank image gives the flattened size.
        flat = self.features(torch.zeros(1, 3, image_size, image_size))
      self.classifier = nn.Sequential(
          nn.Linear(flat.numel(), 4096),
          nn.ReLU(inplace=True),
          nn.Dropout(p=dropout_rate),
          nn.Linear(4096, 4096),
          nn.ReLU(inplace=True),
          nn.Dropout(p=dropout_rate),
          nn.Linear(4096, num_classes),
      )
    else:
      raise ValueError(f'Unknown AlexNet variant {variant!r}; choose one of {VARIANTS}.')

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.features(x)
    x = self.avgpool(x)
    x = torch.flatten(x, 1)  # (c, h, w) order.
    return self.classifier(x)
