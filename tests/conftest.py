import os

import torch

# Without a GPU the Triton kernels run in triton's interpreter on CPU tensors; the variable must be
# set before anything imports triton. Contraction is off explicitly (its default changes in 3.10).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "0")

import pytest  # noqa: E402

import ssgd_fused  # noqa: E402
from tests.helpers import require_cpp  # noqa: E402


def pytest_report_header(config):
    from ssgd_fused import ops

    cpp = "built" if ops.cpp_available() else f"NOT available ({ops.cpp_unavailable_reason()})"
    return [f"torch {torch.__version__}, threads {torch.get_num_threads()}, ssgd_fused._C: {cpp}"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(params=["reference", pytest.param("cpp", marks=pytest.mark.cpp)])
def backend(request):
    """Runs a test on the reference path and on the C++ kernels."""
    if request.param == "cpp":
        require_cpp()
    return request.param


__all__ = ["ssgd_fused"]
