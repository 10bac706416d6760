"""The test tiers' own rules (tests/conftest.py): a test that needs the dataset mirror skips on a machine without
it, but fails in CI, where a quiet skip would hide that the whole-pipeline and preset tests never ran."""

import pytest

pytest_plugins = ["pytester"]

NEEDS_MIRROR = """
from tests.conftest import needs_mirror

@needs_mirror
def test_real_data():
    pass
"""


@pytest.fixture
def no_mirror(pytester, monkeypatch, tmp_path):
    """A test module needing the mirror, run by a pytest that has our conftest's rule, where no mirror is."""
    monkeypatch.setenv("RNNLAB_DATA_MIRROR", str(tmp_path / "no-mirror"))
    pytester.makeconftest("from tests.conftest import pytest_runtest_setup  # noqa: F401\n")
    pytester.makepyfile(NEEDS_MIRROR)
    return pytester


def test_without_the_mirror_a_test_skips_outside_ci(no_mirror, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    result = no_mirror.runpytest_inprocess("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*no dataset mirror*RNNLAB_DATA_MIRROR*"])


def test_without_the_mirror_a_test_fails_in_ci(no_mirror, monkeypatch):
    monkeypatch.setenv("CI", "true")
    result = no_mirror.runpytest_inprocess()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*no dataset mirror*CI=true: CI runs every test, none may skip*"])
    assert result.ret != 0


def test_the_mirror_marks_a_test_integration():
    from tests.conftest import needs_mirror

    def test_real_data():
        pass

    marks = {mark.name for mark in needs_mirror(test_real_data).pytestmark}
    assert marks == {"integration", "needs_mirror"}  # `make test` leaves it to `make test-integration`
