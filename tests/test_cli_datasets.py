"""``crane datasets ...`` through crane.cli.main and one real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from data_fixtures import REPO_ROOT, make_mvtec_class

from crane.cli import main
from crane.data.layouts import list_layouts


def test_list_shows_every_dataset_and_layout(capsys):
    assert main(["datasets", "list"]) == 0
    out = capsys.readouterr().out
    for layout in list_layouts():
        assert f"{layout.name}: " in out
        assert layout.layout.splitlines()[0].strip() in out
    assert "split_csv/1cls.csv" in out and "ground_truth" in out


def test_prepare_check_and_overwrite(tmp_path, capsys):
    make_mvtec_class(tmp_path, "bottle", defects={"crack": ["000", "001"]})
    assert main(["datasets", "prepare", "mvtec", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "test   bottle" in out and "wrote" in out
    lines = {tuple(line.split()[:2]): line.split()[2:] for line in out.splitlines()}
    assert lines[("test", "bottle")] == ["2", "2", "2"]
    assert lines[("train", "bottle")] == ["3", "0", "0"]
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert len(meta["test"]["bottle"]) == 4

    assert main(["datasets", "prepare", "mvtec", "--root", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["datasets", "prepare", "mvtec", "--root", str(tmp_path), "--overwrite"]) == 0
    capsys.readouterr()

    assert main(["datasets", "check", "--root", str(tmp_path)]) == 0
    assert "OK" in capsys.readouterr().out
    (tmp_path / "bottle/test/crack/001.png").unlink()
    assert main(["datasets", "check", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("crane: error:") and "bottle/test/crack/001.png" in err
    assert "Traceback" not in err


def test_prepare_missing_mask_flag(tmp_path, capsys):
    make_mvtec_class(
        tmp_path, "bottle", defects={"crack": ["000", "001"]}, masks={"crack": ["000"]}
    )
    assert main(["datasets", "prepare", "mvtec", "--root", str(tmp_path)]) == 2
    assert "bottle/test/crack/001.png" in capsys.readouterr().err
    assert not (tmp_path / "meta.json").exists()
    args = ["datasets", "prepare", "mvtec", "--root", str(tmp_path), "--missing-mask", "skip"]
    assert main(args) == 0
    assert len(json.loads((tmp_path / "meta.json").read_text())["test"]["bottle"]) == 3


def test_user_errors_exit_2_without_traceback(tmp_path, capsys):
    assert main(["datasets", "prepare", "nosuchset", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'nosuchset'" in err and "mvtec" in err
    assert main(["datasets", "prepare", "mvtec", "--root", str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["datasets", "check", "--root", str(tmp_path)]) == 2
    assert "no meta.json" in capsys.readouterr().err
    (tmp_path / "meta.json").write_text("{}")  # the name is still what is wrong
    assert main(["datasets", "prepare", "nosuchset", "--root", str(tmp_path)]) == 2
    assert "unknown dataset 'nosuchset'" in capsys.readouterr().err


def test_synth_then_check(tmp_path, capsys):
    out = tmp_path / "syn"
    args = [
        "datasets",
        "synth",
        "--out",
        str(out),
        "--seed",
        "3",
        "--classes",
        "tile,plate",
        "--n-train",
        "1",
        "--n-test-good",
        "1",
        "--n-test-bad",
        "4",
        "--size",
        "48",
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "test   plate" in text
    meta = json.loads((out / "meta.json").read_text())
    assert list(meta["test"]) == ["tile", "plate"]
    assert sum(s["anomaly"] for s in meta["test"]["tile"]) == 4
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert main(["datasets", "check", "--root", str(out)]) == 0


def test_module_entry_point_subprocess():
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "crane.cli", "datasets", "list"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("mvtec", "visa", "headct", "cvc-clinicdb", "generic"):
        assert f"{name}: " in proc.stdout


def test_a_closed_pipe_stops_the_listing_quietly():
    """`crane datasets list | head -1`: the reader has gone; no error message, no traceback
    (also when the output only leaves at the final flush)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "crane.cli", "datasets", "list"],
            stdout=write,
            stderr=subprocess.PIPE,
            env=env,
            timeout=120,
            check=False,
        )
    finally:
        os.close(write)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and err == "", err


def test_cli_data_path_does_not_import_torch():
    # `crane datasets ...` must stay fast: the torch-dependent names are imported lazily.
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    code = "import sys, crane.data, crane.cli.datasets; print('torch' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_check_deep_decodes_every_file(tmp_path, capsys):
    """`check` only sees that files exist; `--deep` decodes them as a run would and lists
    what would stop it midway: corrupt/truncated images, masks of another size."""
    from PIL import Image

    make_mvtec_class(tmp_path, "bottle", defects={"crack": ["000", "001"]})
    assert main(["datasets", "prepare", "mvtec", "--root", str(tmp_path)]) == 0
    assert main(["datasets", "check", "--root", str(tmp_path), "--deep", "--no-progress"]) == 0
    assert "meta.json: OK (every file decoded)" in capsys.readouterr().out
    good = tmp_path / "bottle" / "test" / "good" / "001.png"
    good.write_bytes(good.read_bytes()[:60])  # truncated
    mask = tmp_path / "bottle" / "ground_truth" / "crack" / "000_mask.png"
    Image.new("L", (7, 5)).save(mask)
    assert main(["datasets", "check", "--root", str(tmp_path)]) == 0  # (files exist)
    capsys.readouterr()
    for threads in ("1", "3"):
        args = ["datasets", "check", "--root", str(tmp_path), "--deep", "--threads", threads]
        assert main([*args, "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert "files that cannot be used: 2 problems" in err
        assert f"cannot read image {good}" in err
        assert f"mask {mask} is 7x5 but its image" in err


def test_check_refuses_an_index_of_no_image(tmp_path, capsys):
    """An empty index said OK (exit 0), and evaluate and train refused it afterwards."""
    (tmp_path / "meta.json").write_text(json.dumps({"train": {}, "test": {}}))
    assert main(["datasets", "check", "--root", str(tmp_path)]) == 1
    assert "indexes no image" in capsys.readouterr().err
