"""engine/jobs/progress.py: curves from a train_log.jsonl, the ETA, the log tail."""

from __future__ import annotations

import json

from engine.jobs.progress import curves, eta_seconds, log_tail, read_train_log


def test_curves_merge_rows_of_one_step_and_align_missing_values(tmp_path):
    log = tmp_path / "train_log.jsonl"
    rows = [
        {"step": 1, "reward": 0.5, "format": 1.0, "iou": 0.2, "loss": 0.1},
        {"step": 2, "reward": 0.7, "format": 1.0, "od": 0.4},  # multi task: the accuracy reward is "od"
        {"step": 2, "train_loss": 0.3},  # trl's end-of-training summary at the last step: no curve value
        {"step": 3, "loss": 0.05},  # sft logs a loss only
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "rew', encoding="utf-8")  # torn line
    out = curves(read_train_log(log))
    assert out == {"step": [1, 2, 3], "reward": [0.5, 0.7, None], "format": [1.0, 1.0, None],
                   "iou": [0.2, 0.4, None], "loss": [0.1, None, 0.05]}  # fmt: skip
    assert curves([]) == {"step": [], "reward": [], "format": [], "iou": [], "loss": []}
    assert read_train_log(tmp_path / "missing.jsonl") == []


def test_a_resumed_run_replaces_the_steps_it_logs_again():
    out = curves([{"step": 1, "reward": 0.1}, {"step": 2, "reward": 0.2}, {"step": 2, "reward": 0.25}])
    assert out["step"] == [1, 2] and out["reward"] == [0.1, 0.25]


def test_eta_from_the_step_rate_capped_by_the_budget():
    assert eta_seconds(None, None) is None
    assert eta_seconds({"step": 0, "first_step": 0, "max_steps": 10, "seconds": 1.0}, None) is None
    assert eta_seconds({"step": 2, "first_step": 0, "max_steps": 10, "seconds": 4.0}, None) == 16.0
    # after a resume at step 5, the rate counts the steps of this run only
    assert eta_seconds({"step": 7, "first_step": 5, "max_steps": 10, "seconds": 4.0}, None) == 6.0
    assert eta_seconds({"step": 2, "first_step": 0, "max_steps": 10, "seconds": 4.0}, 10.0) == 6.0
    assert eta_seconds({"step": 2, "first_step": 0, "max_steps": 10, "seconds": 4.0}, None, since_update_s=3) == 13.0
    assert eta_seconds({"step": 2, "first_step": 0, "max_steps": 10, "seconds": 4.0}, 5.0, since_update_s=9) == 0.0
    assert eta_seconds({"step": 1, "first_step": 0, "max_steps": -1, "seconds": 4.0}, None) is None


def test_log_tail_keeps_the_last_lines_and_the_last_state_of_a_progress_bar(tmp_path):
    log = tmp_path / "job.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)) + " 10%|#\r 50%|####\r100%|########\n\n")
    tail = log_tail(log, 5)
    assert tail == ["line 96", "line 97", "line 98", "line 99", "100%|########"]
    assert log_tail(tmp_path / "none.log") == []
    big = tmp_path / "big.log"
    big.write_text("x" * 100_000 + "\nlast\n")
    assert log_tail(big, 3) == ["last"]  # the line cut by the 64 KiB window is dropped
