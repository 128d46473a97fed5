"""Progress lines (app/progress.py): what stages log and what `dinoctl pipeline run` shows."""

import io
import logging

from app.progress import ProgressView, format_eta, format_progress, parse_progress
from app.train.metrics import Progress


def test_a_progress_line_survives_a_log_prefix_and_reads_back():
    line = format_progress("pretrain", 40, 100, "steps", elapsed_s=20.0, start=0, loss=2.34567,
                           **{"img/s": 12.25})
    assert line == "progress pretrain 40/100 steps loss=2.346 img/s=12.25 eta=30s"
    p = parse_progress(f"2026-12-03 10:00:00 [rank0] INFO app.train.metrics: {line}\n")
    assert (p.stage, p.done, p.total, p.unit, p.eta_s) == ("pretrain", 40, 100, "steps", 30.0)
    assert p.text() == "pretrain  40/100 steps (40%)  loss=2.346  img/s=12.25  eta 30s"
    assert parse_progress("step 1 loss 9.1") is None
    assert format_progress("embed.pool", 0, 5, "shards", elapsed_s=0.0).endswith("eta=?")


def test_eta_reads_as_hours_minutes_seconds():
    assert [format_eta(s) for s in (7, 85, 3725, float("nan"))] == ["7s", "1m25s", "1h02m", "?"]


def test_on_a_terminal_the_line_is_rewritten_in_place_and_cleared():
    out = io.StringIO()
    view = ProgressView(out, tty=True)
    view.show(parse_progress("progress eval 10/20 images eta=5s"))
    view.show(parse_progress("progress eval 20/20 images eta=0s"))
    view.clear()
    assert out.getvalue() == ("\reval  10/20 images (50%)  eta 5s"
                              "\reval  20/20 images (100%)  eta 0s"
                              "\r" + " " * len("eval  20/20 images (100%)  eta 0s") + "\r")


def test_off_a_terminal_a_line_every_period_and_the_last_one():
    now = [0.0]
    out = io.StringIO()
    view = ProgressView(out, every_s=30, tty=False, clock=lambda: now[0])
    for step, t in ((1, 0.0), (2, 10.0), (3, 31.0), (4, 40.0), (5, 45.0)):
        now[0] = t
        view.show(parse_progress(f"progress pretrain {step}/5 steps eta=1s"))
    assert [line.split()[1] for line in out.getvalue().splitlines()] == ["1/5", "3/5", "5/5"]


def test_training_progress_logs_a_parseable_line_every_log_every(caplog):
    progress = Progress(total=4, start=0, log_every=2, enabled=True, stage="distill")
    with caplog.at_level(logging.INFO, logger="app.train.metrics"):
        for step in range(4):
            progress.update(step, {"total_loss": 1.5, "lr": 1e-3, "images_per_s": 8.0,
                                   "data_wait_fraction": 0.25})
    lines = [parse_progress(r.getMessage()) for r in caplog.records]
    assert [(p.stage, p.done, p.total) for p in lines] == [("distill", 2, 4), ("distill", 4, 4)]
    assert lines[-1].fields["loss"] == "1.5" and lines[-1].fields["data_wait"] == "25%"
