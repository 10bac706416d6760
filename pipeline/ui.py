"""The MLflow dashboard on the store that training writes to (``make ui``).

python -m pipeline.ui                      # the local store (tracking=local), http://127.0.0.1:5000
python -m pipeline.ui ui.port=5050         # another port
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from pipeline import config
from pipeline.redaction import redact

config.register()


def command(cfg: DictConfig) -> list[str]:
    """The ``mlflow ui`` command for the configured store: the same ``tracking`` config as training reads."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        cfg.tracking.uri,
        "--host",
        cfg.ui.host,
        "--port",
        str(cfg.ui.port),
    ]


@hydra.main(config_path="../conf", config_name="ui", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if cfg.tracking.uri.startswith(("http://", "https://")):
        print(f"a tracking server serves its own dashboard: open {redact(cfg.tracking.uri)}")
        return
    print(f"MLflow dashboard for {redact(cfg.tracking.uri)} on http://{cfg.ui.host}:{cfg.ui.port}")
    sys.stdout.flush()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.execv(sys.executable, command(cfg))


if __name__ == "__main__":
    main()
