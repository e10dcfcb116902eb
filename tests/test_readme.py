"""Every ```python block of README.md runs, in order, as one program."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


# The examples, run as one script, step several optimizers over the same parameters: each sees the
# others' gradients as computed since its own last step.
@pytest.mark.filterwarnings("ignore:ssgd_fused. SSGD.step.closure. zeroes the gradients")
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
