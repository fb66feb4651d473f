import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def pytest_terminal_summary(terminalreporter):
    from fixtures import SUMMARIES
    if SUMMARIES:
        terminalreporter.section("reference parity (max abs error per fixture)")
        for line in SUMMARIES:
            terminalreporter.write_line(line)
