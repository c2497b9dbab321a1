"""The evaluations `sere segment` runs beside the linear probe on the same cached patch
features: dense retrieval (`--retrieval`), k-means overclustering (`--overcluster`) and item
classification (`--items`); and the item / background split of every result's mIoU
(`--background`). Methods: docs/dense.md."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor

from sere.eval.dense_clusters import overcluster_segmentation
from sere.eval.dense_items import ItemResult, ItemSettings, item_classification
from sere.eval.dense_metrics import item_scores
from sere.eval.dense_pairs import DensePair
from sere.eval.dense_retrieval import RetrievalRun, RetrievalSettings, retrieval_segmentation
from sere.eval.segment import KMeansRun, SegmentationResult

log = logging.getLogger(__name__)


@dataclass
class ExtraSettings:
    """Which of the extra evaluations run, and how.

    Args:
        retrieval: dense retrieval's settings; None skips it.
        overcluster: cluster counts of k-means with many-to-one matching; empty skips it.
        items: item classification's settings; None skips it.
        seed: of the k-means clusterings.
    """

    retrieval: RetrievalSettings | None = None
    overcluster: tuple[int, ...] = ()
    items: ItemSettings | None = None
    seed: int = 0

    def record(self) -> dict[str, Any]:
        """The settings' entries of result.json: "retrieval", "overcluster", "items" (None
        when the evaluation did not run)."""
        return {"retrieval": None if self.retrieval is None else asdict(self.retrieval),
                "overcluster": list(self.overcluster),
                "items": None if self.items is None else asdict(self.items)}


@dataclass
class ExtraRuns:
    """What the extra evaluations found, with the seconds each took."""

    retrieval: RetrievalRun | None = None
    overcluster: list[KMeansRun] = field(default_factory=list)
    items: ItemResult | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def results(self) -> list[SegmentationResult]:
        """The segmentation results among them (retrieval, then each overclustering)."""
        found = [self.retrieval.result] if self.retrieval is not None else []
        return found + [run.result for run in self.overcluster]

    def record(self) -> dict[str, Any]:
        """result.json's entries: "retrieval", "overcluster" (by K), "items", "seconds"."""
        out: dict[str, Any] = {}
        if self.retrieval is not None:
            out["retrieval"] = {**asdict(self.retrieval.result),
                                "bank_entries": self.retrieval.bank_entries}
        if self.overcluster:
            out["overcluster"] = {run.result.method.split("-", 1)[1]: asdict(run.result)
                                  for run in self.overcluster}
        if self.items is not None:
            out["items"] = asdict(self.items)
        if self.seconds:
            out["seconds"] = {name: round(s, 1) for name, s in self.seconds.items()}
        return out


def run_extras(pair: DensePair, train: Tensor, test: Tensor,
               settings: ExtraSettings, background: int) -> ExtraRuns:
    """Run the evaluations `settings` asks for on train and test features (N, h, w, D)."""
    k, names = pair.train.num_classes, pair.class_names
    runs = ExtraRuns()
    if settings.retrieval is not None:
        start = time.perf_counter()
        runs.retrieval = retrieval_segmentation(train, pair.train.masks, test, pair.test.masks,
                                                k, names, settings.retrieval)
        runs.seconds["retrieval"] = time.perf_counter() - start
    for clusters in settings.overcluster:
        start = time.perf_counter()
        runs.overcluster.append(overcluster_segmentation(test, pair.test.masks, k, names,
                                                         clusters, settings.seed))
        runs.seconds[f"kmeans-{clusters}"] = time.perf_counter() - start
    if settings.items is not None:
        start = time.perf_counter()
        runs.items = item_classification(train, pair.train.masks, test, pair.test.masks, k,
                                         background, settings.items)
        runs.seconds["items"] = time.perf_counter() - start
    for name, seconds in runs.seconds.items():
        log.info("%s took %.1f s", name, seconds)
    return runs


def set_background(result: SegmentationResult, background: int) -> None:
    """Fill in `result`'s item-class mIoU and background IoU, class `background` apart."""
    split = item_scores(result.per_class_iou, background)
    result.item_miou, result.background_iou = split.item_miou, split.background_iou
    result.background = result.class_names[background]
