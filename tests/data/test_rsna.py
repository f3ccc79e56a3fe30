"""Reading every RSNA labels layout, and rejecting every kind of bad row with its reason."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from boneage.rsna import LabelsError, read_labels, unlabeled_image_rejects
from images import write_png


def make_images(folder: Path, ids, nested: bool = False) -> Path:
    target = folder / "boneage-training-dataset" / "boneage-training-dataset" if nested else folder
    target.mkdir(parents=True, exist_ok=True)
    for i in ids:
        write_png(target / f"{i}.png", np.full((8, 6), 100, dtype=np.uint8))
    return folder


def reasons(result) -> dict[str, str]:
    return dict(zip(result.rejects["id"], result.rejects["reason"]))


def test_kaggle_training_csv_with_twice_nested_images(tmp_path):
    images = make_images(tmp_path / "img", ["1377", "1378"], nested=True)
    (tmp_path / "train.csv").write_text("id,boneage,male\n1377,180,False\n1378,12,True\n")
    result = read_labels(tmp_path / "train.csv", images)
    assert result.format.name == "kaggle-train"
    assert result.rejects.empty
    assert list(result.table.columns) == ["id", "path", "boneage", "male", "source"]
    assert result.table.set_index("id").loc["1377", ["boneage", "male"]].tolist() == [180.0, False]
    assert result.table.set_index("id").loc["1378", "male"]
    assert all(Path(p).is_file() for p in result.table["path"])


def test_rsna_validation_csv_accepts_true_false_in_any_case(tmp_path):
    images = make_images(tmp_path / "img", ["1386", "1392"])
    (tmp_path / "val.csv").write_text("Image ID,male,Bone Age (months)\n1386,FALSE,30\n1392,true,162\n")
    result = read_labels(tmp_path / "val.csv", images)
    assert result.format.name == "rsna-validation"
    assert result.table.set_index("id")["male"].to_dict() == {"1386": False, "1392": True}
    assert result.table["boneage"].tolist() == [30.0, 162.0]


@pytest.mark.parametrize("suffix", [".xlsx", ".csv"])
def test_rsna_test_ground_truth_in_xlsx_or_csv_with_decimal_months(tmp_path, suffix):
    images = make_images(tmp_path / "img", ["4360", "4361"])
    frame = pd.DataFrame({"Case ID": [4360, 4361], "Sex": ["M", "f"],
                          "Ground truth bone age (months)": [168.934, 169.652]})
    path = tmp_path / f"Bone age ground truth{suffix}"
    frame.to_excel(path, index=False) if suffix == ".xlsx" else frame.to_csv(path, index=False)
    result = read_labels(path, images)
    assert result.format.name == "rsna-test"
    assert result.rejects.empty
    assert result.table["id"].tolist() == ["4360", "4361"]
    assert result.table["male"].tolist() == [True, False]
    assert result.table["boneage"].tolist() == pytest.approx([168.934, 169.652])


def test_kaggle_unlabeled_test_csv_gives_rows_without_bone_age(tmp_path):
    images = make_images(tmp_path / "img", ["4360"])
    (tmp_path / "test.csv").write_text("Case ID,Sex\n4360,M\n")
    result = read_labels(tmp_path / "test.csv", images)
    assert result.format.name == "kaggle-test" and not result.format.labeled
    assert np.isnan(result.table.loc[0, "boneage"]) and result.table.loc[0, "male"]


def test_unknown_header_lists_the_supported_ones(tmp_path):
    (tmp_path / "x.csv").write_text("patient,age,sex\n1,2,M\n")
    with pytest.raises(LabelsError) as err:
        read_labels(tmp_path / "x.csv", tmp_path)
    for header in ["id,boneage,male", "Image ID,male,Bone Age (months)", "Case ID,Sex"]:
        assert header in str(err.value)


def test_missing_files_fail_clearly(tmp_path):
    with pytest.raises(LabelsError, match="does not exist"):
        read_labels(tmp_path / "nope.csv", tmp_path)
    (tmp_path / "t.csv").write_text("id,boneage,male\n")
    with pytest.raises(LabelsError, match="image folder"):
        read_labels(tmp_path / "t.csv", tmp_path / "no-images")


def test_every_bad_row_is_rejected_with_its_reason(tmp_path):
    images = make_images(tmp_path / "img", ["1", "2", "3", "4", "5", "6", "7", "8", "99"])
    make_images(images / "copy", ["8"])  # a second file for id 8
    (tmp_path / "t.csv").write_text(
        "id,boneage,male\n"
        "1,120,True\n"        # good
        "2,abc,True\n"        # unparseable bone age
        "3,,False\n"          # empty (NaN) bone age
        "4,250,False\n"       # out of range
        "5,100,yes\n"         # bad sex
        "6,100,True\n6,101,True\n"  # duplicate id
        "7,-1,True\n"         # negative
        "8,50,False\n"        # two image files for one id
        "10,80,False\n")      # no image
    result = read_labels(tmp_path / "t.csv", images)
    why = reasons(result)
    assert result.table["id"].tolist() == ["1"]
    assert why["2"].startswith("bad_boneage") and "'abc'" in why["2"]
    assert why["3"].startswith("bad_boneage")
    assert why["4"].startswith("bad_boneage") and "outside 0-240" in why["4"]
    assert why["5"].startswith("bad_sex") and "'yes'" in why["5"]
    assert why["6"].startswith("duplicate_id") and (result.rejects["id"] == "6").sum() == 2
    assert why["7"].startswith("bad_boneage")
    assert why["8"].startswith("ambiguous_image")
    assert why["10"].startswith("missing_image")
    assert "99" not in why  # an image without a label row is reported separately, across all labels files
    orphans = unlabeled_image_rejects([result])
    assert orphans["id"].tolist() == ["99"] and orphans["reason"].str.startswith("image_without_label").all()
    # Nothing silently dropped: every label row and every image is either kept or rejected.
    assert len(result.table) + len(result.rejects) == 10
