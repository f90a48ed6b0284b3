"""Progress output: bars on a terminal (rank 0 only), lines in a log file, nothing when off."""
import pytest

from ccfs_dist.runtime import progress


def run(monkeypatch, capsys, mode, rank="0", main=True, total=5):
    monkeypatch.setenv(progress.ENV, mode)
    monkeypatch.setenv("RANK", rank)
    assert list(progress.track(range(total), desc="filter", total=total, main=main, unit="epochs")) == list(range(total))
    return capsys.readouterr().err


def test_lines_mode_prints_one_line_at_the_end_without_carriage_returns(monkeypatch, capsys):
    err = run(monkeypatch, capsys, "lines")
    assert err.count("\n") == 1 and "\r" not in err
    assert err.startswith("filter: 5/5 epochs, ")


def test_lines_mode_reports_while_running_at_the_interval(monkeypatch, capsys):
    monkeypatch.setattr(progress, "LINE_INTERVAL_S", 0.0)
    err = run(monkeypatch, capsys, "lines", total=3)
    assert [line.split(",")[0] for line in err.splitlines()] == ["filter: 1/3 epochs", "filter: 2/3 epochs",
                                                                  "filter: 3/3 epochs", "filter: 3/3 epochs"]


def test_off_and_non_main_print_nothing(monkeypatch, capsys):
    assert run(monkeypatch, capsys, "off") == ""
    assert run(monkeypatch, capsys, "lines", main=False) == ""
    assert run(monkeypatch, capsys, "bars", main=False) == ""


def test_bars_are_drawn_by_rank_0_only_other_ranks_write_lines(monkeypatch, capsys):
    assert "\r" in run(monkeypatch, capsys, "bars", rank="0")
    err = run(monkeypatch, capsys, "bars", rank="1")
    assert "\r" not in err and err.startswith("filter: 5/5 epochs")


def test_auto_is_lines_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    assert progress.mode() in ("bars", "lines")
    monkeypatch.setenv(progress.ENV, "auto")
    assert progress.mode() == "lines"          # capsys: stderr is not a terminal
    monkeypatch.setenv(progress.ENV, "nonsense")
    assert progress.mode() == "lines"


def test_set_mode_reaches_child_processes_and_refuses_unknown(monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    progress.set_mode("off")
    import os
    assert os.environ[progress.ENV] == "off"
    with pytest.raises(ValueError):
        progress.set_mode("loud")


def test_cli_progress_flag_sets_the_mode_for_run_and_scores(monkeypatch):
    import os
    from ccfs_dist import cli
    for command in ("run", "scores"):
        monkeypatch.delenv(progress.ENV, raising=False)
        monkeypatch.setattr(cli, "cmd_" + command, lambda args: 0)
        assert cli.main([command, "--progress", "lines"]) == 0
        assert os.environ[progress.ENV] == "lines"
        monkeypatch.delenv(progress.ENV)
        assert cli.main([command]) == 0 and progress.ENV not in os.environ     # no flag: the environment decides
    with pytest.raises(SystemExit):
        cli.main(["run", "--progress", "loud"])
