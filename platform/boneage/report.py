"""``report.html``: one self-contained page that says how good a model is on a labelled set, for whom, and where it
looks. Figures are drawn with matplotlib's Agg canvas and embedded as PNG data URIs; the CSS is inline and the
page loads nothing (its Content-Security-Policy forbids it), so it opens from disk, offline, anywhere.

Figures (each a ``<figure id=...>``): ``scatter``, ``bland-altman``, ``error-by-band``, ``gallery``,
``augmentation-preview`` (when the caller has one) and ``localisation`` (a table, when there are scores).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from boneage.artifacts import atomic_file
from boneage.metrics import (SEXES, Agreement, Comparison, EvaluationMetrics, LocalisationRow, TrustFigures,
                             limits_of_agreement)

REPORT_FILE = "report.html"
GALLERY_KINDS = ("best", "median", "worst")
SEX_COLOURS = {"M": "#1f77b4", "F": "#d95f02"}  # blue and orange: distinct for the common colour-blindnesses
SEX_NAMES = {"M": "male", "F": "female"}
MODEL_COLOUR, BASELINE_COLOUR = "#1f77b4", "#bbbbbb"
LIMITS_OF_AGREEMENT_Z = 1.96  # Bland-Altman's 95% limits of agreement: bias +- 1.96 SD


@dataclass
class GalleryCase:
    """One Grad-CAM gallery image: the model's input, its heat-map overlay, and the answer."""

    id: str
    kind: str  # "best" | "median" | "worst" (by absolute error)
    true_months: float
    predicted_months: float
    sex: str  # "M" | "F"
    image_png: bytes
    overlay_png: bytes


def pick_gallery_cases(predictions: pd.DataFrame, per_kind: int) -> list[tuple[str, str]]:
    """``(kind, id)`` of the ``per_kind`` best, median and worst rows by absolute error (rows with a true age)."""
    known = predictions[predictions["boneage"].notna()]
    order = (known["bone_age_months"] - known["boneage"]).abs().sort_values(kind="stable").index
    ids = known.loc[order, "id"].astype(str).tolist()
    middle = max(0, (len(ids) - per_kind) // 2)
    picks = {"best": ids[:per_kind], "median": ids[middle:middle + per_kind], "worst": ids[::-1][:per_kind]}
    return [(kind, case) for kind in GALLERY_KINDS for case in picks[kind]]


def build_report(metrics: EvaluationMetrics, predictions: pd.DataFrame, gallery: Sequence[GalleryCase],
                 augmentation_preview_png: bytes | None, out: str | Path) -> Path:
    """Write ``report.html`` into the folder ``out`` (atomically) and return its path. ``predictions`` are the
    scored rows (``sex``, ``bone_age_months``, ``boneage`` true or NaN); the figures use those with a true age."""
    known = predictions[predictions["boneage"].notna()]
    sections = [
        _summary(metrics),
        _section("How close are the answers", _headline_table(metrics), _scatter(known), _bland_altman(known)),
        _section("For whom", _group_table("By sex", {SEX_NAMES[sex]: metrics.by_sex[sex] for sex in SEXES}),
                 _group_table("By age band (true age)", metrics.by_age_band), _error_by_band(metrics)),
        _section("How far to trust the answers", _correction(metrics), _coverage(metrics.trust)),
        _section("Where the model looks", _gallery(gallery), _localisation(metrics.localisation)),
        _section("Training augmentation", _augmentation_preview(augmentation_preview_png)),
        _section("What was evaluated", _provenance(metrics)),
    ]
    path = Path(out) / REPORT_FILE
    with atomic_file(path) as tmp:
        tmp.write_text(_page(f"Bone-age evaluation: {metrics.bundle.reference or 'model'}", "\n".join(sections)))
    return path


# --- figures ---------------------------------------------------------------------------------------------------

def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure(figure_id: str, content: str, caption: str) -> str:
    return f'<figure id="{figure_id}">{content}<figcaption>{caption}</figcaption></figure>'


def _img(png: bytes, alt: str) -> str:
    return f'<img src="{_data_uri(png)}" alt="{html.escape(alt)}">'


def _scatter(known: pd.DataFrame) -> str:
    caption = ("Predicted against true bone age, one dot per image, coloured by sex. Dots on the dashed line are "
               "exact; dots above it are answers older than the truth.")
    return _figure("scatter", _img(scatter_png(known), "predicted against true bone age"), caption)


def scatter_png(known: pd.DataFrame) -> bytes:
    """The predicted-against-true figure (identity line, coloured by sex) of scored rows with a true age, as PNG."""
    figure = Figure(figsize=(5.2, 5.2))
    axes = figure.add_subplot()
    top = max(240.0, float(known[["boneage", "bone_age_months"]].max().max()) if len(known) else 0.0)
    axes.plot([0, top], [0, top], color="#555555", linestyle="--", linewidth=1, label="identity (perfect answer)")
    for sex in SEXES:
        rows = known[known["sex"] == sex]
        axes.scatter(rows["boneage"], rows["bone_age_months"], s=14, alpha=0.7, color=SEX_COLOURS[sex],
                     label=f"{SEX_NAMES[sex]} (n={len(rows)})")
    axes.set(xlim=(0, top), ylim=(0, top), aspect="equal", xlabel="True bone age (months)",
             ylabel="Predicted bone age (months)")
    axes.legend(loc="upper left", fontsize=8)
    axes.grid(alpha=0.3)
    return _png(figure)


def _bland_altman(known: pd.DataFrame) -> str:
    predicted, true = known["bone_age_months"].to_numpy(float), known["boneage"].to_numpy(float)
    agreement = limits_of_agreement(predicted, true, LIMITS_OF_AGREEMENT_Z)
    figure = Figure(figsize=(6.4, 4.2))
    axes = figure.add_subplot()
    axes.scatter((predicted + true) / 2, predicted - true, s=14, alpha=0.7, color=MODEL_COLOUR)
    _draw_agreement(axes, agreement)
    axes.set(xlabel="Mean of predicted and true bone age (months)", ylabel="Predicted - true (months)")
    axes.grid(alpha=0.3)
    caption = (f"Bland-Altman plot: the difference against the mean of the two readings. Bias "
               f"{_months(agreement.bias, signed=True)} months; 95% limits of agreement "
               f"{_months(agreement.low, signed=True)} to {_months(agreement.high, signed=True)} months (bias "
               f"&plusmn; {LIMITS_OF_AGREEMENT_Z} SD of the differences).")
    return _figure("bland-altman", _img(_png(figure), "Bland-Altman plot"), caption)


def _draw_agreement(axes, agreement: Agreement) -> None:
    """The bias and the limits of agreement as labelled horizontal lines (none for an empty set)."""
    if agreement.bias is None:
        return
    z = LIMITS_OF_AGREEMENT_Z
    for level, name, style in ((agreement.bias, "bias", "-"), (agreement.high, f"+{z} SD", "--"),
                               (agreement.low, f"-{z} SD", "--")):
        axes.axhline(level, color="#555555", linestyle=style, linewidth=1)
        axes.annotate(f"{name}: {level:+.1f} months", (1, level), xycoords=("axes fraction", "data"),
                      xytext=(-4, 3), textcoords="offset points", ha="right", fontsize=8,
                      bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})


def _error_by_band(metrics: EvaluationMetrics) -> str:
    groups = list(metrics.by_age_band.items())
    x = np.arange(len(groups))
    figure = Figure(figsize=(6.4, 3.8))
    axes = figure.add_subplot()
    for offset, side, colour, label in ((-0.2, "model", MODEL_COLOUR, "model"),
                                        (0.2, "baseline", BASELINE_COLOUR, "baseline (training mean)")):
        heights = [getattr(comparison, side).mae or 0.0 for _, comparison in groups]
        axes.bar(x + offset, heights, width=0.4, color=colour, label=label)
    axes.set_xticks(x, [f"{name}\nn={comparison.model.count}" for name, comparison in groups])
    for position, (_, comparison) in zip(x, groups):
        if comparison.model.count == 0:
            axes.annotate("no images", (position, 0), xytext=(0, 3), textcoords="offset points", ha="center",
                          fontsize=8)
    axes.set(xlabel="True age band (n: images)", ylabel="Mean absolute error (months)")
    axes.legend(fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    caption = "Mean absolute error by true age band, the model beside predicting the training mean for every image."
    return _figure("error-by-band", _img(_png(figure), "error by age band"), caption)


def _gallery(gallery: Sequence[GalleryCase]) -> str:
    if not gallery:
        return '<p class="note">No Grad-CAM gallery: no cases were given (they need images with a true age).</p>'
    cases = "".join(_gallery_case(case) for case in gallery)
    caption = ("Grad-CAM gallery: the best, median and worst answers by absolute error. Left the image as the "
               "model saw it, right the heat map over it (warm colours: where the answer came from).")
    return _figure("gallery", f'<div class="cases">{cases}</div>', caption)


def _gallery_case(case: GalleryCase) -> str:
    error = case.predicted_months - case.true_months
    text = (f"<b>{html.escape(case.kind.capitalize())}</b>: {html.escape(case.id)}, {SEX_NAMES.get(case.sex, '?')}"
            f"<br>true {case.true_months:.1f} months, predicted {case.predicted_months:.1f} months "
            f"(error {error:+.1f})")
    return (f'<div class="case">{_img(case.image_png, f"image {case.id}")}'
            f'{_img(case.overlay_png, f"Grad-CAM overlay {case.id}")}<p>{text}</p></div>')


def _augmentation_preview(png: bytes | None) -> str:
    if png is None:
        return '<p class="note">No augmentation preview: none was given for this evaluation.</p>'
    caption = "The training augmentation: random draws of the training config's transforms on one image."
    return _figure("augmentation-preview", _img(png, "augmentation preview"), caption)


# --- tables and text -------------------------------------------------------------------------------------------

def _months(value: float | None, signed: bool = False) -> str:
    return "&ndash;" if value is None else (f"{value:+.1f}" if signed else f"{value:.1f}")


def _share(value: float | None) -> str:
    return "&ndash;" if value is None else f"{value * 100:.0f}%"


# (heading, how to show one ErrorStats' figure): the rows of the headline table and the columns of the group tables
FIGURES = (
    ("MAE (months)", lambda stats: _months(stats.mae)),
    ("RMSE (months)", lambda stats: _months(stats.rmse)),
    ("Median absolute error (months)", lambda stats: _months(stats.median_ae)),
    ("Within 6 months", lambda stats: _share(stats.within_6)),
    ("Within 12 months", lambda stats: _share(stats.within_12)),
    ("Within 24 months", lambda stats: _share(stats.within_24)),
    ("Bias, predicted &minus; true (months)", lambda stats: _months(stats.bias, signed=True)),
)


def _summary(metrics: EvaluationMetrics) -> str:
    overall, ci = metrics.overall, metrics.mae_ci
    if overall.model.count == 0:
        return '<p class="lead">No scored image had a true age: there are no error figures.</p>'
    return (f'<p class="lead">On {overall.model.count} images with a known bone age the model is off by '
            f'<b>{_months(metrics.mae)} months</b> on average (95% CI {_months(ci.low)} to {_months(ci.high)}). '
            f"Answering the training mean, {metrics.baseline_prediction_months:.1f} months, for every image would "
            f"be off by {_months(overall.baseline.mae)} months.</p>")


def _headline_table(metrics: EvaluationMetrics) -> str:
    model, baseline, ci = metrics.overall.model, metrics.overall.baseline, metrics.mae_ci
    interval = (f" <small>(95% CI {_months(ci.low)}&ndash;{_months(ci.high)}, {ci.resamples} bootstrap "
                "resamples)</small>")
    rows = "".join(f"<tr><th>{name}</th><td>{show(model)}{interval if index == 0 else ''}</td>"
                   f"<td>{show(baseline)}</td></tr>" for index, (name, show) in enumerate(FIGURES))
    head = (f"<tr><th>All {model.count} images</th><th>Model</th><th>Baseline: the training mean, "
            f"{metrics.baseline_prediction_months:.1f} months, for every image</th></tr>")
    return f'<table class="figures">{head}{rows}</table>'


def _group_table(title: str, groups: dict[str, Comparison]) -> str:
    head = "".join(f"<th>{name}</th>" for name, _ in FIGURES)
    rows = "".join(f"<tr><th>{html.escape(group)}</th><td>{comparison.model.count}</td>"
                   + "".join(_beside(show, comparison) for _, show in FIGURES) + "</tr>"
                   for group, comparison in groups.items())
    return (f'<table class="groups"><caption>{title}. Each cell: the model, and below it in grey the baseline'
            f"</caption><tr><th></th><th>Images</th>{head}</tr>{rows}</table>")


def _beside(show, comparison: Comparison) -> str:
    return f'<td>{show(comparison.model)}<br><span class="baseline">{show(comparison.baseline)}</span></td>'


def _correction(metrics: EvaluationMetrics) -> str:
    """MAE and bias with the bundle's bias correction (as served) and without, overall and by age band."""
    trust = metrics.trust
    if trust is None or trust.uncorrected is None:
        why = "it was turned off" if trust is not None else "the bundle has none (written before bundle format 2)"
        return f'<p class="note">The answers are the network\'s own, not bias-corrected: {why}.</p>'
    groups = {"All images": (metrics.overall, trust.uncorrected),
              **{band: (served, trust.uncorrected_by_age_band[band]) for band, served in metrics.by_age_band.items()}}
    rows = "".join(f"<tr><th>{html.escape(group)}</th><td>{served.model.count}</td>"
                   f"<td>{_months(served.model.mae)}</td><td>{_months(raw.model.mae)}</td>"
                   f"<td>{_months(served.model.bias, signed=True)}</td><td>{_months(raw.model.bias, signed=True)}</td>"
                   "</tr>" for group, (served, raw) in groups.items())
    return ('<table class="groups" id="correction"><caption>The bias correction (a line fitted on the validation '
            "split, applied to every answer): figures with it, as served, and without it</caption><tr><th></th>"
            "<th>Images</th><th>MAE, corrected</th><th>MAE, raw</th><th>Bias, corrected</th><th>Bias, raw</th></tr>"
            f"{rows}</table>")


def _coverage(trust: TrustFigures | None) -> str:
    """How often the prediction intervals held the true age, against their level."""
    if trust is None or trust.coverage is None:
        return '<p class="note">No prediction intervals: the bundle has none (written before bundle format 2).</p>'
    coverage = trust.coverage
    groups = {"All images": coverage.overall, **{SEX_NAMES[sex]: coverage.by_sex[sex] for sex in SEXES},
              **coverage.by_age_band}
    rows = "".join(f"<tr><th>{html.escape(group)}</th><td>{_share(share)}</td></tr>" for group, share in groups.items())
    return (f'<table class="groups" id="coverage"><caption>Prediction intervals at {coverage.level:.0%}: the share '
            f"that held the true age (mean width {_months(coverage.mean_width_months)} months)</caption>"
            f"<tr><th></th><th>Held the true age</th></tr>{rows}</table>")


def _localisation(scores: Sequence[LocalisationRow]) -> str:
    if not scores:
        return ('<p class="note">No localisation score: the data has no boxes of age-bearing structures (only '
                "phantom data does).</p>")
    rows = "".join(
        f'<tr class="{"chosen" if score.chosen else ""}"><th>{html.escape(score.method)}</th><td>{score.images}</td>'
        f"<td>{_share(score.peak_in_box)}</td><td>{_share(score.random_point)}</td>"
        f"<td>{_share(score.mass_in_boxes)}</td><td>{'&#10003; serving uses it' if score.chosen else ''}</td></tr>"
        for score in scores)
    table = ("<table><tr><th>Method</th><th>Images</th><th>Peak inside a box</th><th>A random point inside a box"
             f"</th><th>Heat-map mass inside boxes</th><th></th></tr>{rows}</table>")
    caption = ("Pointing game on the phantoms' age-bearing structures: the share of images whose heat-map peak "
               "falls inside one of their boxes, against the share a uniformly random point would get, and the "
               "mean share of the heat map inside the boxes.")
    return _figure("localisation", table, caption)


def _provenance(metrics: EvaluationMetrics) -> str:
    bundle, data, counts = metrics.bundle, metrics.data, metrics.counts
    facts = [("Model bundle", bundle.reference), ("Bundle folder", bundle.path), ("SHA-256 of model.pt", bundle.sha256),
             ("Labels file", data.labels), ("Image folder", data.images), ("Prepared data", data.data),
             ("Split", data.split), ("Data fingerprint", data.fingerprint), ("Images scored", str(counts.scored)),
             ("Of those, with a true age (the figures' images)", str(counts.with_true_age)),
             ("Images rejected before scoring (the rejects file says why)", str(counts.rejected))]
    rows = "".join(f"<tr><th>{name}</th><td><code>{html.escape(value)}</code></td></tr>" for name, value in facts
                   if value)
    return f'<table class="facts">{rows}</table>'


def _section(title: str, *parts: str) -> str:
    return f"<section><h2>{title}</h2>{''.join(parts)}</section>"


# Nothing may load from anywhere: images are data: URIs, the style is inline, and there are no scripts.
POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 1.5em auto;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; padding-bottom: 0.2em; }
.lead { font-size: 1.1em; } .note { color: #555; font-style: italic; }
table { border-collapse: collapse; margin: 0.8em 0 1.2em; } caption { text-align: left; padding: 0.3em 0; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: right; vertical-align: top; }
th:first-child { text-align: left; white-space: nowrap; } .facts td { text-align: left; word-break: break-all; }
.baseline { color: #888; } tr.chosen { font-weight: bold; background: #eef5ff; }
figure { margin: 1em 0 1.5em; } figure img { max-width: 100%; } figcaption { color: #444; max-width: 60em; }
.cases { display: flex; flex-wrap: wrap; gap: 1em; }
.case { width: 17em; } .case img { width: 8em; height: 8em; margin-right: 0.3em; image-rendering: pixelated; }
.case p { margin: 0.3em 0; font-size: 0.9em; }
"""


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n"
            f"<body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")
