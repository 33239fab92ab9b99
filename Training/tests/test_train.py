"""Fine-tuning on tiny components and the session's small synthetic dataset (seconds each)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import launch

from instructx2x_train.objective import change_weights, conditioning_dropout, encode_pair, training_loss
from instructx2x_train.pairs import EditPairs, augment_pair
from instructx2x_train.train import fresh_unet_parameters, latest_checkpoint, make_ema, mixed_precision, train
from instructx2x_train.train_config import ConfigError, DataConfig, TrainConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def smoke(built, output, *overrides):
    _, dataset, _ = built
    return load_config(
        CONFIGS / "smoke.yaml",
        [f"data.dataset={dataset}", f"output={output}", "steps=4", "checkpointing.every=2", *overrides],
    )


def test_conditioning_dropout_frequencies():
    """p = 0.05: text dropped for 10 %, image for 10 %, both for 5 % of samples."""
    r = torch.rand(400_000, generator=torch.Generator().manual_seed(0))
    text, image = conditioning_dropout(r, 0.05)
    assert float(text.float().mean()) == pytest.approx(0.10, abs=0.002)
    assert float(image.float().mean()) == pytest.approx(0.10, abs=0.002)
    assert float((text & image).float().mean()) == pytest.approx(0.05, abs=0.002)
    text, image = conditioning_dropout(torch.tensor([0.049, 0.05, 0.099, 0.1, 0.149, 0.15]), 0.05)
    assert text.tolist() == [True, True, True, False, False, False]
    assert image.tolist() == [False, True, True, True, True, False]


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_follows_the_hand_computation(warmup):
    config = TrainConfig(ema=TrainConfig().ema.__class__(decay=0.9, warmup=warmup))
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = make_ema(model, config)
    shadow = 0.0
    for t, value in enumerate([1.0, 2.0, 4.0, 8.0], start=1):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.step(model.parameters())
        steps = t - 1  # diffusers counts the first update as step 0: it copies the weights
        decay = 0.0 if steps == 0 else (min(0.9, (1 + steps) / (10 + steps)) if warmup else 0.9)
        shadow = decay * shadow + (1 - decay) * value
        assert float(ema.shadow_params[0]) == pytest.approx(shadow)


def test_flip_swaps_the_side_in_the_instruction_and_masks():
    past = torch.arange(64.0).reshape(1, 8, 8) / 64
    current = past.flip(-2)
    masks = torch.zeros(1, 8, 8, dtype=torch.bool)
    masks[0, :, :2] = True
    config = DataConfig(resolution=8, rotation_degrees=0.0, flip_probability=1.0)
    p, c, text, m, flipped = augment_pair(
        past,
        current,
        "Add the finding of left pleural effusion",
        config,
        torch.Generator().manual_seed(0),
        masks,
    )
    assert flipped and text == "Add the finding of right pleural effusion"
    assert torch.equal(p, past.flip(-1)) and torch.equal(c, current.flip(-1))
    assert m[0, :, -2:].all() and not m[0, :, :-2].any()
    _, _, text, _, _ = augment_pair(
        past, current, "Remove the finding of edema", config, torch.Generator().manual_seed(0)
    )
    assert text == "Remove the finding of edema"
    keep = DataConfig(resolution=8, rotation_degrees=0.0, flip_probability=0.0)
    p, _, text, _, flipped = augment_pair(
        past, current, "Right-sided pneumothorax", keep, torch.Generator().manual_seed(0)
    )
    assert not flipped and text == "Right-sided pneumothorax" and torch.equal(p, past)


def test_rotation_and_crop_apply_the_same_draw_to_both_images():
    image = torch.rand(1, 80, 80, generator=torch.Generator().manual_seed(1))
    config = DataConfig(resolution=64, rotation_degrees=2.0, flip_probability=0.5)
    p, c, _, _, _ = augment_pair(image, image.clone(), "Add edema", config, torch.Generator().manual_seed(3))
    assert p.shape == (1, 64, 64) and torch.equal(p, c)
    assert not torch.equal(p, image[:, :64, :64])


def test_effective_batch_arithmetic():
    paper = load_config(CONFIGS / "paper.yaml", ["output=o", "data.dataset=d", "model.base=m"])
    paper.validate(devices=8)
    assert paper.effective_batch(8) == 576
    with pytest.raises(
        ConfigError,
        match=r"batch.effective is 576 but per_device 8 x 1 device\(s\) x "
        r"accumulation 9 = 72",
    ):
        paper.validate(devices=1)


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    from instructx2x.untrained import build_untrained_pipeline
    from instructx2x_train.train import _noise_scheduler

    pipe = build_untrained_pipeline(seed=0)
    pipe.vae.requires_grad_(False)  # frozen, as in training
    scheduler = _noise_scheduler(pipe)
    past = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    current = past.flip(-1)
    optimizer = torch.optim.AdamW(pipe.unet.parameters(), lr=1e-3)

    latents = encode_pair(pipe.vae, past, current)

    def loss():
        return training_loss(
            pipe.unet,
            pipe.text_encoder,
            pipe.tokenizer,
            scheduler,
            latents,
            pipe.vae.config.scaling_factor,
            ["Add edema", "Remove edema"],
            torch.Generator().manual_seed(7),
            0.0,
        )

    before = float(loss())
    for _ in range(15):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert float(loss()) < 0.8 * before


def test_resume_equals_an_uninterrupted_run(built, tmp_path):
    straight = train(smoke(built, tmp_path / "straight", "log_every=1"), progress_bar=False)
    first = train(smoke(built, tmp_path / "resumed", "steps=2", "log_every=1"), progress_bar=False)
    checkpoint = latest_checkpoint(tmp_path / "resumed")
    assert first.steps == 2 and checkpoint is not None and checkpoint.name == "checkpoint-000002"
    resumed = train(smoke(built, tmp_path / "resumed", "log_every=1"), resume="latest", progress_bar=False)
    assert resumed.final_loss == straight.final_loss
    log = [line.split(",")[:3] for line in (tmp_path / "straight" / "log.csv").read_text().splitlines()]
    log_resumed = [
        line.split(",")[:3] for line in (tmp_path / "resumed" / "log.csv").read_text().splitlines()
    ]
    assert log == log_resumed and len(log) == 5  # header + 4 steps: step, loss, lr
    from safetensors.torch import load_file

    a = load_file(straight.model / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed.model / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the last K checkpoints stay (keep 2 in the smoke config)
    assert sorted(p.name for p in (tmp_path / "straight" / "checkpoints").iterdir()) == [
        "checkpoint-000002",
        "checkpoint-000004",
    ]


def test_resume_from_another_config_is_refused(built, tmp_path):
    train(smoke(built, tmp_path / "run", "steps=2"), progress_bar=False)
    with pytest.raises(ConfigError, match="optim.learning_rate differ"):
        train(
            smoke(built, tmp_path / "run", "optim.learning_rate=0.001"), resume="latest", progress_bar=False
        )
    with pytest.raises(ConfigError, match="exists; pass --resume latest"):
        train(smoke(built, tmp_path / "run"), progress_bar=False)


def test_the_saved_model_edits_through_the_cli(built, tmp_path):
    result = train(smoke(built, tmp_path / "run", "steps=2"), progress_bar=False)
    image = next((built[1] / "current").iterdir())
    executable = Path(sys.executable).parent / "instructx2x"
    completed = subprocess.run(
        [
            str(executable),
            "edit",
            str(image),
            "-i",
            "Add the finding of edema",
            "-o",
            str(tmp_path / "edit"),
            "--model",
            str(result.model),
            "--progress",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    manifest = json.loads((tmp_path / "edit" / "manifest.json").read_text())
    assert manifest["model"]["trained"] is True and manifest["model"]["card"]["resolution"] == 64
    assert manifest["geometry"]["model_size"] == [256, 256]  # the tiny UNet's native grid
    assert "UNTRAINED" not in completed.stderr


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["colour=red"], "unknown config key"),
        (["optim.learning_rat=1"], "unknown config key"),
        (["steps=ten"], "steps must be an integer, got 'ten'"),
        (["optim.learning_rate=fast"], "optim.learning_rate must be a number"),
        (["batch.effective=5"], "batch.effective is 5"),
        (["data.dataset=/nonexistent"], "not a MIMIC-EDIT-INSTRUCTION folder"),
        (
            [
                "model.base=fresh",
                "model.fresh_unet={in_channels: 4}",
                "model.fresh_vae={latent_channels: 4}",
                "model.fresh_text_encoder={hidden_size: 32}",
            ],
            "in_channels must be 8",
        ),
        (["optim.conditioning_dropout_prob=0.5"], "conditioning_dropout_prob"),
    ],
)
def test_bad_settings_are_refused_before_training(built, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train(smoke(built, tmp_path / "run", *overrides), progress_bar=False)
    assert not (tmp_path / "run").exists()


def test_validation_grids_and_loss_plot(built, tmp_path):
    from PIL import Image

    result = train(
        smoke(built, tmp_path / "run", "validation.every=2", "validation.pairs=2"), progress_bar=False
    )
    grids = sorted(p.name for p in (result.output / "validation").iterdir())
    assert grids == ["step-000002.png", "step-000004.png"]
    grid = Image.open(result.output / "validation" / "step-000004.png")
    assert grid.size == (4 * 64, 2 * 64 + 14)  # input | edited | guidance | target, a row per pair
    plot = Image.open(result.output / "loss.png")
    assert plot.size == (640, 360) and len(set(plot.getdata())) > 2


def test_two_cpu_processes_under_accelerate_launch_stay_in_sync(built, tmp_path):
    """DDP over gloo: the ranks train on different pairs, hold identical weights after each
    step (gradients are averaged), and only the main process writes the checkpoint."""
    from instructx2x_train.train import sample_indices

    config = smoke(built, tmp_path / "ddp", "steps=2", "checkpointing.every=1", "batch.effective=8")
    assert sample_indices(config, 40, 1, 0, 0, 2) != sample_indices(config, 40, 1, 0, 1, 2)
    _, dataset, _ = built
    completed = launch(
        [
            str(Path(__file__).parent / "ddp_driver.py"),
            str(CONFIGS / "smoke.yaml"),
            f"data.dataset={dataset}",
            f"output={tmp_path / 'ddp'}",
            "steps=2",
            "checkpointing.every=1",
            "batch.effective=8",
        ],
        processes=2,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    # the two ranks print at once: their lines may interleave
    ranks = [
        json.loads(match)
        for match in re.findall(
            r'\{"rank": \d+, "world": \d+, "unet_sha256": "[0-9a-f]+"\}', completed.stdout
        )
    ]
    assert sorted(r["rank"] for r in ranks) == [0, 1] and {r["world"] for r in ranks} == {2}
    assert ranks[0]["unet_sha256"] == ranks[1]["unet_sha256"]
    checkpoints = tmp_path / "ddp" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-000001", "checkpoint-000002"]
    assert len(list((checkpoints / "checkpoint-000002" / "model" / "unet").iterdir())) == 2
    # a single process with the same settings and a twice-as-large per-device batch lands
    # elsewhere: the two ranks really trained on their own halves
    single = train(smoke(built, tmp_path / "single", "steps=2", "checkpointing.every=1"), progress_bar=False)
    assert single.unet_sha256 != ranks[0]["unet_sha256"]


def test_latent_cache_gives_the_same_training_without_the_encoder(built, tmp_path):
    """With rotation 0 and images at the training size, the cached run equals the uncached
    one, and a second run encodes nothing; a changed image file gets a new entry."""
    settings = ("data.rotation_degrees=0", "data.resolution=128", "log_every=1", "precision=fp32")
    plain = train(smoke(built, tmp_path / "plain", *settings), progress_bar=False)
    cache_dir = tmp_path / "cache"
    cached = train(
        smoke(
            built,
            tmp_path / "cached",
            *settings,
            "data.latent_cache=true",
            f"data.latent_cache_dir={cache_dir}",
        ),
        progress_bar=False,
    )
    assert cached.final_loss == pytest.approx(plain.final_loss, rel=1e-5)
    entries = list(cache_dir.glob("*/*/moments.pt"))
    assert entries
    stamps = {p: p.stat().st_mtime_ns for p in entries}
    train(
        smoke(
            built,
            tmp_path / "again",
            *settings,
            "data.latent_cache=true",
            f"data.latent_cache_dir={cache_dir}",
        ),
        progress_bar=False,
    )
    assert {p: p.stat().st_mtime_ns for p in entries} == stamps  # all hits
    with pytest.raises(ConfigError, match="latent_cache needs data.rotation_degrees 0"):
        train(smoke(built, tmp_path / "rotated", "data.latent_cache=true"), progress_bar=False)
    with pytest.raises(ConfigError, match="images at data.resolution"):
        train(
            smoke(built, tmp_path / "cropped", "data.rotation_degrees=0", "data.latent_cache=true"),
            progress_bar=False,
        )


@pytest.mark.filterwarnings("error:Converting a tensor with requires_grad")  # the log reads losses quietly
def test_fresh_model_pretrains_its_autoencoder_and_caches_one_view_without_flips(built, tmp_path):
    """model.base fresh (the demo recipe): the autoencoder trains first (its loss falls, its
    latent scale is set), is frozen into the model, and is reused on resume; without flips the
    latent cache encodes each film once, not its mirror; the focal stage refines the result."""
    from diffusers import AutoencoderKL

    from instructx2x.loading import hash_modules, load_pipeline
    from instructx2x_train.latent_cache import LatentCache

    _, dataset, _ = built
    output = tmp_path / "fresh"
    overrides = [
        f"data.dataset={dataset}",
        f"output={output}",
        "steps=2",
        "checkpointing.every=1",
        "batch.per_device=2",
        "batch.effective=2",
        "precision=fp32",
        "vae_pretraining.steps=40",
        "vae_pretraining.batch=4",
        "vae_pretraining.crop=32",
        "vae_pretraining.learning_rate=2e-3",
        "optim.change_region_weight=0",
        "optim.mirror_region_weight=0",
    ]  # the cohort build has no masks
    train(load_config(CONFIGS / "demo.yaml", overrides), progress_bar=False)
    log = json.loads((output / "pretrained-vae" / "vae_log.json").read_text())
    assert log["log"][-1]["l1"] < log["log"][0]["l1"]
    model, _ = load_pipeline(output / "model")
    assert model.vae.config.scaling_factor == pytest.approx(log["scaling_factor"]) != 0.18215
    assert hash_modules(model.vae) == hash_modules(AutoencoderKL.from_pretrained(output / "pretrained-vae"))
    entries = list((output / "latent-cache").glob("*-unmirrored/*/moments.pt"))
    assert entries and all(torch.load(p, weights_only=True)["mean"].shape[0] == 1 for p in entries)
    stamp = (output / "pretrained-vae" / "vae_log.json").stat().st_mtime_ns
    train(
        load_config(CONFIGS / "demo.yaml", [*overrides[:2], "steps=3", *overrides[3:]]),
        resume="latest",
        progress_bar=False,
    )
    assert (output / "pretrained-vae" / "vae_log.json").stat().st_mtime_ns == stamp  # reused
    cache = LatentCache(tmp_path / "cache", model.vae, mirrored=False)
    with pytest.raises(ValueError, match="no mirror images"):
        cache.moments(entries[0], torch.zeros(1, 128, 128), flipped=True)
    with pytest.raises(ConfigError, match="needs model.base 'fresh'"):
        train(smoke(built, tmp_path / "given", "vae_pretraining.steps=5"), progress_bar=False)

    # the focal stage (demo-focal.yaml) refines that model: UNet and text encoder move, the
    # autoencoder - and so the latent space the first stage learnt in - stays as it was
    focal = tmp_path / "focal"
    train(
        load_config(
            CONFIGS / "demo-focal.yaml",
            [
                f"data.dataset={dataset}",
                f"output={focal}",
                f"model.base={output / 'model'}",
                "steps=2",
                "checkpointing.every=2",
                *overrides[4:7],
                *overrides[-2:],
            ],
        ),
        progress_bar=False,
    )
    refined, _ = load_pipeline(focal / "model")
    model, _ = load_pipeline(output / "model")
    assert hash_modules(refined.vae) == hash_modules(model.vae)
    assert hash_modules(refined.unet) != hash_modules(model.unet)
    assert hash_modules(refined.text_encoder) != hash_modules(model.text_encoder)


def test_ctrl_c_saves_a_resumable_checkpoint(built, tmp_path):
    import signal
    import time

    _, dataset, _ = built
    output = tmp_path / "run"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "instructx2x_train.cli",
            "train",
            "--config",
            str(CONFIGS / "smoke.yaml"),
            "--set",
            f"data.dataset={dataset}",
            "--set",
            f"output={output}",
            "--set",
            "steps=500",
            "--set",
            "log_every=1",
            "--set",
            "checkpointing.every=1000",
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    deadline = time.monotonic() + 120
    while not (output / "log.csv").is_file() or len((output / "log.csv").read_text().splitlines()) < 3:
        assert time.monotonic() < deadline and process.poll() is None, process.stderr.read()
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "resumable checkpoint" in err and "Traceback" not in err
    checkpoint = latest_checkpoint(output)
    assert checkpoint is not None
    done = int(checkpoint.name.split("-")[1])
    assert done >= 2 and (checkpoint / "model" / "model_card.json").is_file()
    assert not [p for p in (output / "checkpoints").iterdir() if p.name.startswith(".")]
    resumed = train(
        smoke(built, output, "log_every=1", f"steps={done + 1}", "checkpointing.every=1000"),
        resume="latest",
        progress_bar=False,
    )
    assert resumed.steps == done + 1


def test_disk_full_while_saving_leaves_no_half_checkpoint(built, tmp_path, monkeypatch):
    import errno

    from instructx2x.errors import ResourceError
    from instructx2x_train import train as module

    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if str(path).endswith("training_state.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(module.torch, "save", full_disk)
    with pytest.raises(ResourceError, match="No space left on device"):
        train(smoke(built, tmp_path / "run", "steps=2"), progress_bar=False)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert not checkpoints.exists() or list(checkpoints.iterdir()) == []


def test_missing_images_are_counted_and_named(built, tmp_path):
    import shutil

    _, dataset, _ = built
    copy = tmp_path / "dataset"
    shutil.copytree(dataset, copy)
    victim = next((copy / "past").iterdir())
    victim.unlink()
    with pytest.raises(ConfigError, match=f"1 image\\(s\\) missing, e.g. past/{victim.name}"):
        train(smoke(built, tmp_path / "run", f"data.dataset={copy}", "data.split=train"), progress_bar=False)


@pytest.mark.parametrize("start", ["diffusers folder", "single-file checkpoint"])
def test_training_starts_from_a_released_layout(built, tmp_path, start):
    """The two released forms of InstructPix2Pix load through the library's offline loaders
    (conv_in already has 8 channels: nothing is widened) and train."""
    from original_checkpoint import original_state_dict
    from safetensors.torch import save_file

    from instructx2x.untrained import build_untrained_pipeline

    pipe = build_untrained_pipeline(seed=5)
    pipe.save_pretrained(tmp_path / "ip2p")
    overrides = [f"model.base={tmp_path / 'ip2p'}"]
    if start == "single-file checkpoint":
        save_file(original_state_dict(pipe), tmp_path / "ip2p.safetensors")
        overrides = [
            f"model.base={tmp_path / 'ip2p.safetensors'}",
            f"model.single_file_config={tmp_path / 'ip2p'}",
        ]
    result = train(smoke(built, tmp_path / "run", "steps=1", *overrides), progress_bar=False)
    assert (result.model / "unet" / "config.json").is_file()
    assert json.loads((result.model / "unet" / "config.json").read_text())["in_channels"] == 8


def test_a_fresh_small_model_trains_its_text_encoder_too(built, tmp_path):
    """From scratch (sizes in the config), with the text encoder trained: its saved weights
    differ from the initial ones, the UNet's input stays 8 channels."""
    from safetensors.torch import load_file

    unet = json.dumps(
        {
            "in_channels": 8,
            "out_channels": 4,
            "sample_size": 8,
            "block_out_channels": [32, 64],
            "layers_per_block": 1,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "cross_attention_dim": 32,
            "attention_head_dim": 8,
        }
    )
    vae = json.dumps(
        {
            "block_out_channels": [16, 32, 32, 32],
            "norm_num_groups": 16,
            "layers_per_block": 1,
            "latent_channels": 4,
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
        }
    )
    text = json.dumps(
        {
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "vocab_size": 49408,
        }
    )
    overrides = [
        "model.base=fresh",
        f"model.fresh_unet={unet}",
        f"model.fresh_vae={vae}",
        f"model.fresh_text_encoder={text}",
        "model.train_text_encoder=true",
        "steps=2",
        "optim.learning_rate=0.01",
    ]
    result = train(smoke(built, tmp_path / "run", *overrides), progress_bar=False)
    first = train(
        smoke(built, tmp_path / "zero", *overrides, "optim.learning_rate=1e-12"), progress_bar=False
    )
    trained = load_file(result.model / "text_encoder" / "model.safetensors")
    untouched = load_file(first.model / "text_encoder" / "model.safetensors")
    assert any(not torch.equal(trained[k], untouched[k]) for k in trained)
    assert json.loads((result.model / "unet" / "config.json").read_text())["in_channels"] == 8


@pytest.fixture(scope="module")
def pure_pairs(tmp_path_factory):
    from instructx2x_train.counterfactuals import PurePairsConfig, write_pure_pairs

    root = tmp_path_factory.mktemp("pure") / "pairs"
    # every pair carries a second, unchanged finding in both films
    write_pure_pairs(
        root,
        PurePairsConfig(
            pairs=16, seed=9, resolution=64, other_finding_probability=1.0, validation_fraction=0.0
        ),
    )
    return root


def test_change_region_is_the_instructed_lesion_not_the_unchanged_finding(pure_pairs):
    import numpy as np
    import pandas as pd
    from PIL import Image

    data = EditPairs(pure_pairs, "train")
    truth = pd.read_csv(pure_pairs / "truth.csv", dtype=str, keep_default_na=False).set_index("pair_id")
    outside = []
    for index in range(len(data)):
        past_path, current_path = data.paths(index)
        row = truth.loc[past_path.stem]
        region = data.change_region(index, (64, 64))[0].numpy()
        with_finding = current_path if row.operation == "add" else past_path
        with np.load(with_finding.with_name(f"{with_finding.stem}.masks.npz")) as masks:
            assert np.array_equal(region, masks[row.finding])
            other = masks[row.other_finding]
        outside.append((other & ~region).any())
        changed = np.asarray(Image.open(past_path)) != np.asarray(Image.open(current_path))
        assert changed.any() and not (changed & ~region).any()
    assert sum(outside) >= len(data) // 2  # the unchanged second findings are left out


def test_change_weights_mark_every_latent_cell_the_region_touches():
    regions = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    regions[0, 0, 5, 9] = True  # one pixel: latent cell (1, 2) of a 4x4 grid
    regions[1, 0, 8:, :4] = True  # the lower-left quarter: cells (2..3, 0)
    weights = change_weights(regions, (4, 4), 9.0)
    expected = torch.ones(2, 1, 4, 4)
    expected[0, 0, 1, 2] = 10.0
    expected[1, 0, 2:, 0] = 10.0
    assert torch.equal(weights, expected)


def test_mirror_weights_mark_the_other_side_only_where_the_region_is_not():
    regions = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    regions[0, 0, 5, 1] = True  # cell (1, 0); its mirror is cell (1, 3)
    regions[1, 0, 8:, 4:12] = True  # cells (2..3, 1..2): symmetric, so no mirror cell is left
    weights = change_weights(regions, (4, 4), 9.0, mirror_weight=3.0)
    expected = torch.ones(2, 1, 4, 4)
    expected[0, 0, 1, 0] = 10.0
    expected[0, 0, 1, 3] = 4.0
    expected[1, 0, 2:, 1:3] = 10.0
    assert torch.equal(weights, expected)


def test_change_region_weighting_trains_on_pure_pairs_and_needs_masks(built, pure_pairs, tmp_path):
    """The weighted objective runs end to end, changes the loss, and a dataset without masks is
    refused before anything is written."""

    def run(name, weight, mirror=0):
        return train(
            load_config(
                CONFIGS / "smoke.yaml",
                [
                    f"data.dataset={pure_pairs}",
                    f"output={tmp_path / name}",
                    "steps=2",
                    "checkpointing.every=2",
                    "data.resolution=64",
                    f"optim.change_region_weight={weight}",
                    f"optim.mirror_region_weight={mirror}",
                    "log_every=1",
                ],
            ),
            progress_bar=False,
        )

    plain, weighted, mirrored = run("plain", 0), run("weighted", 20), run("mirrored", 0, 20)
    assert weighted.final_loss != plain.final_loss
    assert mirrored.final_loss not in (plain.final_loss, weighted.final_loss)
    assert (tmp_path / "weighted" / "model" / "unet").is_dir()
    for key in ("change_region_weight", "mirror_region_weight"):
        with pytest.raises(ConfigError, match="masks file"):
            train(smoke(built, tmp_path / "no-masks", f"optim.{key}=5"), progress_bar=False)
        assert not (tmp_path / "no-masks").exists()
        with pytest.raises(ConfigError, match=f"{key} must lie"):
            train(smoke(built, tmp_path / "negative", f"optim.{key}=-1"), progress_bar=False)


@pytest.mark.parametrize("python", ["3.11+", "3.10"])
def test_a_toml_config_reads_on_every_supported_python(tmp_path, monkeypatch, python):
    """tomllib is in the standard library from 3.11; on 3.10 its backport tomli (a dependency
    there) reads the file, stood in for here (from 3.11) by the standard library's module."""
    if sys.version_info >= (3, 11):
        import tomllib as toml
    else:
        import tomli as toml

        if python == "3.11+":
            pytest.skip("Python 3.10 has no tomllib")
    if python == "3.10":
        monkeypatch.setattr(sys, "version_info", (3, 10, 13, "final", 0))
        monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` fails as on 3.10
        monkeypatch.setitem(sys.modules, "tomli", toml)
    path = tmp_path / "run.toml"
    path.write_text('output = "o"\nsteps = 7\n[data]\ndataset = "d"\n[model]\nbase = "m"\n')
    config = load_config(path)
    assert (config.output, config.steps, config.data.dataset, config.model.base) == ("o", 7, "d", "m")


def test_auto_precision_on_a_cpu_follows_the_inference_rule(monkeypatch):
    """On a CPU with bf16 instructions, ``auto`` trains the demo recipe's small UNet in fp32 (bf16
    autocast costs more in casts than it saves there) and a large or unknown UNet in bf16."""
    from instructx2x import devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    demo = fresh_unet_parameters(load_config(CONFIGS / "demo.yaml"))
    assert demo is not None and demo < devices.CPU_BF16_MIN_PARAMETERS
    assert mixed_precision("auto", demo) == "no"
    assert mixed_precision("auto", None) == "bf16" and mixed_precision("auto", 860_000_000) == "bf16"
    assert mixed_precision("bf16", demo) == "bf16"  # asked for: kept
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert mixed_precision("auto", None) == "no"
