"""What the latent space looks like, drawn from the qualitative records of the runs
(``qualitative/step_<step>.npz``, see :mod:`benchmarks.harness.qualitative`; read with numpy,
never torch): reconstruction, sample and interpolation panels per estimator, the 2-D latent
maps side by side, and the continuity table with intervals over seeds.

A record is used only if its SHA-256 matches ``qualitative/index.json``; the panels show each
estimator's lowest completed seed at its last recorded step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from scipy import stats

from benchmarks.records.files import file_sha256, read_json
from benchmarks.report.figures import FigureResult, _save
from benchmarks.report.style import DOUBLE_COLUMN_IN, PAPER_RC, EstimatorStyle
from benchmarks.report.tables import TableResult, _booktabs, _markdown, _write

FOLDER, INDEX = "qualitative", "index.json"  # as written by benchmarks.harness.qualitative
CONTINUITY = (
    ("interp_jump", "largest step / total change"),
    ("interp_off_data", "RMS distance to nearest reconstruction"),
)
FAMILY_ORDER = {"deterministic": 0, "gaussian": 1, "bernoulli": 2, "categorical": 3}


@dataclass(frozen=True)
class Record:
    """One run's qualitative arrays at one step."""

    label: str
    family: str
    seed: int
    step: int
    arrays: dict[str, np.ndarray]


def load_record(run_dir: Path) -> tuple[int, dict[str, np.ndarray]] | None:
    """The last recorded step of ``run_dir`` whose file matches its checksum, and its arrays;
    None when there is none."""
    index = read_json(Path(run_dir) / FOLDER / INDEX) or {"files": {}}
    entries = sorted(index["files"].items(), key=lambda kv: kv[1]["step"], reverse=True)
    for name, entry in entries:
        path = Path(run_dir) / FOLDER / name
        if path.is_file() and file_sha256(path) == entry["sha256"]:
            with np.load(path) as f:  # allow_pickle defaults to False
                return int(entry["step"]), {k: f[k] for k in f.files}
    return None


def load_records(runs: pd.DataFrame) -> list[Record]:
    """One record per estimator label: its lowest completed seed with qualitative records,
    ordered autoencoder first, then by family and label."""
    done = runs[runs["status"] == "completed"]
    if "duplicate_of" in done:
        done = done[done["duplicate_of"].isna()]
    out = []
    for (label, _), group in done.groupby(["estimator_label", "family"], sort=True):
        for r in group.sort_values("seed").itertuples():
            found = load_record(Path(r.run_dir))
            if found is not None:
                out.append(Record(str(label), str(r.family), int(r.seed), *found))
                break
    return sorted(out, key=lambda r: (FAMILY_ORDER.get(r.family, 9), r.label))


def tile(images: np.ndarray, shape: tuple[int, int], gap: int = 1) -> np.ndarray:
    """``[R, C, D]`` uint8 images as one ``[R (H + gap), C (W + gap)]`` picture in [0, 1]
    (the gaps are white: value -1 drawn by the colormap's ``under`` colour)."""
    rows, cols = images.shape[:2]
    h, w = shape
    canvas = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap), -1.0)
    for i in range(rows):
        for j in range(cols):
            canvas[i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = (
                images[i, j].reshape(h, w) / 255.0
            )
    return canvas


def _show(ax: mpl.axes.Axes, picture: np.ndarray, title: str | None = None) -> None:
    cmap = mpl.colormaps["gray_r"].with_extremes(under="white")
    ax.imshow(picture, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title, fontsize=7)


def panels(rec: Record) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three pictures of one row: reconstructions (input, from a posterior sample, from
    the posterior mode), prior samples (2 rows) and interpolations (one row per pair; for
    discrete codes each decoded-at-the-mean row is followed by its sampled row)."""
    a, shape = rec.arrays, tuple(int(s) for s in rec.arrays["image_shape"])
    recon = tile(np.stack([a["digits"], a["recon_sample"], a["recon_mode"]]), shape)
    prior = a["prior_samples"]
    samples = tile(prior.reshape(2, len(prior) // 2, -1), shape)
    interp = a["interp"]
    if "interp_sample" in a:
        interp = np.stack([interp, a["interp_sample"]], 1).reshape(-1, *interp.shape[1:])
    return recon, samples, tile(interp, shape)


def panel_figure(records: list[Record], style: EstimatorStyle, out_dir: Path) -> FigureResult:
    """Per estimator (rows): reconstruction, sample and interpolation panels."""
    name = "latent_panels"
    caption = (
        "What each model makes of fixed test digits at its last evaluation step (lowest seed). "
        "Left: the binarized test digits, their reconstructions from one posterior sample and "
        "from the posterior mode (the mean, for Gaussian codes and the autoencoder). Middle: "
        "decoded samples of the prior (the autoencoder has none: a Gaussian fitted to its "
        "test codes). Right: one row per pair of digits, decoded along a straight line between "
        "their posterior means (Gaussian, autoencoder) or probabilities (discrete codes: each "
        "row decoded at the mean probabilities is followed by one decoded at samples of them). "
        "Images are decoder means (pixel probabilities, black = 1). Row labels take each "
        "estimator's colour."
    )
    if not records:
        return FigureResult(name, caption, skipped="no run has qualitative records")
    pictures = [panels(r) for r in records]
    widths = [max(p[i].shape[1] for p in pictures) for i in range(3)]
    heights = [max(p[i].shape[0] for i in range(3)) for p in pictures]
    scale = DOUBLE_COLUMN_IN / sum(widths) * 0.9
    with mpl.rc_context(PAPER_RC):
        fig, axes = mpl.pyplot.subplots(
            len(records), 3, figsize=(DOUBLE_COLUMN_IN, scale * sum(heights) + 0.4 * len(records)),
            gridspec_kw={"width_ratios": widths, "height_ratios": heights}, squeeze=False,
        )  # fmt: skip
        titles = ("reconstructions", "prior samples", "interpolations")
        for i, (rec, pics) in enumerate(zip(records, pictures, strict=True)):
            for j in range(3):
                _show(axes[i, j], pics[j], titles[j] if i == 0 else None)
            axes[i, 0].set_ylabel(
                f"{rec.label}\n(seed {rec.seed}, step {rec.step})", fontsize=7,
                color=style.color(rec.label) if rec.label in style.colors else "black",
            )  # fmt: skip
        files = _save(fig, out_dir, name)
        mpl.pyplot.close(fig)
    colors = {r.label: style.colors[r.label] for r in records if r.label in style.colors}
    return FigureResult(name, caption, files, colors=colors)


def map_figure(records: list[Record], style: EstimatorStyle, out_dir: Path) -> FigureResult:
    """Two-latent models side by side: test codes coloured by digit (top) and the decoded
    grid over the plane (bottom)."""
    name = "latent_map"
    caption = (
        "The 2-D latent space of each model with two latents (autoencoder first; lowest seed, "
        "last evaluation step). Top: the codes (posterior means) of the test digits, coloured "
        "by their label. Bottom: images decoded on a 15 x 15 grid over the plane: for the "
        "autoencoder evenly over the range of its codes (the dashed box on top), for Gaussian "
        "VAEs at the prior's quantiles Phi^-1((i + 1/2) / 15), the region that holds the prior's "
        "mass."
    )
    maps = [r for r in records if "grid" in r.arrays]
    if not maps:
        return FigureResult(
            name, caption, skipped="no run with two Gaussian / autoencoder latents"
        )
    with mpl.rc_context(PAPER_RC):
        height = 2 * DOUBLE_COLUMN_IN * 0.85 / max(len(maps), 2) + 0.4  # square panels
        fig, axes = mpl.pyplot.subplots(
            2, len(maps), figsize=(DOUBLE_COLUMN_IN, height),
            squeeze=False, gridspec_kw={"height_ratios": [1, 1]},
        )  # fmt: skip
        cmap = mpl.colormaps["tab10"]
        for j, rec in enumerate(maps):
            a = rec.arrays
            ax = axes[0, j]
            codes, labels = a["codes"], a["code_labels"]
            ax.scatter(codes[:, 0], codes[:, 1], c=cmap(np.mod(labels, 10)), s=2, linewidths=0)
            z1, z2 = a["grid_z1"], a["grid_z2"]
            ax.add_patch(mpl.patches.Rectangle((z1[0], z2[0]), z1[-1] - z1[0], z2[-1] - z2[0],
                                               fill=False, ls="--", lw=0.5))  # fmt: skip
            color = style.color(rec.label) if rec.label in style.colors else "black"
            ax.set_title(rec.label, fontsize=7, color=color)
            ax.tick_params(labelsize=5)
            shape = tuple(int(s) for s in a["image_shape"])
            _show(axes[1, j], tile(a["grid"][::-1], shape, gap=0))  # z2 grows upwards
        handles = [mpl.lines.Line2D([], [], ls="", marker="o", ms=3, color=cmap(d), label=str(d))
                   for d in range(10)]  # fmt: skip
        fig.legend(handles=handles, loc="center right", fontsize=6, title="digit",
                   title_fontsize=6, frameon=False)  # fmt: skip
        fig.tight_layout(rect=(0, 0, 0.9, 1))
        files = _save(fig, out_dir, name)
        mpl.pyplot.close(fig)
    colors = {r.label: style.colors[r.label] for r in maps if r.label in style.colors}
    return FigureResult(name, caption, files, colors=colors)


def latent_figures(runs: pd.DataFrame, style: EstimatorStyle, out_dir: Path) -> list[FigureResult]:
    """The latent-space figures of a report (skipped, with the reason, without records)."""
    if "run_dir" not in runs or runs.empty:
        records: list[Record] = []
    else:
        records = load_records(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [panel_figure(records, style, out_dir), map_figure(records, style, out_dir)]


# ------------------------------------------------------------------------------ continuity


def interval(values: pd.Series) -> tuple[float, float, float]:
    """Mean and 95% Student-t interval over seeds (NaN bounds with one seed)."""
    v = values.to_numpy(float)
    mean = float(v.mean())
    if len(v) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return mean, mean - half, mean + half


def continuity_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Per estimator label: the continuity numbers at each completed run's last evaluation,
    mean and 95% interval over seeds: columns ``estimator_label, family, n, <metric>_mean,
    <metric>_lo, <metric>_hi``."""
    done = df[(df["status"] == "completed") & (df["split"] == "qualitative")]
    if done.empty:
        return pd.DataFrame()
    last = done[done["step"] == done.groupby("run_id")["step"].transform("max")]
    rows = []
    for (label, family), group in last.groupby(["estimator_label", "family"], sort=False):
        row: dict[str, object] = {"estimator_label": label, "family": family}
        for metric, _ in CONTINUITY:
            values = group[group["metric"] == metric]["value"]
            row["n"] = len(values)
            row[f"{metric}_mean"], row[f"{metric}_lo"], row[f"{metric}_hi"] = interval(values)
        rows.append(row)
    frame = pd.DataFrame(rows)
    order = frame["family"].map(lambda f: FAMILY_ORDER.get(f, 9))
    return frame.assign(_o=order).sort_values(["_o", "estimator_label"]).drop(columns="_o")


def _cell(row: pd.Series, metric: str, latex: bool) -> str:
    mean, lo, hi = row[f"{metric}_mean"], row[f"{metric}_lo"], row[f"{metric}_hi"]
    if math.isnan(lo):
        return f"{mean:.3f}"
    text = f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"
    return f"${text}$" if latex else text


def verdict(frame: pd.DataFrame) -> str:
    """Sentences, from the numbers, on whether the autoencoder's interpolations are less
    continuous than each VAE's: a higher mean with 95% intervals apart, a higher mean with
    overlapping intervals (not shown by these seeds), or not higher."""
    ae = frame[frame["family"] == "deterministic"]
    vaes = frame[frame["family"] != "deterministic"]
    if ae.empty or vaes.empty:
        return ""
    a = ae.iloc[0]
    out = []
    for metric, _ in CONTINUITY:
        parts = []
        for _, v in vaes.iterrows():
            lo_a, hi_v = a[f"{metric}_lo"], v[f"{metric}_hi"]
            higher = a[f"{metric}_mean"] > v[f"{metric}_mean"]
            apart = not (math.isnan(lo_a) or math.isnan(hi_v)) and lo_a > hi_v
            parts.append(f"{v['estimator_label']}: " + (
                "higher, intervals apart" if higher and apart
                else "higher, intervals overlap (not shown)" if higher else "not higher"
            ))  # fmt: skip
        out.append(f"{metric} of the autoencoder against " + "; ".join(parts) + ".")
    return " Is the autoencoder's latent space less continuous? " + " ".join(out)


def continuity_table(df: pd.DataFrame, out_dir: Path) -> TableResult | None:
    """The continuity numbers per estimator (Markdown and booktabs), None without records."""
    frame = continuity_frame(df)
    if frame.empty:
        return None
    header = ["estimator", "family", "seeds", *(f"{m} ({what})" for m, what in CONTINUITY)]
    md_rows, tex_rows = [], []
    for _, r in frame.iterrows():
        ident = [str(r["estimator_label"]), str(r["family"]), str(int(r["n"]))]
        md_rows.append([*ident, *(_cell(r, m, False) for m, _ in CONTINUITY)])
        tex_rows.append([*ident, *(_cell(r, m, True) for m, _ in CONTINUITY)])
    note = (
        "Continuity of the decoded interpolations between 5 fixed pairs of test digits (11 "
        "points each) at each run's last evaluation, averaged over the pairs: interp_jump, the "
        "largest L1 change between consecutive images over the total (0.1 = even change, 1 = "
        "all at once); interp_off_data, the mean over the interior points of the RMS pixel "
        "distance to the nearest reconstruction of a test digit (how far the path leaves the "
        "images the model makes of real data). Lower is smoother for both. Mean over seeds "
        "[95% Student-t interval]." + verdict(frame)
    )
    md = _markdown(pd.DataFrame(md_rows, columns=header), note, [])
    tex = _booktabs(pd.DataFrame(tex_rows, columns=header), note, [], 3)
    return TableResult(
        "latent_continuity", "Continuity of latent interpolations.", md,
        _write(out_dir, "latent_continuity", md, tex),
    )  # fmt: skip
