"""Every ```python block of the README runs as written (on the CPU here: the reference
backend, small sizes), so the README cannot drift from the code."""
import re
from pathlib import Path

import pytest

import nfd_fast

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_the_readme_has_runnable_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything a block writes stays in the test's folder
    setting = nfd_fast.get_backend()
    try:
        exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), {})
    finally:
        nfd_fast.set_backend(setting)
