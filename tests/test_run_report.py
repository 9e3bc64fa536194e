"""The lines a finished run prints last (``dit_jax.run_report``): its time, its loss windows, its evaluations in words."""

from __future__ import annotations

from configs import default
from dit_jax import run_report

JUDGED = {"class_consistency": 0.97, "per_class": [1.0] * 9 + [0.7], "chance": 0.1, "heldout_accuracy": 1.0,
          "fid": 795.2, "fid_floor": 7.31, "judge_seconds": 20.0, "seconds": 40.0}
GRID = {"png": "samples.png", "sampler": "ddpm 50 steps, guidance 4.0", "decoder": "pixels", "seconds": 1.0}


def summary(**changes) -> dict:
    return {"steps": 6500, "resumed_from_step": 0, "train_seconds": 400.0, "eval_seconds": 70.0, "steps_per_sec": 16.3,
            "first_loss": 0.0812, "first_loss_steps": [1, 500], "final_loss": 0.0270, "final_loss_steps": [6001, 6500],
            "evals": {"class_consistency": JUDGED, "samples": GRID}, **changes}


def test_the_last_lines_give_the_time_the_loss_windows_and_the_judges_verdict_by_class():
    lines = run_report.final_lines(summary(), default.get_config().evals, "/runs/demo", 512.4)
    assert lines == [
        "finished: 6,500 steps in 0:08:32 in all: training 0:06:40 (6,500 steps at 16.3 steps/s, compilation "
        "included), evaluation 0:01:10, the rest (start-up, data, checkpoints) 0:00:42",
        "training loss (mean of a log window): 0.0812 over steps 1-500, then 0.0270 over steps 6,001-6,500",
        "class consistency 0.970: the share of samples that a judge trained on real images recognises as the class "
        "they were drawn for (chance 0.10; the judge recognises 100.00% of held-out real images)",
        "per class: disc 1.00, square 1.00, triangle 1.00, ring 1.00, plus 1.00, cross 1.00, horizontal_bars 1.00, "
        "vertical_bars 1.00, checkerboard 1.00, crescent 0.70",
        "demo FID 795 (lower is better; two sets of real images score 7.3): the samples are recognisable but have "
        "less variety than the data",
        "sample grid /runs/demo/samples.png (a row per class; ddpm 50 steps, guidance 4.0)",
        "every figure: /runs/demo/summary.json; each log window and evaluation: /runs/demo/metrics.jsonl"]


def test_a_resumed_run_says_so_and_a_rerun_of_a_finished_one_trained_nothing():
    evals = default.get_config().evals
    resumed = run_report.final_lines(summary(resumed_from_step=4000), evals, "/runs/demo", 300.0)
    assert resumed[0].startswith("finished: 6,500 steps (resumed from step 4,000) in 0:05:00 in all: training 0:06:40 "
                                 "(2,500 steps at 16.3 steps/s")
    rerun = run_report.final_lines(summary(resumed_from_step=6500, train_seconds=0.0, steps_per_sec=None), evals,
                                   "/runs/demo", 100.0)
    assert "no training (the run had finished: its last step evaluated again)" in rerun[0]
    one_window = run_report.final_lines(summary(final_loss=0.0812, final_loss_steps=[1, 500]), evals, "/runs/demo", 9.0)
    assert one_window[1] == "training loss (mean of a log window): 0.0812 over steps 1-500"
    no_log = run_report.final_lines(summary(evals={}, first_loss=None, first_loss_steps=None, final_loss=None,
                                            final_loss_steps=None), evals, "/runs/demo", 500.0)
    assert len(no_log) == 2 and not any("loss" in line for line in no_log)  # metrics.jsonl lost: no loss line
