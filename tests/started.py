"""Commands started together as subprocesses, each read when a test first needs it.

A module's fixture starts its commands at once; in-process tests that ask for that fixture run
while the commands do, and the start-ups (imports, compilation) overlap.
"""

import subprocess
import sys

from test_main import REPO


class Started:
  """`python -m MODULE FLAGS` per name, all started on creation.

  Indexing by name waits for that command and gives (exit status, stdout, stderr).
  """

  def __init__(self, commands: dict[str, tuple[str, list[str]]], env: dict[str, str]):
    self._processes = {
        name: subprocess.Popen([sys.executable, '-m', module, *flags], cwd=REPO, env=env,
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for name, (module, flags) in commands.items()}
    self._results = {}

  def __getitem__(self, name: str) -> tuple[int, str, str]:
    if name not in self._results:
      stdout, stderr = self._processes[name].communicate(timeout=600)
      self._results[name] = (self._processes[name].returncode, stdout, stderr)
    return self._results[name]
