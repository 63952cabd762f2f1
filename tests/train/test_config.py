import json

import pytest

from sage_fast.train.config import ConfigError, DistillConfig, read_config_file, resolve


def test_defaults_validate():
    config = resolve({})
    assert config == DistillConfig().validate()
    assert config.mode == "sage" and config.compare == ["kd"]


def test_precedence_defaults_then_file_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.002\nbatch_size: 8\nmode: random\n")
    config = resolve({"batch_size": 4}, path)
    assert config.lr == 0.002          # from the file
    assert config.batch_size == 4      # the flag wins over the file
    assert config.mode == "random"     # from the file
    assert config.epochs == DistillConfig().epochs  # default


def test_json_file_and_dash_names(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"pool-size": 300, "compare": "kd,random"}))
    config = resolve({}, path)
    assert config.pool_size == 300 and config.compare == ["kd", "random"]


def test_round_trip(tmp_path):
    config = resolve({"seed": 7, "compare": "random", "max_train_examples": 50, "beta": 0.5})
    config.save(tmp_path)
    for name in ("config.json", "config.yaml"):
        assert resolve({}, tmp_path / name) == config
    assert DistillConfig.from_dict(json.loads((tmp_path / "config.json").read_text())).validate() == config


def test_compare_drops_the_main_mode_and_none():
    assert resolve({"mode": "kd", "compare": "kd,sage"}).compare == ["sage"]
    assert resolve({"compare": "none"}).compare == []


@pytest.mark.parametrize("flags, word", [
    ({"quantile": 1.0}, "quantile"),
    ({"quantile": 0}, "quantile"),
    ({"max_length": 1}, "max-length"),
    ({"pool_size": 10, "synthetic_per_round": 20}, "pool-size"),
    ({"batch_size": 0}, "batch-size"),
    ({"mode": "magic"}, "mode"),
    ({"compare": "kd,magic"}, "compare"),
    ({"alpha": 1.5}, "alpha"),
    ({"temperature": 0}, "temperature"),
    ({"lr": float("nan")}, "lr"),
    ({"lam_low": 0.8, "lam_high": 0.2}, "lam-low"),
    ({"eval_file": "x.csv"}, "train-file"),
    ({"bogus": 1}, "bogus"),
    ({"student": "from-teacher:0"}, "student"),
    ({"device": "gpu0"}, "device"),
    ({"device": "cuda:"}, "device"),
    ({"device": 1}, "device"),
    ({"compare": 5}, "compare"),
    ({"train_file": 5}, "train-file must be text"),
    ({"output_dir": 5}, "output-dir must be text"),
    ({"cache_dir": ["a"]}, "cache-dir must be text"),
    ({"teacher": 5}, "teacher must be text"),
    ({"student": None}, "student must be text"),
    ({"progress": "yes"}, "progress must be true or false"),
    ({"batch_size": True}, "batch-size must be an integer"),
    ({"max_train_examples": "10"}, "max-train-examples must be an integer"),
    ({"generator": "mixup"}, "generator"),
    ({"substitute_share": 1.5}, "substitute-share"),
    ({"substitute_share": -0.1}, "substitute-share"),
    ({"substitute_span": 1.01}, "substitute-span"),
    ({"substitute_top_k": 0}, "substitute-top-k"),
    ({"boundary_steps": 0}, "boundary-steps"),
    ({"boundary_step_size": 0}, "boundary-step-size"),
    ({"boundary_step_size": -1.0}, "boundary-step-size"),
    ({"generator": "boundary", "partners": "same-label"}, "anchor alone"),
    ({"synthetic_share": 1.0}, "synthetic-share"),
    ({"synthetic_share": -0.5}, "synthetic-share"),
    ({"synthetic_volume": 0}, "synthetic-volume"),
    ({"label_batch_size": 0}, "label-batch-size"),
])
def test_impossible_settings_name_the_setting(flags, word):
    with pytest.raises(ConfigError, match=word):
        resolve(flags)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        read_config_file(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_config_file(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        read_config_file(listy)
    unknown = tmp_path / "u.yaml"
    unknown.write_text("learning_rat: 1\n")
    with pytest.raises(ConfigError, match="learning_rat"):
        resolve({}, unknown)


def test_training_arguments_names_are_read_beside_ours(tmp_path):
    """Users of transformers.TrainingArguments bring its names; renamed older names are not read."""
    path = tmp_path / "hf.json"
    path.write_text(json.dumps({"learning_rate": 3e-4, "num-train-epochs": 2, "gradient_accumulation_steps": 2,
                                "logging_steps": 5}))
    config = resolve({}, path)
    assert (config.lr, config.epochs, config.grad_accumulation, config.log_every) == (3e-4, 2, 2, 5)
    assert "learning_rate" not in config.to_dict()
    for older in ("train_limit", "eval_limit", "warmup_fraction"):
        with pytest.raises(ConfigError, match=older):
            resolve({older: 1})


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:1"])
def test_every_device_name_is_accepted_here(device):
    # Whether the device exists is decided when the run starts (sage_fast.devices.resolve_device).
    assert resolve({"device": device}).device == device


@pytest.mark.parametrize("setting", ["output_dir", "cache_dir"])
def test_a_file_where_a_folder_belongs_is_refused(tmp_path, setting):
    (tmp_path / "a_file").write_text("x")
    for place in (tmp_path / "a_file", tmp_path / "a_file" / "inside"):
        with pytest.raises(ConfigError, match=f"{setting.replace('_', '-')} .*a_file is a file, not a folder"):
            resolve({setting: str(place)})
    assert resolve({setting: str(tmp_path / "new" / "folder")})  # made when the run starts


def test_the_config_offers_the_synthesizer_s_own_choices():
    """The config repeats them so that reading it imports no torch; they must not drift apart."""
    from sage_fast import synthesis
    from sage_fast.train import config as config_module

    assert config_module.PARTNERS == synthesis.PARTNERS
    assert config_module.GENERATORS == synthesis.GENERATORS
    assert config_module.POOL_POLICIES == synthesis.POLICIES
    assert config_module.PROFILE_SIGNALS == synthesis.PROFILE_SIGNALS
    assert set(config_module.MODES) == set(synthesis.MODES) | {"kd"}


@pytest.mark.parametrize("share, batch, per_batch", [(0.0, 32, 0), (0.5, 32, 32), (0.2, 32, 8), (0.8, 16, 64),
                                                     (0.25, 7, 2)])
def test_synthetic_share_sets_the_synthetic_rows_of_a_step(share, batch, per_batch):
    config = resolve({"synthetic_share": share, "batch_size": batch, "synthetic_per_batch": 5})
    assert config.synthetic_per_batch == per_batch


def test_synthetic_volume_leaves_the_round_size_to_the_run():
    """The rows a round makes follow from the run's rows and schedule, so a pool smaller than the
    flag's round is no contradiction there (the driver raises the pool to one round)."""
    config = resolve({"synthetic_volume": 4, "synthetic_per_round": 512, "pool_size": 64})
    assert config.synthetic_volume == 4.0


def test_rows_per_round_spreads_the_volume_over_an_epoch_s_rounds():
    from sage_fast.synthesis.volume import rows_per_round

    assert rows_per_round(4, 1000, 30, 10) == 1334          # 4,000 rows over three rounds
    assert rows_per_round(0.5, 1000, 30, 30) == 500         # one round an epoch
    assert rows_per_round(2, 10, 3, 10) == 20               # a round interval past the epoch: one round
    with pytest.raises(ValueError, match="volume"):
        rows_per_round(0, 1000, 30, 10)


def test_training_arguments_flags_set_our_settings_and_help_says_the_batch_is_global(capsys):
    from sage_fast.cli import build_parser
    from sage_fast.commands.distill import resolve_config

    args = build_parser().parse_args(["distill", "--learning-rate", "3e-4", "--num-train-epochs", "2",
                                      "--gradient-accumulation-steps", "4", "--logging-steps", "5"])
    config = resolve_config(args)
    assert (config.lr, config.epochs, config.grad_accumulation, config.log_every) == (3e-4, 2, 4, 5)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["distill", "--help"])
    assert "the global batch" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        build_parser().parse_args(["distill", "--warmup-fraction", "0.1"])
