"""The MLflow dashboard on the store that training writes to (``make ui``).

python -m pipeline.ui                      # the local store (tracking=local), http://127.0.0.1:5000
python -m pipeline.ui ui.port=5050         # another port
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from pipeline import config, tracking
from pipeline.redaction import redact

config.register()

# MLflow 3.17's dashboard opens every experiment as a GenAI one (a traces overview) until the "Model training"
# toggle is set once in the browser; this query parameter opens the training runs directly.
TRAINING_VIEW = "workflowType=machine_learning"


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


def runs_url(cfg: DictConfig, experiment_id: str) -> str:
    """The dashboard's runs table of one experiment, in the model-training view."""
    return f"http://{cfg.ui.host}:{cfg.ui.port}/#/experiments/{experiment_id}/runs?{TRAINING_VIEW}"


def experiment_links(cfg: DictConfig) -> list[str]:
    """``name: url`` for each rnnlab experiment in the store (none when the store is new or unreadable)."""
    try:
        found = tracking.experiments(cfg.tracking.uri, "rnnlab-%")
    except tracking.TrackingError:
        return []
    return [f"  {name}: {runs_url(cfg, experiment_id)}" for name, experiment_id in found]


@hydra.main(config_path="../conf", config_name="ui", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if cfg.tracking.uri.startswith(("http://", "https://")):
        print(f"a tracking server serves its own dashboard: open {redact(cfg.tracking.uri)}")
        return
    print(f"MLflow dashboard for {redact(cfg.tracking.uri)} on http://{cfg.ui.host}:{cfg.ui.port}")
    links = experiment_links(cfg)
    if links:
        print("Training runs of each experiment (or click 'Model training' at the top left once):", *links, sep="\n")
    sys.stdout.flush()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.execv(sys.executable, command(cfg))


if __name__ == "__main__":
    main()
