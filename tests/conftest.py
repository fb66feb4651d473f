import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

_skipped_parity: list[str] = []


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    # Test models are tiny: a second intra-op thread only adds synchronisation, which costs seconds per
    # forward when the CPU is shared with other jobs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def style_lora(tmp_path_factory):
    """A LoRA file for the tiny UNet's attention, large enough to change a restoration."""
    from mini_supir import lora, lora_files, supir
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    model = supir.build(supir.TINY, "cpu")
    lora.inject_lora(model.model.diffusion_model, "style", rank=4, targets=lora.ATTENTION)
    with torch.no_grad():
        for p in lora.lora_parameters(model.model.diffusion_model, "style"):
            p.normal_(0, 0.5)
    lora_files.save_lora(model, path, "style")
    return path


def pytest_runtest_logreport(report):
    if report.skipped and "test_reference.py" in report.nodeid:
        _skipped_parity.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    # In CI a skipped parity test means the fixtures were not found or not run: that is a failure.
    if os.environ.get("CI") and _skipped_parity and session.exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):
    from fixtures import SUMMARIES
    if SUMMARIES:
        terminalreporter.section("reference parity (max abs error per fixture)")
        for line in SUMMARIES:
            terminalreporter.write_line(line)
    if os.environ.get("CI") and _skipped_parity:
        terminalreporter.write_line(f"FAILED: {len(_skipped_parity)} parity tests skipped in CI: {_skipped_parity[:3]}")
