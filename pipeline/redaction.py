"""Credentials never leave the process: a URI's password becomes ``***`` wherever a value, a text, a log line or a
file that Hydra saved could carry it.

Light on purpose (no TensorFlow, no MLflow): Hydra's logging config imports the filter below before anything else.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

MASK = "***"
# scheme://user:password@  ->  scheme://user:***@   (the password is anything up to the last @ before the host)
_IN_TEXT = re.compile(
    r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.\-]*\\?://[^\s/:@'\"\\]*\\?:)(?P<password>[^\s'\"]*)@(?=[^\s@/'\"]+)"
)  # Hydra writes overrides with escaped colons (http\://user\:password@host): those too


def redact(value: Any) -> Any:
    """A value with every URI password in it replaced by ``***`` (``postgresql://u:secret@h/db`` ->
    ``postgresql://u:***@h/db``); anything that is not a string unchanged."""
    return redact_text(value) if isinstance(value, str) else value


def redact_text(text: str) -> str:
    """Every ``scheme://user:password@`` inside free text (an override list, a log line, a YAML file) masked."""
    if "://" not in text or "@" not in text:
        return text
    return _IN_TEXT.sub(lambda m: f"{m['head']}{MASK}@" if m["password"] != MASK else m[0], text)


def redacted(cfg: Any) -> Any:
    """A plain copy of a resolved config (dicts, lists, values) with every credential redacted."""
    if isinstance(cfg, Mapping):
        return {k: redacted(v) for k, v in cfg.items()}
    if isinstance(cfg, list | tuple):
        return [redacted(v) for v in cfg]
    return redact(cfg)


def redact_file(path: Path) -> None:
    """Rewrite a text file (Hydra's saved configs) with every credential masked; leave a clean file untouched."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return
    clean = redact_text(text)
    if clean != text:
        path.write_text(clean)


class RedactFilter(logging.Filter):
    """A logging filter for every handler (conf/hydra/*_logging/rnnlab.yaml): masks credentials in the message,
    whoever logged it (Hydra's launchers print each job's overrides)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


class RedactCallback(Callback):
    """Every entry point's Hydra callback (conf/common/hydra.yaml): masks credentials in the configs Hydra saves
    (``.hydra/*.yaml``, a sweep's ``multirun.yaml``) and in what it prints of a failed job (its overrides and the
    error's message), which go around the logging filter."""

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        if config.hydra.output_subdir is not None:
            for path in (Path(config.hydra.runtime.output_dir) / config.hydra.output_subdir).glob("*.yaml"):
                redact_file(path)
        if config.hydra.mode is not None and config.hydra.mode.name == "MULTIRUN":
            redact_file(Path(config.hydra.sweep.dir) / "multirun.yaml")

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        job_return.overrides = [redact_text(str(o)) for o in job_return.overrides or []]
        error = getattr(job_return, "_return_value", None)
        if isinstance(error, BaseException):
            error.args = tuple(redact(arg) for arg in error.args)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        redact_file(Path(config.hydra.sweep.dir) / "multirun.yaml")
