"""Text generation: the sampling rules on hand-made logits, then from a model logged to MLflow, then the mistakes a
user can make (bad values, a wrong run), each refused with one line."""

import gc
import logging
import os
import subprocess
import sys
import weakref

import keras
import numpy as np
import pytest
from hydra.errors import ConfigCompositionException
from mlflow.entities import Param, RunTag
from mlflow.tracking import MlflowClient

from pipeline import config, generate, sampling, tracking
from tests.conftest import REPO, TINY_VOCAB, compose_config, copy_store

LOGITS = np.log(np.array([0.1, 0.6, 0.3]))
VOCAB = TINY_VOCAB  # 20 words


def test_greedy_takes_the_likeliest_word():
    assert sampling.next_word(LOGITS, "greedy", 1.0, 0, np.random.default_rng(0)) == 1


def test_sampling_is_seeded_and_follows_the_distribution():
    draws = [sampling.next_word(LOGITS, "sample", 1.0, 0, np.random.default_rng(s)) for s in range(2000)]
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, [0.1, 0.6, 0.3], atol=0.04)
    again = [sampling.next_word(LOGITS, "sample", 1.0, 0, np.random.default_rng(s)) for s in range(50)]
    assert again == draws[:50]


def test_top_k_and_temperature():
    rng = np.random.default_rng(0)
    assert {sampling.next_word(LOGITS, "sample", 1.0, 1, rng) for _ in range(50)} == {1}  # top-1 is greedy
    assert {sampling.next_word(LOGITS, "sample", 1.0, 2, rng) for _ in range(200)} == {1, 2}  # word 0 cut
    cold = [sampling.next_word(LOGITS, "sample", 0.05, 0, rng) for _ in range(200)]
    assert cold.count(1) >= 198  # a low temperature is nearly greedy
    with pytest.raises(ValueError, match="unknown strategy 'beam'"):
        sampling.next_word(LOGITS, "beam", 1.0, 0, rng)


def test_temperature_zero_is_greedy():
    # Was: "temperature must be positive" from deep inside the sampler.
    logits = np.log(np.array([0.3, 0.2, 0.5]))
    draws = {sampling.next_word(logits, "sample", 0.0, 0, np.random.default_rng(s)) for s in range(100)}
    assert draws == {2}


def test_generate_from_an_mlflow_run(trained_lm, caplog):
    root, result = trained_lm  # a tiny language model that learnt a 7-word period (conftest)
    cfg = compose_config([f"paths.root={root}"], config_name="generate")
    cfg.run_id = result["run_id"]
    cfg.strategy, cfg.words = "greedy", 7
    greedy = "the company said w0 w1 w2 <eos> the company said"
    assert generate.run(cfg) == greedy
    # Temperature 0 samples greedily: the same words whatever the seed.
    model = tracking.load_model(result["model_uri"])
    for seed in (0, 1):
        words = sampling.generate(model, VOCAB, "the company said", 7, "sample", temperature=0.0, seed=seed)
        assert "the company said " + " ".join(words) == greedy
    # Several continuations as rows of one batch (training's greedy and sampled samples): each as it is alone.
    picks = [sampling.Pick("greedy"), sampling.Pick("sample", seed=3), sampling.Pick("sample", 2.0, seed=4)]
    prime = "the company said"
    rows = sampling.continuations(model, VOCAB, prime, 7, picks)
    alone = [sampling.generate(model, VOCAB, prime, 7, p.strategy, p.temperature, seed=p.seed) for p in picks]
    assert rows == alone and "the company said " + " ".join(rows[0]) == greedy and len(set(map(tuple, rows))) > 1
    # By model URI too, sampled and seeded; an unknown prime word becomes <unk> with a warning, not a crash.
    cfg.run_id, cfg.model_uri = None, result["model_uri"]
    cfg.strategy, cfg.prime, cfg.seed = "sample", "the zebra said", 3
    with caplog.at_level(logging.WARNING):
        first = generate.run(cfg)
    assert "zebra" in caplog.text and "<unk>" in caplog.text
    assert first.startswith("the zebra said ") and len(first.split()) == 3 + 7
    assert generate.run(cfg) == first


def test_last_logits_traced_once_or_eager_for_a_fixed_length_model():
    keras.utils.set_random_seed(0)
    ids = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]], np.int32)
    for unroll in (False, True):  # an unrolled layer cannot be traced for any length: it runs eagerly
        inputs = keras.Input((None,), dtype="int32")
        lstm = keras.layers.LSTM(6, return_sequences=True, unroll=unroll)(keras.layers.Embedding(20, 4)(inputs))
        model = keras.Model(inputs, keras.layers.Dense(20)(lstm))
        last = sampling.last_logits(model)
        assert sampling.last_logits(model) is last  # kept for the model's life: one trace for every call
        for n in (5, 2):
            np.testing.assert_allclose(last(ids[:, :n]), np.asarray(model(ids[:, :n]))[:, -1], atol=1e-6)
        gone = weakref.ref(model)
        del model, last
        gc.collect()
        assert gone() is None  # the kept function does not keep its model (its key) alive


def make_run(client: MlflowClient, root, dataset: str, kind: str | None, vocab=False, parent=False) -> str:
    """A finished run in a real sqlite store, tagged and with params as train leaves them (no model: none is
    loaded by the checks below)."""
    name = f"rnnlab-{dataset}"
    experiment = client.get_experiment_by_name(name)
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment(name, artifact_location=(root / "mlartifacts").as_uri())
    )
    run_id = client.create_run(experiment_id).info.run_id
    tags = {"sweep_role": "parent"} if parent else {"dataset": dataset}
    params = {"data.kind": kind} if kind else {}
    client.log_batch(
        run_id, params=[Param(k, v) for k, v in params.items()], tags=[RunTag(k, v) for k, v in tags.items()]
    )
    if vocab:
        (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
        client.log_artifact(run_id, str(root / "vocab.txt"))
    client.set_terminated(run_id, "FINISHED")
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory, store_template):
    """One store for the checks below (creating an MLflow sqlite store takes seconds): its root and run ids."""
    root = tmp_path_factory.mktemp("store")
    copy_store(store_template, root)
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    runs = {
        "lm": make_run(client, root, "ptb", "language_model", vocab=True),
        "unlogged": make_run(client, root, "ptb", "language_model"),
        "parent": make_run(client, root, "ptb", None, parent=True),
        "imdb": make_run(client, root, "imdb", "classification"),
        "toy": make_run(client, root, "toy", "classification"),
    }
    return root, runs


def generate_cfg(root, *overrides: str):
    return compose_config([f"paths.root={root}", *overrides], config_name="generate")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("words=-1", "words: must be at least 1, got -1"),
        ("words=0", "words: must be at least 1, got 0"),
        ("top_k=-3", "top_k: must be at least 0 (0 = all words), got -3"),
        ("temperature=-0.5", "temperature: must be at least 0 (0 = greedy: always the likeliest word), got -0.5"),
        ("temperature=inf", "temperature: must be at least 0 and finite"),
        ("seed=-1", "seed: must be in [0, 4294967295]"),
        ("strategy=beam", "strategy: unknown strategy 'beam'; choose one of greedy, sample"),
        ("+beam_width=3", "beam_width: no such key. Valid keys at the top level: paths, tracking, run_id, model_uri"),
    ],
)
def test_bad_values_are_refused_before_the_store_is_read(tmp_path, override, message):
    cfg = generate_cfg(tmp_path, "run_id=0123abc", override)
    with pytest.raises(config.ConfigError) as err:
        generate.run(cfg)
    assert str(err.value).startswith(message)
    assert not (tmp_path / "mlflow.db").exists()  # refused before anything was opened


def test_a_model_must_be_named(tmp_path):
    with pytest.raises(config.ConfigError, match=r"run_id: name the trained model: run_id=<MLflow run id>"):
        generate.run(generate_cfg(tmp_path))


def test_a_misspelt_key_lists_the_valid_keys(tmp_path):
    with pytest.raises(ConfigCompositionException, match=r"^wordz: no such key; did you mean words\? Valid keys"):
        generate_cfg(tmp_path, "wordz=3")


def test_top_k_above_the_vocabulary_names_its_size(store):
    root, runs = store
    with pytest.raises(config.ConfigError) as err:
        generate.run(generate_cfg(root, f"run_id={runs['lm']}", "top_k=21"))
    assert str(err.value) == (
        f"top_k: must be at most 20, the vocabulary size of run {runs['lm']}, got 21; "
        "e.g. top_k=40, or top_k=0 for all words"
    )


def test_unknown_run_and_model_are_named_with_the_store(store):
    root, _ = store
    where = f"sqlite:///{root}/mlflow.db"
    with pytest.raises(tracking.TrackingError, match=f"^no MLflow run 0123abc in {where}: check the id"):
        generate.run(generate_cfg(root, "run_id=0123abc"))
    with pytest.raises(tracking.TrackingError, match=f"^no MLflow model models:/m-0123abc in {where}: check the URI"):
        generate.run(generate_cfg(root, "model_uri=models:/m-0123abc"))


def test_runs_without_a_language_model_say_what_to_pick(store):
    root, runs = store
    with pytest.raises(generate.GenerateError) as err:
        generate.run(generate_cfg(root, f"run_id={runs['imdb']}"))
    assert str(err.value) == (
        f"run {runs['imdb']} is an imdb classifier, not a language model; pick a PTB run (tags.dataset=ptb)"
    )
    with pytest.raises(generate.GenerateError, match="is a sweep's parent run, which holds no model"):
        generate.run(generate_cfg(root, f"run_id={runs['parent']}"))
    with pytest.raises(generate.GenerateError, match=r"\(FINISHED\) logged no model and vocabulary"):
        generate.run(generate_cfg(root, f"run_id={runs['unlogged']}"))


@pytest.mark.integration
@pytest.mark.parametrize("case", ["classifier", "misspelt key"])
def test_the_command_line_says_one_line_and_leaves_no_file(store, tmp_path, case):
    """A real process: exit 1, the message on stderr with no traceback, and no generate.log in the working folder
    (Hydra's default job logging left an empty one there). A misspelt key's message, printed by Hydra itself, lists
    the valid keys instead of suggesting ``+wordz=3``."""
    root, runs = store
    argv = [f"run_id={runs['toy']}"] if case == "classifier" else [f"run_id={runs['lm']}", "wordz=3"]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.generate", *argv, f"paths.root={root}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    if case == "classifier":
        assert lines[-1] == (
            f"generate: run {runs['toy']} is a toy classifier, not a language model; pick a PTB run (tags.dataset=ptb)"
        )
    else:
        assert lines[-3:] == [
            "wordz: no such key; did you mean words? Valid keys at the top level: paths, tracking, run_id, model_uri, "
            "prime, words, strategy, temperature, top_k, seed.",
            "",
            "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.",
        ]
    assert list(tmp_path.iterdir()) == []
