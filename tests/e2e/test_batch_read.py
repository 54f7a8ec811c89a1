"""The read-side batch commands on hand-made run folders with known numbers: runs (filters, sort,
limit, JSON, CSV), compare (differing keys, group statistics), plot, show's chart, rm."""

from __future__ import annotations

import csv
import io
import json
import statistics
import subprocess
import sys
import textwrap

import pytest
from kdl import kdl, train_tiny
from runfolders import make_run
from typer.testing import CliRunner

from karpathy_runner.batch import query
from karpathy_runner.cli import app


@pytest.fixture
def lr_sweep(runs_dir):
    """optimizer.lr 0.1 x seeds 0,1,2 and 0.01 x seeds 0,1; final val.loss = the last curve point."""
    finals = {(0.1, 0): 0.20, (0.1, 1): 0.21, (0.1, 2): 0.25, (0.01, 0): 0.30, (0.01, 1): 0.36}
    for (lr, seed), final in finals.items():
        make_run(runs_dir, [0.6, 0.4, final], config={"optimizer.lr": lr, "seed": seed}, sweep="s1")
    return finals


def listed_ids(*args: str) -> list[str]:
    result = kdl("runs", "--json", *args)
    assert result.exit_code == 0, result.stderr
    return [row["id"] for row in json.loads(result.stdout)]


# ----------------------------------------------------------------------------- kdl runs


def test_runs_filters_by_status_name_sweep_and_config(runs_dir):
    cifar = make_run(runs_dir, name="cifar_cnn", config={"optimizer.lr": 0.1}).name
    failed = make_run(runs_dir, [0.9, float("nan")], status="failed").name
    running = make_run(runs_dir, [0.8], status="running").name
    crashed = make_run(runs_dir, [0.8], status="running", pid=2**22 + 12345).name  # no such pid
    swept = make_run(runs_dir, sweep="s1").name

    assert listed_ids("--status", "failed", "--status", "running") == [failed, running]
    assert listed_ids("--status", "crashed") == [crashed]
    assert listed_ids("--name", "cifar*") == [cifar]
    assert listed_ids("--sweep", "s1") == [swept]
    assert listed_ids("--where", "optimizer.lr=0.1") == [cifar]
    assert listed_ids("--where", "status=failed") == [failed]
    assert listed_ids("--where", "model.channels=[32, 64]", "--name", "cifar*") == [cifar]

    typo = kdl("runs", "--where", "optimizer.lrr=0.1")
    assert typo.exit_code == 2 and "did you mean optimizer.lr" in typo.stderr
    assert kdl("runs", "--status", "done").exit_code == 2


def test_runs_sort_limit_and_formats(runs_dir, lr_sweep):
    ids = listed_ids()
    by_loss = [ids[i] for i in sorted(range(5), key=lambda i: list(lr_sweep.values())[i])]
    assert listed_ids("--sort", "val.loss") == by_loss  # a loss: lowest first
    assert listed_ids("--sort", "val.accuracy") == by_loss  # an accuracy: highest first
    assert listed_ids("--sort=-val.loss") == by_loss[::-1]
    assert listed_ids("--sort", "val.loss", "--limit", "2") == by_loss[:2]
    assert listed_ids("--limit", "2") == ids[-2:]  # unsorted: the newest
    assert listed_ids("--sort", "optimizer.lr")[:2] == ids[3:]  # config keys ascend

    table = kdl("runs", "--sort", "val.accuracy")
    assert table.stdout.splitlines()[0].split()[-1] == "val.accuracy"
    assert table.stdout.splitlines()[1].split()[-1] == "0.9"  # 1 - 0.20 / 2
    rows = list(csv.DictReader(io.StringIO(kdl("runs", "--csv", "--sort", "val.loss").stdout)))
    assert [row["id"] for row in rows] == by_loss and rows[0]["sweep"] == "s1"
    assert float(rows[0]["val.loss"]) == pytest.approx(0.20)


# ----------------------------------------------------------------------------- kdl compare


def test_compare_shows_the_keys_that_differ_and_the_best_run(runs_dir, lr_sweep):
    result = kdl("compare", "--sweep", "s1", "--json")
    assert result.exit_code == 0, result.stderr
    table = json.loads(result.stdout)
    assert table["keys"] == ["seed", "optimizer.lr"]
    assert table["metrics"] == ["val.loss", "val.accuracy", "train.loss", "train.accuracy", "best"]
    assert table["rows"][table["best_row"]]["metrics"]["best"] == pytest.approx(0.20)
    ids = listed_ids()
    assert kdl("compare", ids[0], ids[3]).stdout.count("*") == 2  # the best row and the note
    assert "optimizer.lr" in kdl("compare", ids[0], ids[3]).stdout


def test_compare_group_by_gives_mean_sample_std_and_n(runs_dir, lr_sweep):
    make_run(runs_dir, [0.5], config={"optimizer.lr": 0.5}, sweep="s1")  # a group of one
    table = json.loads(kdl("compare", "--sweep", "s1", "--group-by", "optimizer.lr", "--json").stdout)
    groups = {row["values"]["optimizer.lr"]: row for row in table["rows"]}
    assert table["averaged_over"] == ["seed"]
    for lr in (0.1, 0.01):
        losses = [final for (key, _), final in lr_sweep.items() if key == lr]
        stats = groups[lr]["metrics"]["val.loss"]
        assert stats["n"] == groups[lr]["n"] == len(losses)
        assert stats["mean"] == pytest.approx(statistics.mean(losses))
        assert stats["std"] == pytest.approx(statistics.stdev(losses))  # sample std, n-1
    assert groups[0.5]["metrics"]["val.loss"] == {"mean": 0.5, "std": None, "n": 1}
    assert table["rows"][table["best_row"]]["values"] == {"optimizer.lr": 0.1}

    text = kdl("compare", "--sweep", "s1", "--group-by", "optimizer.lr").stdout
    assert "0.22 ± 0.02646" in text and "0.5 ± -" in text
    rows = list(csv.DictReader(io.StringIO(
        kdl("compare", "--sweep", "s1", "--group-by", "optimizer.lr", "--csv").stdout)))
    assert [row["n"] for row in rows] == ["2", "3", "1"]  # groups sorted by lr


def test_compare_pure_function_on_records():
    def record(run_id, lr, seed, loss):
        return {"id": run_id, "name": "x", "status": "completed",
                "config": {"optimizer.lr": lr, "seed": seed, "model.name": "cnn"},
                "final": {"val.accuracy": 1 - loss}, "best": {"metric": "val.accuracy",
                                                              "value": 1 - loss, "mode": "max"}}

    records = [record("a", 0.1, 0, 0.1), record("b", 0.1, 1, 0.3), record("c", 0.2, 0, 0.15)]
    grouped = query.compare(records, ["optimizer.lr"])
    assert [row["n"] for row in grouped.rows] == [2, 1]
    assert grouped.rows[0]["metrics"]["val.accuracy"]["mean"] == pytest.approx(0.8)
    assert grouped.rows[0]["metrics"]["val.accuracy"]["std"] == pytest.approx(0.1414213562)
    assert grouped.best_row == 1  # accuracy: the highest mean wins
    assert query.compare(records).keys == ["optimizer.lr", "seed"]
    with pytest.raises(query.KdlError, match="did you mean optimizer.lr"):
        query.compare(records, ["optimizer.lrr"])


# ----------------------------------------------------------------------------- plot, show, rm


def test_plot_writes_a_png_with_one_line_per_run(runs_dir, lr_sweep, tmp_path):
    import matplotlib.image

    ids = listed_ids()
    out = tmp_path / "figs" / "curves.png"
    result = kdl("plot", ids[0], ids[3], "--metric", "val.loss", "--out", out)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(out).shape[:2] == (500, 800)

    unknown = kdl("plot", ids[0], "--metric", "val.bleu", "--out", out)
    assert unknown.exit_code == 2
    assert "val.loss" in unknown.stderr and "train_epoch.accuracy" in unknown.stderr


def test_plot_a_sweep_in_colour_families_with_the_differing_keys_in_the_legend(runs_dir, lr_sweep,
                                                                               tmp_path):
    import colorsys

    from karpathy_runner.ui.plot import draw

    out = tmp_path / "sweep.png"
    result = kdl("plot", "--sweep", "s1", "--metric", "val.loss", "--log-y", "--out", out)
    assert result.exit_code == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    found, _ = query.sweep_runs(runs_dir, "s1")
    figure = draw(found, "val.loss", log_y=True)
    axes = figure.axes[0]
    assert axes.get_yscale() == "log"
    lines = {line.get_label(): line.get_color() for line in axes.get_lines()}
    assert sorted(lines) == sorted(f"optimizer.lr={lr}, seed={seed}" for lr, seed in lr_sweep)
    hue = {label: colorsys.rgb_to_hsv(*color[:3])[0] for label, color in lines.items()}
    fast = [label for label in lines if label.startswith("optimizer.lr=0.1,")]
    slow = [label for label in lines if label.startswith("optimizer.lr=0.01,")]
    # one family (hue) per learning rate, one shade per seed
    assert max(hue[a] for a in fast) - min(hue[a] for a in fast) < 0.05
    assert max(hue[a] for a in slow) - min(hue[a] for a in slow) < 0.05
    assert abs(hue[fast[0]] - hue[slow[0]]) > 0.1
    assert len({lines[label] for label in fast + slow}) == 5
    # the other key chosen: one family per seed
    by_seed = {line.get_label(): line.get_color()
               for line in draw(found, "val.loss", color_by="seed").axes[0].get_lines()}
    seed_hue = {label: colorsys.rgb_to_hsv(*color[:3])[0] for label, color in by_seed.items()}
    assert "seed=0, optimizer.lr=0.1" in seed_hue  # the compared key first
    assert abs(seed_hue["seed=0, optimizer.lr=0.1"] - seed_hue["seed=0, optimizer.lr=0.01"]) < 0.05
    assert abs(seed_hue["seed=0, optimizer.lr=0.1"] - seed_hue["seed=1, optimizer.lr=0.1"]) > 0.1

    both = kdl("plot", found[0].id, "--sweep", "s1")
    assert both.exit_code == 2 and "not both" in both.stderr
    negative = kdl("plot", "--sweep", "s1", "--metric", "val.loss", "--log-y", "--color-by", "model.name")
    assert negative.exit_code == 2 and "--color-by model.name" in negative.stderr


def test_a_trial_its_search_pruned_is_listed_as_pruned_until_it_trains_again(runs_dir):
    from karpathy_runner.runfolder import sweeps

    folder = make_run(runs_dir, [0.5], status="paused", sweep="study-x")
    meta = json.loads((folder / "meta.json").read_text())
    meta["sweep"]["trial"] = 3
    (folder / "meta.json").write_text(json.dumps(meta))
    assert listed_ids("--status", "paused") == [folder.name]
    sweeps.record_pruned(runs_dir, "study-x", folder.name, 1)
    sweeps.record_pruned(runs_dir, "study-x", folder.name, 1)  # a study run again: one record
    assert len((runs_dir / ".sweeps" / "study-x.jsonl").read_text().splitlines()) == 1
    assert listed_ids("--status", "pruned") == [folder.name] and listed_ids("--status", "paused") == []
    assert "pruned" in kdl("show", folder.name).stdout
    meta["epochs_done"] = 2  # resumed by hand and paused again: unfinished work again
    (folder / "meta.json").write_text(json.dumps(meta))
    assert listed_ids("--status", "paused") == [folder.name]


def test_compare_marks_a_best_only_among_runs_of_one_task(runs_dir):
    """A char model's val.loss (nats per character) and a classifier's (cross-entropy over
    classes) share a name, not a meaning: no row of a mixed comparison is marked best."""
    cnn = make_run(runs_dir, [0.5, 0.3], name="digits_cnn")
    chars = make_run(runs_dir, [1.9, 1.4], name="char_lstm", task="language_model")
    cnn2 = make_run(runs_dir, [0.5, 0.4], name="digits_cnn")
    mixed = kdl("compare", cnn.name, chars.name, cnn2.name)
    assert mixed.exit_code == 0, mixed.stderr
    assert "*" not in mixed.stdout.replace("* lowest", "")
    assert "no row marked: these runs are of different tasks (2 classify, 1 language_model)" in " ".join(
        mixed.stdout.split())
    data = json.loads(kdl("compare", cnn.name, chars.name, "--json").stdout)
    assert data["best_row"] is None and data["tasks"] == {"classify": 1, "language_model": 1}
    grouped = json.loads(kdl("compare", cnn.name, chars.name, "--group-by", "name", "--json").stdout)
    assert grouped["best_row"] is None
    like = kdl("compare", cnn.name, cnn2.name)
    assert "* lowest best val.loss" in like.stdout
    assert json.loads(kdl("compare", cnn.name, cnn2.name, "--json").stdout)["best_row"] == 0


def test_plot_names_the_runs_it_cannot_draw_and_what_they_have(runs_dir, tmp_path):
    drawn = make_run(runs_dir, [0.5, 0.3])
    other = make_run(runs_dir, [0.6, 0.4])
    metrics = other / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    metrics.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "accuracy"}) + "\n"
                               for r in records))
    result = kdl("plot", drawn.name, other.name, "--metric", "val.accuracy", "--out", tmp_path / "a.png")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "a.png")
    assert "1 of 2 runs have no val.accuracy and are not drawn" in result.stderr
    assert f"{other.name} (has train.loss, train.lr" in result.stderr and drawn.name not in result.stderr
    every = kdl("plot", drawn.name, other.name, "--metric", "val.loss", "--out", tmp_path / "b.png")
    assert every.exit_code == 0 and every.stderr == ""


def test_show_draws_the_best_metric_and_the_epoch_table(runs_dir):
    make_run(runs_dir, [0.9, 0.5, 0.3, 0.25])
    result = kdl("show", "latest")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "metrics per epoch" in out and "val.accuracy" in out
    chart = out[out.index("\nval.loss\n"):].splitlines()
    assert chart[2].startswith(" 0.9 ┤█")  # top row: the highest value, epoch 1
    assert chart[7].startswith("0.25 ┤") and "epoch 1" in chart[9] and chart[9].endswith("4")


def test_rm_refuses_a_running_run_and_removes_after_confirmation(runs_dir):
    running = make_run(runs_dir, [0.8], status="running")
    done = make_run(runs_dir)
    other = make_run(runs_dir)

    refused = kdl("rm", running.name, done.name, "--yes")
    assert refused.exit_code == 2 and "still running" in refused.stderr
    assert running.is_dir() and done.is_dir()  # nothing removed

    unanswered = kdl("rm", done.name)  # stdin closed: a script forgot --yes
    assert unanswered.exit_code == 2 and "nothing removed; pass --yes" in unanswered.stderr
    assert "Aborted" not in unanswered.stderr and done.is_dir()
    declined = CliRunner().invoke(app, ["rm", done.name], input="n\n")
    assert declined.exit_code == 0 and declined.stderr.endswith("nothing removed\n")
    assert "Aborted" not in declined.stderr and done.is_dir()
    assert kdl("rm", done.name[:17], "--yes").stdout.strip() == f"removed {done.name}"
    assert not done.exists() and other.is_dir()


def test_read_commands_never_import_torch(runs_dir, lr_sweep):
    script = textwrap.dedent("""
        import sys
        from typer.testing import CliRunner
        from karpathy_runner.cli import app

        for args in (["--help"], ["runs"], ["runs", "--where", "optimizer.lr=0.1", "--sort", "val.loss"],
                     ["show", "latest"], ["compare", "--sweep", "s1", "--group-by", "optimizer.lr"]):
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 0, (args, result.output)
        heavy = [m for m in ("torch", "pydantic", "karpathy_runner.config.root", "matplotlib")
                 if m in sys.modules]
        assert not heavy, heavy
    """)
    subprocess.run([sys.executable, "-c", script], check=True)


def test_a_run_reused_by_a_sweep_is_one_of_its_points(tmp_path):
    """`kdl train --sweep S --skip-existing` that finds the experiment done records the run as
    a point of S (a run may belong to several sweeps) and the comparison says it was reused."""
    first = train_tiny(tmp_path, "--set", "train.max_steps=2", "--sweep", "sweep-a")
    assert first.exit_code == 0, first.stderr
    again = train_tiny(tmp_path, "--set", "train.max_steps=2", "--sweep", "sweep-b", "--skip-existing")
    assert again.exit_code == 0 and again.last_line == first.last_line
    for sweep, how in (("sweep-a", "made"), ("sweep-b", "reused")):
        compared = json.loads(kdl("compare", "--sweep", sweep, "--json", "--runs-dir", tmp_path).stdout)
        assert [(row["id"], row["how"]) for row in compared["rows"]] == [(first.last_line, how)]
