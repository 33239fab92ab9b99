"""Installing a model folder: the folder digest, model.sha256, the staged copy, and what a
failure leaves (nothing). Runs in the main environment; the installer itself needs no torch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from instructx2x.errors import ModelLoadError, OutputExistsError, ResourceError
from instructx2x.model_digest import CHECKSUM_NAME, folder_digest, read_checksum
from InstructX2XModuleLib import model_install
from InstructX2XModuleLib.model_install import Installed, UnpinnedModelError, install_model

ROOT = Path(__file__).resolve().parents[3]


def write_model(folder: Path, pin: bool = True) -> Path:
    """A small diffusers-shaped folder (its bytes matter, not its loadability)."""
    files = {
        "unet/config.json": '{"sample_size": 8}',
        "unet/diffusion_pytorch_model.safetensors": "unet weights",
        "vae/config.json": '{"latent_channels": 4}',
        "vae/diffusion_pytorch_model.safetensors": "vae weights",
        "text_encoder/config.json": '{"hidden_size": 32}',
        "text_encoder/model.safetensors": "clip weights",
        "tokenizer/vocab.json": '{"a": 0}',
        "tokenizer/merges.txt": "a b",
        "scheduler/scheduler_config.json": '{"beta_end": 0.012}',
        "model_card.json": '{"trained": true}',
        "model_index.json": "{}",
    }
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    if pin:
        pin_model(folder)
    return folder


def pin_model(folder: Path) -> str:
    digest = folder_digest(folder)
    (folder / CHECKSUM_NAME).write_text(f"{digest}  {folder.name}\n")
    return digest


@pytest.fixture
def model(tmp_path):
    return write_model(tmp_path / "source" / "my-model")


@pytest.fixture
def root(tmp_path):
    return tmp_path / "home" / ".instructx2x" / "models"


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_the_digest_covers_configs_scheduler_tokenizer_card_and_names_but_not_its_checksum(tmp_path):
    folder = write_model(tmp_path / "m", pin=False)
    original = folder_digest(folder)
    assert len(original) == 64 and folder_digest(folder) == original  # stable
    for name in (
        "unet/config.json",
        "tokenizer/vocab.json",
        "scheduler/scheduler_config.json",
        "model_card.json",
        "text_encoder/model.safetensors",
    ):
        before = (folder / name).read_bytes()
        (folder / name).write_bytes(before + b" ")
        assert folder_digest(folder) != original, name
        (folder / name).write_bytes(before)
        assert folder_digest(folder) == original, name
    (folder / "tokenizer" / "merges.txt").rename(
        folder / "tokenizer" / "merges2.txt"
    )  # same bytes, other name
    assert folder_digest(folder) != original
    (folder / "tokenizer" / "merges2.txt").rename(folder / "tokenizer" / "merges.txt")
    (folder / "extra.txt").write_text("")  # an added (empty) file counts
    assert folder_digest(folder) != original
    (folder / "extra.txt").unlink()
    (folder / CHECKSUM_NAME).write_text("anything")  # the top-level checksum is left out...
    assert folder_digest(folder) == original
    (folder / "unet" / CHECKSUM_NAME).write_text("x")  # ...but not one deeper down
    assert folder_digest(folder) != original


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs GNU coreutils")
def test_the_digest_is_what_the_documented_sha256sum_pipeline_prints(tmp_path):
    folder = write_model(tmp_path / "m")
    (folder / "unet" / "ä b.json").write_text("a name with a space and a non-ASCII letter")
    (folder / "unet.json").write_text("sorts before unet/ by its bytes")
    pipeline = (
        "find . -type f ! -path ./model.sha256 | sed 's|^\\./||' | LC_ALL=C sort "
        "| xargs -d '\\n' sha256sum | sha256sum"
    )
    printed = subprocess.run(["bash", "-c", pipeline], cwd=folder, capture_output=True, text=True, check=True)
    assert printed.stdout.split()[0] == folder_digest(folder)


def test_folders_with_links_to_folders_special_files_or_odd_names_are_refused(tmp_path):
    folder = write_model(tmp_path / "m", pin=False)
    (folder / "outside").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(ModelLoadError, match="outside in m is a link to a folder"):
        folder_digest(folder)
    (folder / "outside").unlink()
    os.mkfifo(folder / "vae" / "pipe")  # reading it would block forever
    with pytest.raises(ModelLoadError, match="vae/pipe in m is not a regular file"):
        folder_digest(folder)
    (folder / "vae" / "pipe").unlink()
    (folder / "tokenizer" / "new\nline").write_text("")
    with pytest.raises(ModelLoadError, match="newline"):
        folder_digest(folder)
    (folder / "tokenizer" / "new\nline").unlink()
    (folder / "tokenizer" / "linked.json").symlink_to(folder / "model_card.json")  # a linked file: its bytes
    with_link = folder_digest(folder)
    (folder / "tokenizer" / "linked.json").unlink()
    shutil.copyfile(folder / "model_card.json", folder / "tokenizer" / "linked.json")
    assert folder_digest(folder) == with_link


def test_model_sha256_must_start_with_a_digest(tmp_path):
    folder = write_model(tmp_path / "m", pin=False)
    assert read_checksum(folder) is None
    (folder / CHECKSUM_NAME).write_text("A" * 64 + "  m\n")
    assert read_checksum(folder) == "a" * 64
    (folder / CHECKSUM_NAME).write_text("not a digest\n")
    with pytest.raises(ModelLoadError, match="does not start with a SHA-256"):
        read_checksum(folder)


def test_neither_the_digest_nor_the_installer_imports_torch():
    code = (
        "import sys; import instructx2x.model_digest, InstructX2XModuleLib.model_install; "
        "heavy = {'torch', 'numpy', 'diffusers', 'transformers', 'qt', 'slicer'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "InstructX2X")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_the_required_folders_are_the_ones_the_loader_needs():
    from instructx2x.loading import COMPONENTS

    assert model_install.MODEL_FOLDERS == COMPONENTS


def test_a_pinned_folder_is_copied_whole_and_a_second_install_reports_it_installed(model, root):
    installed = install_model(model, root)
    target = root / "my-model"
    pinned = read_checksum(model)
    assert pinned is not None
    assert installed == Installed(target, pinned, already_installed=False)
    assert folder_digest(target) == folder_digest(model) == installed.digest
    assert listing(target) == listing(model)  # model.sha256 included
    assert os.listdir(root) == ["my-model"]  # no staging folder left beside it
    again = install_model(model, root)
    assert again.already_installed and again.path == target and again.digest == installed.digest


def test_a_folder_that_does_not_match_its_model_sha256_is_refused_and_nothing_is_made(model, root):
    (model / "tokenizer" / "vocab.json").write_text('{"b": 0}')  # after the checksum was written
    with pytest.raises(ModelLoadError, match="do not match its model.sha256") as caught:
        install_model(model, root)
    assert folder_digest(model) in str(caught.value) and str(read_checksum(model)) in str(caught.value)
    assert not root.parent.exists()  # not even ~/.instructx2x


def test_a_folder_without_model_sha256_needs_its_digest_confirmed(tmp_path, root):
    model = write_model(tmp_path / "unpinned", pin=False)
    with pytest.raises(UnpinnedModelError) as caught:
        install_model(model, root)
    assert caught.value.digest == folder_digest(model) and caught.value.digest in str(caught.value)
    assert not root.parent.exists()
    with pytest.raises(ModelLoadError, match="do not match the confirmed digest"):
        install_model(model, root, confirmed_digest="0" * 64)
    assert not root.parent.exists()
    installed = install_model(model, root, confirmed_digest=caught.value.digest.upper())
    assert not installed.already_installed and folder_digest(installed.path) == caught.value.digest
    assert not (installed.path / CHECKSUM_NAME).exists()


def test_a_confirmed_digest_must_agree_with_model_sha256(model, root):
    with pytest.raises(ModelLoadError, match="pins"):
        install_model(model, root, confirmed_digest="0" * 64)
    assert not root.parent.exists()


def test_a_different_model_of_the_same_name_is_never_replaced(model, root):
    first = install_model(model, root)
    (model / "model_card.json").write_text('{"trained": false}')
    pin_model(model)
    with pytest.raises(OutputExistsError, match="already holds a different model"):
        install_model(model, root)
    assert folder_digest(first.path) == first.digest and os.listdir(root) == ["my-model"]
    shutil.rmtree(first.path)
    (root / "my-model").write_text("a file where the model would go")
    with pytest.raises(OutputExistsError):
        install_model(model, root)


def test_what_is_not_a_model_folder_is_refused_before_anything_is_read(tmp_path, root, monkeypatch):
    monkeypatch.setattr(model_install, "folder_digest", lambda folder: pytest.fail("hashed"))
    with pytest.raises(ModelLoadError, match="is not a folder"):
        install_model(tmp_path / "missing", root)
    (tmp_path / "photos" / "unet").mkdir(parents=True)
    with pytest.raises(
        ModelLoadError, match="not an InstructX2X model folder: it has no vae/, text_encoder/"
    ):
        install_model(tmp_path / "photos", root)
    assert not root.parent.exists()


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failure_mid_copy_leaves_nothing(model, root, monkeypatch, failure):
    (root / "other-model").mkdir(parents=True)
    copied: list = []

    def copy_then_fail(source, destination):
        if len(copied) == 3:
            raise failure
        copied.append(destination)
        return shutil.copyfile(source, destination)

    monkeypatch.setattr(model_install.shutil, "copyfile", copy_then_fail)
    with pytest.raises(ResourceError if isinstance(failure, OSError) else KeyboardInterrupt):
        install_model(model, root)
    assert len(copied) == 3 and os.listdir(root) == ["other-model"]  # the staged copy is gone
    shutil.rmtree(root.parent)
    copied.clear()
    with pytest.raises(ResourceError if isinstance(failure, OSError) else KeyboardInterrupt):
        install_model(model, root)
    assert not root.parent.exists()  # the folders this install made are gone too


def test_a_source_that_changes_while_it_is_copied_is_caught_after_the_copy(model, root, monkeypatch):
    real_copy = shutil.copyfile

    def copy_and_tamper(source, destination):
        (model / "model_card.json").write_text('{"trained": false}')
        return real_copy(source, destination)

    monkeypatch.setattr(model_install.shutil, "copyfile", copy_and_tamper)
    with pytest.raises(ModelLoadError, match="once copied"):
        install_model(model, root)
    assert not root.parent.exists()


@pytest.mark.parametrize("same", [True, False])
def test_a_model_installed_meanwhile_by_someone_else_is_kept(model, root, monkeypatch, tmp_path, same):
    real_copy = shutil.copyfile
    rival = write_model(tmp_path / "rival" / "my-model", pin=False)
    if not same:
        (rival / "model_card.json").write_text('{"trained": false}')

    def copy_while_another_install_finishes(source, destination):
        if not (root / "my-model").exists():
            shutil.copytree(model if same else rival, root / "my-model", copy_function=real_copy)
        return real_copy(source, destination)

    monkeypatch.setattr(model_install.shutil, "copyfile", copy_while_another_install_finishes)
    if same:
        assert install_model(model, root).already_installed
    else:
        with pytest.raises(OutputExistsError):
            install_model(model, root)
    assert os.listdir(root) == ["my-model"]  # the rival's copy, and no staging folder
    assert folder_digest(root / "my-model") == folder_digest(model if same else rival)


def test_too_little_room_is_refused_before_copying(model, root, monkeypatch):
    monkeypatch.setattr(model_install.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1, 1, 100))
    with pytest.raises(ResourceError, match="MiB free"):
        install_model(model, root)
    assert not root.parent.exists()


def test_info_prints_the_folder_digest_a_publisher_writes_into_model_sha256(tmp_path, capsys):
    from instructx2x.cli import main
    from instructx2x.loading import demo_model_path

    folder = tmp_path / "demo-copy"
    shutil.copytree(demo_model_path(), folder)
    assert main(["info", "--model", str(folder), "--device", "cpu"]) == 0
    described = json.loads(capsys.readouterr().out)["model"]
    assert described["folder_sha256"] == folder_digest(folder) != described["sha256"]
