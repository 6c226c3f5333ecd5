"""Event config loading: the seed's three examples load unchanged; bad input is named."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from runner.aws.settings import AWSWorkerSection
from runner.config import DispatchFacts, load_event_config, worker_section, worker_settings
from runner.dask.settings import DaskWorkerSection
from runner.errors import ConfigError
from runner.local.settings import CondaWorkerSection

SEEDS = Path(__file__).parent / "seed_configs"


def test_seed_conda_config_loads_with_its_values():
    config = load_event_config(SEEDS / "conda.yml")
    assert isinstance(config.worker, CondaWorkerSection)
    assert config.worker.conda_env == "ramp-iris"
    assert config.worker.timeout == 14400
    assert config.worker.kit_dir == "/home/ramp/ramp_deployment/ramp-kits/iris"
    assert config.dispatcher.hunger_policy == "sleep"
    assert (config.dispatcher.slots, config.dispatcher.n_threads) == (2, 2)
    assert config.ramp.event_title == "Iris classification challenge"
    # Named after its config file: the three seed configs share a folder, not a ledger.
    assert config.ledger_path == SEEDS / "ramp-runner-conda.sqlite3"


def test_seed_aws_config_loads_and_hides_its_secrets():
    config = load_event_config(SEEDS / "aws.yml")
    assert isinstance(config.worker, AWSWorkerSection)
    assert config.worker.region_name == "us-west-2"
    assert config.worker.use_spot_instance is False
    assert config.worker.spot_fallback_on_demand is True
    assert config.dispatcher.time_between_collection == 60
    assert config.worker.secret_access_key.startswith("<aws_secret")
    assert "aws_secret_access_key" not in repr(config)
    assert "aws_access_key_id" not in repr(config.worker)
    # Paths absent from the seed's AWS example get RAMP's defaults beside the config.
    assert config.worker.kit_dir == str(SEEDS / "ramp-kits" / "iris")


def test_seed_dask_config_loads_with_defaults():
    config = load_event_config(SEEDS / "dask.yml")
    assert isinstance(config.worker, DaskWorkerSection)
    assert config.worker.dask_scheduler == "tcp://127.0.0.1:8786"
    assert config.dispatcher.slots == 4  # the seed sets n_workers in the worker section
    assert config.dispatcher.hunger_policy is None
    # Unset: each worker type polls at its own default (the seed's 1 s for Dask).
    assert config.dispatcher.time_between_collection is None
    assert config.worker.timeout == 7200


def test_defaults_follow_the_seed():
    bare = worker_section({"worker_type": "conda"}, "x", "worker")
    assert bare.timeout == 7200 and bare.conda_env is None
    assert load_event_config(SEEDS / "conda.yml").dispatcher.max_attempts == 3


def test_negative_n_workers_counts_from_the_cpu_count(tmp_path, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    document = _conda_document()
    document["dispatcher"]["n_workers"] = -2
    assert load_event_config(_write(tmp_path, document)).dispatcher.slots == 7


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    document = _conda_document()
    document["worker"]["kit_dir"] = "kits/iris"
    config = load_event_config(_write(tmp_path, document))
    assert config.worker.kit_dir == str(tmp_path / "kits" / "iris")


def test_hunger_policy_none_written_as_in_the_seed(tmp_path):
    document = _conda_document()
    document["dispatcher"]["hunger_policy"] = "None"
    assert load_event_config(_write(tmp_path, document)).dispatcher.hunger_policy is None


def _conda_document():
    return yaml.safe_load((SEEDS / "conda.yml").read_text())


def _aws_document():
    return yaml.safe_load((SEEDS / "aws.yml").read_text())


def _write(folder: Path, document) -> Path:
    path = folder / "config.yml"
    path.write_text(document if isinstance(document, str) else yaml.safe_dump(document))
    return path


def _set(document, dotted, value):
    *parents, last = dotted.split(".")
    target = document
    for key in parents:
        target = target[key]
    target[last] = value
    return document


def _drop(document, dotted):
    *parents, last = dotted.split(".")
    target = document
    for key in parents:
        target = target[key]
    del target[last]
    return document


BAD_CONFIGS = [
    # (id, document builder, key path named, words of the expectation)
    ("unknown worker type", lambda: _set(_conda_document(), "worker.worker_type", "condor"),
     "worker.worker_type", "did you mean 'conda'"),
    ("worker type missing", lambda: _drop(_conda_document(), "worker.worker_type"),
     "worker.worker_type", "one of"),
    ("unknown worker key", lambda: _set(_conda_document(), "worker.conda_evn", "x"),
     "worker.conda_evn", "did you mean 'conda_env'"),
    ("unknown dispatcher key", lambda: _set(_conda_document(), "dispatcher.n_worker", 2),
     "dispatcher.n_worker", "did you mean 'n_workers'"),
    ("unknown section", lambda: _set(_conda_document(), "dispatch", {}),
     "dispatch", "did you mean 'dispatcher'"),
    ("no worker section", lambda: _drop(_conda_document(), "worker"), "worker", "section"),
    ("timeout not a number", lambda: _set(_conda_document(), "worker.timeout", "2h"),
     "worker.timeout", "a number"),
    ("timeout negative", lambda: _set(_conda_document(), "worker.timeout", -5),
     "worker.timeout", "positive"),
    ("n_workers a string", lambda: _set(_conda_document(), "dispatcher.n_workers", "two"),
     "dispatcher.n_workers", "an integer"),
    ("n_workers zero", lambda: _set(_conda_document(), "dispatcher.n_workers", 0),
     "dispatcher.n_workers", "non-zero"),
    ("n_threads zero", lambda: _set(_conda_document(), "dispatcher.n_threads", 0),
     "dispatcher.n_threads", "positive"),
    ("hunger policy unknown", lambda: _set(_conda_document(), "dispatcher.hunger_policy", "slep"),
     "dispatcher.hunger_policy", "did you mean 'sleep'"),
    ("time_between_collection negative",
     lambda: _set(_conda_document(), "dispatcher.time_between_collection", -1),
     "dispatcher.time_between_collection", ">= 0"),
    ("max_attempts zero", lambda: _set(_conda_document(), "dispatcher.max_attempts", 0),
     "dispatcher.max_attempts", ">= 1"),
    ("problem name missing", lambda: _drop(_conda_document(), "ramp.problem_name"),
     "ramp.problem_name", "a string"),
    ("event_is_public not a boolean",
     lambda: _set(_conda_document(), "ramp.event_is_public", "yes please"),
     "ramp.event_is_public", "true or false"),
    ("worker section a list", lambda: _set(_conda_document(), "worker", ["conda"]),
     "worker", "a mapping"),
    ("aws key_path missing", lambda: _drop(_aws_document(), "worker.key_path"),
     "worker.key_path", "a string"),
    ("aws no image name", lambda: _drop(_aws_document(), "worker.ami_image_name"),
     "worker.ami_image_name", "AMI base name"),
    ("aws spot not a boolean", lambda: _set(_aws_document(), "worker.use_spot_instance", "no"),
     "worker.use_spot_instance", "true or false"),
    ("dask scheduler missing", lambda: {"worker": {"worker_type": "dask"}},
     "worker.dask_scheduler", "a string"),
    ("dask security incomplete", lambda: {"worker": {
        "worker_type": "dask", "dask_scheduler": "tls://h:8786",
        "dask_security": {"tls_ca_file": "ca.pem"}}},
     "worker.dask_security.tls_client_cert", "a string"),
    ("ssh hosts empty", lambda: {"worker": {"worker_type": "ssh", "hosts": []}},
     "worker.hosts", "non-empty list"),
    ("ssh host without user", lambda: {"worker": {"worker_type": "ssh", "hosts": [
        {"host": "h", "key_path": "k", "remote_ramp_kit_folder": "/k"}]}},
     "worker.hosts[0].user", "a string"),
    ("top level a list", lambda: "- worker\n- ramp\n", "<top level>", "a mapping"),
    ("not YAML", lambda: "worker: {worker_type: conda\n  kit_dir: [\n", "<file>", "YAML"),
]


@pytest.mark.parametrize(("build", "key_path", "expected"),
                         [case[1:] for case in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_names_file_key_and_expectation(tmp_path, build, key_path, expected):
    path = _write(tmp_path, build())
    with pytest.raises(ConfigError) as caught:
        load_event_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: {key_path}: expected"), message
    assert expected in message
    assert caught.value.key_path == key_path


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nowhere\.yml: <file>: expected a readable file"):
        load_event_config(tmp_path / "nowhere.yml")


def test_a_wrong_secret_is_not_echoed(tmp_path):
    document = _set(_aws_document(), "worker.secret_access_key", ["s3cr3t-value"])
    with pytest.raises(ConfigError) as caught:
        load_event_config(_write(tmp_path, document))
    assert "worker.secret_access_key" in str(caught.value)
    assert "s3cr3t-value" not in str(caught.value)


def test_worker_dict_round_trips_through_validation():
    config = load_event_config(SEEDS / "conda.yml")
    again = worker_section(config.worker_dict(dispatcher_id="d"), "dict", "worker")
    assert again == config.worker


def test_the_dispatchers_keys_reach_the_settings_typed_and_leave_the_dict_as_it_was():
    config = load_event_config(SEEDS / "conda.yml")
    worker = config.worker_dict(dispatcher_id="d", scratch_dir="/scratch",
                                prepared={"conda_prefix": "/envs/x"})
    settings = worker_settings(CondaWorkerSection, worker, "dict")
    assert settings.dispatch == DispatchFacts(
        n_threads=config.dispatcher.n_threads,
        time_between_collection=config.dispatcher.time_between_collection,
        event_name=config.ramp.event_name, event_dir=str(config.path.parent),
        event_config=str(config.path), scratch_dir="/scratch", dispatcher_id="d",
        prepared={"conda_prefix": "/envs/x"})
    # The settings are the event's section otherwise; the dict keeps the seed's flat keys.
    assert dataclasses.replace(settings, dispatch=DispatchFacts()) == config.worker
    assert worker["dispatcher_id"] == "d" and "dispatch" not in worker


def test_a_dispatcher_key_of_the_wrong_type_in_a_worker_dict_names_it():
    config = load_event_config(SEEDS / "conda.yml")
    worker = {**config.worker_dict(), "n_threads": "four"}
    with pytest.raises(ConfigError, match=r"worker\.n_threads"):
        worker_settings(CondaWorkerSection, worker, "dict")


def test_the_dispatchers_facts_are_not_a_key_of_the_config_file(tmp_path):
    conda = yaml.safe_load((SEEDS / "conda.yml").read_text())
    conda["worker"]["dispatch"] = {"n_threads": 4}
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(conda))
    with pytest.raises(ConfigError, match=r"worker\.dispatch.*known key"):
        load_event_config(path)
