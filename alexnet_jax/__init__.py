"""AlexNet (Krizhevsky, Sutskever, Hinton, 2012) in JAX/Flax.

Importing the package, before JAX starts, chooses XLA:CPU's Eigen convolutions
(`cpu_convolutions`), as the commands run them; `config.model.ops='xla'` (the commands) or
`cpu_convolutions.choose_convolutions('xla')` (Python, before JAX starts) keeps XLA's defaults.
"""

from alexnet_jax import cpu_convolutions as _cpu_convolutions

_cpu_convolutions.choose_at_import()
