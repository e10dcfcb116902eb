"""Every ```python block of README.md runs, in order, as one program."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_examples_run():
    text = open(README).read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 6
    code = "\n".join(blocks).replace("range(100)", "range(3)")  # the training loop, shortened
    env = {}
    try:
        exec(compile(code, "README.md", "exec"), env)
    except Exception as e:  # pragma: no cover - the message names the failing example
        pytest.fail(f"a README example failed: {type(e).__name__}: {e}")
    assert env["opt"].noise_step > 0
