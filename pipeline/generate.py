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
import keras
import numpy as np
from omegaconf import DictConfig

from pipeline import config, tracking

log = logging.getLogger(__name__)

config.register()

STRATEGIES = config.STRATEGIES
UNK = "<unk>"


class GenerateError(ValueError):
    """The run named cannot generate text (not a language model, no model logged); the message says which to pick."""


def encode_prime(prime: str, vocab: list[str]) -> list[int]:
    """Word ids of ``prime``; unknown words become ``<unk>`` with a warning rather than an error."""
    index = {word: i for i, word in enumerate(vocab)}
    unknown = [word for word in prime.split() if word not in index]
    if unknown:
        log.warning("not in the vocabulary, read as %s: %s", UNK, " ".join(unknown))
    return [index.get(word, index[UNK]) for word in prime.split()]


def next_word(logits: np.ndarray, strategy: str, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    """Pick the next id from one step's logits. Temperature 0 is the limit of ever sharper sampling: greedy."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if temperature < 0:
        raise ValueError(f"temperature must be at least 0 (0 = greedy), got {temperature}")
    if strategy == "greedy" or temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    if top_k:
        cutoff = np.sort(scaled)[-min(top_k, len(scaled))]
        scaled = np.where(scaled >= cutoff, scaled, -np.inf)
    probs = np.exp(scaled - scaled.max())
    return int(rng.choice(len(probs), p=probs / probs.sum()))


def generate(
    model: keras.Model,
    vocab: list[str],
    prime: str,
    words: int,
    strategy: str = "sample",
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    context: int = 100,
) -> list[str]:
    """``words`` words continuing ``prime``. The model reads the last ``context`` ids afresh at every step, so
    any stateless language model (the form logged to MLflow) works."""
    ids = encode_prime(prime, vocab) or [vocab.index("<eos>")]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(words):
        logits = model(np.array([ids[-context:]], dtype=np.int32), training=False)
        choice = next_word(np.asarray(logits)[0, -1], strategy, temperature, top_k, rng)
        ids.append(choice)
        out.append(vocab[choice])
    return out


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
    except (config.ConfigError, tracking.TrackingError, GenerateError) as err:
        print(f"generate: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(text)


if __name__ == "__main__":
    main()
