"""`benchmarks/gpu_check.sh --dry-run`: the GPU check's every part runs on the CPU at tiny sizes
and leaves its table and result files, so that the script cannot rot between runs on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("gpu_tests", "pretrain_auto", "pretrain_compile", "train_step", "data_pipeline")


@pytest.mark.slow
def test_dry_run_leaves_a_table_and_sane_results(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", str(out)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "| part | status | result | log |" in run.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and summary["peak_tflops"] == 989
    assert [r["part"] for r in summary["rows"]] == list(PARTS)
    assert all(r["status"] == "ok" for r in summary["rows"]), summary["rows"]
    assert (out / "summary.md").read_text() in run.stdout
    for part in PARTS:
        assert (out / "status" / part).read_text().strip() == "0"
        assert (out / "logs" / f"{part}.log").is_file()
    # every GPU test is collected and skips without CUDA
    assert "skipped" in summary["rows"][0]["result"]

    for part in ("pretrain_auto", "pretrain_compile"):
        result = json.loads((out / f"{part}.json").read_text())
        assert result["exit_code"] == 0 and result["steps"] == 4
        assert result["images_per_second"] > 0 and result["peak_rss_mb"] > 100
        assert result["peak_gpu_memory_mb"] is None  # no GPU
        assert (out / f"{part}_metrics.jsonl").is_file()
    assert "train.compile=true" in json.loads((out / "pretrain_compile.json").read_text())["argv"]

    steps = {json.loads(line)["path"]: json.loads(line)
             for line in (out / "train_step.jsonl").read_text().splitlines()}
    assert steps.keys() == {"baseline", "ours"}
    for row in steps.values():
        assert row["batch"] == 2 and row["images_per_second"] > 0
        assert row["flops_per_step"] > 1e8 and 0 < row["mfu"] < 1
    # ours skips the patch heads' unused positions: less arithmetic than the baseline
    assert steps["ours"]["flops_per_step"] < steps["baseline"]["flops_per_step"]

    loader = json.loads((out / "data_pipeline.jsonl").read_text().splitlines()[-1])
    assert loader["workers"] == 2 and loader["photometric_on"] == "device"
    assert loader["images_per_second"] > 0
    assert not list(out.rglob("*.pt"))  # the checkpoints stay out of the results folder


def test_summary_shows_each_failure_with_its_log(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import print_summary

    (tmp_path / "status").mkdir()
    (tmp_path / "logs").mkdir()
    (tmp_path / "status" / "gpu_tests").write_text("0\n")
    (tmp_path / "logs" / "gpu_tests.log").write_text("===== 6 passed, 1 skipped in 9.1s =====\n")
    (tmp_path / "status" / "pretrain_auto").write_text("1\n")
    (tmp_path / "status" / "pretrain_compile").write_text("124\n")
    (tmp_path / "status" / "train_step").write_text("0\n")
    (tmp_path / "train_step.jsonl").write_text("\n".join(json.dumps(r) for r in [
        dict(path="baseline", batch=256, images_per_second=1000.0, step_memory_mb=9000.0),
        dict(path="ours", batch=256, images_per_second=2500.0, step_memory_mb=6000.0,
             tflops_per_second=420.0, mfu=420 / 989),
        dict(path="ours@max", batch=1024, images_per_second=2600.0)]) + "\n")
    assert print_summary(tmp_path, dry_run=False, peak_tflops=989.0) == 1
    rows = {r["part"]: r for r in json.loads((tmp_path / "summary.json").read_text())["rows"]}
    assert rows["gpu_tests"]["status"] == "ok"
    assert rows["gpu_tests"]["result"] == "6 passed, 1 skipped in 9.1s"
    assert rows["pretrain_auto"]["status"] == "FAILED (exit 1)"
    assert "logs/pretrain_auto.log" in rows["pretrain_auto"]["result"]
    assert rows["pretrain_compile"]["status"] == "TIMEOUT"
    assert rows["data_pipeline"]["status"] == "NOT RUN"
    step = rows["train_step"]["result"]
    assert "2.50 x" in step and "MFU 42.5%" in step and "ours@max: batch 1024" in step
