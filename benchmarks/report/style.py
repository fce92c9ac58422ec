"""One colour and one marker per estimator label, and paper-sized figure settings."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import seaborn as sns

SINGLE_COLUMN_IN = 3.3  # figure width for one column of a two-column paper (inches)
DOUBLE_COLUMN_IN = 7.0  # figure width spanning both columns (inches)
DPI = 300  # PNG resolution
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")

#: Matplotlib rc for figures printed at column width: 7-8 pt text, thin lines, embeddable fonts.
PAPER_RC = {
    "font.family": "DejaVu Sans",
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.title_fontsize": 7,
    "figure.titlesize": 8,
    "lines.linewidth": 1.2,
    "lines.markersize": 3.5,
    "axes.linewidth": 0.6,
    "grid.linewidth": 0.4,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "xtick.major.size": 2.5,
    "ytick.major.size": 2.5,
    "pdf.fonttype": 42,  # TrueType in the PDF: journals reject Type 3 fonts
    "ps.fonttype": 42,
    "savefig.dpi": DPI,
}


@dataclass(frozen=True)
class EstimatorStyle:
    """The colour and marker of every estimator label in one report."""

    colors: dict[str, tuple[float, float, float]]
    markers: dict[str, str]

    def color(self, label: str) -> tuple[float, float, float]:
        """The label's colour (RGB in [0, 1])."""
        return self.colors[label]

    def marker(self, label: str) -> str:
        """The label's matplotlib marker."""
        return self.markers[label]


def estimator_style(
    labels: Iterable[str], base: Mapping[str, str] | None = None
) -> EstimatorStyle:
    """A deterministic colour and marker per label: sorted labels -> seaborn "colorblind".

    The mapping depends only on the set of labels (and ``base``), so every figure of a report
    (built from the same set) uses the same colour and marker for the same estimator. ``base``
    maps a label that tells apart groups of one estimator (``rloo (S=2) [steps=500]``) to the
    estimator's label (``rloo (S=2)``): such labels take the colour of their base label and
    markers of their own. Beyond 10 colours the colour-blind palette runs out and evenly
    spaced "husl" hues are used instead; the markers still tell labels apart.
    """
    ordered = sorted({str(x) for x in labels})
    base = {str(k): str(v) for k, v in (base or {}).items()}
    bases = sorted({base.get(label, label) for label in ordered})
    n = len(bases)
    palette = sns.color_palette("colorblind" if n <= 10 else "husl", max(n, 1))
    color_of = {b: tuple(float(c) for c in palette[i]) for i, b in enumerate(bases)}
    colors = {label: color_of[base.get(label, label)] for label in ordered}
    markers = {label: MARKERS[i % len(MARKERS)] for i, label in enumerate(ordered)}
    return EstimatorStyle(colors=colors, markers=markers)  # type: ignore[arg-type]
