"""The accuracy study's bookkeeping: a finished run is never run again, a cut-off ledger line is,
exploration records hold no test number, and the report rewrites only its own table. The training
itself is the driver's, tested in tests/; here a run is a stand-in that returns a record."""
import json
import os
import time

import accuracy_study as study
import pytest


@pytest.fixture
def plan():
    return [
        study.Experiment("base", "baseline", "minilm", {"max_train_examples": 50}, seeds=(0, 1)),
        study.Experiment("knob", "a synthesis knob", "minilm", {"analysis_every": 3}, modes=("random", "sage"),
                         kd_from="base"),
        study.Experiment("final", "chosen settings", "minilm", {}, modes=("kd", "sage"), stage="final"),
    ]


def _fake_runs(monkeypatch, calls):
    def run_one(exp, mode, seed, teacher, out, log):
        calls.append((exp.name, mode, seed))
        accuracy = {"kd": 0.70, "random": 0.71, "sage": 0.73}[mode] + 0.01 * seed
        record = {"experiment": exp.name, "mode": mode, "seed": seed, "stage": exp.stage, "overrides": exp.overrides,
                  "validation_accuracy": accuracy, "examples_per_second": 100.0 if mode == "kd" else 60.0,
                  "analysis_share": None if mode == "kd" else 0.05, "synthesis_share": None if mode == "kd" else 0.01,
                  "validation_curve": [{"step": 10, "epoch": 1, "accuracy": accuracy}], "wall_seconds": 1.0}
        if exp.stage == "final":
            record["test_accuracy"] = accuracy - 0.01
        return record

    monkeypatch.setattr(study, "run_one", run_one)
    monkeypatch.setattr(study, "teacher_folder", lambda pair, log: "teacher")


def test_a_second_call_runs_nothing_and_a_cut_line_runs_again(plan, monkeypatch, tmp_path):
    calls = []
    _fake_runs(monkeypatch, calls)
    ledger = tmp_path / "ledger.jsonl"
    study.run_plan(plan, tmp_path / "runs", ledger, None, None, log=lambda m: None)
    assert len(calls) == 2 * 3 + 2 + 2
    study.run_plan(plan, tmp_path / "runs", ledger, None, None, log=lambda m: None)
    assert len(calls) == 10
    lines = ledger.read_text().splitlines()
    ledger.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # killed mid-write
    study.run_plan(plan, tmp_path / "runs", ledger, None, None, log=lambda m: None)
    assert calls[-1] == calls[9] and len(calls) == 11


def test_stage_and_only_select_runs(plan, monkeypatch, tmp_path):
    calls = []
    _fake_runs(monkeypatch, calls)
    study.run_plan(plan, tmp_path, tmp_path / "l.jsonl", "final", None, log=lambda m: None)
    assert {c[0] for c in calls} == {"final"}
    study.run_plan(plan, tmp_path, tmp_path / "l.jsonl", None, "knob", log=lambda m: None)
    assert {c[0] for c in calls[2:]} == {"knob"}


def test_seed_selects_one_seed_so_processes_can_share_a_plan(plan, monkeypatch, tmp_path):
    calls = []
    _fake_runs(monkeypatch, calls)
    study.run_plan(plan, tmp_path, tmp_path / "l.jsonl", None, "base", log=lambda m: None, seed=1)
    assert calls == [("base", "kd", 1), ("base", "random", 1), ("base", "sage", 1)]
    study.run_plan(plan, tmp_path, tmp_path / "l.jsonl", None, "base", log=lambda m: None, seed=0, mode="sage")
    assert calls[3:] == [("base", "sage", 0)]


def test_report_uses_validation_in_exploration_and_test_in_final(plan, monkeypatch, tmp_path):
    plan = plan + [study.Experiment("signal", "a profile knob", "minilm", {"profile_signal": "trusted"},
                                    modes=("sage",), seeds=(0, 1), kd_from="base", random_from="base")]
    _fake_runs(monkeypatch, [])
    ledger = tmp_path / "l.jsonl"
    study.run_plan(plan, tmp_path, ledger, None, None, log=lambda m: None)
    records = study.read_ledger(ledger)
    assert all("test_accuracy" not in r for r in records if r["stage"] == "explore")
    table = study.report(plan, ledger).splitlines()
    base = next(line for line in table if line.startswith("| base |"))
    assert "| 70.5 ± 0.7 (n=2) | 71.5 ± 0.7 (n=2) | 73.5 ± 0.7 (n=2) | +3.0 (n=2) | +2.0 (n=2) | 100 / 60 | 6% |" in base
    knob = next(line for line in table if line.startswith("| knob |"))
    assert "70.5 ± 0.7 (n=2)" in knob  # KD borrowed from the experiment it names
    assert "| +3.0 | +2.0 |" in knob  # paired over the one seed knob ran
    signal = next(line for line in table if line.startswith("| signal |"))
    assert "| 70.5 ± 0.7 (n=2) | 71.5 ± 0.7 (n=2) | 73.5 ± 0.7 (n=2) | +3.0 (n=2) | +2.0 (n=2) |" in signal
    final = next(line for line in table if line.startswith("| final (test) |"))
    assert "| 69.0 |" in final and "| 72.0 |" in final


def test_write_table_keeps_the_prose(tmp_path):
    page = tmp_path / "results.md"
    page.write_text(f"intro\n{study.TABLE_START}\nold table\n{study.TABLE_END}\nreading\n")
    study.write_table(page, "| new |", log=lambda m: None)
    assert page.read_text() == f"intro\n{study.TABLE_START}\n| new |\n{study.TABLE_END}\nreading\n"
    bare = tmp_path / "bare.md"
    bare.write_text("no markers\n")
    study.write_table(bare, "| new |", log=lambda m: None)
    assert bare.read_text() == "no markers\n"


def test_only_must_name_an_experiment(capsys):
    with pytest.raises(SystemExit) as exit_info:
        study.main(["--only", "nope", "--list"])
    assert exit_info.value.code == 2
    assert "--only must name an experiment" in capsys.readouterr().err


def test_ledger_lines_are_json(plan, monkeypatch, tmp_path):
    _fake_runs(monkeypatch, [])
    ledger = tmp_path / "l.jsonl"
    study.run_plan(plan, tmp_path, ledger, None, None, log=lambda m: None)
    for line in ledger.read_text().splitlines():
        assert json.loads(line)["experiment"] in {"base", "knob", "final"}


def test_every_run_of_the_plan_is_a_valid_driver_config(tmp_path):
    """A typo in an experiment's overrides (or a mode the driver lacks) fails here, not hours into
    the study; the SAGE column of an experiment with its own ``sage_mode`` runs that mode."""
    teacher = str(tmp_path)  # any folder: the config checks the teacher's path, not its contents
    for exp in study.PLAN:
        for mode in exp.modes:
            config = study.run_config(exp, mode, exp.seeds[0], teacher, tmp_path / "out")
            assert config.mode == (exp.sage_mode if mode == "sage" else mode)
            assert config.output_dir == str(tmp_path / "out" / "runs" / exp.name / f"{mode}-seed{exp.seeds[0]}")
    inverse = next(e for e in study.PLAN if e.sage_mode != "sage")
    assert study.run_config(inverse, "sage", 0, teacher, tmp_path).mode == "inverse"


def test_the_held_out_read_is_taken_once_and_kept(plan, monkeypatch, tmp_path):
    """Exploration runs' test scores come from the results their driver wrote, final runs' from the
    ledger; both are copied once to the held-out ledger, so a later call reads nothing again (the
    run folders may be gone by then), and a run without results is named, not guessed."""
    cells = [("minilm", "50", 3, {"kd": "base", "random": "knob", "sage": "knob"}), ("minilm", "all", 3, "final")]
    monkeypatch.setattr(study, "TEST_CELLS", cells)
    ledger = tmp_path / "ledger.jsonl"
    study.append_ledger(ledger, {"experiment": "final", "mode": "kd", "seed": 0, "test_accuracy": 0.80})
    study.append_ledger(ledger, {"experiment": "final", "mode": "sage", "seed": 0, "test_accuracy": 0.83})
    out = tmp_path / "out"
    scores = {("base", "kd", 0): 0.70, ("base", "kd", 1): 0.72, ("knob", "random", 0): 0.71,
              ("knob", "sage", 0): 0.75}
    for (name, mode, seed), accuracy in scores.items():
        folder = out / "runs" / name / f"{mode}-seed{seed}"
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps({"modes": [{"split": "test", "accuracy": accuracy}]}))
    messages = []
    table = study.held_out_table(plan, study.read_held_out(plan, out, ledger, messages.append)).splitlines()
    assert table[2] == "| minilm | 50 | 3 | 71.0 ± 1.4 (n=2) | 71.0 | 75.0 | +5.0 | +4.0 |"
    assert table[3] == "| minilm | all | 3 | 80.0 | — | 83.0 | +3.0 | — |"
    assert messages == []
    kept = study.held_out_ledger(ledger).read_text()
    assert kept.count("\n") == 6

    (out / "runs" / "base" / "kd-seed1" / "results.json").unlink()
    (out / "runs" / "knob" / "sage-seed0" / "results.json").write_text(
        json.dumps({"modes": [{"split": "test", "accuracy": 0.10}]}))  # a later rerun is not read
    again = study.held_out_table(plan, study.read_held_out(plan, out, ledger, messages.append)).splitlines()
    assert again == table and study.held_out_ledger(ledger).read_text() == kept

    folder = out / "runs" / "knob" / "random-seed0"
    (folder / "results.json").unlink()
    study.held_out_ledger(ledger).unlink()
    study.read_held_out(plan, out, ledger, messages.append)
    assert messages == ["no results for 2 run(s), which must run again to be read: base kd seed 1; "
                        "knob random seed 0"]


def test_the_generators_plan_screens_both_scales_with_controls_and_confirms_only_screened_settings(tmp_path):
    """Every generator setting is screened at 2,000 rows (3 seeds) and on all rows, SAGE beside its
    own random-anchor control; each possible confirmation (any screened setting, on all rows, 3
    seeds, test read) is a valid driver config; the claim is re-run with 5 seeds."""
    teacher = str(tmp_path)
    names = {e.name: e for e in study.PLAN}
    generators = set()
    for setting, values in study.GENERATOR_SETTINGS.items():
        generators.add(values["generator"])
        small, full = names[f"n2k-{setting}"], names[f"all-{setting}"]
        assert small.overrides["max_train_examples"] == 2000 and small.seeds == study.SEEDS
        assert "max_train_examples" not in full.overrides and full.stage == "explore"
        for exp in (small, full):
            assert exp.modes == ("random", "sage") and exp.kd_from in names
            kd = names[exp.kd_from]  # KD of the same data and steps, run beside them
            assert kd.modes == ("kd",) and kd.seeds == study.SEEDS
            assert {k: v for k, v in exp.overrides.items() if k in ("max_train_examples", "epochs")} == \
                {k: v for k, v in kd.overrides.items() if k in ("max_train_examples", "epochs")}
            for mode in exp.modes:
                assert study.run_config(exp, mode, 0, teacher, tmp_path).generator == values["generator"]
        confirm = study.confirmation(values["generator"], setting)
        assert confirm.stage == "final" and confirm.seeds == study.SEEDS and confirm.kd_from == "all-kd"
        assert names["all-kd"].stage == "final"
        for mode in confirm.modes:
            config = study.run_config(confirm, mode, 2, teacher, tmp_path)
            assert config.epochs == 3 and config.max_train_examples == 0 and config.generator == values["generator"]
    assert generators == {"interpolate", "substitute", "boundary"} == set(study.CONFIRM)
    for generator, setting in study.CONFIRM.items():
        assert setting is None or study.GENERATOR_SETTINGS[setting]["generator"] == generator
    claim, again = names["n2k-1epoch"], names["n2k-1epoch-5seeds"]
    assert again.overrides == claim.overrides and again.modes == claim.modes and len(again.seeds) == 5
    assert any(cell[3] == "n2k-1epoch-5seeds" for cell in study.TEST_CELLS)


def test_a_run_cut_off_before_its_first_checkpoint_starts_over_and_a_later_one_resumes(monkeypatch, tmp_path):
    from sage_fast.train import loop
    from sage_fast.train.checkpoint import CHECKPOINT_NAME

    exp = next(e for e in study.PLAN if e.name == "n2k-kd")
    calls = []

    def run(config, *, resume, overwrite, log):
        calls.append((resume, overwrite))
        folder = tmp_path / "runs" / exp.name / "kd-seed0" / "kd"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": 1, "epoch": 0, "accuracy": 0.7}))
        return {"modes": [{"validation_accuracy": 0.7}]}

    monkeypatch.setattr(loop, "run", run)
    run_dir = tmp_path / "runs" / exp.name / "kd-seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text("{}")  # what a run writes before its first checkpoint
    study.run_one(exp, "kd", 0, str(tmp_path), tmp_path, log=lambda m: None)
    (run_dir / "kd" / CHECKPOINT_NAME).write_text("")
    study.run_one(exp, "kd", 0, str(tmp_path), tmp_path, log=lambda m: None)
    assert calls == [(False, True), (True, False)]


def test_the_speed_stage_times_kd_then_sage_one_epoch_each_and_keeps_every_result(monkeypatch, tmp_path, capsys):
    from sage_fast.train import loop

    configs = []

    def run(config, *, resume, overwrite, log):
        configs.append(config)
        assert not resume and overwrite  # a timing starts over in its own folder
        fast = config.mode == "kd"
        return {"modes": [{"steps": 320, "train_seconds": 100.0 if fast else 160.0,
                           "examples_per_second": 102.4 if fast else 64.0,
                           "analysis_share": 0.0 if fast else 0.02, "synthesis_share": 0.0 if fast else 0.01}]}

    monkeypatch.setattr(loop, "run", run)
    monkeypatch.setattr(study, "teacher_folder", lambda pair, log: str(tmp_path))
    ledger = tmp_path / "results" / "accuracy_study.jsonl"
    report = tmp_path / "results.md"
    report.write_text(f"prose\n{study.SPEED_START}\nold\n{study.SPEED_END}\nmore prose\n")
    assert study.main(["--stage", "speed", "--only", "all-sub15", "--out", str(tmp_path / "runs"),
                       "--ledger", str(ledger), "--report", str(report)]) == 0
    assert [c.mode for c in configs] == ["kd", "sage"]
    assert all(c.epochs == 1 and c.seed == 0 and c.generator == "substitute" for c in configs)
    assert all(str(tmp_path / "runs" / "speed") in c.output_dir for c in configs)
    lines = [json.loads(x) for x in (ledger.parent / "speed.jsonl").read_text().splitlines()]
    assert [(r["mode"], r["examples_per_second"]) for r in lines] == [("kd", 102.4), ("sage", 64.0)]
    assert lines[1]["waiting_share"] == pytest.approx(0.03) and 0 <= lines[1]["cpu_busy_before"] <= 1
    assert not ledger.exists()  # the study's own ledger is untouched
    assert "SAGE / KD real examples per second: 0.62" in capsys.readouterr().out
    text = report.read_text()
    assert "old" not in text and text.startswith("prose") and text.endswith("more prose\n")
    assert "| all-sub15 | 1 | 102.4 | 64.0 | 0.62 | 3.0% |" in text


def test_cpu_busy_sees_another_process_keep_a_core_busy():
    import subprocess
    import sys

    quiet = study.cpu_busy(0.5)
    if quiet is None:
        pytest.skip("no /proc/stat here")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        loaded = study.cpu_busy(1.0)
    finally:
        spinner.kill()
        spinner.wait()
    assert loaded >= 0.8 / (os.cpu_count() or 1)  # one core of them, at least


def test_the_speed_stage_needs_one_experiment(capsys):
    with pytest.raises(SystemExit) as raised:
        study.main(["--stage", "speed"])
    assert raised.value.code == 2 and "--only" in capsys.readouterr().err
