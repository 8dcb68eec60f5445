"""Text and image conditioning: captions from measured properties (hand-computed on constructed
images), the tokenizer, the text encoder's null caption, caption dropout rates, the
super-resolution stage's noise-conditioning augmentation, and seconds-long end-to-end runs of the
text-to-digit and cascade recipes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from difflab.errors import UserError
from difflab.gaussian.guidance import ClassifierFreeGuidance
from difflab.gaussian.parameterization import Denoiser
from difflab.gaussian.schedules import linear_beta
from difflab.nets.super_resolution import SuperResolutionNet
from difflab.nets.text_encoder import TextConditionedNet
from difflab.nets.unet import UNet
from difflab.recipes import Run, load, load_config
from difflab.recipes import cascade as cas
from difflab.recipes import text_to_digit as t2d

SCHEDULE = linear_beta(1000)


def line(pixels: list[tuple[int, int]], ink: float = 1.0) -> Tensor:
    """An 8x8 image in [-1, 1]: background -1, ``ink`` in [0, 1] at the given (row, col)."""
    x = -torch.ones(1, 1, 8, 8, dtype=torch.float64)
    for r, c in pixels:
        x[0, 0, r, c] = 2.0 * ink - 1.0
    return x


SLASH = [(r, 7 - r) for r in range(8)]  # "/": one column right per row up, slant +1
BACKSLASH = [(r, r) for r in range(8)]  # "\": slant -1
BAR = [(r, 3) for r in range(8)]  # "|": slant 0
HALF_SHEAR = [(r, 4 - r // 2) for r in range(8)]  # columns 4,4,3,3,2,2,1,1 down the rows


def perturb_(module: torch.nn.Module, scale: float = 0.1) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


# --- measured properties and captions ------------------------------------------------------------


def test_stroke_mass_and_slant_match_hand_computation():
    x = torch.cat([line(SLASH, 0.5), line(BACKSLASH), line(BAR, 0.75), line(HALF_SHEAR)])
    # mass = sum of ink / 64: 8 * 0.5, 8, 8 * 0.75, 8
    torch.testing.assert_close(t2d.stroke_mass(x), torch.tensor([4, 8, 6, 8]).double() / 64)
    # slant = -cov(c, r) / var(r): +1, -1, 0; the half shear has sum (c - 2.5)(r - 3.5) = -20
    # and sum (r - 3.5)^2 = 42, so slant = 20 / 42 (ink weights cancel out of the ratio).
    want = torch.tensor([1.0, -1.0, 0.0, 20.0 / 42.0], dtype=torch.float64)
    torch.testing.assert_close(t2d.slant(x), want, rtol=0, atol=1e-12)
    # intensities beyond [-1, 1] count as full ink or none
    over = line(BAR) * 3.0
    torch.testing.assert_close(t2d.stroke_mass(over), torch.tensor([8 / 64], dtype=torch.float64))


def constructed_digits() -> tuple[Tensor, Tensor]:
    """Three images per class: thin "/" (mass 4/64, slant +1), middle "|" (6/64, 0), thick "\\"
    (8/64, -1)."""
    trio = torch.cat([line(SLASH, 0.5), line(BAR, 0.75), line(BACKSLASH, 1.0)])
    return trio.repeat(10, 1, 1, 1).float(), torch.arange(10).repeat_interleave(3)


def test_captions_follow_the_class_terciles_and_are_deterministic():
    x, labels = constructed_digits()
    thresholds = t2d.Thresholds.fit(x, labels)
    # terciles of (a, b, c) with linear interpolation: a + 2(b - a)/3 and b + (c - b)/3
    torch.testing.assert_close(
        thresholds.mass[7], torch.tensor([16 / 3, 20 / 3], dtype=torch.float64) / 64
    )
    torch.testing.assert_close(thresholds.slant[7], torch.tensor([-1 / 3, 1 / 3]).double())
    caps = t2d.captions(t2d.measure(x, labels, thresholds))
    assert caps[21:24] == ["a thin slanted seven", "a seven", "a thick upright seven"]
    assert caps[24:27] == ["a thin slanted eight", "an eight", "a thick upright eight"]
    assert caps == t2d.captions(t2d.measure(x, labels, thresholds))
    assert t2d.caption(8, 0, -1) == "an upright eight"


def test_tokenizer_and_prompt_parser():
    tokens = t2d.tokenize(["a thick slanted seven", "", "A thin 3!"])
    ids = {w: i for i, w in enumerate(t2d.VOCAB)}
    assert tokens.shape == (3, t2d.MAX_TOKENS)
    assert tokens[0].tolist() == [ids["a"], ids["thick"], ids["slanted"], ids["seven"], 0, 0]
    assert tokens[1].tolist() == [t2d.PAD] * t2d.MAX_TOKENS
    assert tokens[2].tolist() == [ids["a"], ids["thin"], ids["three"], 0, 0, 0]
    with pytest.raises(ValueError, match="unknown words"):
        t2d.tokenize(["a bold seven"])
    with pytest.raises(ValueError, match="at most"):
        t2d.tokenize(["a a a a a a seven"])
    parsed = t2d.parse_prompt("a thin three")
    assert (parsed.digit.item(), parsed.thickness.item(), parsed.slant.item()) == (3, -1, 0)
    with pytest.raises(ValueError, match="exactly one digit"):
        t2d.parse_prompt("a thin three or four")
    with pytest.raises(ValueError, match="contradictory"):
        t2d.parse_prompt("a thin thick four")


def test_prompt_adherence_counts_what_the_prompt_names():
    x, labels = constructed_digits()
    thresholds = t2d.Thresholds.fit(x, labels)
    images = x[21:24]  # the three sevens: thin slanted, middle, thick upright

    def read_as_seven(batch: Tensor) -> Tensor:
        return torch.full((batch.shape[0],), 7)

    prompts = ["a thin slanted seven", "a thick seven", "a thick upright one"]
    got = t2d.prompt_adherence(images, prompts, thresholds, read_as_seven)
    # digit: 2 of 3 (the third asks for a one); thickness: thin ok, thick wrong (middle), thick
    # measured against a one's terciles (the same here) ok; slant: both named ones right.
    assert got.digit == pytest.approx(2 / 3)
    assert got.thickness == pytest.approx(2 / 3)
    assert got.slant == pytest.approx(1.0)
    assert got.all == pytest.approx(1 / 3)


# --- text encoder, caption dropout, guidance with the empty caption ------------------------------


def tiny_text_net() -> TextConditionedNet:
    torch.manual_seed(0)
    _, cfg = load_config(
        "digits-tiny",
        [
            "model.unet.channels=8",
            "model.unet.num_heads=2",
            "text_encoder.dim=16",
            "text_encoder.depth=1",
            "text_encoder.num_heads=2",
        ],
        recipe="text-to-digit",
    )
    net = t2d.build_net(cfg, (1, 8, 8))
    perturb_(net.net)  # the output layers start at zero
    return net.eval()


def test_the_empty_caption_conditions_on_nothing():
    net = tiny_text_net()
    x, c = torch.randn(2, 1, 8, 8), torch.tensor([300.0, 700.0])
    tokens = t2d.tokenize(["", "a thick seven"])
    with torch.no_grad():
        before = net(x, c, tokens)
        perturb_(net.encoder, 1.0)
        after = net(x, c, tokens)
    assert torch.isfinite(before).all()
    assert torch.equal(before[0], after[0])  # no text reaches the U-Net from an empty caption
    assert (before[1] - after[1]).abs().max() > 1e-4  # but a real caption does


def test_cfg_with_the_empty_caption_batches_both_passes():
    net = tiny_text_net()
    den = Denoiser(net, SCHEDULE, "eps")
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    tokens = t2d.tokenize(["a thin three", "an upright eight", "a four"])
    empty = t2d.tokenize([""])
    with torch.inference_mode():
        guided = ClassifierFreeGuidance(den, 3.0, null_cond={"tokens": empty})(
            x, t, {"tokens": tokens}
        )
        p_c = den(x, t, {"tokens": tokens})
        p_u = den(x, t, {"tokens": empty.expand(3, -1)})
    # float32, batch of 6 vs 3: rounding only
    torch.testing.assert_close(guided.eps, 4.0 * p_c.eps - 3.0 * p_u.eps, rtol=1e-4, atol=1e-5)


class TokenSpy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.tokens: list[Tensor] = []

    def forward(self, x, c_noise, tokens):
        self.tokens.append(tokens)
        return x * self.weight


def test_training_drops_words_and_captions_at_their_rates():
    _, cfg = load_config(
        "digits-tiny",
        ["diffusion.cond_drop=0.2", "text_encoder.word_drop=0.3"],
        recipe="text-to-digit",
    )
    loss = t2d.make_loss(cfg)
    n = 20_000
    full = t2d.Attributes(torch.full((n,), 7), torch.ones(n, dtype=torch.long),
                          torch.ones(n, dtype=torch.long))  # fmt: skip
    variants = t2d.caption_variants(full)
    spy = TokenSpy()
    loss(spy, (torch.zeros(n, 1, 8, 8), variants), torch.Generator().manual_seed(0))
    tokens = spy.tokens[0]
    empty = (tokens == t2d.PAD).all(dim=1)
    ids = {w: i for i, w in enumerate(t2d.VOCAB)}
    kept = tokens[~empty]
    has_thick = (kept == ids["thick"]).any(dim=1).double()
    has_slanted = (kept == ids["slanted"]).any(dim=1).double()

    def within(count: float, trials: int, p: float) -> bool:  # 5 binomial sd
        return abs(count - trials * p) <= 5 * math.sqrt(trials * p * (1 - p))

    assert within(float(empty.sum()), n, 0.2)
    assert within(float((1 - has_thick).sum()), len(kept), 0.3)
    assert within(float((1 - has_slanted).sum()), len(kept), 0.3)
    assert (kept == ids["seven"]).any(dim=1).all()  # the digit is never dropped alone


def test_text_to_digit_trains_loads_and_samples_end_to_end(tmp_path):
    recipe, cfg = load_config(
        "digits-tiny",
        [f"train.out={tmp_path}", "train.steps=6", "train.batch_size=16", "model.unet.channels=8",
         "model.unet.num_heads=2", "diffusion.T=50", "text_encoder.dim=16", "text_encoder.depth=1",
         "text_encoder.num_heads=2"],
        recipe="text-to-digit",
    )  # fmt: skip
    result = recipe.train(cfg, progress=False)
    assert result.steps == 6
    run = load(tmp_path, "cpu")
    assert run.recipe is t2d.RECIPE
    assert run.step == 6 and run.model.thresholds.mass.shape == (10, 2)
    prompts = ["a thin three", "a thick slanted seven"]
    x = run.sample(4, prompt=prompts, guidance=2.0, steps=4, seed=1).x
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()
    assert torch.equal(x, run.sample(4, prompt=prompts, guidance=2.0, steps=4, seed=1).x)
    other = run.sample(4, prompt="a four", guidance=2.0, steps=4, seed=1).x
    assert not torch.equal(x, other)  # the prompt reaches the samples
    # The explorer's reverse-process tab reads every step of a prompt run through the callback.
    from difflab.explore import reverse

    frames = reverse.reverse_frames(run, steps=4, prompt="a thin three", guidance=2.0, seed=1)
    assert len(frames.times) == 5 and frames.times[-1] == 0.0
    assert frames.x0[-1].shape == (reverse.ROW, 1, 8, 8)
    with pytest.raises(UserError, match="unknown words"):
        run.sample(1, prompt="a purple seven")


# --- super-resolution and the cascade ------------------------------------------------------------


def test_downsample_averages_blocks():
    x = torch.arange(64, dtype=torch.float64).reshape(1, 1, 8, 8)
    got = cas.downsample(x, 4)
    # block (i, j) holds rows 2i, 2i+1 and columns 2j, 2j+1: mean 16 i + 2 j + 4.5
    i, j = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    torch.testing.assert_close(got[0, 0], (16 * i + 2 * j + 4.5).double())
    with pytest.raises(ValueError):
        cas.downsample(x, 3)


def test_noise_conditioning_augmentation_is_the_forward_process():
    x_lr = torch.linspace(-1, 1, 16, dtype=torch.float64).reshape(1, 1, 4, 4)
    n, level = 20_000, 0.3
    z = cas.augment_low_res(
        SCHEDULE, x_lr.expand(n, -1, -1, -1), torch.full((n,), level, dtype=torch.float64),
        torch.Generator().manual_seed(0),
    )  # fmt: skip
    alpha, sigma = (float(v) for v in SCHEDULE.alpha_sigma(torch.tensor(level).double()))
    # per pixel: mean alpha x (se sigma / sqrt(n)), variance sigma^2 (se sigma^2 sqrt(2 / n))
    assert (z.mean(0) - alpha * x_lr[0]).abs().max() < 5 * sigma / math.sqrt(n)
    assert (z.var(0) - sigma**2).abs().max() < 5 * sigma**2 * math.sqrt(2 / n)
    zero = cas.augment_low_res(SCHEDULE, x_lr, torch.zeros(1, dtype=torch.float64))
    assert torch.equal(zero, x_lr)  # s = 0 is the clean image


class SuperResolutionSpy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.calls: list[dict] = []

    def forward(self, x, c_noise, low_res, aug_level, class_labels=None):
        self.calls.append({"low_res": low_res, "aug_level": aug_level, "labels": class_labels})
        return x * self.weight


def test_super_resolution_training_augments_at_random_levels_up_to_aug_max():
    _, cfg = load_config(
        "digits-tiny",
        [
            "diffusion.cond_drop=0.1",
            "diffusion.schedule=linear",
            "diffusion.T=1000",
            "cascade.low_res=4",
            "cascade.aug_max=0.4",
        ],
        recipe="cascade",
    )
    loss = cas.make_super_resolution_loss(cfg, num_classes=10)
    n = 8000
    x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    spy = SuperResolutionSpy()
    loss(spy, (x, torch.zeros(n, dtype=torch.long)), torch.Generator().manual_seed(2))
    seen = spy.calls[0]
    s = seen["aug_level"]
    assert float(s.min()) >= 0.0 and float(s.max()) <= 0.4
    # U[0, 0.4]: mean 0.2, sd 0.4 / sqrt(12); 5 se of the mean of n draws
    assert abs(float(s.mean()) - 0.2) < 5 * 0.4 / math.sqrt(12 * n)
    alpha, sigma = SCHEDULE.alpha_sigma(s)
    residual = (seen["low_res"].double() - alpha[:, None, None, None] * cas.downsample(x, 4)) / (
        sigma[:, None, None, None]
    )
    # standardised residuals are N(0, 1): 16 n values, mean se 1/sqrt(16 n), var se sqrt(2/(16 n))
    m = 16 * n
    assert abs(float(residual.mean())) < 5 / math.sqrt(m)
    assert abs(float(residual.var()) - 1.0) < 5 * math.sqrt(2 / m)
    assert (seen["labels"] == 10).any()  # conditioning dropout to the null label


@pytest.mark.parametrize("level", [0.0, 0.25])
def test_super_resolution_sampling_uses_one_fixed_augmentation(level):
    spy = SuperResolutionSpy()
    den = Denoiser(spy, SCHEDULE, "eps")
    low = torch.rand(3, 1, 4, 4) * 2 - 1
    out = cas.super_resolve(den, low, (1, 8, 8), SCHEDULE.timesteps(5), aug_level=level,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.shape == (3, 1, 8, 8)
    assert len(spy.calls) == 5
    first = spy.calls[0]["low_res"]
    for call in spy.calls:
        assert torch.equal(call["aug_level"], torch.full((3,), level, dtype=torch.float64))
        assert torch.equal(call["low_res"], first)  # corrupted once, not per step
    assert torch.equal(first, low) == (level == 0.0)


def test_super_resolution_net_reads_the_augmentation_level():
    torch.manual_seed(0)
    unet = UNet(channels=8, channel_mults=(1, 2), num_res_blocks=1, image_size=8, num_heads=2,
                num_classes=10, cond_channels=2)  # fmt: skip
    perturb_(unet)
    net = SuperResolutionNet(unet).eval()
    x, c = torch.randn(2, 1, 8, 8), torch.tensor([100.0, 900.0])
    low = torch.randn(2, 1, 4, 4)
    with torch.no_grad():
        a = net(x, c, low, torch.tensor([0.0, 0.0]))
        b = net(x, c, low, torch.tensor([0.5, 0.5]))
    assert a.shape == (2, 1, 8, 8)
    assert (a - b).abs().max() > 1e-4
    with pytest.raises(ValueError, match="cond_channels"):
        SuperResolutionNet(UNet(channels=8, image_size=8, num_heads=2, cond_channels=1))


def test_cascade_trains_loads_and_samples_end_to_end(tmp_path):
    recipe, cfg = load_config(
        "digits-tiny",
        [f"train.out={tmp_path}", "train.steps=4", "train.batch_size=16", "model.unet.channels=8",
         "model.unet.num_heads=2", "diffusion.T=50", "cascade.low_res=4", "cascade.aug_max=0.5",
         "cascade.aug_sample=0.2"],
        recipe="cascade",
    )  # fmt: skip
    result = recipe.train(cfg, progress=False)
    assert result.steps == 4 and (tmp_path / "base" / "checkpoint.safetensors").exists()
    run = load(tmp_path, "cpu")
    assert isinstance(run, Run) and run.recipe is cas.RECIPE
    assert run.model.base.shape == (1, 4, 4) and run.model.sr.shape == (1, 8, 8)
    assert run.config.cascade.aug_sample == 0.2
    samples = run.sample(3, label=[0, 3, 7], guidance=1.0, steps=3, seed=0)
    low, high = samples.extras["low"], samples.x
    assert low.shape == (3, 1, 4, 4) and high.shape == (3, 1, 8, 8)
    assert float(low.abs().max()) <= 1.0 and torch.isfinite(high).all()
    assert samples.labels.tolist() == [0, 3, 7]
    with pytest.raises(UserError, match="cascade"):
        cas.RECIPE.load(tmp_path / "base", "cpu")
