"""The service's answers, typed: what ``/v1/predict`` and ``/v1/explain`` return, and what ``/docs`` shows.

A field that does not apply is left out of the answer (the routes drop unset fields): ``sds`` and its friends
appear only when the chronological age is given, ``canvas_png_base64`` only when asked for.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ModelRef(BaseModel):
    """Which bundle answered."""

    name: str = Field(description="the bundle's registry name")
    version: str = Field(description="its version folder in the registry")


class Reference(BaseModel):
    """The reference the SDS is computed against."""

    standard: str = Field(description="the reference table")
    mean_months: float | None = Field(description="mean bone age for this sex and chronological age")
    sd_months: float | None = Field(description="its standard deviation")


class Answer(BaseModel):
    """The bone age of one radiograph, with how far to trust it."""

    bone_age_months: float = Field(description="bone age in months, one decimal; bias-corrected when `calibrated`")
    bone_age: str = Field(description="the same in years and months, e.g. '10 y 4 m'")
    interval_months: list[float] | None = Field(
        None, min_length=2, max_length=2,
        description="[low, high] months: a prediction interval at `interval_level` (split conformal on the "
                    "bundle's validation split, per age band and sex); null for a bundle without intervals")
    interval_level: float | None = Field(None, description="the interval's coverage, e.g. 0.9")
    calibrated: bool = Field(description="true when the bundle's bias correction (fitted on its validation split) "
                                         "was applied")
    ood_score: float | None = Field(None, description="out-of-distribution score: how far the image's features lie "
                                                      "from the training hands' (Mahalanobis distance); above the "
                                                      "model's threshold (/v1/model) the image is refused as "
                                                      "not_a_hand_radiograph; null for a bundle without a detector")
    ensemble_spread_months: float | None = Field(None, description="the SD of an ensemble's members' answers, in "
                                                                   "months: their disagreement (only for ensembles)")
    sex: Literal["M", "F"] = Field(description="the sex the answer used")
    sex_source: Literal["form", "dicom"] = Field(description="where the sex came from")
    chronological_age_months: float | None = Field(None, description="as given (only with an age)")
    sds: float | None = Field(None, description="standard deviation score of the bone age against the reference "
                                                "(only with an age; null outside the reference's ages)")
    sds_interval: list[float | None] | None = Field(None, description="the SDS of the interval's ends")
    determination: Literal["delayed", "normal", "advanced", "indeterminate"] | None = Field(
        None, description="within +/-2 SD is normal; indeterminate outside the reference's ages or when the "
                          "interval spans more than one determination")
    reference: Reference | None = Field(None, description="the reference the SDS uses (only with an age)")
    model: ModelRef
    request_id: str = Field(description="quote it when reporting a problem")
    canvas_png_base64: str | None = Field(None, description="the decoded radiograph, only with ?canvas=true")


class ErrorBody(BaseModel):
    """Every answer other than 200, whatever refused the request: a route, the framework or a middleware."""

    error: str = Field(description="a stable code for programs, e.g. not_a_hand_radiograph, missing_sex, not_found")
    detail: str = Field(description="one sentence for people: what was wrong and what to send instead")
    request_id: str = Field(description="the request's ID, as in the X-Request-ID header: quote it when reporting "
                                        "a problem")


class Explained(Answer):
    """An answer with its heat map."""

    overlay_png_base64: str = Field(description="the heat map blended over the radiograph, PNG")
    heatmap: list[list[float]] = Field(description="the raw heat map in [0, 1], averaged to a grid")
