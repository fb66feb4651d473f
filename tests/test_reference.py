"""Parity with the official reference: every fixture under $MINI_SUPIR_REFERENCE, dispatched on its kind."""
import importlib
import os
from pathlib import Path

import pytest

from fixtures import CHECKS, REFERENCE, SUMMARIES, Fixture

for module in sorted(Path(__file__).parent.glob("parity_*.py")):
    importlib.import_module(module.stem)

FIXTURES = sorted(p.parent for p in REFERENCE.glob("*/config.json")) if REFERENCE.is_dir() else []


def test_reference_present():
    if not FIXTURES:
        if os.environ.get("CI"):
            pytest.fail(f"no reference fixtures under {REFERENCE}: parity tests must run in CI")
        pytest.skip(f"no reference fixtures under {REFERENCE} (set MINI_SUPIR_REFERENCE)")


@pytest.mark.parametrize("path", FIXTURES, ids=[p.name for p in FIXTURES])
def test_fixture(path):
    fx = Fixture(path)
    check = CHECKS.get(fx.kind)
    assert check is not None, f"fixture kind {fx.kind!r} ({path.name}) has no check: add one in tests/parity_*.py"
    try:
        check(fx)
    finally:
        SUMMARIES.append(fx.summary())
