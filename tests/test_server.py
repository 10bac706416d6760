"""The team set-up with real parts: PostgreSQL + the MLflow server on free loopback ports, sweeps against it,
a server that dies mid-run, and credentials that must never be logged."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline import prepare, teamserver
from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.server, pytest.mark.needs_postgres]  # skipped without it, not in CI
SMALL = ("data.n_train=64", "data.n_val=32", "data.n_test=32", "model.units=8")


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    folder = tmp_path_factory.mktemp("team")
    os.chmod(folder, 0o755)
    srv = teamserver.TeamServer(folder, port=teamserver.free_port(), pg_port=teamserver.free_port())
    started = time.perf_counter()
    srv.start()
    srv.startup_seconds = time.perf_counter() - started
    yield srv
    srv.stop()
    assert not (srv.pgdata / "postmaster.pid").exists()
    shutil.rmtree(srv.pgdata, ignore_errors=True)  # a cluster outside the test folder (see TeamServer.pgdata)


def train_cmd(module_args, tmp_path, uri, env_extra=None):
    """The training command against the server at ``uri``, and its environment."""
    env = {**os.environ, "RNNLAB_TRACKING_URI": uri, **(env_extra or {})}
    for key in ("RNNLAB_ROOT", "RNNLAB_SWEEP_PARENT_RUN_ID"):
        env.pop(key, None)
    flags = [a for a in module_args if a.startswith("-")]  # Hydra wants -m before the overrides
    overrides = [a for a in module_args if not a.startswith("-")]
    base = [f"paths.root={tmp_path}", "tracking=server", "trainer.verbose=0", *SMALL]
    return [sys.executable, "-m", "pipeline.train", *flags, *base, *overrides], env


def pipeline_cmd(module_args, tmp_path, uri, env_extra=None, timeout=600, check=True):
    cmd, env = train_cmd(module_args, tmp_path, uri, env_extra)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_server_listens_on_loopback_only(team):
    assert team.uri.startswith("http://127.0.0.1:")
    out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
    listening = [
        line.split()[3] for line in out.splitlines() if line.split()[3].endswith((f":{team.port}", f":{team.pg_port}"))
    ]
    assert listening and all(addr.startswith("127.0.0.1:") for addr in listening), listening


def test_parallel_sweep_against_the_server_arrives_complete(team, make_cfg, tmp_path):
    prepare.run(make_cfg(*SMALL))
    pipeline_cmd(
        [
            "-m",
            "budget=smoke",
            "model=rnn,gru",
            "optimizer=adam,rmsprop",
            "hydra/launcher=parallel",
            "tracking.sweep_name=team-grid",
        ],
        tmp_path,
        team.uri,
    )
    client = MlflowClient(tracking_uri=team.uri)
    runs = client.search_runs([client.get_experiment_by_name("rnnlab-toy").experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    children = [r for r in runs if r.data.tags.get("sweep") == "team-grid" and r not in parents]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(children) == 4
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        for key in ("train/loss", "train/accuracy", "val/loss", "val/accuracy", "perf/samples_per_sec"):
            assert [m.step for m in client.get_metric_history(child.info.run_id, key)] == [0, 1], key
        assert {"test/accuracy", "test/loss", "epochs"} <= set(child.data.metrics)
    # The models went through the server's artifact proxy and load back.
    mlflow.set_tracking_uri(team.uri)
    models = mlflow.search_logged_models(experiment_ids=[children[0].info.experiment_id], output_format="list")
    assert len({m.source_run_id for m in models} & {c.info.run_id for c in children}) == 4
    x = np.load(tmp_path / "data/prepared/toy/test.npz")["x"][:4]
    assert mlflow.keras.load_model(models[0].model_uri).predict(x, verbose=0).shape == (4, 2)


def test_server_gone_mid_run_fails_loudly_keeps_the_checkpoint_and_resumes(team, make_cfg, tmp_path):
    prepare.run(make_cfg(*SMALL, "data.n_train=800"))
    args = ["data.n_train=800", "trainer.batch_size=4", "trainer.epochs=5", "tracking.log_model=false"]
    no_retries = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    cmd, env = train_cmd(args, tmp_path, team.uri, no_retries)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list((tmp_path / "checkpoints").glob("*/state.json")):
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    os.killpg(int((team.folder / "mlflow.pid").read_text()), signal.SIGKILL)  # the server dies
    output = proc.communicate(timeout=240)[0]
    try:
        assert proc.returncode == 1, output
        assert "failed while logging" in output and "Training stopped: epoch" in output, output
        assert "trainer.resume_run_id=" in output
        (state,) = (tmp_path / "checkpoints").glob("*/state.json")
        run_id = state.parent.name
        assert json.loads(state.read_text())["epochs_done"] >= 1
    finally:
        team.start_mlflow()  # back again, for this test and the next
    pipeline_cmd([*args, f"trainer.resume_run_id={run_id}"], tmp_path, team.uri)
    client = MlflowClient(tracking_uri=team.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_at_epoch"]
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == [0, 1, 2, 3, 4]


def every_text_of_the_runs(client, experiment_ids, tmp_path):
    """Everything a run keeps: names, params, tags, metric keys, every artifact's text."""
    texts = []
    for run in client.search_runs(experiment_ids):
        texts += [run.info.run_name, *run.data.params.items(), *run.data.tags.items(), *run.data.metrics]
        todo = [""]
        while todo:
            for item in client.list_artifacts(run.info.run_id, todo.pop() or None):
                if item.is_dir:
                    todo.append(item.path)
                elif item.file_size < 1_000_000:
                    local = client.download_artifacts(run.info.run_id, item.path, str(tmp_path / "artifacts"))
                    texts.append(Path(local).read_bytes().decode(errors="replace"))
    return "\n".join(map(str, texts))


def test_a_password_in_the_uri_is_never_written_anywhere(team, make_cfg, tmp_path):
    """A sweep and a single run with user:password@ on the command line: no MLflow field, artifact, Hydra output
    file or log line holds the password."""
    prepare.run(make_cfg(*SMALL))
    secret_uri = team.uri.replace("http://", "http://alice:s3cr3t-pw@")
    common = ["budget=smoke", "tracking.log_model=false", f"tracking.uri={secret_uri}", "tracking.experiment=secrets"]
    sweep = pipeline_cmd(["-m", *common, "model=rnn,gru"], tmp_path, team.uri)
    single = pipeline_cmd([*common, "tracking.run_name=secret-check"], tmp_path, team.uri)
    logs = sweep.stdout + sweep.stderr + single.stdout + single.stderr
    assert "alice:***@" in logs and "s3cr3t" not in logs
    client = MlflowClient(tracking_uri=team.uri)
    experiment = client.get_experiment_by_name("secrets")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 4  # the sweep's parent, its two children, the single run
    stored = every_text_of_the_runs(client, [experiment.experiment_id], tmp_path)
    assert "s3cr3t" not in stored and "alice:***@" in stored
    hydra_files = [p for folder in ("outputs", "multirun") for p in (tmp_path / folder).rglob("*") if p.is_file()]
    assert any(p.name == "overrides.yaml" for p in hydra_files) and any(p.name == "multirun.yaml" for p in hydra_files)
    leaking = [str(p) for p in hydra_files if "s3cr3t" in p.read_text(errors="replace")]
    assert not leaking, leaking
    (run,) = [r for r in runs if r.info.run_name == "secret-check"]
    assert "tracking.uri" not in run.data.params  # where a run was tracked does not determine its result


def test_the_team_server_holds_the_searches_studies_in_a_database_of_its_own(team):
    """tracking=server keeps Optuna's studies in the team's PostgreSQL (database optuna): a study written there
    through one storage object is read back through another, as the sweeper and its trial jobs do."""
    import optuna

    from pipeline import sweep

    url = team.search_storage
    assert url.endswith(f":{team.pg_port}/optuna")
    study = optuna.create_study(study_name="shared", storage=sweep.open_storage(url), direction="maximize")
    study.tell(study.ask(), 0.9)
    again = optuna.load_study(study_name="shared", storage=sweep.open_storage(url))
    assert [t.value for t in again.trials] == [0.9]
