import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from instructx2x.cli import main
from instructx2x.schedulers import FEW_STEP_SOLVER_STEPS


def args(png, out, *extra):
    return [
        "edit",
        str(png),
        "-i",
        "Add the finding of right pleural effusion",
        "-o",
        str(out),
        "--model",
        "untrained-tiny",
        "--steps",
        "2",
        "--resolution",
        "64",
        "--progress",
        "none",
        *extra,
    ]


def test_edit_writes_all_files(png, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(args(png, out)) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "edit_mask.png",
        "edited.png",
        "figure.png",
        "guidance.png",
        "guidance_overlay.png",
        "manifest.json",
    ]
    for name in ("edited.png", "figure.png", "guidance_overlay.png"):  # every picture says what it is
        assert "SYNTHETIC" in Image.open(out / name).info["Description"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["trained"] is False and "UNTRAINED" in manifest["notice"]
    assert manifest["prior"]["laterality"] == "right"
    assert Image.open(out / "edited.png").size == (60, 72)
    assert Image.open(out / "guidance_overlay.png").mode == "RGB"
    assert "UNTRAINED MODEL" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_reference_mask_is_outlined_on_the_figure_and_checked_first(png, tmp_path, capsys):
    reference = np.zeros((72, 60), bool)
    reference[20:40, 10:25] = True
    np.save(tmp_path / "lesion.npy", reference)
    out = tmp_path / "out"
    assert main(args(png, out, "--reference-mask", str(tmp_path / "lesion.npy"))) == 0
    figure = np.asarray(Image.open(out / "figure.png"))
    green = (figure[..., 1] > 200) & (figure[..., 0] < 80) & (figure[..., 2] < 120)
    assert green[:, figure.shape[1] // 3 : 2 * figure.shape[1] // 3].any()  # on the edit panel
    assert not green[:, : figure.shape[1] // 3].any()
    np.save(tmp_path / "small.npy", np.zeros((10, 10), bool))
    assert main(args(png, tmp_path / "bad", "--reference-mask", str(tmp_path / "small.npy"))) == 2
    assert "small.npy is 10x10" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_verify_checks_the_edit_with_the_classifiers_the_model_names(tmp_path, capsys):
    from pathlib import Path

    sample = Path(__file__).resolve().parents[2] / "Resources" / "Samples" / "phantom_pa.dcm"
    out = tmp_path / "verified"
    assert (
        main(
            [
                "edit",
                str(sample),
                "-i",
                "Add the finding of moderate left pleural effusion",
                "--model",
                "demo",
                "--verify",
                "-o",
                str(out),
                "--progress",
                "none",
            ]
        )
        == 0
    )
    done = json.loads(capsys.readouterr().out)
    report = json.loads((out / "verification.json").read_text())
    assert done["verification"] == report and "verification.txt" in done["files"]
    assert report["classifiers"]["name"] == "cohort-v2" and report["instructed"] == ["Effusion"]
    assert report["classifiers"]["chosen_because"] == "the input is a synthetic-cohort phantom"
    assert report["max_change_outside_mask"] == 0 and set(report["findings_after"]) == set(
        report["findings_before"]
    )
    text = (out / "verification.txt").read_text()
    assert text.startswith("Verification ") and "* Effusion" in text


def test_verify_with_missing_classifiers_fails_before_the_edit(png, tmp_path, capsys):
    try:
        import torchxrayvision  # noqa: F401

        pytest.skip("torchxrayvision is installed here")
    except (ImportError, RuntimeError):
        pass
    assert main(args(png, tmp_path / "out", "--verify", "torchxrayvision")) == 3
    assert "eval extra" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(["preview", *args(png, tmp_path / "p", "--verify")[1:]]) == 2
    assert "verification needs the edit command" in capsys.readouterr().err


def test_preview_writes_maps_only(png, tmp_path):
    out = tmp_path / "preview"
    assert main(["preview", *args(png, out)[1:]]) == 0
    assert not (out / "edited.png").exists() and (out / "edit_mask.png").exists()


def test_existing_output_is_never_touched(png, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(args(png, out)) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("under", ["afile/out", "afile/sub/out"])
@pytest.mark.parametrize("jobs", [False, True])
def test_an_output_under_a_file_is_an_input_error_before_the_model_loads(png, tmp_path, capsys, under, jobs):
    (tmp_path / "afile").write_text("mine")
    out = tmp_path / under
    command = args(png, out, "--model", str(tmp_path / "no-such-model"))  # a model error would be 3
    if jobs:
        command = ["edit", "--jobs", str(tmp_path / "jobs.csv"), *command[4:]]
    assert main(command) == 2
    assert "cannot make the output folder out: afile is not a folder." in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", png.name]
    assert (tmp_path / "afile").read_text() == "mine"


def test_the_atomic_folder_refuses_a_file_on_its_way(tmp_path):
    from instructx2x.errors import InputError
    from instructx2x.outputs import atomic_output_dir

    (tmp_path / "afile").write_text("mine")
    with pytest.raises(InputError, match="afile is not a folder"):
        with atomic_output_dir(tmp_path / "afile" / "out"):
            pytest.fail("the block must not run")
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


@pytest.mark.parametrize("model", ["demo", "untrained-tiny"])
def test_an_edit_prints_no_library_notice_that_asks_nothing(tmp_path, model):
    """diffusers' 'modules ... should be kept in float32: [] ... Casting directly with `to()`'
    (logged on every dtype cast) must not reach the user of `instructx2x edit`."""
    from pathlib import Path

    sample = Path(__file__).resolve().parents[2] / "Resources" / "Samples" / "phantom_pa.dcm"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "instructx2x.cli",
            "edit",
            str(sample),
            "-i",
            "Add the finding of moderate left pleural effusion",
            "--model",
            model,
            "-o",
            str(tmp_path / "out"),
            "--progress",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr
    assert "float32" not in completed.stderr and "Casting directly" not in completed.stderr, completed.stderr


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--tau", "1.5"], "tau"),
        (["--steps", "0"], "num_inference_steps"),
        (["--guidance-scale", "-2"], "guidance_scale"),
        (["--mask", "missing.png"], "not found"),
        (["--dicomweb-modality", "CR"], "--dicomweb-modality needs --dicomweb URL"),
        (["--dicomweb-store"], "--dicomweb-store needs --dicomweb URL"),
    ],
)
def test_bad_input_writes_nothing(png, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main(args(png, out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [png]


def test_unreadable_image_and_missing_model(png, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert main(args(bad, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "bad.png: cannot decode" in err and str(tmp_path) not in err  # no folder names
    # the input is checked before the model is looked for
    assert (
        main(
            [
                "edit",
                str(bad),
                "-i",
                "Add edema",
                "-o",
                str(tmp_path / "o"),
                "--model",
                str(tmp_path / "no-model"),
            ]
        )
        == 2
    )
    assert (
        main(
            [
                "edit",
                str(png),
                "-i",
                "Add edema",
                "-o",
                str(tmp_path / "o"),
                "--model",
                str(tmp_path / "no-model"),
            ]
        )
        == 3
    )
    assert "model not found: no-model" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.png", "chest.png"]


def test_unknown_scheduler_is_rejected(png, tmp_path):
    with pytest.raises(SystemExit):
        main(args(png, tmp_path / "out", "--scheduler", "magic"))


def test_mask_of_wrong_size(png, tmp_path, capsys):
    Image.fromarray(np.ones((10, 10), np.uint8) * 255).save(tmp_path / "mask.png")
    assert main(args(png, tmp_path / "out", "--mask", str(tmp_path / "mask.png"))) == 2
    assert "but the image is 72x60" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_jsonl_progress_protocol(png, tmp_path, capsys):
    out = tmp_path / "out"
    argv = args(png, out)
    argv[argv.index("--progress") + 1] = "jsonl"
    assert main(argv) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in events] == [
        "loading",
        "started",
        "progress",
        "progress",
        "decode",
        "export",
        "done",
    ]
    assert {k: events[3][k] for k in ("step", "total")} == {"step": 2, "total": 2}
    assert events[2]["eta_s"] >= 0 and events[3]["eta_s"] == 0


def test_default_sampling_on_cpu_is_the_fast_path(png, tmp_path, capsys):
    out = tmp_path / "out"
    argv = args(png, out, "--device", "cpu")
    del argv[argv.index("--steps") : argv.index("--steps") + 2]
    argv[argv.index("--progress") + 1] = "jsonl"
    assert main(argv) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    n = FEW_STEP_SOLVER_STEPS
    assert events[1]["total"] == n and events[-4]["step"] == n
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["scheduler"]["class"] == "DPMSolverMultistepScheduler"
    assert manifest["parameters"]["num_inference_steps"] == n
    # the tiny model is far below the size where bf16 pays on a CPU
    assert (
        manifest["dtype"] == "float32"
        and "M parameters" in manifest["precision"]["reason"]
        or "no bf16 instructions" in manifest["precision"]["reason"]
    )


def test_info(capsys):
    assert main(["info", "--model", "untrained-tiny", "--device", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"]["trained"] is False and info["device"] == "cpu"
    assert info["priors"]["version"] == "approx-v1"
    from instructx2x.serve import PROTOCOL_VERSION

    assert info["worker_protocol"] == PROTOCOL_VERSION == 2  # what a panel checks before sending files


def test_info_and_edit_take_the_sampling_defaults_from_the_model_card(capsys, png, tmp_path):
    from instructx2x.loading import save_model
    from instructx2x.untrained import build_untrained_pipeline

    card = {
        "name": "carded",
        "trained": False,
        "few_step_solver_steps": 2,
        "guidance_scale": 3.0,
        "image_guidance_scale": 1.25,
    }
    model = save_model(build_untrained_pipeline(seed=3), tmp_path / "carded", card)
    assert main(["info", "--model", str(model), "--device", "cpu", "--scheduler", "dpm++"]) == 0
    defaults = json.loads(capsys.readouterr().out)["defaults"]
    assert (
        defaults["num_inference_steps"],
        defaults["guidance_scale"],
        defaults["image_guidance_scale"],
    ) == (2, 3.0, 1.25)
    edit = [
        "edit",
        str(png),
        "-i",
        "Add the finding of edema",
        "--model",
        str(model),
        "--device",
        "cpu",
        "--scheduler",
        "dpm++",
        "--resolution",
        "64",
        "--progress",
        "none",
    ]
    assert main([*edit, "-o", str(tmp_path / "a")]) == 0
    assert main([*edit, "-o", str(tmp_path / "b"), "--image-guidance-scale", "2"]) == 0
    ran = [json.loads((tmp_path / name / "manifest.json").read_text())["parameters"] for name in "ab"]
    assert [(p["guidance_scale"], p["image_guidance_scale"]) for p in ran] == [(3.0, 1.25), (3.0, 2.0)]


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_stops_cleanly_and_writes_nothing(png, tmp_path, stop):
    out = tmp_path / "out"
    argv = args(png, out, "--steps", "400")
    argv[argv.index("--progress") + 1] = "jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "instructx2x.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    for line in process.stdout:
        if json.loads(line)["event"] == "progress":
            break
    process.send_signal(stop)
    remaining, _ = process.communicate(timeout=60)
    assert process.returncode == 130
    assert '"cancelled"' in remaining
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chest.png"]


def _dicom_folder(tmp_path, count):
    from dicom_factory import make_radiograph, write

    folder = tmp_path / "study"
    folder.mkdir()
    for index in range(count):
        write(make_radiograph(rows=64 + 8 * index), folder / f"img{index}.dcm")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_dicom_folder_gives_one_series_per_image(tmp_path, capsys):
    folder = _dicom_folder(tmp_path, 2)
    out = tmp_path / "out"
    assert main(args(folder, out, "--feather", "2")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert sorted(summary["files"]) == sorted(
        f"image-00{i}/{name}"
        for i in (1, 2)
        for name in (
            "counterfactual.dcm",
            "guidance_overlay.dcm",
            "edit_region_seg.dcm",
            "provenance.json",
            "edited.png",
            "guidance.png",
            "guidance_overlay.png",
            "edit_mask.png",
            "manifest.json",
            "figure.png",
        )
    )
    import pydicom
    from dicom_factory import dciodvfy_errors

    assert pydicom.dcmread(out / "image-002" / "counterfactual.dcm").Rows == 72
    for name in summary["files"]:
        if name.endswith(".dcm"):
            assert dciodvfy_errors(out / name) == [], name


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--push-cstore", "nohostport"], "HOST:PORT:AET"),
        (["--push-stow", "ftp://pacs"], "http"),
        (["--feather", "-1"], "feather"),
        (["--voi", "7"], "voi index 7"),
    ],
)
def test_dicom_option_errors_write_nothing(tmp_path, capsys, extra, message):
    folder = _dicom_folder(tmp_path, 1)
    out = tmp_path / "out"
    assert main(args(folder / "img0.dcm", out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_one_bad_file_in_a_folder_stops_everything(tmp_path, capsys):
    folder = _dicom_folder(tmp_path, 2)
    (folder / "img1.dcm").write_bytes((folder / "img1.dcm").read_bytes()[:-500])
    assert main(args(folder, tmp_path / "out")) == 2
    assert "img1.dcm" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_push_needs_dicom_input(png, tmp_path, capsys):
    assert main(args(png, tmp_path / "out", "--push-cstore", "127.0.0.1:104:PACS")) == 2
    assert "DICOM input" in capsys.readouterr().err


def test_decompression_bomb_is_refused_unread(tmp_path, capsys):
    """A PNG whose header declares 70000x70000 pixels: a specific error, no traceback."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 70000, 70000, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 100))
        + chunk(b"IEND", b"")
    )
    assert main(args(bomb, tmp_path / "out")) == 2
    assert "declares more than" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.png"]


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--guidance-scale", "nan"], "guidance_scale must be a finite number"),
        (["--image-guidance-scale", "inf"], "image_guidance_scale must be a finite number"),
        (["--resolution", "65536"], "resolution must be a multiple of 8 in [64, 2048]"),
        (["--relevance-draws", "0"], "relevance_draws must be an integer in [1, 16], got 0"),
        (["--device", "tpu:7"], "device"),
        (["--mode", "relevance", "--mask", "MASK"], "does not use"),
        (["--priors", "no-such-priors"], "no priors.json in prior directory no-such-priors"),
    ],
)
def test_hostile_settings_fail_before_the_model_with_exit_2(png, tmp_path, capsys, extra, message):
    Image.fromarray(np.full((72, 60), 255, np.uint8)).save(tmp_path / "mask.png")
    extra = [str(tmp_path / "mask.png") if e == "MASK" else e for e in extra]
    assert main(args(png, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chest.png", "mask.png"]


def test_keep_mask_over_everything_is_one_rule_before_the_model(png, tmp_path, capsys):
    keep = tmp_path / "keep.npy"
    np.save(keep, np.ones((72, 60), bool))
    assert main(args(png, tmp_path / "out", "--keep-mask", str(keep))) == 2
    assert "keep mask covers the whole image" in capsys.readouterr().err
    folder = _dicom_folder(tmp_path, 1)
    assert main(args(folder / "img0.dcm", tmp_path / "sub" / "out", "--keep-mask", str(keep))) == 2
    assert not (tmp_path / "sub").exists()


def test_output_path_is_normalised_and_gets_the_umask(png, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old = os.umask(0o022)
    try:
        assert main(args(png, "nonexist/../out")) == 0
    finally:
        os.umask(old)
    assert not (tmp_path / "nonexist").exists()
    assert (tmp_path / "out" / "edited.png").is_file()
    assert oct((tmp_path / "out").stat().st_mode & 0o777) == oct(0o755)


def test_read_only_output_file_system_gives_exit_4(png, tmp_path, capsys, monkeypatch):
    """As the kernel answers on a read-only mount (root ignores permission bits, so the
    refusal is injected where the staging folder is made)."""
    import errno
    import tempfile

    def read_only(*_args, **_kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    assert main(args(png, tmp_path / "out")) == 4
    assert "cannot write the output folder out: Read-only file system" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chest.png"]


def test_disk_error_while_writing_gives_exit_4_and_leaves_nothing(png, tmp_path, capsys, monkeypatch):
    import errno

    from instructx2x import outputs

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "_save_gray", full)
    assert main(args(png, tmp_path / "out", "--progress", "jsonl")) == 4
    captured = capsys.readouterr()
    assert "No space left on device" in captured.err
    last = json.loads(captured.out.splitlines()[-1])
    assert last["event"] == "error" and last["exit_code"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chest.png"]


def test_manifest_is_strict_json(png, tmp_path):
    out = tmp_path / "out"
    argv = args(png, out, "--scheduler", "dpm++")
    assert main(argv) == 0
    text = (out / "manifest.json").read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON token {name}"))
    assert "Infinity" not in text and "NaN" not in text


def test_patient_names_never_reach_the_output(tmp_path, capfd):
    """Single-part names and names with line breaks trip highdicom's warnings (SC and SEG)."""
    from dicom_factory import make_radiograph, write

    for index, name in enumerate(["ANONYMOUSPATIENTX", "Doe^Jane\nSecondLine"]):
        ds = make_radiograph()
        ds.PatientName = name
        ds.ReferringPhysicianName = "DRWHOEVERY"
        path = write(ds, tmp_path / f"named{index}.dcm")
        main(args(path, tmp_path / f"out{index}", "--progress", "jsonl"))
    captured = capfd.readouterr()
    for secret in ("ANONYMOUSPATIENTX", "Jane", "SecondLine", "DRWHOEVERY"):
        assert secret not in captured.out + captured.err


def test_multi_valued_referring_physician_is_refused_before_the_model(tmp_path, capsys):
    from dicom_factory import make_radiograph, write

    ds = make_radiograph()
    ds.ReferringPhysicianName = ["One^Doctor", "Two^Doctor"]
    path = write(ds, tmp_path / "two.dcm")
    assert main(args(path, tmp_path / "out", "--model", str(tmp_path / "no-model"))) == 2
    err = capsys.readouterr().err
    assert "two.dcm: ReferringPhysicianName holds 2 values" in err and "Doctor" not in err


def test_ctrl_c_during_imports_ends_cleanly(png, tmp_path):
    """An interrupt while torch and diffusers load gives the cancelled message, no traceback."""
    code = (
        "import signal, threading, os\n"
        "from instructx2x.cli import main\n"  # light (no torch): main() imports torch and diffusers
        "threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()\n"
        f"raise SystemExit(main({args(png, tmp_path / 'out', '--steps', '400')!r}))\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 130, completed.stderr
    assert "Traceback" not in completed.stderr and "cancelled" in completed.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chest.png"]


def test_import_is_light():
    """The parser, vocabulary, job schema, errors and provenance reader load without torch."""
    code = (
        "import time, sys\nstart = time.perf_counter()\n"
        "import instructx2x\nfrom instructx2x import parse_instruction, EditJob, read_provenance, "
        "InstructX2XError\nfrom instructx2x.instructions import FINDINGS\n"
        "from instructx2x.priors import PUBLISHED_MASK_EXTENTS\n"
        "print(time.perf_counter() - start, 'torch' in sys.modules, 'diffusers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    seconds, torch_loaded, diffusers_loaded = out.split()
    assert torch_loaded == diffusers_loaded == "False"
    assert float(seconds) < 1.0


def test_a_missing_input_is_refused_before_torch_loads(tmp_path):
    """With the demo model by default, a mistyped input path is said at once: nothing of torch,
    diffusers or the model is loaded first."""
    code = (
        "import sys\nfrom instructx2x.cli import main\n"
        f"code = main(['edit', {str(tmp_path / 'typo.png')!r}, '-i', 'Add the finding of left pleural effusion', "
        f"'-o', {str(tmp_path / 'out')!r}])\n"
        "print(code, 'torch' in sys.modules, 'diffusers' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["2", "False", "False"]
    assert "input image not found: typo.png" in result.stderr and not list(tmp_path.iterdir())


def test_jobs_file_runs_many_edits_in_one_process(png, tmp_path, capsys):
    """PNG and DICOM rows alike, each with its own instruction, mask and seed."""
    _dicom_folder(tmp_path, 1)
    mask = tmp_path / "mask.npy"
    region = np.zeros((72, 60), bool)
    region[10:60, 5:50] = True
    np.save(mask, region)
    jobs = tmp_path / "jobs.csv"
    jobs.write_text(
        "image,instruction,mask,seed\n"
        "chest.png,Add the finding of right pleural effusion,,3\n"
        "chest.png,Remove the finding of edema,mask.npy,\n"
        "study/img0.dcm,Add the finding of pneumothorax,,5\n"
    )
    out = tmp_path / "batch"
    argv = [
        "edit",
        "--jobs",
        str(jobs),
        "-o",
        str(out),
        "--model",
        "untrained-tiny",
        "--steps",
        "2",
        "--resolution",
        "64",
        "--progress",
        "none",
    ]
    assert main(argv) == 0
    import csv

    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["output"] for r in rows] == ["0001-chest", "0002-chest", "0003-img0"]
    assert [r["seed"] for r in rows] == ["3", "0", "5"]
    assert (out / "0003-img0" / "counterfactual.dcm").is_file()
    second = np.asarray(Image.open(out / "0002-chest" / "edit_mask.png")) > 0
    assert not second[~region].any()
    # a row alone gives the same edit as in the batch (the model stays warm, nothing leaks)
    assert main(args(png, tmp_path / "alone", "--seed", "3")) == 0
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "alone" / "edited.png")),
        np.asarray(Image.open(out / "0001-chest" / "edited.png")),
    )
    # consecutive rows without a mask share a pipeline call with --batch-size 2; the same
    # edits up to the last bits of batched arithmetic
    lines = jobs.read_text().splitlines()
    jobs.write_text("\n".join([lines[0], lines[1], lines[3], lines[2]]) + "\n")
    batched = tmp_path / "batched"
    assert main([*argv[:4], str(batched), *argv[5:], "--batch-size", "2"]) == 0
    rows = list(csv.DictReader(open(batched / "results.csv")))
    assert [r["batch"] for r in rows] == ["2", "2", "1"]
    a = np.asarray(Image.open(out / "0001-chest" / "edited.png")).astype(int)
    b = np.asarray(Image.open(batched / "0001-chest" / "edited.png")).astype(int)
    assert np.abs(a - b).max() <= 1
    import pydicom

    assert np.array_equal(
        pydicom.dcmread(out / "0003-img0" / "edit_region_seg.dcm").pixel_array,
        pydicom.dcmread(batched / "0002-img0" / "edit_region_seg.dcm").pixel_array,
    )


def test_a_jobs_run_needs_a_jobs_file_or_a_cohort(tmp_path):
    from instructx2x import EditParameters
    from instructx2x.errors import ParameterError
    from instructx2x.job_sources import prepare_jobs_run
    from instructx2x.jobs import EditJob

    template = EditJob("edit", tmp_path / "in.png", tmp_path / "out", EditParameters("Add edema"))
    with pytest.raises(ParameterError, match="give a jobs file or a DICOMweb cohort"):
        prepare_jobs_run(template, batch_size=1)
    assert not (tmp_path / "out").exists()


def test_a_bad_row_stops_the_jobs_file_before_any_work(png, tmp_path, capsys):
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("image,instruction\nchest.png,Add edema\nmissing.png,Add edema\n")
    assert (
        main(
            [
                "edit",
                "--jobs",
                str(jobs),
                "-o",
                str(tmp_path / "batch"),
                "--model",
                str(tmp_path / "no-model"),
            ]
        )
        == 2
    )
    assert "job 2: input image not found: missing.png" in capsys.readouterr().err
    jobs.write_text("image,instruction,colour\nchest.png,Add edema,red\n")
    assert (
        main(["edit", "--jobs", str(jobs), "-o", str(tmp_path / "batch"), "--model", "untrained-tiny"]) == 2
    )
    assert "unknown ['colour']" in capsys.readouterr().err
    jobs.write_text("image,instruction\nchest.png,Add edema\n")
    assert (
        main(
            [
                "edit",
                "--jobs",
                str(jobs),
                "-o",
                str(tmp_path / "batch"),
                "--model",
                "untrained-tiny",
                "--reference-mask",
                str(png),
            ]
        )
        == 2
    )
    assert "--reference-mask outlines one image's lesion" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chest.png", "jobs.csv"]


def test_stale_staging_of_a_killed_writer_is_removed(png, tmp_path):
    """A writer killed with SIGKILL mid-export leaves .<name>.<pid>.* behind; the next writer
    of that output removes it (a live process's staging is left alone)."""
    from instructx2x.staging import remove_stale_staging

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.{dead.pid}.abc123"
    stale.mkdir()
    (stale / "counterfactual.dcm").write_bytes(b"partial")
    live = tmp_path / f".out.{os.getpid()}.xyz"
    live.mkdir()
    other = tmp_path / ".outside.1.abc"
    other.mkdir()
    assert main(args(png, tmp_path / "out")) == 0
    assert not stale.exists() and live.exists() and other.exists()
    assert remove_stale_staging(tmp_path / "out") == []


def test_signed_dicom_is_refused_before_the_model(tmp_path, capsys):
    from dicom_factory import make_radiograph, write

    path = write(make_radiograph(signed=True, window=(0.0, 4096.0)), tmp_path / "signed.dcm")
    assert main(args(path, tmp_path / "out", "--model", str(tmp_path / "no-model"))) == 2
    assert "signed.dcm: signed stored values cannot be written" in capsys.readouterr().err
    # a preview writes PNGs, not DICOM: it may go ahead
    assert main(["preview", *args(path, tmp_path / "preview")[1:]]) == 0


def test_the_clis_sampler_choices_are_the_schedulers_that_exist():
    from instructx2x.parameters import SCHEDULER_NAMES
    from instructx2x.schedulers import SCHEDULERS

    assert tuple(SCHEDULERS) == SCHEDULER_NAMES


def test_gpu_out_of_memory_gives_exit_4_with_what_to_do(png, tmp_path, capsys, monkeypatch):
    import torch

    from instructx2x.pipeline import InstructX2XPipeline

    def out_of_memory(*_args, **_kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0)")

    monkeypatch.setattr(InstructX2XPipeline, "__call__", out_of_memory)
    assert main(args(png, tmp_path / "out", "--progress", "jsonl")) == 4
    captured = capsys.readouterr()
    assert "error: out of memory on the device (CUDA out of memory." in captured.err
    assert "smaller resolution" in captured.err and "CPU" in captured.err
    last = json.loads(captured.out.splitlines()[-1])
    assert (last["event"], last["kind"], last["exit_code"]) == ("error", "ResourceError", 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chest.png"]


def _series_args(source, out, *extra):
    return [
        "edit",
        str(source),
        "-o",
        str(out),
        "--model",
        "untrained-tiny",
        "--steps",
        "2",
        "--resolution",
        "64",
        "--tau",
        "0.2",
        "--seed",
        "4",
        "--progress",
        "none",
        *extra,
    ]


def test_a_series_of_levels_writes_one_dicom_series_in_order(tmp_path, capsys):
    import pydicom
    from dicom_factory import dciodvfy_errors, make_radiograph, write

    from instructx2x.provenance import read_provenance

    source = write(make_radiograph(kind="DX", rows=96, columns=80), tmp_path / "film.dcm")
    out = tmp_path / "out"
    template = [
        "-i",
        "Add the finding of {level} left pneumothorax",
        "--series",
        "small",
        "moderate",
        "large",
    ]
    assert main(_series_args(source, out, *template)) == 0
    summary = json.loads(capsys.readouterr().out)
    steps = [f"step-0{n}" for n in (1, 2, 3)]
    assert sorted(summary["files"]) == sorted(
        [f"{s}.dcm" for s in steps]
        + [f"{s}.png" for s in steps]
        + ["guidance_overlay.dcm", "edit_region_seg.dcm", "provenance.json"]
        + ["guidance.png", "guidance_overlay.png", "edit_mask.png", "strip.png", "manifest.json"]
    )
    assert summary["series"]["levels"] == ["small", "moderate", "large"]
    assert summary["series"]["step_files"][1] == ["step-02.dcm", "step-02.png"]
    datasets = [pydicom.dcmread(out / f"{s}.dcm") for s in steps]
    assert [ds.InstanceNumber for ds in datasets] == [1, 2, 3]
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    for ds, level in zip(datasets, ("small", "moderate", "large")):
        instruction = f"Add the finding of {level} left pneumothorax"
        assert f"Instruction: {instruction}." in ds.ImageComments and ds.ConversionType == "SYN"
        assert read_provenance(ds)["parameters"]["instruction"] == instruction
        assert read_provenance(ds)["parameters"]["seed"] == 4
    for name in summary["files"]:
        if name.endswith(".dcm"):
            assert dciodvfy_errors(out / name) == [], name
    manifest = json.loads(
        (out / "manifest.json").read_text(),
        parse_constant=lambda token: pytest.fail(f"not strict JSON: {token}"),
    )
    assert manifest["kind"] == "edit_series" and manifest["edit_region"]["shared"] is True
    assert manifest["edit_region"]["from_instruction"] == "Add the finding of large left pneumothorax"
    assert [step["series"]["step"] for step in manifest["steps"]] == [1, 2, 3]
    assert [step["files"] for step in manifest["steps"]] == [[f"{s}.png"] for s in steps]
    assert "SYNTHETIC" in Image.open(out / "strip.png").info["Description"]
    assert Image.open(out / "strip.png").size[0] > 3 * Image.open(out / "strip.png").size[1]  # input + 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_a_series_of_instructions_on_a_png_shares_the_edit_mask(png, tmp_path, capsys):
    out = tmp_path / "out"
    steps = [
        "Change the level of right pleural effusion from small to moderate",
        "Change the level of right pleural effusion from small to large",
    ]
    assert main(_series_args(png, out, "--series", *steps)) == 0
    mask = np.asarray(Image.open(out / "edit_mask.png")) > 0
    original = np.asarray(Image.open(png))
    assert mask.any() and not mask.all()
    edits = [np.asarray(Image.open(out / f"step-0{n}.png")) for n in (1, 2)]
    for edited in edits:
        assert np.array_equal(edited[~mask], original[~mask])  # one region: untouched outside it
    assert not np.array_equal(edits[0], edits[1])
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["parameters"]["instruction"] for s in manifest["steps"]] == steps
    assert manifest["series"]["region_instruction"] == steps[1]
    assert {s["edit_fraction"] for s in manifest["steps"]} == {manifest["edit_region"]["edit_fraction"]}


@pytest.mark.parametrize(
    "extra,message",
    [
        (["-i", "Add the finding of {level} edema", "--series", "mild"], "at least two steps, got 1"),
        (
            ["-i", "Add the finding of {level} edema", "--series", "mild", "severe", "moderate"],
            "series levels out of order: mild, severe, moderate",
        ),
        (["--series", "mild", "severe"], "series step 1 ('mild') is a level, not an instruction"),
        (
            ["-i", "Add the finding of edema", "--series", "mild", "severe"],
            "-i is a template holding {level}",
        ),
        (
            ["--series", "Add the finding of mild edema", "Add the finding of severe left pleural effusion"],
            "series step 2 has finding pleural effusion, step 1 edema",
        ),
        (
            ["-i", "Add the finding of {level} edema", "--series", "mild", "severe", "--verify"],
            "verification checks one edit",
        ),
        (["-i", "Add the finding of {level} edema"], "holds {level}, a series' template"),
    ],
)
def test_series_refusals_exit_2_and_write_nothing(png, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main(_series_args(png, out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chest.png"]


def test_series_refusals_of_other_commands_and_sources(png, tmp_path, capsys):
    series = ["-i", "Add the finding of {level} edema", "--series", "mild", "severe"]
    preview = ["preview", *_series_args(png, tmp_path / "out", *series)[1:]]
    assert main(preview) == 2 and "a series needs the edit command" in capsys.readouterr().err
    jobs = tmp_path / "jobs.csv"
    jobs.write_text(f"image,instruction\n{png.name},Add the finding of edema\n")
    with_jobs = _series_args(png, tmp_path / "out", *series)
    with_jobs[1:2] = ["--jobs", str(jobs)]
    assert main(with_jobs) == 2 and "--series edits one radiograph" in capsys.readouterr().err
    folder = _dicom_folder(tmp_path, 2)
    assert main(_series_args(folder, tmp_path / "out", *series)) == 2
    assert "a series edits one radiograph; the input folder holds 2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
