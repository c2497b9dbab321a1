"""`sere segment --retrieval --items --overcluster --background` end to end on the tiny
checkpoint and scenes of tests/test_segment_cli.py."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from sere.cli import main

from test_segment_cli import LAST_LINE, scenes, segment_argv  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_extra_evaluations_appear_in_result_and_report(scenes, capsys):
    argv = segment_argv(scenes, "--cluster", "--retrieval", "--bank-size", "100",
                        "--retrieval-k", "5", "--items", "--overcluster", "3,4")
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    labels = ["linear probe", "k-means", "retrieval", "k-means K=3 (many-to-one)",
              "k-means K=4 (many-to-one)"]
    for line, label in zip(lines[-5:], labels):
        assert line.startswith(f"{label} mIoU: ") and LAST_LINE.search(line)
        assert "; items " in line and ", background " in line
    out = scenes / "run" / "segment"
    record = json.loads((out / "result.json").read_text())
    assert record["background"] == "background" and record["settings"]["background"] == (
        "background")
    for result in (record, record["kmeans"], record["retrieval"], *record["overcluster"].values()):
        ious = result["per_class_iou"]
        items = [v for v in ious[1:] if v is not None]
        assert result["background_iou"] == ious[0]
        assert result["item_miou"] == pytest.approx(sum(items) / len(items))
    assert record["retrieval"]["bank_entries"] == 100
    assert record["settings"]["retrieval"] == {"bank_size": 100, "k": 5, "temperature": 0.02,
                                               "seed": 0, "chunk": 1024}
    assert sorted(record["overcluster"]) == ["3", "4"]
    assert record["overcluster"]["3"]["method"] == "kmeans-3"
    items = record["items"]
    assert 0 <= items["knn_top1"] <= 1 and 0 <= items["linear_top1"] <= 1
    assert items["train_items"] > 20 and items["test_items"] > 5
    assert set(record["seconds"]) == {"retrieval", "kmeans-3", "kmeans-4", "items"}
    report = (out / "report.txt").read_text()
    assert "dense retrieval, k-NN over a memory bank" in report
    assert "k-means, K = 4, many-to-one matched" in report
    assert "item classification (mask-pooled patch features)" in report
    assert "item classes (all but background) mIoU: " in report
    # the pictures gain a retrieval column beside the probe's and k-means's
    with Image.open(out / "dense_pictures.png") as picture:
        wide = picture.size[0]
    assert main(segment_argv(scenes)) == 0
    with Image.open(out / "dense_pictures.png") as picture:
        assert picture.size[0] < wide


def test_background_by_name_and_bad_options(scenes, capsys):
    assert main(segment_argv(scenes, "--background", "Trouser")) == 0
    record = json.loads((scenes / "run" / "segment" / "result.json").read_text())
    assert record["background"] == "Trouser" and record["background_iou"] == (
        record["per_class_iou"][2])
    assert "retrieval" not in record and "items" not in record
    assert record["settings"]["retrieval"] is None and record["settings"]["overcluster"] == []
    capsys.readouterr()
    assert main(segment_argv(scenes, "--background", "sky")) == 2
    assert "--background 'sky' is neither a class name" in capsys.readouterr().err
    assert main(segment_argv(scenes, "--retrieval", "--retrieval-k", "0")) == 2
    with pytest.raises(SystemExit):
        main(segment_argv(scenes, "--overcluster", "1,50"))
