"""pytest setup for the benchmarks under bench/ (not the test suite, which is python -m pytest tests)."""

import os

from bench import timing

_probe = {}


def pytest_report_header(config):
    import torch

    _probe["before"] = timing.stall_probe_us()
    return [f"bench: torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, "
            f"one small parallel region {_probe['before']:.0f} us (bench/timing.py: stall_probe_us)"]


def pytest_terminal_summary(terminalreporter, config):
    import torch

    timed = getattr(getattr(config, "_benchmarksession", None), "benchmarks", None)  # pytest-benchmark's
    if timed is not None and not timed:
        return  # nothing was timed in this process
    _probe["after"] = timing.stall_probe_us()
    threads = torch.get_num_threads()
    stalled = [when for when, us in _probe.items() if timing.stall_note(us, threads)]
    if stalled:
        note = timing.stall_note(max(_probe[when] for when in stalled), threads)
        terminalreporter.write_line(f"{note} ({' and '.join(stalled)} the run)", yellow=True)
