import numpy as np
import PIL.Image
import pytest
import torch

from instructx2x import guidance, make_scheduler
from instructx2x.errors import EditCancelled, EmptyEditRegionError


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


PROMPT = "Add the finding of pleural effusion"


def run(pipe, image, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 4)
    kwargs.setdefault("output_type", "pt")
    kwargs.setdefault("generator", generator(seed))
    return pipe(kwargs.pop("prompt", PROMPT), image, **kwargs)


def test_same_seed_same_output_bit_for_bit(tiny_pipe, xray):
    first, second = run(tiny_pipe, xray), run(tiny_pipe, xray)
    assert torch.equal(first.images, second.images)
    assert torch.equal(first.guidance_maps, second.guidance_maps)
    assert not torch.equal(first.images, run(tiny_pipe, xray, seed=1).images)


def test_global_rng_does_not_matter(tiny_pipe, xray):
    torch.manual_seed(123)
    first = run(tiny_pipe, xray)
    torch.manual_seed(456)
    assert torch.equal(first.images, run(tiny_pipe, xray).images)


def test_pixels_outside_mask_equal_input(tiny_pipe, xray):
    out = run(tiny_pipe, xray, tau=0.3)
    outside = out.edit_masks == 0
    assert outside.any() and (~outside).any()
    assert torch.equal(out.images[outside], xray[outside])
    assert not torch.equal(out.images[~outside], xray[~outside])


def test_latents_outside_mask_are_renoised_input_after_every_step(tiny_pipe, xray):
    seen = []

    def record(pipe, step, timestep, tensors):
        seen.append({k: v.clone() for k, v in tensors.items()})
        return {}

    steps = 5
    out = run(
        tiny_pipe,
        xray,
        num_inference_steps=steps,
        tau=0.3,
        callback_on_step_end=record,
        callback_on_step_end_tensor_inputs=["latents", "mask", "source_latents", "noise"],
    )
    timesteps = tiny_pipe.scheduler.timesteps
    assert len(seen) == steps
    for i, state in enumerate(seen):
        outside = state["mask"].expand_as(state["latents"]) == 0
        if i < steps - 1:
            expected = tiny_pipe.scheduler.add_noise(
                state["source_latents"], state["noise"], timesteps[i + 1 : i + 2]
            )
        else:
            expected = state["source_latents"]
        assert outside.any()
        assert torch.allclose(state["latents"][outside], expected[outside], atol=1e-6)
    assert torch.equal(seen[0]["mask"], out.latent_edit_masks)


def test_start_point_is_noised_input_not_pure_noise(tiny_pipe, xray):
    captured: dict[str, torch.Tensor] = {}

    def first_input(module, args, kwargs):
        captured.setdefault("sample", args[0].clone())

    handle = tiny_pipe.unet.register_forward_pre_hook(first_input, with_kwargs=True)
    try:
        run(tiny_pipe, xray, region_mode="none", num_inference_steps=3)
    finally:
        handle.remove()
    # With mode "none" there is no relevance call: the first UNet call is step 1, whose noisy
    # latent (channels 0-3) is add_noise(z0, n, t0) for the same z0 and n as the relevance map.
    sample = captured["sample"][0, :4]
    tiny_pipe.scheduler.set_timesteps(3)
    pixels = tiny_pipe.image_processor.normalize(xray.expand(-1, 3, -1, -1))
    g = generator(0)
    z0 = tiny_pipe.vae.encode(pixels).latent_dist.sample(g) * tiny_pipe.vae.config.scaling_factor
    noise = torch.randn(z0.shape, generator=g)
    expected = tiny_pipe.scheduler.add_noise(z0, noise, tiny_pipe.scheduler.timesteps[:1])[0]
    assert torch.allclose(sample, expected, atol=1e-5)


def test_relevance_map_comes_from_one_unet_call_at_t_rel(tiny_pipe, xray):
    calls = []
    handle = tiny_pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(int(a[1])))
    try:
        out = run(tiny_pipe, xray, guidance_only=True, relevance_timestep=777)
    finally:
        handle.remove()
    assert calls == [777]
    assert out.images is None
    # min-max normalised at latent size; the bilinear upsampling stays inside [0, 1]
    assert out.relevance_maps.min() >= 0 and out.relevance_maps.max() <= 1
    assert out.relevance_maps.max() - out.relevance_maps.min() > 0.5


def test_relevance_map_equals_spec_computation_on_the_full_cfg_batch(tiny_pipe, xray):
    """The call runs on the two CFG members R uses; R must equal docs/method.md section 2, step 3
    on all three."""
    out = run(tiny_pipe, xray, guidance_only=True, region_mode="relevance")
    pixels = tiny_pipe.image_processor.normalize(xray.expand(-1, 3, -1, -1))
    g = generator(0)
    posterior = tiny_pipe.vae.encode(pixels).latent_dist
    z0 = posterior.sample(g) * tiny_pipe.vae.config.scaling_factor
    noise = torch.randn(z0.shape, generator=g)
    alpha = tiny_pipe.scheduler.alphas_cumprod[800]
    noisy = alpha.sqrt() * z0 + (1 - alpha).sqrt() * noise
    c = posterior.mode()
    model_input = torch.cat([torch.cat([noisy] * 3), torch.cat([c, c, torch.zeros_like(c)])], dim=1)
    embeds = tiny_pipe.encode_prompt(PROMPT, torch.device("cpu"))
    with torch.no_grad():
        eps_text, eps_image, _ = tiny_pipe.unet(model_input, 800, encoder_hidden_states=embeds).sample.chunk(
            3
        )
    expected = guidance.relevance_map(eps_text, eps_image)
    assert torch.allclose(guidance.resize_map(expected, xray.shape[-2:]), out.relevance_maps, atol=1e-5)


def test_several_relevance_draws_average_spec_maps_over_the_generators_next_draws(tiny_pipe, xray):
    """relevance_draws=3: R from docs/method.md section 2, step 3, at each of three noise draws,
    the first being the edit's noise and the two others the generator's next two, averaged
    before the clip; the edit itself still starts from and re-noises with the first."""
    calls = []
    handle = tiny_pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(int(a[1])))
    try:
        out = run(tiny_pipe, xray, guidance_only=True, region_mode="relevance", relevance_draws=3)
    finally:
        handle.remove()
    assert calls == [800] * 3
    pixels = tiny_pipe.image_processor.normalize(xray.expand(-1, 3, -1, -1))
    g = generator(0)
    posterior = tiny_pipe.vae.encode(pixels).latent_dist
    z0 = posterior.sample(g) * tiny_pipe.vae.config.scaling_factor
    noises = [torch.randn(z0.shape, generator=g) for _ in range(3)]
    alpha = tiny_pipe.scheduler.alphas_cumprod[800]
    c = posterior.mode()
    embeds = tiny_pipe.encode_prompt(PROMPT, torch.device("cpu"))
    eps = []
    for noise in noises:
        noisy = alpha.sqrt() * z0 + (1 - alpha).sqrt() * noise
        model_input = torch.cat([torch.cat([noisy] * 3), torch.cat([c, c, torch.zeros_like(c)])], dim=1)
        with torch.no_grad():
            eps.append(tiny_pipe.unet(model_input, 800, encoder_hidden_states=embeds).sample.chunk(3)[:2])
    expected = guidance.relevance_map(torch.stack([e[0] for e in eps]), torch.stack([e[1] for e in eps]))
    assert torch.allclose(out.guidance_state.relevance, expected, atol=1e-5)
    assert torch.equal(out.guidance_state.noise, noises[0])
    single = run(tiny_pipe, xray, guidance_only=True, region_mode="relevance")
    assert (single.guidance_state.relevance - expected).abs().max() > 0.05  # the draws matter
    # the edit's noise is the first draw: with the prior's mask (no R) and eta 0 the edits agree
    assert torch.equal(
        run(tiny_pipe, xray, region_mode="prior", relevance_draws=3).images,
        run(tiny_pipe, xray, region_mode="prior").images,
    )


def test_guidance_state_reuse_with_several_draws(tiny_pipe, xray):
    """A preview with two draws, then the edit reusing it (eta > 0 draws from the generator
    after the noise): bit-identical to the edit alone. A state of other draws is refused."""
    kwargs = dict(relevance_draws=2, eta=0.7)
    preview = run(tiny_pipe, xray, guidance_only=True, **kwargs)
    reused = run(tiny_pipe, xray, guidance_state=preview.guidance_state, **kwargs)
    alone = run(tiny_pipe, xray, **kwargs)
    assert torch.equal(reused.images, alone.images)
    assert torch.equal(reused.guidance_maps, alone.guidance_maps)
    with pytest.raises(ValueError, match="drawn for 2 relevance draws, not 1"):
        run(tiny_pipe, xray, guidance_state=preview.guidance_state)


def test_preview_equals_the_edits_guidance(tiny_pipe, xray):
    preview = run(tiny_pipe, xray, guidance_only=True)
    edit = run(tiny_pipe, xray)
    assert torch.equal(preview.edit_masks, edit.edit_masks)
    assert torch.equal(preview.guidance_maps, edit.guidance_maps)


def test_four_ablation_modes(tiny_pipe, xray):
    tau = 0.2
    rse = run(tiny_pipe, xray, region_mode="rse", tau=tau, guidance_only=True)
    relevance = run(tiny_pipe, xray, region_mode="relevance", tau=tau, guidance_only=True)
    prior = run(tiny_pipe, xray, region_mode="prior", tau=tau, guidance_only=True)
    none = run(tiny_pipe, xray, region_mode="none", tau=tau)
    assert torch.equal(relevance.edit_masks, (relevance.relevance_maps >= tau).float())
    assert torch.equal(prior.edit_masks, (prior.prior_masks >= tau).float())
    expected_rse = (rse.relevance_maps * rse.prior_masks >= tau).float()
    assert torch.equal(rse.edit_masks, expected_rse)
    # G = R x M <= R and <= M, so the RSE region lies inside both ablations' regions
    assert (rse.edit_masks <= relevance.edit_masks).all() and (rse.edit_masks <= prior.edit_masks).all()
    assert rse.edit_masks.sum() < relevance.edit_masks.sum()
    assert none.edit_masks.min() == 1 and none.relevance_maps is None and none.prior_masks is None
    assert prior.relevance_maps is None and relevance.prior_masks is None


def test_tau_zero_edits_everywhere(tiny_pipe, xray):
    assert run(tiny_pipe, xray, tau=0.0, guidance_only=True).edit_masks.min() == 1


def test_prior_comes_from_the_instruction(tiny_pipe, xray):
    out = run(
        tiny_pipe,
        xray,
        prompt="Add the finding of right pneumothorax",
        guidance_only=True,
        region_mode="prior",
    )
    assert out.prior.categories == ("Pneumothorax",)
    assert out.prior_masks[..., 33:].sum() == 0  # patient's right = image left
    fallback = run(
        tiny_pipe, xray, prompt="Add the finding of scoliosis", guidance_only=True, region_mode="prior"
    )
    assert fallback.prior.full_image and "scoliosis" in fallback.prior.reason


def test_user_mask_replaces_prior(tiny_pipe, xray):
    user = torch.zeros(1, 1, 64, 64)
    user[..., 8:40, 8:24] = 1
    out = run(tiny_pipe, xray, mask_image=user, region_mode="prior")
    assert torch.equal(out.edit_masks, user)
    assert out.prior.reason == "user-defined edit mask"
    assert torch.equal(out.images[user == 0], xray[user == 0])


def test_keep_mask_wins_over_everything(tiny_pipe, xray):
    keep = torch.zeros(1, 1, 64, 64)
    keep[..., :, :20] = 1
    out = run(tiny_pipe, xray, keep_mask_image=keep, region_mode="none")
    assert out.edit_masks[keep == 1].max() == 0
    assert torch.equal(out.images[keep == 1], xray[keep == 1])
    assert out.latent_edit_masks[..., :, :3].max() == 0  # latent cells touching the keep region


def test_scheduler_swap_keeps_the_invariants(tiny_pipe, xray):
    original = tiny_pipe.scheduler
    tiny_pipe.scheduler = make_scheduler("dpm++")
    try:
        out = run(tiny_pipe, xray, num_inference_steps=3)
    finally:
        tiny_pipe.scheduler = original
    outside = out.edit_masks == 0
    assert torch.equal(out.images[outside], xray[outside])
    assert torch.isfinite(out.images).all()


def test_rgb_and_pil_inputs(tiny_pipe, xray):
    rgb = xray.expand(-1, 3, -1, -1).contiguous()
    out = run(tiny_pipe, rgb)
    assert out.images.shape == (1, 3, 64, 64)
    pil = tiny_pipe(PROMPT, xray[0, 0].numpy(), num_inference_steps=2, generator=generator())
    assert pil.images[0].size == (64, 64) and pil.images[0].mode == "L"


def test_interrupt_raises_and_returns_nothing(tiny_pipe, xray):
    def stop(pipe, step, timestep, tensors):
        pipe._interrupt = True
        return {}

    with pytest.raises(EditCancelled):
        run(tiny_pipe, xray, callback_on_step_end=stop)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"tau": 1.5}, ValueError, "tau"),
        ({"tau": -0.1}, ValueError, "tau"),
        ({"num_inference_steps": 0}, ValueError, "num_inference_steps"),
        ({"guidance_scale": -1.0}, ValueError, "guidance_scale"),
        ({"image_guidance_scale": -0.5}, ValueError, "image_guidance_scale"),
        ({"guidance_scale": float("nan")}, ValueError, "guidance_scale must be a finite number"),
        ({"image_guidance_scale": float("inf")}, ValueError, "finite"),
        ({"tau": float("nan")}, ValueError, "tau must be a finite number"),
        ({"keep_mask_image": torch.ones(1, 1, 64, 64)}, ValueError, "keep mask covers the whole image"),
        ({"latents": [[0.0]]}, TypeError, "latents"),
        ({"prompt": "Add the finding of\x00 edema"}, ValueError, "control character U\\+0000"),
        ({"prompt": "Add edema \udcff"}, ValueError, "not valid UTF-8"),
        ({"region_mode": "everywhere"}, ValueError, "region_mode"),
        ({"relevance_timestep": 1000}, ValueError, "relevance_timestep"),
        ({"relevance_draws": 0}, ValueError, "relevance_draws must be an integer in \\[1, 16\\]"),
        ({"relevance_draws": 17}, ValueError, "relevance_draws"),
        ({"relevance_draws": True}, ValueError, "relevance_draws"),
        ({"relevance_from": 1}, ValueError, "`relevance_from` must be a batch element, 0 to 0, got 1"),
        ({"relevance_from": True}, ValueError, "relevance_from"),
        ({"guidance_scale": None}, ValueError, "both guidance scales"),  # the editor resolves None
        ({"output_type": "latent"}, ValueError, "output_type"),
        ({"callback_on_step_end_tensor_inputs": ["secret"]}, ValueError, "callback"),
        ({"prompt": ""}, ValueError, "empty"),
        ({"prompt": "a" * 1000}, ValueError, "characters"),
        (
            {"prompt": ["Add edema", "Add edema"]},
            ValueError,
            "2 image\\(s\\) of one size \\(one per prompt\\)",
        ),
        ({"prompt": 3}, TypeError, "prompt"),
        ({"generator": [torch.Generator(), torch.Generator()]}, ValueError, "one generator per prompt"),
        ({"mask_image": torch.ones(1, 1, 32, 32)}, ValueError, "mask_image"),
        ({"mask_image": torch.zeros(1, 1, 64, 64)}, ValueError, "empty"),
        ({"keep_mask_image": torch.ones(1, 1, 63, 64)}, ValueError, "keep_mask_image"),
        ({"mask_image": torch.ones(1, 1, 64, 64), "region_mode": "none"}, ValueError, "does not use"),
        ({"prior_mask": torch.ones(1, 1, 64, 64), "region_mode": "relevance"}, ValueError, "does not use"),
    ],
)
def test_bad_arguments_fail_before_any_model_call(tiny_pipe, xray, kwargs, error, match):
    calls = []
    # every model the pipeline calls: the text encoder, the UNet, the VAE's encoder and decoder
    modules = (tiny_pipe.text_encoder, tiny_pipe.unet, tiny_pipe.vae.encoder, tiny_pipe.vae.decoder)
    handles = [
        m.register_forward_pre_hook(lambda module, args: calls.append(type(module).__name__)) for m in modules
    ]
    try:
        with pytest.raises(error, match=match):
            run(tiny_pipe, xray, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == []


def test_the_hooks_see_every_model_call(tiny_pipe, xray):
    """The hooks above would notice a model call: a valid run fires all four."""
    calls = set()
    modules = (tiny_pipe.text_encoder, tiny_pipe.unet, tiny_pipe.vae.encoder, tiny_pipe.vae.decoder)
    handles = [m.register_forward_pre_hook(lambda module, args: calls.add(id(module))) for m in modules]
    try:
        run(tiny_pipe, xray, num_inference_steps=1)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == {id(m) for m in modules}


@pytest.mark.parametrize(
    "image,match",
    [
        (torch.rand(1, 1, 60, 64), "multiples of 8"),
        (torch.rand(1, 4, 64, 64), "grayscale or RGB"),
        (torch.rand(2, 1, 64, 64), "must give 1 image\\(s\\)"),  # two images for one prompt
        (torch.rand(1, 1, 64, 64) * 3, r"\[0, 1\]"),
        ("image.png", "PIL image"),
    ],
)
def test_bad_images(tiny_pipe, image, match):
    with pytest.raises((ValueError, TypeError), match=match):
        run(tiny_pipe, image)


def test_wrong_unet_channels_are_refused(xray):
    from instructx2x.untrained import build_untrained_pipeline

    pipe = build_untrained_pipeline()
    pipe.unet.register_to_config(in_channels=4)
    with pytest.raises(ValueError, match="8"):
        run(pipe, xray)


def test_shipped_ddim_is_the_authors_configuration():
    import json
    from importlib import resources

    config = make_scheduler("ddim").config
    assert (config.beta_start, config.beta_end, config.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert (config.num_train_timesteps, config.steps_offset) == (1000, 1)
    assert config.set_alpha_to_one is False and config.clip_sample is False
    shipped = json.loads(
        (
            resources.files("instructx2x") / "resources" / "sd15_ip2p" / "scheduler" / "scheduler_config.json"
        ).read_text()
    )
    assert all(config[key] == value for key, value in shipped.items() if key != "_class_name")
    scheduler = make_scheduler("ddim")
    scheduler.set_timesteps(100)
    assert int(scheduler.timesteps[0]) == 991 and int(scheduler.timesteps[-1]) == 1


@pytest.mark.parametrize("name", ["dpm++", "unipc"])
def test_latent_blending_under_the_cpu_default_samplers(tiny_pipe, xray, name):
    """After every step of a multistep solver, the latents outside the mask are the input
    re-noised with the same noise to the next timestep (the clean input after the last)."""
    seen = []

    def record(pipe, step, timestep, tensors):
        seen.append({k: v.clone() for k, v in tensors.items()})
        return {}

    original = tiny_pipe.scheduler
    tiny_pipe.scheduler = make_scheduler(name)
    try:
        out = run(
            tiny_pipe,
            xray,
            num_inference_steps=3,
            tau=0.3,
            callback_on_step_end=record,
            callback_on_step_end_tensor_inputs=["latents", "mask", "source_latents", "noise"],
        )
        timesteps = tiny_pipe.scheduler.timesteps
    finally:
        tiny_pipe.scheduler = original
    assert len(seen) == 3
    for i, state in enumerate(seen):
        outside = state["mask"].expand_as(state["latents"]) == 0
        # docs/method.md section 2, step 6, from the training schedule itself, independent of
        # the solver's state
        alpha = tiny_pipe.scheduler.alphas_cumprod[int(timesteps[i + 1])] if i < 2 else torch.tensor(1.0)
        expected = alpha.sqrt() * state["source_latents"] + (1 - alpha).sqrt() * state["noise"]
        assert outside.any()
        assert torch.allclose(state["latents"][outside], expected[outside], atol=1e-6)
    assert torch.equal(out.images[out.edit_masks == 0], xray[out.edit_masks == 0])


@pytest.mark.parametrize("mode,scale,dtype", [("I;16", 65535, np.uint16), ("F", 1.0, np.float32)])
def test_pil_images_are_read_at_full_depth(tiny_pipe, mode, scale, dtype):
    """A 16-bit or float PIL image must give the same result as its [0, 1] tensor (through
    8-bit "L" a 16-bit ramp reads as ~1, a float one as ~0)."""
    ramp = np.tile(np.linspace(0.1, 0.9, 64, dtype=np.float32), (64, 1))
    image = PIL.Image.fromarray((ramp * scale).astype(dtype))
    assert image.mode == mode
    from_pil = run(tiny_pipe, image, guidance_only=True)
    from_tensor = run(
        tiny_pipe,
        torch.from_numpy((ramp * scale).astype(dtype).astype(np.float32) / scale),
        guidance_only=True,
    )
    assert torch.allclose(from_pil.relevance_maps, from_tensor.relevance_maps, atol=1e-6)
    with pytest.raises(ValueError, match="PIL mode 'I'"):
        run(tiny_pipe, PIL.Image.fromarray(np.zeros((64, 64), np.int32)))


def test_constant_relevance_map_is_refused_before_denoising(tiny_pipe, xray):
    """If the text changes nothing (equal noise predictions), R normalises to zeros and the
    edit would silently return the input: refuse after the one relevance call."""
    calls = []

    def same_prediction(module, args, kwargs, output):
        calls.append(1)
        sample = output[0] if isinstance(output, tuple) else output.sample
        sample.copy_(sample[:1].expand_as(sample))
        return output

    handle = tiny_pipe.unet.register_forward_hook(same_prediction, with_kwargs=True)
    try:
        with pytest.raises(EmptyEditRegionError, match="relevance map is constant"):
            run(tiny_pipe, xray)
    finally:
        handle.remove()
    assert calls == [1]


def test_too_high_tau_is_refused_with_the_largest_guidance_value(tiny_pipe, xray):
    with pytest.raises(EmptyEditRegionError, match="no guidance value reaches tau=1"):
        run(
            tiny_pipe,
            xray,
            tau=1.0,
            region_mode="rse",
            prior_mask=torch.zeros(1, 1, 64, 64).index_fill_(3, torch.tensor([0]), 1.0),
        )


def test_relevance_is_computed_in_fp32_when_the_model_runs_in_bf16(xray):
    """The bf16 pipeline's relevance map equals the one an fp32 UNet with the same (bf16-
    rounded) weights computes; the UNet is back in bf16 afterwards."""
    from instructx2x.untrained import build_untrained_pipeline

    pipe = build_untrained_pipeline(seed=0).to(dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    dtypes = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: dtypes.append(args[0].dtype))
    try:
        out = run(pipe, xray, num_inference_steps=1, region_mode="relevance")
    finally:
        handle.remove()
    assert dtypes == [torch.float32, torch.bfloat16] and pipe.unet.dtype == torch.bfloat16
    # docs/method.md section 2, step 3, by hand on the pipeline's own inputs, with an fp32
    # copy of the UNet
    import copy

    state = out.guidance_state
    unet32 = copy.deepcopy(pipe.unet).to(torch.float32)
    alpha = pipe.scheduler.alphas_cumprod[800]
    noisy = alpha.sqrt() * state.source_latents + (1 - alpha).sqrt() * state.noise
    c = state.image_latents.float()
    with torch.no_grad():
        eps = unet32(
            torch.cat([torch.cat([noisy] * 2), torch.cat([c, c])], dim=1),
            800,
            encoder_hidden_states=state.prompt_embeds[:2].float(),
        ).sample
    expected = guidance.relevance_map(*eps.chunk(2))
    assert torch.allclose(state.relevance, expected, atol=1e-5)
    pipe.relevance_dtype = None  # in bf16 the map is visibly different
    in_bf16 = run(pipe, xray, guidance_only=True, region_mode="relevance").guidance_state.relevance
    assert not torch.allclose(in_bf16, expected, atol=1e-3)


def test_each_batch_element_equals_the_same_edit_alone(tiny_pipe):
    """A batch of three with their own instructions, masks and generators: element i is the
    edit of image i run alone with generator i (eta > 0 draws from the generator too).

    The masks come from the priors (region mode "prior"): batched arithmetic differs from
    single in the last bits (about 2e-5 in R on an AVX2 CPU), enough to flip a latent cell whose
    guidance lies on tau, and one flipped cell changes the decoded image around it. The relevance
    maps are compared to that tolerance instead."""
    images = torch.rand(3, 1, 64, 64, generator=generator(4))
    images = torch.nn.functional.avg_pool2d(images, 5, 1, 2)  # smooth, like a film
    prompts = [
        "Add the finding of left pleural effusion",
        "Remove the finding of edema",
        "Add the finding of right pneumothorax",
    ]
    kwargs = dict(num_inference_steps=3, tau=0.2, eta=0.5, output_type="pt")
    batch = tiny_pipe(
        prompts, images, generator=[generator(s) for s in (1, 2, 3)], region_mode="prior", **kwargs
    )
    relevance = tiny_pipe(
        prompts,
        images,
        generator=[generator(s) for s in (1, 2, 3)],
        guidance_only=True,
        relevance_draws=2,
        **kwargs,
    ).relevance_maps
    assert batch.images.shape == (3, 1, 64, 64) and len(batch.prior) == 3
    assert [p.laterality for p in batch.prior] == ["left", None, "right"]
    for i, seed in enumerate((1, 2, 3)):
        alone = tiny_pipe(
            prompts[i], images[i : i + 1], generator=generator(seed), region_mode="prior", **kwargs
        )
        assert torch.allclose(
            relevance[i : i + 1],
            tiny_pipe(
                prompts[i],
                images[i : i + 1],
                generator=generator(seed),
                guidance_only=True,
                relevance_draws=2,
                **kwargs,
            ).relevance_maps,
            atol=1e-4,
        )
        assert torch.equal(alone.edit_masks, batch.edit_masks[i : i + 1])
        assert torch.allclose(alone.images, batch.images[i : i + 1], atol=1e-4)
        outside = batch.edit_masks[i] == 0
        assert torch.equal(batch.images[i][outside], images[i][outside])


def test_relevance_from_one_element_gives_every_element_its_region(tiny_pipe, xray):
    """A series: one image and seed at two instructions, relevance_from=1. One relevance call
    (element 1's members), the same map, guidance and masks for both, that map equal to element
    1's own; only the instruction changes the edits."""
    prompts = [
        "Add the finding of mild left pleural effusion",
        "Add the finding of severe left pleural effusion",
    ]
    images = xray.repeat(2, 1, 1, 1)
    sizes = []
    handle = tiny_pipe.unet.register_forward_pre_hook(
        lambda m, a: sizes.append((int(a[1]), a[0].shape[0])) if int(a[1]) == 800 else None
    )
    try:
        out = tiny_pipe(
            prompts,
            images,
            generator=[generator(5), generator(5)],
            relevance_from=1,
            relevance_draws=2,
            tau=0.2,
            num_inference_steps=3,
            output_type="pt",
        )
    finally:
        handle.remove()
    assert sizes == [(800, 2), (800, 2)]  # two draws, each on one element's two members
    assert torch.equal(out.relevance_maps[0], out.relevance_maps[1])
    assert torch.equal(out.guidance_maps[0], out.guidance_maps[1])
    assert torch.equal(out.edit_masks[0], out.edit_masks[1])
    assert torch.equal(out.latent_edit_masks[0], out.latent_edit_masks[1])
    assert torch.equal(out.guidance_state.noise[0], out.guidance_state.noise[1])  # the same noise
    alone = tiny_pipe(
        prompts[1], xray, generator=generator(5), relevance_draws=2, guidance_only=True, output_type="pt"
    )
    assert torch.allclose(out.relevance_maps[1:], alone.relevance_maps, atol=1e-4)
    first = tiny_pipe(
        prompts[0], xray, generator=generator(5), relevance_draws=2, guidance_only=True, output_type="pt"
    )
    assert (first.relevance_maps - alone.relevance_maps).abs().max() > 0.05  # a region of its own otherwise
    assert not torch.equal(out.images[0], out.images[1])
    outside = out.edit_masks[0] == 0
    assert torch.equal(out.images[0][outside], xray[0][outside])


def test_decoding_the_mask_region_only(tiny_pipe):
    """The decoder sees only the masks' box plus the margin; outside the mask the output is
    the input either way. Inside, it is not a full decode's (group norms and attention see
    only the crop): that is why it is opt-in, and the difference is measured, not assumed."""
    from instructx2x.pipeline import DECODE_MARGIN

    image = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 128, 128, generator=generator(5)), 5, 1, 2)
    mask = torch.zeros(1, 1, 128, 128)
    mask[..., 40:72, 80:112] = 1
    shapes = []
    handle = tiny_pipe.vae.decoder.register_forward_pre_hook(lambda m, a: shapes.append(tuple(a[0].shape)))
    try:
        kwargs = dict(region_mode="prior", mask_image=mask, num_inference_steps=2)
        full = run(tiny_pipe, image, **kwargs)
        part = run(tiny_pipe, image, decode_mask_region=True, **kwargs)
    finally:
        handle.remove()
    box = (32 // 8 + 2 * DECODE_MARGIN, min(32 // 8 + 2 * DECODE_MARGIN, 16 - 80 // 8 + DECODE_MARGIN))
    assert shapes == [(1, 4, 16, 16), (1, 4, *box)]
    inside = full.edit_masks > 0
    assert torch.equal(part.images[~inside], image[~inside])
    difference = (part.images - full.images)[inside].abs().mean()
    assert 0 < difference < 0.25 and part.images.min() >= 0 and part.images.max() <= 1
