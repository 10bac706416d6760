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
