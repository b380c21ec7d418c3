"""Original-layout scanners, on miniature trees written into tmp_path."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from data_fixtures import (
    counts,
    deny,
    make_mvtec_class,
    samples_of,
    write_blank_mask,
    write_image,
    write_mask,
)

from crane.data.layouts import (
    DTD_CLASSES,
    MPDD_CLASSES,
    get_layout,
    list_layouts,
    prepare,
)
from crane.data.meta import read_meta, validate_meta, write_meta
from crane.errors import DatasetError

ALL_NAMES = [
    "mvtec", "visa", "mpdd", "btad", "sdd", "dagm", "dtd", "headct", "brainmri", "br35h",
    "isic", "tn3k", "cvc-colondb", "cvc-clinicdb", "generic",
]  # fmt: skip


def mask_stem_matches(sample, suffix: str = "_mask") -> bool:
    return Path(sample.mask_path).stem.lower() == (Path(sample.img_path).stem + suffix).lower()


# --------------------------------------------------------------------------- registry


def test_registry_lists_every_dataset_with_a_layout():
    layouts = list_layouts()
    assert [lay.name for lay in layouts] == ALL_NAMES
    for lay in layouts:
        assert lay.title and lay.layout.strip()
    assert get_layout("MVTec").name == "mvtec"
    assert get_layout("cvc_clinicdb").name == "cvc-clinicdb"
    assert len(get_layout("mvtec").classes) == 15
    assert len(get_layout("visa").classes) == 12
    assert get_layout("dtd").classes[0] == "Woven_001"


def test_unknown_dataset_lists_known_names(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'mvtek'.*mvtec.*cvc-clinicdb"):
        prepare("mvtek", tmp_path)


def test_missing_and_empty_roots(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        prepare("mvtec", tmp_path / "absent")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatasetError, match="not a directory"):
        prepare("mvtec", tmp_path / "file")
    for name in ALL_NAMES:
        empty = tmp_path / f"empty-{name}"
        empty.mkdir()
        with pytest.raises(DatasetError, match="expected"):
            prepare(name, empty)


def test_class_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "bottle" / "test" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="found no images"):
        prepare("mvtec", tmp_path)


def test_bad_policy_name(tmp_path):
    with pytest.raises(DatasetError, match="missing_mask must be one of"):
        prepare("mvtec", tmp_path, missing_mask="ignore")


# --------------------------------------------------------------------------- MVTec family


def test_mvtec_pairs_masks_by_name_not_sorted_position(tmp_path, caplog):
    # Sorted listings disagree here: images 1, 10, 2 vs masks 10_mask, 1_mask, 2_mask
    # ('0' < '_'), so pairing by position would give 1.png the mask of 10.png.
    make_mvtec_class(tmp_path, "bottle", defects={"broken_large": ["1", "10", "2"]})
    make_mvtec_class(
        tmp_path,
        "screw",
        train=["000"],
        defects={"scratch_head": ["000"], "thread_top": ["005", "006"]},
    )
    with caplog.at_level(logging.WARNING):
        meta = prepare("mvtec", tmp_path)
    assert "cable" in caplog.text  # absent classes are reported
    assert list(meta["test"]) == ["bottle", "screw"]
    assert counts(meta, "train", "bottle") == (3, 0)
    assert counts(meta, "test", "bottle") == (2, 3)
    assert counts(meta, "test", "screw") == (2, 3)
    for split in ("train", "test"):
        for cls in ("bottle", "screw"):
            for s in samples_of(meta, split, cls):
                assert s.cls_name == cls
                if s.anomaly:
                    assert mask_stem_matches(s), s
                    assert s.mask_path.startswith(f"{cls}/ground_truth/{s.specie_name}/")
                else:
                    assert s.mask_path == "" and s.specie_name == "good"
    bad = {s.img_path: s.mask_path for s in meta["test"]["bottle"] if s.anomaly}
    assert bad["bottle/test/broken_large/1.png"] == "bottle/ground_truth/broken_large/1_mask.png"
    assert bad["bottle/test/broken_large/10.png"] == "bottle/ground_truth/broken_large/10_mask.png"
    # The result is a valid, writable index.
    write_meta(tmp_path, meta)
    assert read_meta(tmp_path) == meta


def test_missing_mask_policies(tmp_path, caplog):
    # 001 has no mask: position-based pairing would give it 002's mask.
    make_mvtec_class(
        tmp_path,
        "bottle",
        defects={"crack": ["000", "001", "002"]},
        masks={"crack": ["000", "002"]},
    )
    with pytest.raises(DatasetError) as info:
        prepare("mvtec", tmp_path)
    assert "1 problem" in str(info.value) and "bottle/test/crack/001.png" in str(info.value)

    with caplog.at_level(logging.WARNING):
        meta = prepare("mvtec", tmp_path, missing_mask="skip")
    assert "bottle/test/crack/001.png" in caplog.text
    bad = [s for s in meta["test"]["bottle"] if s.anomaly]
    assert [(Path(s.img_path).name, Path(s.mask_path).name) for s in bad] == [
        ("000.png", "000_mask.png"),
        ("002.png", "002_mask.png"),
    ]

    meta = prepare("mvtec", tmp_path, missing_mask="warn")
    bad = {Path(s.img_path).name: s.mask_path for s in meta["test"]["bottle"] if s.anomaly}
    assert bad == {
        "000.png": "bottle/ground_truth/crack/000_mask.png",
        "001.png": "",
        "002.png": "bottle/ground_truth/crack/002_mask.png",
    }


def test_unused_masks_are_reported(tmp_path, caplog):
    make_mvtec_class(
        tmp_path, "bottle", defects={"crack": ["000"]}, masks={"crack": ["000", "007"]}
    )
    with caplog.at_level(logging.WARNING):
        meta = prepare("mvtec", tmp_path)
    assert "007_mask.png" in caplog.text
    assert counts(meta, "test", "bottle") == (2, 1)


@pytest.mark.parametrize(("name", "cls"), [("mpdd", MPDD_CLASSES[0]), ("dtd", DTD_CLASSES[3])])
def test_mvtec_layout_datasets(tmp_path, name, cls):
    make_mvtec_class(tmp_path, cls, defects={"bad": ["000", "001", "002"]})
    make_mvtec_class(tmp_path, "not_a_class", defects={"bad": ["000"]})  # ignored
    meta = prepare(name, tmp_path)
    assert list(meta["test"]) == [cls]
    assert counts(meta, "train", cls) == (3, 0)
    assert counts(meta, "test", cls) == (2, 3)
    assert all(mask_stem_matches(s) for s in meta["test"][cls] if s.anomaly)


def test_btad_ok_ko_with_mixed_extensions(tmp_path):
    # Class 01: bmp images with png masks; class 03: bmp masks. Masks share the image name.
    make_mvtec_class(
        tmp_path,
        "01",
        normal="ok",
        defects={"ko": ["0000", "0001"]},
        img_ext=".bmp",
        mask_name="{stem}.png",
    )
    make_mvtec_class(
        tmp_path,
        "03",
        normal="ok",
        train=["0000"],
        test_good=["0005"],
        defects={"ko": ["0003"]},
        mask_name="{stem}.bmp",
    )
    meta = prepare("btad", tmp_path)
    assert counts(meta, "train", "01") == (3, 0) and counts(meta, "test", "01") == (2, 2)
    assert counts(meta, "train", "03") == (1, 0) and counts(meta, "test", "03") == (1, 1)
    for cls in ("01", "03"):
        for s in meta["test"][cls]:
            assert s.specie_name == ("ko" if s.anomaly else "ok")
            if s.anomaly:
                assert mask_stem_matches(s, suffix="")
    bad = [s for s in meta["test"]["03"] if s.anomaly]
    assert [s.mask_path for s in bad] == ["03/ground_truth/ko/0003.bmp"]


def test_sdd_original_kolektor_layout(tmp_path):
    for kos, parts in (("kos01", {0: False, 1: True}), ("kos02", {0: True, 3: False, 7: False})):
        for part, defective in parts.items():
            write_image(tmp_path / kos / f"Part{part}.jpg", size=(20, 50))
            if defective:
                write_mask(
                    tmp_path / kos / f"Part{part}_label.bmp", size=(20, 50), box=(5, 10, 9, 30)
                )
            else:
                write_blank_mask(tmp_path / kos / f"Part{part}_label.bmp", size=(20, 50))
    meta = prepare("sdd", tmp_path)
    assert list(meta["test"]) == ["SDD"] and meta["train"] == {}
    assert counts(meta, "test", "SDD") == (3, 2)
    for s in meta["test"]["SDD"]:
        if s.anomaly:
            assert s.mask_path == s.img_path.replace(".jpg", "_label.bmp")
            assert s.specie_name == "defect"
        else:
            assert s.mask_path == ""
    (tmp_path / "kos02" / "Part3_label.bmp").unlink()
    with pytest.raises(DatasetError, match="kos02/Part3.jpg"):
        prepare("sdd", tmp_path)


def test_sdd_converted_layout(tmp_path):
    make_mvtec_class(tmp_path, "SDD", defects={"defect": ["kos01_Part1_0", "kos10_Part5_2"]})
    meta = prepare("sdd", tmp_path)
    assert counts(meta, "train", "SDD") == (3, 0)
    assert counts(meta, "test", "SDD") == (2, 2)


def test_dagm_labels_define_anomalies(tmp_path):
    cls = tmp_path / "Class3"
    for split, stems, labelled in (
        ("Train", ["0001", "0002", "0003"], ["0002"]),
        ("Test", ["0001", "0010", "0100", "1000"], ["1000", "0010"]),
    ):
        for stem in stems:
            write_image(cls / split / f"{stem}.PNG", fmt="PNG")
        for stem in labelled:
            write_mask(cls / split / "Label" / f"{stem}_label.PNG")
        (cls / split / "Label" / "Labels.txt").write_text("not an image\n")
    write_image(tmp_path / "Class7" / "Test" / "0001.PNG", fmt="PNG")
    meta = prepare("dagm", tmp_path)
    assert list(meta["test"]) == ["Class3", "Class7"]
    assert counts(meta, "train", "Class3") == (2, 1)
    assert counts(meta, "test", "Class3") == (2, 2)
    assert counts(meta, "test", "Class7") == (1, 0)
    bad = {s.img_path: s.mask_path for s in meta["test"]["Class3"] if s.anomaly}
    assert bad == {
        "Class3/Test/0010.PNG": "Class3/Test/Label/0010_label.PNG",
        "Class3/Test/1000.PNG": "Class3/Test/Label/1000_label.PNG",
    }


@pytest.mark.parametrize("nested", [False, True])
def test_headct_labels_csv(tmp_path, nested, caplog):
    img_dir = tmp_path / "head_ct" / "head_ct" if nested else tmp_path / "head_ct"
    labels = {0: 1, 1: 1, 7: 0, 42: 0, 150: 1}
    for i in labels:
        write_image(img_dir / f"{i:03d}.png", mode="L")
    write_image(img_dir / "999.png", mode="L")  # not in labels.csv: ignored
    rows = "\n".join(f"{i},{v}" for i, v in labels.items())
    (tmp_path / "labels.csv").write_text(f"id, hemorrhage\n{rows}\n")
    with caplog.at_level(logging.WARNING):
        meta = prepare("headct", tmp_path)
    assert "1 of the 6 images in" in caplog.text
    assert "are not in labels.csv: left out" in caplog.text
    assert list(meta["test"]) == ["brain"]
    assert counts(meta, "test", "brain") == (2, 3)
    rel = img_dir.relative_to(tmp_path).as_posix()
    got = {s.img_path: s.anomaly for s in meta["test"]["brain"]}
    assert got == {f"{rel}/{i:03d}.png": v for i, v in labels.items()}
    assert all(s.mask_path == "" for s in meta["test"]["brain"])


@pytest.mark.parametrize(
    ("name", "data", "says"),
    [
        ("headct", b"id,hemorrhage\n0,1\n2\n", "line 3: id '2' / hemorrhage '' invalid"),
        ("headct", "id,hemorrhage\n0,1\n".encode("utf-16"), "labels.csv is not UTF-8 text"),
        ("headct", "id;hémorrhage\n0;1\n".encode("latin-1"), "is not UTF-8 text"),
        ("visa", "object,split\nfryum,tést\n".encode("latin-1"), "1cls.csv is not UTF-8 text"),
        ("visa", b"object,split,label,image,mask\npcb1,test,normal,,\n", "line 2: empty object"),
    ],
)
def test_bad_csv_files_are_clear_errors(tmp_path, name, data, says):
    """A short row, or a file that is not UTF-8, crashed with a traceback
    (AttributeError / UnicodeDecodeError)."""
    write_image(tmp_path / "head_ct" / "000.png")
    write_image(tmp_path / "head_ct" / "002.png")
    (tmp_path / "pcb1").mkdir()
    csv_path = tmp_path / ("labels.csv" if name == "headct" else "split_csv/1cls.csv")
    csv_path.parent.mkdir(exist_ok=True)
    csv_path.write_bytes(data)
    with pytest.raises(DatasetError, match=re.escape(says)):
        prepare(name, tmp_path)


def test_visa_image_in_both_splits_is_reported(tmp_path, caplog):
    make_visa(tmp_path, [("pcb1", "train", "normal", "0000"), ("pcb1", "test", "anomaly", "000")])
    csv_path = tmp_path / "split_csv" / "1cls.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join([*lines, lines[1].replace(",train,", ",test,")]) + "\n")
    with caplog.at_level(logging.WARNING):
        meta = prepare("visa", tmp_path)
    assert counts(meta, "test", "pcb1") == (1, 1)
    assert "visa: images in both train and test" in caplog.text
    assert "pcb1/Data/Images/Normal/0000.JPG" in caplog.text


def test_headct_missing_image_is_an_error(tmp_path):
    write_image(tmp_path / "head_ct" / "000.png")
    (tmp_path / "labels.csv").write_text("id,hemorrhage\n0,1\n5,0\n")
    with pytest.raises(DatasetError, match="no image for id 5"):
        prepare("headct", tmp_path)


def test_brainmri_and_br35h_folders(tmp_path):
    base = tmp_path / "mri" / "brain_tumor_dataset"
    for name in ("1 no.jpeg", "N2.JPG", "no 3.jpg"):
        write_image(base / "no" / name, fmt="JPEG")
    for name in ("Y1.jpg", "Y2.png"):
        write_image(base / "yes" / name)
    meta = prepare("brainmri", tmp_path / "mri")
    assert counts(meta, "test", "brain") == (3, 2)
    assert {s.specie_name for s in meta["test"]["brain"]} == {"no", "yes"}
    assert all(s.img_path.startswith("brain_tumor_dataset/") for s in meta["test"]["brain"])

    br = tmp_path / "br35h"
    for i in range(4):
        write_image(br / "no" / f"no{i}.jpg", fmt="JPEG")
    for i in range(3):
        write_image(br / "yes" / f"y{i}.jpg", fmt="JPEG")
    write_image(br / "pred" / "pred0.jpg", fmt="JPEG")  # unlabelled: ignored
    meta = prepare("br35h", br)
    assert counts(meta, "test", "brain") == (4, 3)
    assert not any("pred" in s.img_path for s in meta["test"]["brain"])


def test_isic_segmentation_masks(tmp_path):
    data = tmp_path / "ISBI2016_ISIC_Part1_Test_Data"
    gt = tmp_path / "ISBI2016_ISIC_Part1_Test_GroundTruth"
    for i in (3, 12, 100):
        write_image(data / f"ISIC_{i:07d}.jpg", fmt="JPEG")
    for i in (100, 12, 3):
        write_mask(gt / f"ISIC_{i:07d}_Segmentation.png")
    meta = prepare("isic", tmp_path)
    assert counts(meta, "test", "skin") == (0, 3)
    assert all(mask_stem_matches(s, "_Segmentation") for s in meta["test"]["skin"])
    (gt / "ISIC_0000012_Segmentation.png").unlink()
    with pytest.raises(DatasetError, match="ISIC_0000012.jpg"):
        prepare("isic", tmp_path)


def test_tn3k_same_stem(tmp_path):
    for stem in ("0000", "0001", "0010"):
        write_image(tmp_path / "test-image" / f"{stem}.jpg", fmt="JPEG")
        write_mask(tmp_path / "test-mask" / f"{stem}.jpg")
    meta = prepare("tn3k", tmp_path)
    assert counts(meta, "test", "thyroid") == (0, 3)
    assert all(mask_stem_matches(s, "") for s in meta["test"]["thyroid"])
    assert meta["train"] == {}


def test_cvc_colondb_extensions_differ(tmp_path):
    # Image 1.tif's mask is 1.png; sorted-position pairing would misalign 10/2.
    for stem in ("1", "10", "2"):
        write_image(tmp_path / "images" / f"{stem}.tif", fmt="TIFF")
        write_mask(tmp_path / "masks" / f"{stem}.png")
    meta = prepare("cvc-colondb", tmp_path)
    assert counts(meta, "test", "colon") == (0, 3)
    pairs = {s.img_path: s.mask_path for s in meta["test"]["colon"]}
    assert pairs == {f"images/{s}.tif": f"masks/{s}.png" for s in ("1", "10", "2")}


def test_cvc_clinicdb_original_folder_names(tmp_path):
    for stem in ("1", "2"):
        write_image(tmp_path / "Original" / f"{stem}.tif", fmt="TIFF")
        write_mask(tmp_path / "Ground Truth" / f"{stem}.tif")
    meta = prepare("cvc-clinicdb", tmp_path)
    assert counts(meta, "test", "colon") == (0, 2)
    assert meta["test"]["colon"][0].mask_path == "Ground Truth/1.tif"


def test_ambiguous_masks_are_an_error(tmp_path):
    write_image(tmp_path / "images" / "1.png")
    write_mask(tmp_path / "masks" / "1.png")
    write_mask(tmp_path / "masks" / "1.tif")
    with pytest.raises(DatasetError, match="ambiguous masks"):
        prepare("cvc-colondb", tmp_path)


def test_generic_multi_class(tmp_path):
    make_mvtec_class(tmp_path, "widget", defects={"dent": ["a", "b"], "hole": ["c"]})
    # A class without ground_truth/: image-level labels only.
    make_mvtec_class(tmp_path, "gadget", defects={"bad": ["x"]}, masks={})
    (tmp_path / "notes").mkdir()  # no test/: not a class
    meta = prepare("generic", tmp_path)
    assert list(meta["test"]) == ["gadget", "widget"]
    assert counts(meta, "test", "widget") == (2, 3)
    assert all(mask_stem_matches(s) for s in meta["test"]["widget"] if s.anomaly)
    assert counts(meta, "test", "gadget") == (2, 1)
    assert all(s.mask_path == "" for s in meta["test"]["gadget"])


def test_generic_single_class_tree(tmp_path):
    root = tmp_path / "my_part"
    make_mvtec_class(
        tmp_path, "my_part", defects={"scratch": ["0", "1"]}, mask_name="{stem}.png"
    )  # same-name masks are accepted too
    meta = prepare("generic", root)
    assert list(meta["test"]) == ["my_part"]
    assert counts(meta, "train", "my_part") == (3, 0)
    assert counts(meta, "test", "my_part") == (2, 2)
    assert meta["test"]["my_part"][-1].img_path == "test/scratch/1.png"
    assert meta["test"]["my_part"][-1].mask_path == "ground_truth/scratch/1.png"


def test_generic_single_class_named_by_the_link_given(tmp_path):
    make_mvtec_class(tmp_path / "store", "7f3a9c", defects={"scratch": ["0"]})
    (tmp_path / "screw").symlink_to(tmp_path / "store" / "7f3a9c", target_is_directory=True)
    assert list(prepare("generic", tmp_path / "screw")["test"]) == ["screw"]


def test_generic_missing_defect_masks_folder(tmp_path):
    make_mvtec_class(
        tmp_path, "widget", defects={"dent": ["a"], "hole": ["b"]}, masks={"dent": ["a"]}
    )
    with pytest.raises(DatasetError, match="widget/test/hole/b.png"):
        prepare("generic", tmp_path)


# --------------------------------------------------------------------------- VisA


def make_visa(root: Path, rows: list[tuple[str, str, str, str]]) -> None:
    """rows: (object, split, label, stem); writes the files and split_csv/1cls.csv."""
    lines = ["object,split,label,image,mask"]
    for obj, split, label, stem in rows:
        sub = "Normal" if label == "normal" else "Anomaly"
        img = f"{obj}/Data/Images/{sub}/{stem}.JPG"
        write_image(root / img, fmt="JPEG")
        mask = ""
        if label == "anomaly":
            mask = f"{obj}/Data/Masks/Anomaly/{stem}.png"
            write_mask(root / mask, value=1)
        lines.append(f"{obj},{split},{label},{img},{mask}")
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(lines) + "\n")


def test_visa_split_csv(tmp_path):
    rows = [("pcb1", "train", "normal", f"{i:04d}") for i in range(4)]
    rows += [
        ("pcb1", "test", "normal", "0004"),
        ("pcb1", "test", "anomaly", "000"),
        ("candle", "test", "anomaly", "001"),
        ("candle", "train", "normal", "0000"),
    ]
    make_visa(tmp_path, rows)
    meta = prepare("visa", tmp_path)
    assert list(meta["test"]) == ["candle", "pcb1"]  # VisA class order
    assert counts(meta, "train", "pcb1") == (4, 0)
    assert counts(meta, "test", "pcb1") == (1, 1)
    assert counts(meta, "test", "candle") == (0, 1)
    bad = meta["test"]["pcb1"][1]
    assert bad.img_path == "pcb1/Data/Images/Anomaly/000.JPG"
    assert bad.mask_path == "pcb1/Data/Masks/Anomaly/000.png"
    assert bad.specie_name == ""  # as the reference VisA generators write it
    validate_meta(meta, tmp_path)


def test_visa_errors(tmp_path):
    with pytest.raises(DatasetError, match="1cls.csv"):
        prepare("visa", tmp_path)
    make_visa(tmp_path, [("pcb1", "test", "anomaly", "000")])
    csv_path = tmp_path / "split_csv" / "1cls.csv"
    csv_path.write_text(csv_path.read_text().replace("anomaly", "broken"))
    with pytest.raises(DatasetError, match="label 'broken'"):
        prepare("visa", tmp_path)
    # A mask that names a different image is refused rather than trusted.
    make_visa(tmp_path, [("pcb1", "test", "anomaly", "000"), ("pcb1", "test", "anomaly", "001")])
    text = csv_path.read_text().replace("Anomaly/001.png", "Anomaly/000.png")
    csv_path.write_text(text)
    with pytest.raises(DatasetError, match="does not match image"):
        prepare("visa", tmp_path)


def test_normal_folder_name_is_matched_without_case(tmp_path):
    """Folders are found without case everywhere; a `Good` folder was labelled anomalous."""
    make_mvtec_class(tmp_path, "part", normal="Good", defects={"scratch": ["a"]}, masks={})
    meta = prepare("generic", tmp_path / "part")
    assert counts(meta, "train", "part") == (3, 0)
    assert counts(meta, "test", "part") == (2, 1)


def test_a_class_without_test_images_is_reported(tmp_path, caplog):
    make_mvtec_class(tmp_path, "widget", defects={"dent": ["a"]})
    make_mvtec_class(tmp_path, "cable", train=(), test_good=(), defects={}, masks={})
    (tmp_path / "cable" / "test" / "good").mkdir(parents=True)
    with caplog.at_level(logging.WARNING):
        meta = prepare("generic", tmp_path)
    assert "cable" not in meta["test"] and "cable" not in meta["train"]  # left out, as it says
    assert "cable: no test images" in caplog.text and "the class is left out" in caplog.text
    assert counts(meta, "test", "widget") == (2, 1)


@pytest.mark.parametrize("normal", ["ok", "OK", "normal", "Normal", "good"])
def test_generic_reads_ok_and_normal_folders_as_normal(tmp_path, normal, caplog):
    """`generic` labelled every folder but `good` anomalous, in train too, without a word."""
    make_mvtec_class(tmp_path, "part", normal=normal, defects={"scratch": ["a"]}, masks={})
    with caplog.at_level(logging.WARNING):
        meta = prepare("generic", tmp_path)
    assert counts(meta, "train", "part") == (3, 0)
    assert counts(meta, "test", "part") == (2, 1)
    assert caplog.text == ""


def test_generic_warns_about_anomalous_train_folders_and_one_label_classes(tmp_path, caplog):
    make_mvtec_class(tmp_path, "part", normal="defect-free", defects={"scratch": ["a"]}, masks={})
    with caplog.at_level(logging.WARNING):
        meta = prepare("generic", tmp_path)
    assert counts(meta, "train", "part") == (0, 3)  # (what the folders say, loudly)
    assert "train/defect-free is not a normal folder (good/normal/ok)" in caplog.text
    assert "part's test images are all anomalous" in caplog.text


def test_generic_split_folders_are_found_without_case(tmp_path):
    make_mvtec_class(tmp_path, "part", defects={"scratch": ["a"]})
    for old, new in (("train", "Train"), ("test", "Test"), ("ground_truth", "Ground_Truth")):
        (tmp_path / "part" / old).rename(tmp_path / "part" / new)
    meta = prepare("generic", tmp_path)
    assert counts(meta, "train", "part") == (3, 0)
    assert counts(meta, "test", "part") == (2, 1)
    assert all(
        "part/Ground_Truth/scratch/" in s.mask_path for s in meta["test"]["part"] if s.anomaly
    )


def test_an_image_level_set_with_one_label_is_reported(tmp_path, caplog):
    base = tmp_path / "brain_tumor_dataset"
    for i in range(3):
        write_image(base / "no" / f"{i}.png")
    (base / "yes").mkdir()
    with caplog.at_level(logging.WARNING):
        meta = prepare("brainmri", tmp_path)
    assert counts(meta, "test", "brain") == (3, 0)
    assert "brainmri: brain's test images are all normal" in caplog.text


def test_visa_paths_outside_the_root_are_refused(tmp_path):
    root = tmp_path / "visa"
    make_visa(root, [("pcb1", "test", "anomaly", "000"), ("pcb1", "test", "normal", "0001")])
    csv_path = root / "split_csv" / "1cls.csv"
    text = csv_path.read_text()
    # Absolute paths inside the root are read as the relative ones.
    csv_path.write_text(text.replace("pcb1/Data", f"{root}/pcb1/Data"))
    meta = prepare("visa", root)
    assert meta["test"]["pcb1"][0].img_path == "pcb1/Data/Images/Anomaly/000.JPG"
    elsewhere = tmp_path / "elsewhere"
    write_image(elsewhere / "000.JPG", fmt="JPEG")
    csv_path.write_text(text.replace("pcb1/Data/Images/Anomaly/000.JPG", f"{elsewhere}/000.JPG"))
    with pytest.raises(DatasetError, match="outside the dataset root"):
        prepare("visa", root)


def test_generic_reads_label_masks_of_converted_dagm_trees(tmp_path):
    make_mvtec_class(tmp_path, "Class1", defects={"defect": ["0002"]}, mask_name="{stem}_label.PNG")
    meta = prepare("generic", tmp_path)
    (bad,) = [s for s in meta["test"]["Class1"] if s.anomaly]
    assert bad.mask_path == "Class1/ground_truth/defect/0002_label.PNG"


def test_dagm_names_the_class_folders_it_skips(tmp_path, caplog):
    write_image(tmp_path / "Class3" / "Test" / "0001.PNG")
    with caplog.at_level(logging.WARNING):
        meta = prepare("dagm", tmp_path)
    assert list(meta["test"]) == ["Class3"]
    assert "not found, skipped: Class1, Class2, Class4," in caplog.text


def test_dagm_leaves_out_classes_without_test_images(tmp_path, caplog):
    write_image(tmp_path / "Class1" / "Test" / "0001.PNG")
    write_image(tmp_path / "Class2" / "Train" / "0001.PNG")
    (tmp_path / "Class2" / "Test").mkdir()
    with caplog.at_level(logging.WARNING):
        meta = prepare("dagm", tmp_path)
    assert list(meta["test"]) == ["Class1"] and "Class2" not in meta["train"]
    assert "Class2: no test images in" in caplog.text and "left out" in caplog.text


def test_links_to_missing_files_are_named_not_dropped_silently(tmp_path, caplog):
    make_mvtec_class(tmp_path, "bottle", defects={"broken": ["000"]})
    good = tmp_path / "bottle" / "test" / "good"
    (good / "gone.png").symlink_to(tmp_path / "unmounted" / "gone.png")
    (good / "there.png").symlink_to(next(good.glob("*.png")))
    with caplog.at_level(logging.WARNING):
        meta = prepare("mvtec", tmp_path)
    paths = {s.img_path for s in meta["test"]["bottle"]}
    assert "bottle/test/good/there.png" in paths and "bottle/test/good/gone.png" not in paths
    assert "1 image link(s) point to no file and are left out: gone.png" in caplog.text


def test_skipping_every_image_for_its_missing_mask_says_so(tmp_path):
    for stem in ("0", "1"):
        write_image(tmp_path / "test-image" / f"{stem}.jpg", fmt="JPEG")
    (tmp_path / "test-mask").mkdir()
    with pytest.raises(DatasetError, match="all 2 images found lack their mask and were skipped"):
        prepare("tn3k", tmp_path, missing_mask="skip")


def test_layouts_registered_under_any_spelling_are_found(monkeypatch):
    from crane.data import layouts

    monkeypatch.setattr(layouts, "_REGISTRY", dict(layouts._REGISTRY))
    for name in ("My_Data", "mvtec_loco"):
        layouts.register_layout(name, title=name, layout="<cls>/*.png")(lambda ctx: {})
    assert get_layout("my-data").name == "my-data" and get_layout("MY_DATA").name == "my-data"
    assert get_layout("mvtec_loco") is get_layout("MVTec-LOCO")
    with pytest.raises(ValueError, match="already registered"):
        layouts.register_layout("MY-data", title="x", layout="x")(lambda ctx: {})


def test_visa_reads_the_classes_a_partial_download_holds(tmp_path, caplog):
    make_visa(tmp_path, [("pcb1", "test", "anomaly", "000"), ("pcb1", "test", "normal", "0001")])
    csv_path = tmp_path / "split_csv" / "1cls.csv"
    rows = "candle,test,normal,candle/Data/Images/Normal/0000.JPG,\n"
    csv_path.write_text(csv_path.read_text() + rows)  # candle/ not downloaded
    with caplog.at_level(logging.WARNING):
        meta = prepare("visa", tmp_path)
    assert list(meta["test"]) == ["pcb1"]
    assert "visa: class folder(s) not found, skipped: candle" in caplog.text
    csv_path.write_text("object,split,label,image,mask\n" + rows)
    with pytest.raises(DatasetError, match="none of the class folders 1cls.csv names"):
        prepare("visa", tmp_path)


def test_a_root_one_level_too_high_gets_a_hint(tmp_path):
    make_mvtec_class(tmp_path / "mvtec_anomaly_detection", "bottle")
    with pytest.raises(DatasetError, match=r"did you mean --root .*mvtec_anomaly_detection\?"):
        prepare("mvtec", tmp_path)
    assert list(prepare("mvtec", tmp_path / "mvtec_anomaly_detection")["test"]) == ["bottle"]
    # no hint where the folder inside would not read either
    make_mvtec_class(tmp_path / "other", "bottle", masks={})
    with pytest.raises(DatasetError) as info:
        prepare("mvtec", tmp_path / "other")
    assert "did you mean" not in str(info.value)


def test_pixel_only_sets_are_not_reported_as_one_label(tmp_path, caplog):
    for i in range(2):
        write_image(tmp_path / "test-image" / f"{i}.jpg", fmt="JPEG")
        write_mask(tmp_path / "test-mask" / f"{i}.jpg")
    with caplog.at_level(logging.WARNING):
        meta = prepare("tn3k", tmp_path)
    assert sum(len(v) for v in meta["test"].values()) == 2
    assert "all anomalous" not in caplog.text


def test_a_class_without_normal_test_images_is_reported(tmp_path, caplog):
    """(a partial download: no test/good/) The pixel-only sets are all-anomalous by design;
    an MVTec class is not."""
    make_mvtec_class(tmp_path, "bottle", test_good=(), defects={"crack": ["000"]})
    with caplog.at_level(logging.WARNING):
        prepare("mvtec", tmp_path)
    assert "bottle's test images are all anomalous" in caplog.text


# --------------------------------------------------------------------------- 28th-session review


def test_one_mask_is_never_given_to_two_images(tmp_path):
    """Masks are found by case-insensitive stem, any extension: images that differ only in
    case or extension would share one mask silently; it is an error naming both."""
    make_mvtec_class(
        tmp_path / "a", "bottle", defects={"broken": ["A", "a"]}, masks={"broken": ["a"]}
    )
    with pytest.raises(DatasetError, match=r"mask '.*a_mask.png' matches images .*A.png.*a.png"):
        prepare("mvtec", tmp_path / "a")
    write_image(tmp_path / "t" / "test-image" / "7.jpg", fmt="JPEG")
    write_image(tmp_path / "t" / "test-image" / "7.png")
    write_mask(tmp_path / "t" / "test-mask" / "7.jpg")
    with pytest.raises(DatasetError, match=r"mask 'test-mask/7.jpg' matches images"):
        prepare("tn3k", tmp_path / "t")


def test_a_defect_folder_in_both_splits_uses_its_masks_once(tmp_path, caplog):
    """train/broken and test/broken share ground_truth/broken: each split's masks are used,
    none is reported as unused, and a mask matching an image of each split is an error."""
    make_mvtec_class(
        tmp_path / "g", "bottle", defects={"broken": ["001"]}, masks={"broken": ["000", "001"]}
    )
    write_image(tmp_path / "g" / "bottle" / "train" / "broken" / "000.png")
    with caplog.at_level(logging.WARNING):
        meta = prepare("generic", tmp_path / "g")
    assert "without a matching image" not in caplog.text
    (train_bad,) = [s for s in meta["train"]["bottle"] if s.anomaly]
    assert train_bad.mask_path == "bottle/ground_truth/broken/000_mask.png"
    assert counts(meta, "test", "bottle") == (2, 1)
    write_image(tmp_path / "g" / "bottle" / "train" / "broken" / "001.png")
    with pytest.raises(DatasetError, match=r"matches images 'bottle/train/broken/001.png' and"):
        prepare("generic", tmp_path / "g")


def test_generic_names_the_folders_it_leaves_out(tmp_path, caplog):
    make_mvtec_class(tmp_path, "bottle", defects={"broken": ["000"]})
    write_image(tmp_path / "screw" / "Testing" / "good" / "000.png")  # a misnamed split
    (tmp_path / "cable").mkdir()
    with caplog.at_level(logging.WARNING):
        meta = prepare("generic", tmp_path)
    assert list(meta["test"]) == ["bottle"]
    assert "folder(s) without a test/ folder left out" in caplog.text
    assert "cable, screw" in caplog.text


@pytest.mark.parametrize(
    "mask", ["pcb1/Data/Images/Anomaly/000.JPG", "candle/Data/Masks/Anomaly/000.png"]
)
def test_visa_refuses_a_mask_that_is_the_image_or_another_class(tmp_path, mask):
    make_visa(tmp_path, [("pcb1", "test", "anomaly", "000"), ("candle", "test", "anomaly", "000")])
    csv_path = tmp_path / "split_csv" / "1cls.csv"
    text = csv_path.read_text().replace(
        "pcb1,test,anomaly,pcb1/Data/Images/Anomaly/000.JPG,pcb1/Data/Masks/Anomaly/000.png",
        f"pcb1,test,anomaly,pcb1/Data/Images/Anomaly/000.JPG,{mask}",
    )
    assert text != csv_path.read_text()
    csv_path.write_text(text)
    with pytest.raises(DatasetError, match="is not a mask of pcb1"):
        prepare("visa", tmp_path)


def test_class_folders_a_known_layout_does_not_read_are_named(tmp_path, caplog):
    """A folder in class form that is not one of MVTec's classes was left out without a word
    (a run trained on 6 of the folder's 12 images)."""
    make_mvtec_class(tmp_path, "bottle", defects={"broken_large": ["000"]})
    make_mvtec_class(tmp_path, "plate", defects={"dent": ["000"]})
    (tmp_path / "notes").mkdir()  # (no test/ inside: not named)
    with caplog.at_level(logging.WARNING):
        meta = prepare("mvtec", tmp_path)
    assert list(meta["test"]) == ["bottle"]
    assert "folder(s) plate look like classes but are not mvtec classes" in caplog.text
    assert "--dataset generic" in caplog.text and "notes" not in caplog.text
    assert list(prepare("generic", tmp_path)["test"]) == ["bottle", "plate"]


def test_a_folder_that_cannot_be_searched_does_not_stop_the_scan(tmp_path, monkeypatch):
    """A dataset volume's lost+found (0700, root's): is_dir on a path inside it raised
    PermissionError through the scan."""
    make_mvtec_class(tmp_path, "bottle", defects={"broken_large": ["000"]})
    (tmp_path / "lost+found").mkdir()
    deny(monkeypatch, "is_dir", lambda p: "lost+found" in p.parts and p.name != "lost+found")
    deny(monkeypatch, "iterdir", lambda p: p.name == "lost+found")
    assert list(prepare("mvtec", tmp_path)["test"]) == ["bottle"]
    assert list(prepare("generic", tmp_path)["test"]) == ["bottle"]
