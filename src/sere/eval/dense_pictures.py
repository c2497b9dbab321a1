"""Pictures of dense predictions: image | ground truth | probe prediction | k-means clusters |
retrieval."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import Tensor

from sere.errors import SereError
from sere.runtime.files import atomic_path

# Fixed colours (RGB, 0-255) for classes 0..10: black background, then 10 distinct hues; any
# class beyond is drawn grey, the ignore index white.
CLASS_COLOURS = np.array([
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
], dtype=np.uint8)
OTHER_COLOUR = np.array((128, 128, 128), dtype=np.uint8)
IGNORE_COLOUR = np.array((255, 255, 255), dtype=np.uint8)


def colourise(classes: Tensor) -> np.ndarray:
    """uint8 (H, W, 3) colours of a class map (H, W) (255: white, beyond 10: grey)."""
    index = classes.long().numpy()
    table = np.concatenate([CLASS_COLOURS, np.tile(OTHER_COLOUR, (256 - len(CLASS_COLOURS), 1))])
    table[255] = IGNORE_COLOUR
    return table[np.clip(index, 0, 255)]


def _image_array(image: Tensor) -> np.ndarray:
    array = image.permute(1, 2, 0).numpy()  # (H, W, C)
    return array[:, :, 0] if array.shape[2] == 1 else array


def save_dense_pictures(images: Tensor, masks: Tensor, probe: Tensor, clusters: Tensor | None,
                        path: str | Path, class_names: list[str] | None = None,
                        retrieval: Tensor | None = None) -> Path:
    """Save a PNG grid, one row per image: image | ground truth | probe | k-means (matched) |
    retrieval.

    images: uint8 (N, C, H, W); masks, probe, clusters, retrieval: class maps (N, H, W) of the
    same size; without `clusters` (`retrieval`) the k-means (retrieval) column is left out.
    """
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    columns = [("ground truth", masks), ("linear probe", probe),
               ("k-means (matched)", clusters), ("retrieval", retrieval)]
    titles = ["image"] + [title for title, m in columns if m is not None]
    maps = [m for _, m in columns if m is not None]
    if any(m.shape != images[:, 0].shape for m in maps):
        raise SereError("dense pictures need images (N, C, H, W) and class maps (N, H, W) of "
                        "the same N, H, W")
    path = Path(path)
    n = len(images)
    figure, axes = plt.subplots(n, len(maps) + 1, figsize=(2 * len(maps) + 2, 2 * n),
                                squeeze=False)
    for row in range(n):
        panels = (_image_array(images[row]), *(colourise(m[row]) for m in maps))
        for column, panel in enumerate(panels):
            axis = axes[row, column]
            axis.imshow(panel, cmap="gray" if panel.ndim == 2 else None,
                        interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(titles[column], fontsize=9)
    if class_names:
        _add_legend(figure, class_names)
    try:
        with atomic_path(path) as temporary:
            figure.savefig(temporary, format="png", dpi=100, bbox_inches="tight")
    except OSError as err:
        raise SereError(f"could not write {path}: {err}") from None
    finally:
        plt.close(figure)
    return path


def _add_legend(figure, class_names: list[str]) -> None:
    from matplotlib.patches import Patch  # noqa: PLC0415

    handles = [Patch(color=CLASS_COLOURS[i] / 255, label=name)
               for i, name in enumerate(class_names[:len(CLASS_COLOURS)])]
    figure.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=7)
