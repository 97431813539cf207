"""Every dataset layout parsed from a tiny fixture (empty placeholder files: no voxels are read), every malformed
description refused with a message naming the file/line and the fix, and auto-detection of each layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medtransfer.data.datasets import (
    CHESTXRAY14_LABELS,
    detect_format,
    duplicate_case_ids,
    load_dataset,
    write_dataset_json,
)
from medtransfer.data.types import Case
from medtransfer.errors import DataError


def touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---------------------------------------------------------------- MSD


def msd_fixture(root: Path) -> Path:
    desc = {
        "name": "Hippocampus",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
        "numTraining": 2,
        "training": [
            {"image": "./imagesTr/hippocampus_001.nii.gz", "label": "./labelsTr/hippocampus_001.nii.gz"},
            {"image": "./imagesTr/hippocampus_003.nii.gz", "label": "./labelsTr/hippocampus_003.nii.gz"},
        ],
        "test": ["./imagesTs/hippocampus_002.nii.gz"],
    }
    write(root / "dataset.json", json.dumps(desc, indent=2))
    return root


def test_msd_is_parsed_into_cases_labels_and_channels(tmp_path):
    ds = load_dataset(msd_fixture(tmp_path))
    assert (ds.name, ds.format, ds.task, ds.spatial_dims) == ("Hippocampus", "msd", "segmentation", 3)
    assert ds.labels == {0: "background", 1: "Anterior", 2: "Posterior"}
    assert ds.channel_names == ["MRI"]
    assert ds.cases == [
        Case("hippocampus_001", (tmp_path / "imagesTr/hippocampus_001.nii.gz",), tmp_path / "labelsTr/hippocampus_001.nii.gz"),
        Case("hippocampus_003", (tmp_path / "imagesTr/hippocampus_003.nii.gz",), tmp_path / "labelsTr/hippocampus_003.nii.gz"),
    ]
    assert ds.test_cases == [Case("hippocampus_002", (tmp_path / "imagesTs/hippocampus_002.nii.gz",))]
    assert ds.description["numTraining"] == 2 and ds.description["duplicate_case_ids"] == []


def test_msd_multimodal_case_is_one_4d_file_with_several_channel_names(tmp_path):
    write(tmp_path / "dataset.json", json.dumps({
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}, "labels": {"0": "background"},
        "training": [{"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}],
    }))  # fmt: skip
    ds = load_dataset(tmp_path)
    assert ds.channel_names == ["FLAIR", "T1w", "t1gd", "T2w"]
    assert ds.cases[0].images == (tmp_path / "imagesTr/BRATS_001.nii.gz",)
    assert ds.name == tmp_path.name  # no "name" key: the folder's name


def test_write_dataset_json_round_trips_through_the_msd_reader(tmp_path):
    path = write_dataset_json(
        tmp_path, "Phantoms", {0: "background", 1: "lung"}, ["CT"],
        [(tmp_path / "imagesTr/p_000.nii.gz", "labelsTr/p_000.nii.gz"),
         {"image": "imagesTr/p_001.nii.gz", "label": "labelsTr/p_001.nii.gz", "target": 1}],
        test=["imagesTs/p_002.nii.gz"], description="synthetic CT",
    )  # fmt: skip
    raw = json.loads(path.read_text())
    assert raw["training"][0] == {"image": "./imagesTr/p_000.nii.gz", "label": "./labelsTr/p_000.nii.gz"}
    assert (raw["numTraining"], raw["numTest"], raw["tensorImageSize"], raw["description"]) == (2, 1, "3D", "synthetic CT")
    assert raw["modality"] == {"0": "CT"} and raw["labels"] == {"0": "background", "1": "lung"}
    ds = load_dataset(tmp_path)
    assert [c.case_id for c in ds.cases] == ["p_000", "p_001"]
    assert [c.target for c in ds.cases] == [None, 1]
    assert ds.test_cases[0].images == (tmp_path / "imagesTs/p_002.nii.gz",)
    assert not list(tmp_path.glob(".dataset.json.*"))  # atomic write leaves no temp file


def test_write_dataset_json_refuses_a_path_outside_the_folder(tmp_path):
    with pytest.raises(DataError, match="not under the dataset folder"):
        write_dataset_json(tmp_path / "ds", "x", {0: "bg"}, ["CT"], [(tmp_path / "elsewhere.nii.gz", None)])


def test_bad_json_names_the_line_and_column(tmp_path):
    write(tmp_path / "dataset.json", '{\n  "name": "x",\n  "labels": {"0": "bg"},\n}\n')
    with pytest.raises(DataError) as info:
        load_dataset(tmp_path)
    msg = str(info.value)
    assert f"{tmp_path / 'dataset.json'}:4:1: invalid JSON" in msg and "trailing comma" in msg


def test_msd_missing_keys_are_named(tmp_path):
    write(tmp_path / "dataset.json", json.dumps({"modality": {"0": "CT"}, "training": []}))
    with pytest.raises(DataError, match=r"missing key\(s\) 'labels' required by the MSD layout; fix: add them"):
        load_dataset(tmp_path)


def test_msd_training_item_without_image_names_its_index(tmp_path):
    write(tmp_path / "dataset.json", json.dumps({
        "modality": {"0": "CT"}, "labels": {"0": "bg"}, "training": [{"image": "./a.nii.gz"}, {"label": "./b.nii.gz"}]
    }))  # fmt: skip
    with pytest.raises(DataError, match=r"training\[1\] has no 'image' path; fix: write it like"):
        load_dataset(tmp_path)


def test_msd_labels_with_names_as_keys_are_refused_with_the_expected_form(tmp_path):
    write(tmp_path / "dataset.json", json.dumps({"modality": {"0": "CT"}, "labels": {"background": 0}, "training": []}))
    with pytest.raises(DataError, match=r"'labels' key 'background' is not an integer; fix: write it like"):
        load_dataset(tmp_path, format="msd")


def test_empty_training_list_is_an_empty_dataset_not_an_error(tmp_path):
    write(tmp_path / "dataset.json", json.dumps({"modality": {"0": "CT"}, "labels": {"0": "bg"}, "training": []}))
    ds = load_dataset(tmp_path)
    assert ds.cases == [] and len(ds) == 0


# ---------------------------------------------------------------- nnU-Net v2


def nnunet_fixture(root: Path, channels=("CT", "PET")) -> Path:
    desc = {"channel_names": dict(enumerate(channels)), "labels": {"background": 0, "liver": 1, "tumor": 2},
            "numTraining": 2, "file_ending": ".nii.gz", "name": "Dataset042_Liver"}  # fmt: skip
    write(root / "dataset.json", json.dumps(desc))
    for case in ("liver_1", "liver_0"):
        touch(root, *(f"imagesTr/{case}_{c:04d}.nii.gz" for c in range(len(channels))), f"labelsTr/{case}.nii.gz")
    touch(root, *(f"imagesTs/liver_9_{c:04d}.nii.gz" for c in range(len(channels))), "imagesTr/.DS_Store")
    return root


def test_nnunet_raw_is_parsed_with_every_channel_file(tmp_path):
    ds = load_dataset(nnunet_fixture(tmp_path))
    assert (ds.name, ds.format, ds.task, ds.spatial_dims) == ("Dataset042_Liver", "nnunet", "segmentation", 3)
    assert ds.labels == {0: "background", 1: "liver", 2: "tumor"}
    assert ds.channel_names == ["CT", "PET"]
    tr = tmp_path / "imagesTr"
    assert ds.cases == [
        Case("liver_0", (tr / "liver_0_0000.nii.gz", tr / "liver_0_0001.nii.gz"), tmp_path / "labelsTr/liver_0.nii.gz"),
        Case("liver_1", (tr / "liver_1_0000.nii.gz", tr / "liver_1_0001.nii.gz"), tmp_path / "labelsTr/liver_1.nii.gz"),
    ]
    ts = tmp_path / "imagesTs"
    assert ds.test_cases == [Case("liver_9", (ts / "liver_9_0000.nii.gz", ts / "liver_9_0001.nii.gz"))]


def test_nnunet_missing_channel_names_the_case_and_the_file(tmp_path):
    nnunet_fixture(tmp_path)
    (tmp_path / "imagesTr/liver_1_0001.nii.gz").unlink()
    with pytest.raises(DataError) as info:
        load_dataset(tmp_path)
    assert str(info.value).startswith(
        f"case 'liver_1': missing channel file(s) {tmp_path / 'imagesTr/liver_1_0001.nii.gz'} (PET); fix: add them"
    )


def test_nnunet_region_labels_are_refused_clearly(tmp_path):
    write(tmp_path / "dataset.json", json.dumps({
        "channel_names": {"0": "T1"}, "labels": {"background": 0, "whole_tumor": [1, 2, 3], "core": [2, 3]},
        "regions_class_order": [1, 2], "file_ending": ".nii.gz", "numTraining": 0,
    }))  # fmt: skip
    with pytest.raises(DataError, match=r"region-based labels \(whole_tumor, core\) are not supported; fix: give"):
        load_dataset(tmp_path)


def test_nnunet_file_without_channel_suffix_and_extra_channel_are_refused(tmp_path):
    nnunet_fixture(tmp_path, channels=("CT",))
    touch(tmp_path, "imagesTr/liver_5.nii.gz")
    with pytest.raises(DataError, match=r"liver_5\.nii\.gz: not named <case>_<4-digit channel>\.nii\.gz; fix: rename"):
        load_dataset(tmp_path)
    (tmp_path / "imagesTr/liver_5.nii.gz").unlink()
    touch(tmp_path, "imagesTr/liver_0_0003.nii.gz")
    with pytest.raises(DataError, match=r"channel 3, but .*declares 1 channel\(s\) in channel_names"):
        load_dataset(tmp_path)


def test_nnunet_missing_keys_are_named(tmp_path):
    write(tmp_path / "dataset.json", json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0}}))
    with pytest.raises(DataError, match=r"missing key\(s\) 'file_ending' required by the nnU-Net v2 layout"):
        load_dataset(tmp_path)


def test_nnunet_png_dataset_is_2d(tmp_path):
    write(tmp_path / "dataset.json", json.dumps({"channel_names": {"0": "R"}, "labels": {"background": 0, "x": 1},
                                                 "file_ending": ".png"}))  # fmt: skip
    touch(tmp_path, "imagesTr/a_0000.png", "labelsTr/a.png")
    ds = load_dataset(tmp_path)
    assert ds.spatial_dims == 2 and [c.case_id for c in ds.cases] == ["a"]


# ---------------------------------------------------------------- MedicalNet list


def test_medicalnet_list_relative_to_root_with_comments_and_unlabelled_lines(tmp_path):
    path = write(tmp_path / "lists/train.txt", "# MRBrainS18\n"
                 "MRBrainS18/images/070.nii.gz MRBrainS18/labels/070.nii.gz\n\n"
                 "MRBrainS18/images/1.nii.gz  MRBrainS18/labels/1.nii.gz\n"
                 "MRBrainS18/images/4.nii.gz\n")  # fmt: skip
    ds = load_dataset(path, root=tmp_path / "data")
    d = tmp_path / "data/MRBrainS18"
    assert (ds.format, ds.task, ds.root, ds.name) == ("medicalnet_list", "segmentation", tmp_path / "data", "train")
    assert ds.cases == [
        Case("070", (d / "images/070.nii.gz",), d / "labels/070.nii.gz"),
        Case("1", (d / "images/1.nii.gz",), d / "labels/1.nii.gz"),
        Case("4", (d / "images/4.nii.gz",), None),
    ]
    # default root: the list file's folder
    assert load_dataset(path).cases[0].images == (tmp_path / "lists/MRBrainS18/images/070.nii.gz",)


def test_medicalnet_list_line_with_three_columns_names_the_line(tmp_path):
    path = write(tmp_path / "train.txt", "a.nii.gz b.nii.gz\n# x\nc.nii.gz d.nii.gz e.nii.gz\n")
    with pytest.raises(DataError, match=r"train\.txt:3: 3 columns; expected 'image label' or 'image'"):
        load_dataset(path)


def test_same_file_name_in_different_folders_gives_path_ids_and_repeats_are_recorded(tmp_path):
    path = write(tmp_path / "l.txt", "p1/ct.nii.gz p1/seg.nii.gz\np2/ct.nii.gz p2/seg.nii.gz\np1/ct.nii.gz\n")
    ds = load_dataset(path)
    assert [c.case_id for c in ds.cases] == ["p1_ct", "p2_ct", "p1_ct"]
    assert ds.description["duplicate_case_ids"] == ["p1_ct"] == duplicate_case_ids(ds.cases)
    assert len(ds) == 3  # kept, not dropped


# ---------------------------------------------------------------- CSV


def test_csv_segmentation_with_id_column_and_root(tmp_path):
    path = write(tmp_path / "train.csv", "case_id,image,label\nc1,img/a.nii.gz,lab/a.nii.gz\nc2,/abs/b.nii.gz,\n,d/e.nii.gz,\n")
    ds = load_dataset(path)
    assert (ds.format, ds.task) == ("csv", "segmentation")
    assert ds.cases == [
        Case("c1", (tmp_path / "img/a.nii.gz",), tmp_path / "lab/a.nii.gz"),
        Case("c2", (Path("/abs/b.nii.gz"),), None),
        Case("e", (tmp_path / "d/e.nii.gz",), None),  # empty id cell: the file name
    ]
    assert load_dataset(path, root=tmp_path / "r").cases[0].label == tmp_path / "r/lab/a.nii.gz"


def test_csv_string_classes_become_sorted_indices(tmp_path):
    path = write(tmp_path / "cls.csv", "image,class\nx1.nii.gz,malignant\nx2.nii.gz,benign\nx3.nii.gz,\n")
    ds = load_dataset(path)
    assert (ds.task, ds.labels) == ("classification", {0: "benign", 1: "malignant"})
    assert [(c.case_id, c.target) for c in ds.cases] == [("x1", 1), ("x2", 0), ("x3", None)]


def test_csv_integer_label_column_is_a_class_not_a_mask(tmp_path):
    path = write(tmp_path / "cls.csv", "image,label\nx1.png,2\nx2.png,0\n")
    ds = load_dataset(path)
    assert (ds.task, ds.labels, ds.spatial_dims) == ("classification", {0: "0", 2: "2"}, 2)
    assert [c.target for c in ds.cases] == [2, 0] and ds.cases[0].label is None
    with pytest.raises(DataError, match=r"cls\.csv:3: class '1\.5' is not a non-negative integer"):
        load_dataset(write(tmp_path / "cls.csv", "image,class\nx1.png,2\nx2.png,1.5\n"))


def test_csv_multilabel_chexpert_style_keeps_uncertain_and_reads_empty_as_zero(tmp_path):
    path = write(tmp_path / "chexpert.csv", "Path,Edema,Effusion,Pneumonia\n"
                 "p1/view1.jpg,1.0,,-1.0\np2/view1.jpg,0,1,0\n")  # fmt: skip
    ds = load_dataset(path)
    assert (ds.task, ds.labels) == ("classification", {0: "Edema", 1: "Effusion", 2: "Pneumonia"})
    assert [c.case_id for c in ds.cases] == ["p1_view1", "p2_view1"]
    assert [c.target for c in ds.cases] == [(1.0, 0.0, -1.0), (0.0, 1.0, 0.0)]


def test_csv_label_columns_pick_the_findings_and_bad_values_name_the_cell(tmp_path):
    path = write(tmp_path / "c.csv", "Path,Sex,Age,Edema,Effusion\na.jpg,F,68,1,0\nb.jpg,M,70,0,1\n")
    with pytest.raises(DataError, match=r"c\.csv:2: Sex = 'F' is not 0, 1, -1 .*label_columns="):
        load_dataset(path)
    ds = load_dataset(path, label_columns=["Edema", "Effusion"])
    assert ds.labels == {0: "Edema", 1: "Effusion"} and [c.target for c in ds.cases] == [(1.0, 0.0), (0.0, 1.0)]


def test_csv_task_override(tmp_path):
    path = write(tmp_path / "x.csv", "image,label\na.nii.gz,b.nii.gz\n")
    assert load_dataset(path, task="unlabelled").cases == [Case("a", (tmp_path / "a.nii.gz",))]
    seg = write(tmp_path / "y.csv", "image,mask\na.png,1\n")
    assert load_dataset(seg, task="segmentation").cases[0].label == tmp_path / "1"
    with pytest.raises(DataError, match="task='segmentation' needs a mask column"):
        load_dataset(write(tmp_path / "z.csv", "image,class\na.png,1\n"), task="segmentation")


def test_csv_without_image_column_ragged_row_and_empty_file(tmp_path):
    with pytest.raises(DataError, match=r"x\.csv:1: no image column in header \['scan', 'label'\]; fix: name"):
        load_dataset(write(tmp_path / "x.csv", "scan,label\na,b\n"))
    assert load_dataset(write(tmp_path / "x.csv", "scan,label\na.nii,b.nii\n"), image_column="scan").cases[0].case_id == "a"
    with pytest.raises(DataError, match=r"x\.csv:3: 3 cells but the header has 2"):
        load_dataset(write(tmp_path / "x.csv", "image,label\na,b\nc,d,e\n"))
    with pytest.raises(DataError, match="empty, no header row"):
        load_dataset(write(tmp_path / "x.csv", "\n"))


# ---------------------------------------------------------------- folder, LUNA16


def test_unlabelled_folder_finds_every_format_and_dicom_series_folders(tmp_path):
    touch(tmp_path, "a.nii.gz", "b.mha", "sub/c.mhd", "sub/c.raw", "sub/d.nrrd", "e.npy", "f.npz", "g.nii",
          "series1/IM0001.dcm", "series1/IM0002.dcm", "notes.txt", ".hidden/h.nii.gz")  # fmt: skip
    ds = load_dataset(tmp_path)
    assert (ds.format, ds.task, ds.spatial_dims) == ("folder", "unlabelled", 3)
    assert [(c.case_id, c.images[0].relative_to(tmp_path).as_posix()) for c in ds.cases] == [
        ("a", "a.nii.gz"), ("b", "b.mha"), ("e", "e.npy"), ("f", "f.npz"), ("g", "g.nii"),
        ("series1", "series1"), ("c", "sub/c.mhd"), ("d", "sub/d.nrrd"),
    ]  # fmt: skip
    assert all(c.label is None and c.target is None for c in ds.cases)


def test_folder_mixing_2d_and_3d_is_refused_and_empty_folder_is_empty(tmp_path):
    touch(tmp_path, "a.nii.gz", "b.png")
    with pytest.raises(DataError, match="mixes 2D images"):
        load_dataset(tmp_path)
    (tmp_path / "empty").mkdir()
    assert load_dataset(tmp_path / "empty", format="folder").cases == []
    with pytest.raises(DataError, match=r"no image files and no known layout found\nsupported layouts"):
        load_dataset(tmp_path / "empty")


def test_luna16_subsets_and_annotations(tmp_path):
    touch(tmp_path, "subset0/1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860.mhd",
          "subset0/1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860.raw",
          "subset1/1.3.6.1.4.1.14519.5.2.1.6279.6001.100332161840553388986847034053.mhd",
          "seg-lungs-LUNA16/1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860.mhd")  # fmt: skip
    uid0 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860"
    uid1 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.100332161840553388986847034053"
    write(tmp_path / "annotations.csv", "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
          f"{uid0},-128.69,-175.32,-298.38,5.65\n{uid0},103.78,-211.92,-227.12,4.22\n")  # fmt: skip
    ds = load_dataset(tmp_path)
    assert (ds.format, ds.task) == ("luna16", "unlabelled")
    assert ds.cases == [Case(uid0, (tmp_path / f"subset0/{uid0}.mhd",)), Case(uid1, (tmp_path / f"subset1/{uid1}.mhd",))]
    assert ds.description["subset"] == {uid0: "subset0", uid1: "subset1"}
    assert ds.description["annotations"] == {uid0: [
        {"coordX": -128.69, "coordY": -175.32, "coordZ": -298.38, "diameter_mm": 5.65},
        {"coordX": 103.78, "coordY": -211.92, "coordZ": -227.12, "diameter_mm": 4.22},
    ]}  # fmt: skip
    write(tmp_path / "bad.csv", f"seriesuid,coordX,coordY,coordZ,diameter_mm\n{uid0},1,2,x,4\n")
    with pytest.raises(DataError, match=r"bad\.csv:2: a coordinate or diameter is not a number"):
        load_dataset(tmp_path, annotations=tmp_path / "bad.csv")


# ---------------------------------------------------------------- 2D


def test_chestxray14_list_with_label_names(tmp_path):
    row = lambda name, hot: name + " " + " ".join("1" if i in hot else "0" for i in range(14))  # noqa: E731
    path = write(tmp_path / "Xray14_train_official.txt", row("00000001_000.png", {1}) + "\n" + row("00000002_000.png", {}) + "\n")
    ds = load_dataset(path, root=tmp_path / "images", label_names=list(CHESTXRAY14_LABELS))
    assert (ds.format, ds.task, ds.spatial_dims) == ("image_list_2d", "classification", 2)
    assert ds.labels[1] == "Cardiomegaly" and len(ds.labels) == 14
    assert ds.cases[0] == Case("00000001_000", (tmp_path / "images/00000001_000.png",), None, (0.0, 1.0) + (0.0,) * 12)
    assert ds.cases[1].target == (0.0,) * 14
    assert load_dataset(path).labels[13] == "finding_13"
    with pytest.raises(DataError, match="3 label_names for 14 label columns"):
        load_dataset(path, label_names=["a", "b", "c"])


def test_shenzhen_list_is_one_class_per_image(tmp_path):
    path = write(tmp_path / "ShenzenCXR_train_data.txt", "CHNCXR_0001_0.png,0\nCHNCXR_0327_1.png,1\n")
    ds = load_dataset(path, label_names=["normal", "tuberculosis"])
    assert ds.labels == {0: "normal", 1: "tuberculosis"}
    assert [(c.case_id, c.target) for c in ds.cases] == [("CHNCXR_0001_0", 0), ("CHNCXR_0327_1", 1)]


def test_image_list_with_inconsistent_label_count_names_the_line(tmp_path):
    path = write(tmp_path / "l.txt", "a.png 0 1 0\nb.png 0 1\n")
    with pytest.raises(DataError, match=r"l\.txt:2: 2 labels, but line 1 has 3"):
        load_dataset(path)


def test_image_mask_folders_same_names_and_drive_suffixes(tmp_path):
    touch(tmp_path / "seg", "images/a.png", "images/b.png", "masks/a.png", "masks/z.png")
    ds = load_dataset(tmp_path / "seg")
    assert (ds.format, ds.task, ds.spatial_dims) == ("image_mask_2d", "segmentation", 2)
    s = tmp_path / "seg"
    assert ds.cases == [Case("a", (s / "images/a.png",), s / "masks/a.png"), Case("b", (s / "images/b.png",), s / "masks/b.png")]
    assert ds.description["unmatched_masks"] == [str(s / "masks/z.png")]
    touch(tmp_path / "drive", "images/21_training.tif", "masks/21_manual1.gif")
    ds = load_dataset(tmp_path / "drive", image_suffix="_training", mask_suffix="_manual1")
    d = tmp_path / "drive"
    assert ds.cases == [Case("21", (d / "images/21_training.tif",), d / "masks/21_manual1.gif")]


# ---------------------------------------------------------------- detection and options


def test_auto_detection_names_every_layout(tmp_path):
    msd_fixture(tmp_path / "msd")
    nnunet_fixture(tmp_path / "nnunet")
    touch(tmp_path / "luna", "subset3/x.mhd")
    touch(tmp_path / "seg2d", "images/a.png", "masks/a.png")
    touch(tmp_path / "vols", "a.nii.gz")
    write(tmp_path / "list.txt", "a.nii.gz b.nii.gz\n")
    write(tmp_path / "unl.txt", "a.nii.gz\n")
    write(tmp_path / "xray.txt", "a.png 0 1\n")
    write(tmp_path / "shenzhen.txt", "a.png,1\n")
    write(tmp_path / "t.csv", "image\na.nii.gz\n")
    expected = {"msd": "msd", "nnunet": "nnunet", "luna": "luna16", "seg2d": "image_mask_2d", "vols": "folder",
                "list.txt": "medicalnet_list", "unl.txt": "medicalnet_list", "xray.txt": "image_list_2d",
                "shenzhen.txt": "image_list_2d", "t.csv": "csv"}  # fmt: skip
    assert {name: detect_format(tmp_path / name) for name in expected} == expected
    assert {name: load_dataset(tmp_path / name).format for name in expected} == expected
    assert load_dataset(tmp_path / "msd/dataset.json").format == "msd"


def test_nothing_matches_lists_the_supported_layouts(tmp_path):
    with pytest.raises(DataError, match=r"not a recognised dataset description\nsupported layouts.*\n  msd "):
        load_dataset(write(tmp_path / "x.xlsx", ""))
    with pytest.raises(DataError, match="no such file or folder"):
        load_dataset(tmp_path / "nope")
    write(tmp_path / "j/dataset.json", "{}")
    with pytest.raises(DataError, match="neither MSD .* nor nnU-Net v2"):
        load_dataset(tmp_path / "j")
    touch(tmp_path, "raw/imagesTr/a.nii.gz")
    with pytest.raises(DataError, match="has imagesTr/ but no dataset.json"):
        load_dataset(tmp_path / "raw")


def test_wrong_format_and_unknown_options_are_refused(tmp_path):
    msd_fixture(tmp_path)
    with pytest.raises(DataError, match=r"unknown dataset format 'decathlon'; use 'auto' or one of: msd, nnunet"):
        load_dataset(tmp_path, format="decathlon")
    with pytest.raises(DataError, match=r"unknown option\(s\) rooot for format 'msd'; accepted: boxes_from, name"):
        load_dataset(tmp_path, rooot="x")
    with pytest.raises(DataError, match="format 'csv' reads a list file"):
        load_dataset(tmp_path, format="csv")
    with pytest.raises(DataError, match="no dataset.json"):
        load_dataset(tmp_path / "imagesTr" if (tmp_path / "imagesTr").mkdir() is None else tmp_path, format="nnunet")
    assert load_dataset(tmp_path, name="Hippo").name == "Hippo"
