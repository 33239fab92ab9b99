import pytest
import torch

from instructx2x import guidance
from instructx2x.guidance import RegionMode


def test_iqr_clip_matches_hand_computed_fence():
    # values 0..7: midpoint quartiles q1 = (1+2)/2 = 1.5, q3 = (5+6)/2 = 5.5, fence 5.5 + 1.5*4 = 11.5
    values = torch.tensor([0.0, 1, 2, 3, 4, 5, 6, 100]).view(1, 2, 4)
    clipped = guidance.clip_outliers_iqr(values)
    assert clipped.flatten().tolist() == [0, 1, 2, 3, 4, 5, 6, 11.5]


def test_iqr_clip_is_per_batch_item():
    a = torch.tensor([0.0, 1, 2, 3, 4, 5, 6, 100]).view(1, 2, 4)
    clipped = guidance.clip_outliers_iqr(torch.cat([a, a * 2]))
    assert clipped[1].flatten()[-1].item() == pytest.approx(23.0)


def test_min_max_normalisation_and_constant_map():
    values = torch.tensor([[[2.0, 4.0], [6.0, 10.0]]])
    assert guidance.normalize_min_max(values).flatten().tolist() == [0.0, 0.25, 0.5, 1.0]
    assert torch.equal(guidance.normalize_min_max(torch.full((1, 2, 2), 3.0)), torch.zeros(1, 2, 2))


def test_relevance_map_sums_channels_clips_and_normalises():
    text = torch.zeros(1, 4, 2, 4)
    image = torch.zeros(1, 4, 2, 4)
    # |eps_text - eps_img| summed over 4 channels: 4 * [0..6, 100]
    text[0, :, :, :] = torch.tensor([0.0, 1, 2, 3, 4, 5, 6, 100]).view(2, 4)
    relevance = guidance.relevance_map(text, image)
    assert relevance.shape == (1, 1, 2, 4)
    expected = torch.tensor([0.0, 4, 8, 12, 16, 20, 24, 46]) / 46  # fence 4 * 11.5 = 46
    assert torch.allclose(relevance.flatten(), expected)


def test_relevance_map_of_several_draws_averages_their_clipped_maps():
    """Draw A's sums are [0..6, 100] (fence 5.5 + 1.5 * 4 = 11.5 clips the outlier), draw B's
    [7..0] (fence 11.5, no clip): R is the min-max of the mean of A/11.5 and B/7. The mean of
    the raw sums, [3.5 x 7, 50], would clip to a constant; the first draw alone is A/11.5."""
    text = torch.zeros(2, 1, 4, 2, 4)
    image = torch.zeros(2, 1, 4, 2, 4)
    text[0, 0, 0] = torch.tensor([0.0, 1, 2, 3, 4, 5, 6, 100]).view(2, 4)
    text[1, 0, 0] = torch.arange(7.0, -1.0, -1.0).view(2, 4)
    relevance = guidance.relevance_map(text, image)
    assert relevance.shape == (1, 1, 2, 4)
    mean = (torch.tensor([0.0, 1, 2, 3, 4, 5, 6, 11.5]) / 11.5 + torch.arange(7.0, -1.0, -1.0) / 7) / 2
    expected = (mean - mean.min()) / (mean.max() - mean.min())
    assert torch.allclose(relevance.flatten(), expected)
    one = guidance.relevance_map(text[:1], image[:1])
    assert torch.equal(one, guidance.relevance_map(text[0], image[0]))


def test_relevance_map_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        guidance.relevance_map(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 3))
    with pytest.raises(ValueError, match="same shape"):
        guidance.relevance_map(torch.zeros(4, 2, 2), torch.zeros(4, 2, 2))


def test_binary_prior_downsamples_to_cell_coverage():
    prior = torch.zeros(1, 1, 8, 8)
    prior[..., :, :3] = 1  # three of every eight columns
    small = guidance.resize_map(prior, (4, 4))
    # cells cover columns (0,1) (2,3) (4,5) (6,7): coverage 1, 0.5, 0, 0
    assert torch.allclose(small[0, 0, 0], torch.tensor([1.0, 0.5, 0.0, 0.0]))


def test_guidance_map_modes():
    relevance = torch.tensor([[[[0.2, 0.8], [0.05, 1.0]]]])
    prior = torch.tensor([[[[1.0, 0.0], [1.0, 0.5]]]])
    assert torch.allclose(
        guidance.guidance_map(relevance, prior, "rse"), torch.tensor([[[[0.2, 0.0], [0.05, 0.5]]]])
    )
    assert torch.equal(guidance.guidance_map(relevance, None, RegionMode.RELEVANCE), relevance)
    assert torch.equal(guidance.guidance_map(None, prior, "prior"), prior)
    assert torch.equal(guidance.guidance_map(relevance, None, "none"), torch.ones_like(relevance))


@pytest.mark.parametrize(
    "mode,relevance,prior",
    [("rse", None, True), ("rse", True, None), ("relevance", None, True), ("prior", True, None)],
)
def test_guidance_map_needs_its_inputs(mode, relevance, prior):
    maps = torch.ones(1, 1, 2, 2)
    with pytest.raises(ValueError, match="needs"):
        guidance.guidance_map(maps if relevance else None, maps if prior else None, mode)


def test_guidance_map_unknown_mode():
    with pytest.raises(ValueError):
        guidance.guidance_map(torch.ones(1, 1, 2, 2), None, "everything")


def test_threshold_is_inclusive():
    g = torch.tensor([0.0, 0.099, 0.1, 0.5])
    assert guidance.threshold_mask(g, 0.1).tolist() == [0, 0, 1, 1]
    assert guidance.threshold_mask(g, 0.0).tolist() == [1, 1, 1, 1]


def test_keep_mask_wins_and_any_touch_counts():
    edit = torch.ones(1, 1, 2, 2)
    keep = torch.tensor([[[[0.0, 0.01], [0.0, 1.0]]]])
    assert guidance.combine_masks(edit, keep).flatten().tolist() == [1, 0, 1, 0]
    assert torch.equal(guidance.combine_masks(edit, None), edit)
    with pytest.raises(ValueError, match="keep mask"):
        guidance.combine_masks(edit, torch.ones(1, 1, 3, 3))
