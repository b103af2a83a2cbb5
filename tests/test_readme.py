"""The README's usage example runs as written, CI runs the README's test command, and the
benchmark tables are the ones `benchmarks/report.py` renders from `benchmarks/results/`."""

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


def test_benchmark_tables_are_rendered_from_the_result_files():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    suites = re.findall(r"<!-- bench:([\w-]+) -->\n(.*?)\n<!-- /bench:\1 -->", README, flags=re.S)
    assert suites, "README has no benchmark block"
    for suite, block in suites:
        combined = report.load_combined(ROOT / "benchmarks" / "results", suite)
        plots = [Path("docs") / f"{suite}_val_ppl.png", Path("docs") / f"{suite}_memory_vs_ppl.png"]
        assert block == report.render_block(combined, plots), f"README block {suite} is stale: run benchmarks/report.py"
        assert all((ROOT / path).exists() for path in plots)


def test_layout_section_lists_every_module_and_nothing_else():
    block = re.search(r"```\nlowrank/\n(.*?)\nconfigs/", README, flags=re.S).group(1)
    # Each entry line starts (two spaces in) with the names it describes, then two or more spaces.
    heads = [re.split(r"\s{2,}", line.strip())[0] for line in block.splitlines() if re.match(r"  \S", line)]
    listed = {name.strip() for head in heads for name in head.split(",")}
    actual = {p.name + "/" for p in (ROOT / "lowrank").iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    actual |= {p.name for p in (ROOT / "lowrank").glob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    # kept only so that imports of earlier versions work: not part of the layout
    actual -= {"train.py", "checkpoint.py"}
    assert listed == actual, (sorted(actual - listed), sorted(listed - actual))


def test_memory_tables_are_rendered_from_the_result_files():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_memory_table

    block = re.search(r"<!-- memory-table -->\n(.*?)\n<!-- /memory-table -->", README, flags=re.S).group(1)
    assert block == bench_memory_table.render_block(), "README memory tables are stale: run benchmarks/bench_memory_table.py --render"
