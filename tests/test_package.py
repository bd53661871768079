"""The package as a user installs it: `pip install -e .` (CI does it before the tests), then
the README's Python example run from a directory outside the repository."""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO


def _outside_the_repository(tmp_path, code: str) -> subprocess.CompletedProcess:
  """Runs `code` in a fresh interpreter whose only way to the package is the installation."""
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  return subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env, text=True,
                        capture_output=True, timeout=600, check=False)


@pytest.mark.slow  # A fresh interpreter imports JAX and TensorFlow.
def test_the_installed_package_and_configs_are_this_checkout(tmp_path):
  result = _outside_the_repository(tmp_path, (
      'import alexnet_jax, configs.imagenet, alexnet_jax.labels as l\n'
      'print(alexnet_jax.__file__, configs.imagenet.__file__, len(l.imagenet_names()))'))
  assert result.returncode == 0, ('Install the package first: pip install -e .\n'
                                  + result.stderr[-2000:])
  package, config, num_names = result.stdout.split()
  assert package == str(REPO / 'alexnet_jax' / '__init__.py')
  assert config == str(REPO / 'configs' / 'imagenet.py')
  assert num_names == '1000'  # The class names file is found beside the modules.


@pytest.mark.slow
def test_readmes_python_example_runs_outside_the_repository(tmp_path):
  readme = (REPO / 'README.md').read_text()
  example = re.search(r'### From Python\n.*?```python\n(.*?)```', readme, re.S).group(1)
  assert "'/tmp/alexnet_notebook'" in example
  example = example.replace("'/tmp/alexnet_notebook'", repr(str(tmp_path / 'run')))
  result = _outside_the_repository(tmp_path, example)
  assert result.returncode == 0, result.stderr[-3000:]
  top1 = float(result.stdout.strip().splitlines()[-1])
  assert 0.0 <= top1 <= 1.0
  assert (tmp_path / 'run' / 'final_metrics.json').exists()


@pytest.mark.slow  # A fresh interpreter imports JAX and TensorFlow.
def test_the_inference_side_imports_no_trainer(tmp_path):
  result = subprocess.run([sys.executable, '-c', (
      'import sys\n'
      'from alexnet_jax import ensemble, evaluate, features, inference, neighbours, predict\n'
      "print(sorted(m for m in sys.modules if m in ('alexnet_jax.train', 'alexnet_jax.steps',"
      " 'alexnet_jax.evaluation')))")], cwd=REPO, text=True, capture_output=True, timeout=600,
      check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  # Evaluation and the steps, but not the loop (nor its preemption, plots and saving).
  assert result.stdout.split('\n')[-2] == "['alexnet_jax.evaluation', 'alexnet_jax.steps']"
