"""Continue a prime text with a trained PTB language model from MLflow.

python -m pipeline.generate run_id=<id>                                 # sample, temperature 1
python -m pipeline.generate run_id=<id> strategy=greedy words=20
python -m pipeline.generate model_uri=runs:/<id>/model temperature=0.8 top_k=40 prime="stocks fell"
"""

from __future__ import annotations

import logging

import hydra
import keras
import numpy as np
from omegaconf import DictConfig

from pipeline import config, tracking

log = logging.getLogger(__name__)

config.register()

STRATEGIES = ("greedy", "sample")
UNK = "<unk>"


def encode_prime(prime: str, vocab: list[str]) -> list[int]:
    """Word ids of ``prime``; unknown words become ``<unk>`` with a warning rather than an error."""
    index = {word: i for i, word in enumerate(vocab)}
    unknown = [word for word in prime.split() if word not in index]
    if unknown:
        log.warning("not in the vocabulary, read as %s: %s", UNK, " ".join(unknown))
    return [index.get(word, index[UNK]) for word in prime.split()]


def next_word(logits: np.ndarray, strategy: str, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    """Pick the next id from one step's logits."""
    if strategy == "greedy":
        return int(np.argmax(logits))
    if strategy != "sample":
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    scaled = logits.astype(np.float64) / temperature
    if top_k:
        cutoff = np.sort(scaled)[-top_k]
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


def run(cfg: DictConfig) -> str:
    """Load the model and vocabulary of a run, return the prime followed by the generated words."""
    if not (cfg.run_id or cfg.model_uri):
        raise ValueError("name the trained model: run_id=<MLflow run id> or model_uri=runs:/<id>/model")
    tracking.use_store(cfg.tracking)
    uri = cfg.model_uri or f"runs:/{cfg.run_id}/model"
    run_id = cfg.run_id or tracking.run_of_model(uri)
    vocab = tracking.download_artifact(run_id, "vocab.txt").read_text().splitlines()
    model = tracking.load_model(uri)
    words = generate(model, vocab, cfg.prime, cfg.words, cfg.strategy, cfg.temperature, cfg.top_k, cfg.seed)
    return f"{cfg.prime} {' '.join(words)}"


@hydra.main(config_path="../conf", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    print(run(cfg))


if __name__ == "__main__":
    main()
