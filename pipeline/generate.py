"""Continue a prime text with a trained PTB language model from MLflow.

python -m pipeline.generate run_id=<id>                                 # sample, temperature 1
python -m pipeline.generate run_id=<id> strategy=greedy words=20
python -m pipeline.generate model_uri=runs:/<id>/model temperature=0.8 top_k=40 prime="stocks fell"

A mistake (a bad value, an unknown run, a classifier's run) ends with one line on stderr and exit status 1.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from pipeline import cells, config, tracking
from pipeline.sampling import generate

log = logging.getLogger(__name__)

config.register()


class GenerateError(ValueError):
    """The run named cannot generate text (not a language model, no model logged); the message says which to pick."""


def language_model_run(cfg: DictConfig, run_id: str) -> None:
    """Refuse, with what to pick instead, a run that holds no language model: a classifier, a sweep parent, a run
    whose model was not logged."""
    run = tracking.describe_run(cfg, run_id, artifacts=True)
    tags, pick = run["tags"], "pick a PTB run (tags.dataset=ptb)"
    if tags.get("sweep_role") == "parent":
        raise GenerateError(f"run {run_id} is a sweep's parent run, which holds no model; pick one of its child runs")
    if run["params"].get("data.kind") != "language_model":
        if "dataset" not in tags:
            raise GenerateError(f"run {run_id} is not an rnnlab training run (no dataset tag); {pick}")
        dataset = tags["dataset"]
        article = "an" if dataset[:1].lower() in "aeiou" else "a"
        raise GenerateError(f"run {run_id} is {article} {dataset} classifier, not a language model; {pick}")
    if "vocab.txt" not in run["artifacts"]:
        raise GenerateError(
            f"run {run_id} ({run['status']}) logged no model and vocabulary: it was trained with "
            f"tracking.log_model=false or did not finish; {pick} that finished"
        )


def run(cfg: DictConfig) -> str:
    """Load the model and vocabulary of a run, return the prime followed by the generated words."""
    config.validate_generate(cfg)
    uri = cfg.model_uri or f"runs:/{cfg.run_id}/model"
    run_id = cfg.run_id or tracking.run_of_model(cfg.tracking, uri)
    language_model_run(cfg.tracking, run_id)
    vocab = tracking.download_artifact(run_id, "vocab.txt").read_text().splitlines()
    if cfg.top_k > len(vocab):
        raise config.ConfigError(
            f"top_k: must be at most {len(vocab)}, the vocabulary size of run {run_id}, got {cfg.top_k}; "
            "e.g. top_k=40, or top_k=0 for all words"
        )
    model = tracking.load_model(uri)
    words = generate(model, vocab, cfg.prime, cfg.words, cfg.strategy, cfg.temperature, cfg.top_k, cfg.seed)
    return f"{cfg.prime} {' '.join(words)}"


@hydra.main(config_path="../conf", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        text = run(cfg)
    except (config.ConfigError, tracking.TrackingError, cells.CellError, GenerateError) as err:
        print(f"generate: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(text)


if __name__ == "__main__":
    main()
