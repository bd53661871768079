"""Which convolution kernels XLA:CPU compiles: Eigen's, chosen by an XLA flag before JAX starts.

jaxlib 0.10.2's XLA:CPU hands large convolutions to YNNPACK; its Eigen convolutions, which
`XLA_FLAG` brings back, are faster at AlexNet's shapes, forward and both gradients (figures in
docs/benchmarks.md). XLA reads XLA_FLAGS once, when JAX starts its CPU backend, for the whole
process, so the choice has to come first: when the package is imported (`choose_at_import`:
a Python user gets the commands' kernels without a call of their own) and in each command,
from `config.model.ops` (`choose_convolutions`). Both leave alone an XLA_FLAGS that already
says which fusions YNNPACK takes (the user's choice), and JAX once started. The flag touches
only XLA:CPU's convolutions; GPU programs ignore it. Nothing here imports JAX, so importing
the package stays light where JAX is not used (the PyTorch side of the benchmarks).
"""

import os
import sys

# Takes convolutions out of XLA:CPU's default YNNPACK fusions, back to its Eigen kernels.
XLA_FLAG = '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'
_OPTION = XLA_FLAG.split('=')[0] + '='


def jax_started() -> bool:
  """Whether JAX has started a backend, after which XLA_FLAGS change nothing."""
  if 'jax' not in sys.modules:
    return False
  # No public API tells; xla_bridge is where JAX itself keeps its backends.
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  return xla_bridge.backends_are_initialized()


def use_eigen_convolutions() -> None:
  """Adds `XLA_FLAG` to the XLA_FLAGS environment variable, unless XLA_FLAGS already says
  which fusions YNNPACK takes (the user's choice stands). Call it before JAX starts."""
  flags = os.environ.get('XLA_FLAGS', '')
  if _OPTION not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} {XLA_FLAG}'.strip()


def choose_convolutions(ops: str) -> None:
  """`use_eigen_convolutions` for every `config.model.ops` but 'xla', which asks for XLA's
  defaults, kernels included: it takes `XLA_FLAG` out again while JAX has not started."""
  if ops != 'xla':
    use_eigen_convolutions()
  elif not jax_started():
    others = [f for f in os.environ.get('XLA_FLAGS', '').split() if f != XLA_FLAG]
    os.environ['XLA_FLAGS'] = ' '.join(others)


def choose_at_import() -> None:
  """`use_eigen_convolutions` while JAX has not started (the package calls it on import)."""
  if not jax_started():
    use_eigen_convolutions()


def eigen_convolutions_requested() -> bool:
  """Whether XLA_FLAGS holds `XLA_FLAG` (it took effect if it was there when JAX started)."""
  return XLA_FLAG in os.environ.get('XLA_FLAGS', '').split()
