"""Credentials are masked in values, free text, log lines and saved files; no server needed."""

import logging

import pytest

from pipeline.redaction import RedactFilter, redact, redact_file, redact_text, redacted


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("http://bob:pw@127.0.0.1:5001", "http://bob:***@127.0.0.1:5001"),
        ("postgresql+psycopg2://u:s3cr@t@db:5432/mlflow", "postgresql+psycopg2://u:***@db:5432/mlflow"),
        ("https://alice:p%40ss@host/path?q=1", "https://alice:***@host/path?q=1"),
        ("postgresql+psycopg2://mlflow@127.0.0.1:5433/mlflow", "postgresql+psycopg2://mlflow@127.0.0.1:5433/mlflow"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
        ("user@example.com", "user@example.com"),
        (42, 42),
        (None, None),
    ],
)
def test_redact_masks_only_the_password(value, expected):
    assert redact(value) == expected


def test_redact_text_masks_every_uri_in_a_line_and_is_idempotent():
    line = "tracking.uri=http://bob:pw@h:5001 model=rnn other=https://a:b@c/x, done"
    masked = redact_text(line)
    assert masked == "tracking.uri=http://bob:***@h:5001 model=rnn other=https://a:***@c/x, done"
    assert redact_text(masked) == masked


def test_redacted_walks_nested_configs():
    cfg = {"tracking": {"uri": "http://u:secret@h"}, "list": ["x", "http://u:secret@h"], "n": 1}
    assert redacted(cfg) == {"tracking": {"uri": "http://u:***@h"}, "list": ["x", "http://u:***@h"], "n": 1}


def test_redact_file_rewrites_a_saved_config_and_leaves_a_clean_one(tmp_path):
    dirty, clean = tmp_path / "overrides.yaml", tmp_path / "config.yaml"
    dirty.write_text("- tracking.uri=http://bob:pw@127.0.0.1:5001\n- model=rnn\n")
    clean.write_text("model: rnn\n")
    before = clean.stat().st_mtime_ns
    redact_file(dirty)
    redact_file(clean)
    assert dirty.read_text() == "- tracking.uri=http://bob:***@127.0.0.1:5001\n- model=rnn\n"
    assert clean.stat().st_mtime_ns == before


def test_the_log_filter_masks_messages_and_their_arguments(caplog):
    logger = logging.getLogger("rnnlab-test-redaction")
    handler_filter = RedactFilter()
    caplog.handler.addFilter(handler_filter)
    try:
        with caplog.at_level(logging.INFO):
            logger.info("#0 : tracking.uri=%s model=rnn", "http://bob:pw@127.0.0.1:5001")
            logger.info("plain %d", 3)
    finally:
        caplog.handler.removeFilter(handler_filter)
    assert caplog.messages == ["#0 : tracking.uri=http://bob:***@127.0.0.1:5001 model=rnn", "plain 3"]


def test_hydra_escaped_overrides_are_masked_too():
    line = r"#0 : tracking.uri=http\://alice\:s3cr3t-pw@127.0.0.1\:50935 model=rnn"
    assert redact_text(line) == r"#0 : tracking.uri=http\://alice\:***@127.0.0.1\:50935 model=rnn"


def test_a_failed_job_prints_its_overrides_and_error_masked(capsys):
    from hydra.core.utils import JobReturn, JobStatus

    from pipeline.redaction import RedactCallback

    failed = JobReturn(overrides=["tracking.uri=http://bob:hunter2@h:9", "seed=1"], status=JobStatus.FAILED)
    failed.return_value = RuntimeError("cannot reach http://bob:hunter2@h:9/api")
    RedactCallback().on_job_end(None, failed)
    with pytest.raises(RuntimeError) as err:
        _ = failed.return_value  # what Hydra does next: print the overrides, raise the error for its traceback
    assert "hunter2" not in capsys.readouterr().err + str(err.value)
    assert failed.overrides == ["tracking.uri=http://bob:***@h:9", "seed=1"]


@pytest.mark.integration  # a real entry point's process (not the training stage)
def test_a_stage_other_than_training_saves_no_password_in_hydras_files(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    argv = [sys.executable, "-m", "pipeline.download", "data=ptb", f"paths.root={tmp_path}"]
    argv += ["download.mirror=http://alice:s3cret@127.0.0.1:1/m", "download.timeout=5"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "alice:***@" in done.stderr + done.stdout
    saved = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "overrides.yaml" for p in saved)
    assert not [p for p in saved if "s3cret" in p.read_text(errors="replace")] and "s3cret" not in done.stderr
