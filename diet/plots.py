"""Small PNG charts of pipeline artifacts: they render offline, in `dvc plots show` and in any viewer.

Each function takes plain rows (what the stage also writes as CSV) and writes one image atomically.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

from diet.io import atomic_file


def per_layer_chart(path: str | os.PathLike, series: Mapping[str, Sequence[float]], *, title: str, ylabel: str,
                    reference: Mapping[str, Sequence[float]] | None = None) -> None:
    """One line per group over the layer index (``series``: group -> value per layer), optionally with a dashed
    reference line per group (e.g. the dense width)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for group, values in series.items():
        (line,) = ax.plot(range(len(values)), list(values), marker="o", markersize=3, label=group)
        if reference and group in reference:
            ax.plot(range(len(reference[group])), list(reference[group]), linestyle="--", color=line.get_color(),
                    alpha=0.5, label=f"{group} (dense)")
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})  # no version stamp: same bytes
    plt.close(fig)
