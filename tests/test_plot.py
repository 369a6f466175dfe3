"""`vlp plot`: two hand-written train_log.jsonl files -> one figure whose lines carry exactly the
logs' loss, lr and evaluation series (read back from matplotlib's line objects), and a valid PNG
of a sensible size from the command."""
import json

import numpy as np
import pytest
from PIL import Image

from vlp.cli import main
from vlp.eval.plot import plot_runs, read_run


def _write_log(folder, records, junk_line: bool = False):
    folder.mkdir(parents=True)
    lines = [json.dumps(r) for r in records]
    if junk_line:
        lines.append('{"step": 99, "loss": 1.')  # cut short by a kill
    (folder / "train_log.jsonl").write_text("\n".join(lines) + "\n")


def _train(step, loss, lr):
    return {"step": step, "loss": loss, "lr": lr, "samples_per_s": 100.0 + step,
            "grad_norm": 1.0, "skipped": {}, "time_s": step / 10}


@pytest.fixture
def runs(tmp_path):
    a, b = tmp_path / "runs" / "small", tmp_path / "runs" / "big"
    _write_log(a, [
        _train(10, 2.5, 1e-4), _train(20, 2.0, 2e-4),
        {"step": 20, "event": "eval", "i2t_R@1": 5.0, "i2t_R@10": 30.0, "num_images": 100,
         "zeroshot_shape_images": 40, "skipped_samples": 0},
        {"step": 25, "event": "non_finite_loss", "loss": [float("nan")]},
        _train(30, 1.5, 1.5e-4), _train(40, 1.2, 0.5e-4),
        {"step": 40, "event": "end", "i2t_R@1": 9.0, "i2t_R@10": 41.0, "num_images": 100,
         "train_steps": 40, "train_time_s": 12.0, "total_time_s": 20.0, "skipped_samples": 0},
    ], junk_line=True)
    _write_log(b, [
        _train(10, 3.0, 1e-4), _train(20, 2.2, 1e-4),
        {"step": 20, "event": "eval", "i2t_R@1": 7.0, "i2t_R@10": 35.0, "t2i_R@1": 4.0},
        _train(30, 1.0, 1e-4),
        {"step": 30, "event": "end", "i2t_R@1": 12.0, "i2t_R@10": 50.0, "t2i_R@1": 6.0},
    ])
    return a, b


def _series(fig) -> dict:
    """{panel title: {line label: (steps, values)}} read back from the figure."""
    out = {}
    for ax in fig.axes:
        out[ax.get_title()] = {line.get_label(): (list(line.get_xdata()),
                                                  list(line.get_ydata()))
                               for line in ax.get_lines()}
    return out


def test_plotted_series_are_the_logs(runs):
    fig = plot_runs(runs)
    got = _series(fig)
    # loss, lr, then the evaluation metrics in natural order; counts and times left out
    assert list(got) == ["loss", "lr", "i2t_R@1", "i2t_R@10", "t2i_R@1"]
    assert got["loss"] == {"small": ([10, 20, 30, 40], [2.5, 2.0, 1.5, 1.2]),
                           "big": ([10, 20, 30], [3.0, 2.2, 1.0])}
    assert got["lr"]["small"] == ([10, 20, 30, 40], [1e-4, 2e-4, 1.5e-4, 0.5e-4])
    # eval records, then the final value at the end step
    assert got["i2t_R@1"] == {"small": ([20, 40], [5.0, 9.0]), "big": ([20, 30], [7.0, 12.0])}
    assert got["i2t_R@10"]["big"] == ([20, 30], [35.0, 50.0])
    assert got["t2i_R@1"] == {"big": ([20, 30], [4.0, 6.0])}  # only the run that has it
    # one colour per run, the same in every panel
    colours = {title: {line.get_label(): line.get_color() for line in ax.get_lines()}
               for title, ax in zip(got, fig.axes)}
    assert len({c["small"] for t, c in colours.items() if "small" in c}) == 1
    assert colours["loss"]["small"] != colours["loss"]["big"]
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["small", "big"]


def test_metrics_filter_and_read_run(runs):
    fig = plot_runs(runs, metrics=["i2t_R@1*"])
    assert [ax.get_title() for ax in fig.axes] == ["loss", "lr", "i2t_R@1", "i2t_R@10"]
    log = read_run(runs[0] / "train_log.jsonl")  # a log file works as well as its folder
    assert log.name == "small" and set(log.evals) == {"i2t_R@1", "i2t_R@10"}


def test_vlp_plot_writes_a_png(runs, tmp_path, capsys):
    out = tmp_path / "plots" / "curves.png"
    assert main(["plot", *map(str, runs), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        assert im.format == "PNG"
        width, height = im.size
        # 5 panels in 3 columns: 2 rows; 100 dpi
        assert 1000 <= width <= 1600 and 400 <= height <= 800, im.size
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 20  # lines drawn, not a blank canvas


def test_bad_runs_are_one_clear_line(runs, tmp_path, capsys):
    for args, words in (([str(tmp_path / "nope")], "no train_log.jsonl"),
                        ([str(runs[0]), "--metrics", "vqa_acc"],
                         "--metrics vqa_acc: not in the logs")):
        assert main(["plot", *args, "--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train_log.jsonl").write_text("")
    assert main(["plot", str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")]) == 2
    assert "no training or evaluation records" in capsys.readouterr().err
