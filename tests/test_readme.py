"""The README's usage example runs as written, and CI runs the README's test command."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_usage_example_runs_as_written(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "README has no python example"
    script = tmp_path / "example.py"
    script.write_text(blocks[0])
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ParameterCount(trainable=" in result.stdout


def test_ci_runs_the_readme_test_command():
    command = subprocess.run(
        ["awk", "/<!-- test-command -->/ {getline; getline; print; exit}", "README.md"],
        capture_output=True, text=True, cwd=ROOT, check=True,
    ).stdout.strip()
    assert command.endswith("-m pytest -q"), command
    assert "awk '/<!-- test-command -->/" in (ROOT / ".ci" / "run").read_text()
