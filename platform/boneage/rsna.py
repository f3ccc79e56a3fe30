"""Read the RSNA 2017 Bone Age label layouts into one table, reporting every rejected row with its reason.

The four layouts in the wild, told apart by their header:

=================  ==============================================  ===========================
format             header                                          sex values
=================  ==============================================  ===========================
kaggle-train       ``id,boneage,male``                             True / False
rsna-validation    ``Image ID,male,Bone Age (months)``             true / false (any case)
rsna-test          ``Case ID,Sex,Ground truth bone age (months)``  M / F  (.xlsx or .csv)
kaggle-test        ``Case ID,Sex``                                 M / F  (no labels)
=================  ==============================================  ===========================

:func:`read_labels` returns the table ``id, path, boneage, male, source`` and a rejects table
``id, path, reason`` where ``reason`` starts with one of the ``REJECT_*`` codes; image files that no labels row
names are reported by :func:`unlabeled_image_rejects`.
"""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from boneage.errors import JobError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
MAX_BONEAGE_MONTHS = 240.0

REJECT_MISSING_IMAGE = "missing_image"
REJECT_UNLABELED_IMAGE = "image_without_label"
REJECT_AMBIGUOUS_IMAGE = "ambiguous_image"
REJECT_DUPLICATE_ID = "duplicate_id"
REJECT_BAD_BONEAGE = "bad_boneage"
REJECT_BAD_SEX = "bad_sex"

TABLE_COLUMNS = ["id", "path", "boneage", "male", "source"]
REJECT_COLUMNS = ["id", "path", "reason"]


@dataclass(frozen=True)
class LabelFormat:
    """One RSNA labels layout: its exact header and how to read sex and bone age from it."""

    name: str
    header: tuple[str, ...]
    id_column: str
    sex_column: str
    sex_values: dict[str, bool]  # lower-cased text -> male
    boneage_column: str | None  # None: an unlabeled (inference-only) layout

    @property
    def labeled(self) -> bool:
        return self.boneage_column is not None


_TRUE_FALSE = {"true": True, "false": False}
_M_F = {"m": True, "f": False}

FORMATS = (
    LabelFormat("kaggle-train", ("id", "boneage", "male"), "id", "male", _TRUE_FALSE, "boneage"),
    LabelFormat("rsna-validation", ("Image ID", "male", "Bone Age (months)"), "Image ID", "male", _TRUE_FALSE,
                "Bone Age (months)"),
    LabelFormat("rsna-test", ("Case ID", "Sex", "Ground truth bone age (months)"), "Case ID", "Sex", _M_F,
                "Ground truth bone age (months)"),
    LabelFormat("kaggle-test", ("Case ID", "Sex"), "Case ID", "Sex", _M_F, None),
)


class LabelsError(JobError, ValueError):
    """A labels file that cannot be read at all (missing, empty, unknown header)."""


@dataclass
class LabelTable:
    """The rows that passed validation and the ones that did not."""

    table: pd.DataFrame
    rejects: pd.DataFrame
    format: LabelFormat
    source: Path
    images: dict[str, list[Path]]  # every image file found under the image folder, by id

    @property
    def labeled_ids(self) -> set[str]:
        return set(self.table["id"]) | set(self.rejects["id"])


def detect_format(columns: list[str]) -> LabelFormat:
    """The layout whose header is exactly ``columns`` (whitespace and a BOM ignored)."""
    cleaned = tuple(c.strip().lstrip("\ufeff") for c in columns)
    for fmt in FORMATS:
        if cleaned == fmt.header:
            return fmt
    supported = "; ".join(f"{f.name}: {','.join(f.header)}" for f in FORMATS)
    raise LabelsError(f"unknown labels header {','.join(cleaned)!r}; supported headers are {supported}")


def read_labels(labels: str | Path, images: str | Path, blank_sex: bool = False) -> LabelTable:
    """Read a labels file, match each row to ``<id>.<ext>`` anywhere under ``images``, and validate it.

    With ``blank_sex`` a row whose sex cell is empty is kept with ``male`` missing (``<NA>``, in a nullable
    boolean column), for a reader that can take sex from elsewhere (bulk scoring: the DICOM header); without it
    such a row is rejected as ``bad_sex``, like any unreadable sex."""
    raw = _read_raw(Path(labels))
    fmt = detect_format(list(raw.columns))
    raw.columns = list(fmt.header)
    index = index_images(Path(images))
    rows = _parse_rows(raw, fmt)
    duplicated = rows["id"].duplicated(keep=False)
    counts = rows["id"].value_counts()

    table, rejects = [], []
    for row, is_duplicate in zip(rows.itertuples(index=False), duplicated, strict=True):
        paths = index.get(row.id, [])
        path = str(paths[0]) if len(paths) == 1 else ""
        reason = _row_reason(row, fmt, paths, is_duplicate, counts, Path(images), blank_sex)
        if reason:
            rejects.append((row.id, path, reason))
        else:
            table.append((row.id, path, row.boneage, row.male, fmt.name))
    return LabelTable(
        table=pd.DataFrame(table, columns=TABLE_COLUMNS).astype({"boneage": "float64",
                                                                 "male": "boolean" if blank_sex else "bool"}),
        rejects=pd.DataFrame(rejects, columns=REJECT_COLUMNS),
        format=fmt,
        source=Path(labels),
        images=index,
    )


def unlabeled_image_rejects(tables: list[LabelTable]) -> pd.DataFrame:
    """Image files that no labels file names: reported, not silently ignored.

    Several labels files may share one image folder (train + external test), so a file counts as labeled if any
    of them has a row with its id.
    """
    labeled = set().union(*(t.labeled_ids for t in tables))
    rows = {}
    for t in tables:
        for image_id, paths in t.images.items():
            if image_id not in labeled:
                for path in paths:
                    rows[path] = (image_id, str(path), f"{REJECT_UNLABELED_IMAGE}: no labels row has id {image_id}")
    return pd.DataFrame(list(rows.values()), columns=REJECT_COLUMNS)


def reject_counts(rejects: pd.DataFrame) -> dict[str, int]:
    """How many rejected rows per reason code (the text before the first colon of ``reason``)."""
    return rejects["reason"].str.split(":").str[0].value_counts().to_dict()


def index_images(folder: Path) -> dict[str, list[Path]]:
    """Map each image id (file stem) to every image file with that stem anywhere under ``folder``."""
    if not folder.is_dir():
        raise LabelsError(f"image folder {folder} does not exist: point data.images (or data.test_images) at "
                          "the folder holding the radiographs")
    index: dict[str, list[Path]] = {}
    for root, _, files in os.walk(folder.resolve()):
        for name in files:
            stem, suffix = os.path.splitext(name)
            if suffix.lower() in IMAGE_SUFFIXES:
                index.setdefault(stem, []).append(Path(root) / name)
    return index


def _read_raw(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise LabelsError(f"labels file {path} does not exist: point data.labels (or data.test_labels) at the "
                          "labels .csv or .xlsx")
    try:
        if path.suffix.lower() in (".xlsx", ".xlsm"):
            raw = pd.read_excel(path, dtype=str, engine="openpyxl")
        else:
            raw = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, UnicodeDecodeError, zipfile.BadZipFile) as err:
        raise LabelsError(f"labels file {path} is not a readable table ({type(err).__name__}): give the labels "
                          ".csv or .xlsx") from None
    raw = raw.fillna("")
    blank = (raw.apply(lambda col: col.str.strip()) == "").all(axis=1)  # trailing empty spreadsheet rows
    return raw[~blank].reset_index(drop=True)


def _parse_rows(raw: pd.DataFrame, fmt: LabelFormat) -> pd.DataFrame:
    """Normalised text id, parsed bone age (NaN if absent or unparseable), parsed sex (None if unparseable)."""
    ids = raw[fmt.id_column].map(_normalise_id)
    sex_text = raw[fmt.sex_column].str.strip()
    male = sex_text.str.lower().map(fmt.sex_values)
    age_text = raw[fmt.boneage_column].str.strip() if fmt.labeled else pd.Series("", index=raw.index)
    boneage = pd.to_numeric(age_text, errors="coerce")
    return pd.DataFrame({"id": ids, "male": male, "sex_text": sex_text, "boneage": boneage, "age_text": age_text})


def _normalise_id(value: str) -> str:
    text = str(value).strip()
    # Spreadsheets store numeric ids as floats: "1234.0" names the file 1234.png.
    return text[:-2] if text.endswith(".0") and text[:-2].isdigit() else text


def _row_reason(row, fmt: LabelFormat, paths: list[Path], is_duplicate: bool, counts: pd.Series,
                images: Path, blank_sex: bool) -> str:
    """Why a label row cannot be used, or "" when it can."""
    if is_duplicate:
        return f"{REJECT_DUPLICATE_ID}: id {row.id} appears {counts[row.id]} times"
    unreadable_sex = row.male is None or (isinstance(row.male, float) and math.isnan(row.male))
    if unreadable_sex and not (blank_sex and row.sex_text == ""):
        allowed = "/".join(fmt.sex_values)
        return f"{REJECT_BAD_SEX}: {fmt.sex_column}={row.sex_text!r} is not one of {allowed} (any case)"
    if fmt.labeled:
        if not math.isfinite(row.boneage):
            return f"{REJECT_BAD_BONEAGE}: {fmt.boneage_column}={row.age_text!r} is not a number"
        if not 0 <= row.boneage <= MAX_BONEAGE_MONTHS:
            return f"{REJECT_BAD_BONEAGE}: {row.boneage:g} months is outside 0-{MAX_BONEAGE_MONTHS:g}"
    if not paths:
        return f"{REJECT_MISSING_IMAGE}: no {row.id}{{{','.join(IMAGE_SUFFIXES)}}} under {images}"
    if len(paths) > 1:
        return f"{REJECT_AMBIGUOUS_IMAGE}: {len(paths)} files for id {row.id}: {', '.join(map(str, paths))}"
    return ""
