"""A process's start: Keras loads without the packages it would import for features rnnlab never uses
(``pipeline.KERAS_EXTRAS``), and they import normally afterwards."""

from __future__ import annotations

import subprocess
import sys

import pytest

import pipeline
from tests.conftest import REPO


def test_the_extras_fail_to_import_only_inside_the_context(monkeypatch):
    """Inside ``without_keras_extras`` an extra not yet imported raises ImportError (what Keras catches); after it,
    the same import works, and an extra imported before stays as it was."""
    import json

    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    monkeypatch.setattr(pipeline, "KERAS_EXTRAS", ("colorsys", "json"))
    with pipeline.without_keras_extras():
        with pytest.raises(ImportError):
            import colorsys  # noqa: F401
        assert sys.modules["json"] is json
    assert "colorsys" not in sys.modules
    import colorsys

    assert colorsys.rgb_to_hsv(1.0, 0.0, 0.0) == (0.0, 1.0, 1.0)


@pytest.mark.integration  # a real TensorFlow process
def test_keras_loads_without_its_extras_and_they_import_afterwards():
    """``import pipeline, keras`` leaves scikit-learn and Matplotlib unimported; both import afterwards."""
    code = (
        "import sys, pipeline, keras\n"
        "print(sorted(name for name in pipeline.KERAS_EXTRAS if name in sys.modules))\n"
        "import sklearn.base, matplotlib.pyplot\n"
        "print(sklearn.base.BaseEstimator.__module__, matplotlib.pyplot.__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "sklearn.base matplotlib.pyplot"]
