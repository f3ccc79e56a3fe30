"""Greulich & Pyle reference: interpolated SDS, determinations at the limits, months as years and months."""

import pytest

from boneage.standards import assess, reference_table, years_and_months


def test_the_table_is_the_brush_foundation_one_carried_as_package_data():
    table = reference_table()
    assert table["M"][0].tolist() == [3.0, 3.01, 0.69] and table["M"][-1].tolist() == [204.0, 206.21, 13.05]
    assert table["F"][-1].tolist() == [192.0, 189.44, 7.31]


def test_sds_at_a_table_row_and_between_rows():
    at_row = assess(125.68 + 2 * 9.79, "M", 120)  # boys at 10 years: mean 125.68, SD 9.79
    assert at_row.sds == pytest.approx(2.0) and at_row.determination == "normal"
    between = assess(100.0, "F", 102)  # halfway between 96 (100.66, 10.23) and 108 (113.86, 10.74) months
    mean, sd = (100.66 + 113.86) / 2, (10.23 + 10.74) / 2
    assert between.reference_mean_months == pytest.approx(mean, abs=0.01)
    assert between.sds == pytest.approx((100.0 - mean) / sd, abs=0.01)


@pytest.mark.parametrize("bone_age, expected", [(90.0, "delayed"), (125.0, "normal"), (160.0, "advanced")])
def test_determination_uses_two_standard_deviations(bone_age, expected):
    assert assess(bone_age, "F", 120).determination == expected


@pytest.mark.parametrize("sex, age", [("F", 2), ("F", 193), ("M", 205)])
def test_ages_outside_the_table_are_indeterminate(sex, age):
    result = assess(100.0, sex, age)
    assert result.determination == "indeterminate" and result.sds is None


def test_sexes_have_their_own_norms():
    assert assess(60.0, "F", 54).sds != assess(60.0, "M", 54).sds


@pytest.mark.parametrize("months, text", [(124.4, "10 years 4 months"), (12.0, "1 year"), (13.2, "1 year 1 month"),
                                          (5.0, "5 months"), (0.2, "0 months"), (-3.0, "0 months")])
def test_years_and_months(months, text):
    assert years_and_months(months) == text
