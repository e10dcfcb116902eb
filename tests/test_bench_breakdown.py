"""bench.breakdown runs on the C++ kernels and its parts are consistent (timings are not asserted:
benchmarks are not tests)."""

import pytest
import torch

from tests.helpers import require_cpp

pytestmark = pytest.mark.cpp


def test_breakdown_times_every_part_and_prints_the_overlap_bounds():
    require_cpp()
    from bench import breakdown, shapes

    med, total = breakdown.run("resnet20", torch.float32, "gaussian", rounds=1)
    assert total == shapes.numel("resnet20")
    assert set(med) == {"update, whole", "update, no next norms", "update, memory only", "perturb, whole",
                        "perturb, rademacher", "norms, weights only", "norms, weights + gaussian ||u||^2",
                        "generation, cache-resident", "update AdamW, no next norms", "torch SGD step",
                        "torch AdamW step"}
    assert all(v > 0 for v in med.values())
    text = breakdown.markdown(med, total, "title")
    assert "perfect overlap" in text and "compute floor" in text and text.count("|") > 11 * 4
