"""Guidance and thresholding wrappers, checked on the exact Gaussian-mixture oracle.

- Classifier-free guidance at its conditional scale is conditional sampling; at other scales it
  is the closed-form guided score ``(1 - gamma) grad log p(x_t) + gamma grad log p(x_t | y)``;
  its one batched network call gives what two separate calls give.
- Classifier guidance with the exact ``p(y | x_t)`` is Bayes' rule: at ``s = 1`` it turns the
  unconditional oracle into the conditional one (pointwise, pathwise and in distribution), and
  larger ``s`` sharpens the samples.
- Conditioning dropout reaches the null label at the configured rate.
- Static and dynamic thresholding keep every ``x_0`` estimate in range and are exactly the
  identity when nothing leaves it.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import Tensor

from difflab.data.images import digits_split
from difflab.gaussian.guidance import (
    ClassifierFreeGuidance,
    ClassifierGuidance,
    DynamicThresholding,
    StaticThresholding,
    thresholded,
)
from difflab.gaussian.oracles import GaussianMixtureOracle
from difflab.gaussian.parameterization import Denoiser
from difflab.gaussian.process import q_sample
from difflab.gaussian.samplers import SAMPLERS
from difflab.gaussian.schedules import cosine_logsnr, linear_beta
from difflab.nets.classifier import NoisyClassifier
from difflab.nets.unet import UNet
from difflab.recipes import load, load_config
from difflab.recipes.classifier import noisy_accuracy
from difflab.recipes.image import build_schedule, drop_labels, make_loss
from difflab.train.checkpoint import load_checkpoint

SCHEDULE = linear_beta(1000)
K = 3  # components; label K is the null label


def mixture(schedule=SCHEDULE) -> GaussianMixtureOracle:
    """Three overlapping 2-D components with full covariances (float64 throughout)."""
    means = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.5]], dtype=torch.float64)
    covs = torch.tensor(
        [[[0.6, 0.1], [0.1, 0.3]], [[0.4, -0.1], [-0.1, 0.5]], [[0.3, 0.0], [0.0, 0.2]]],
        dtype=torch.float64,
    )
    return GaussianMixtureOracle(means, covs, torch.tensor([0.5, 0.3, 0.2]), schedule)


def exact_classifier(oracle: GaussianMixtureOracle):
    """``log p(y | x_t)`` of the oracle: differentiable in ``x_t``."""
    return lambda x, t: oracle.log_class_posterior(x, t)


def noise(n: int, seed: int, dim: int = 2) -> Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def points(n: int = 64, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Random states ``x_t``, times spread over (0, 1) and labels."""
    g = torch.Generator().manual_seed(seed)
    x = 2.0 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.98 + 0.01
    y = torch.randint(0, K, (n,), generator=g)
    return x, t, y


# --- classifier-free guidance --------------------------------------------------------------------


@pytest.mark.parametrize(("convention", "scale"), [("w", 0.0), ("gamma", 1.0)])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_cfg_at_the_conditional_scale_is_conditional_sampling(convention, scale, sampler):
    oracle = mixture()
    cfg = ClassifierFreeGuidance(oracle, scale, convention=convention, null_label=K)
    x, y = noise(500, 1), torch.arange(500) % K
    ts = SCHEDULE.timesteps(40)
    guided = SAMPLERS[sampler](
        cfg, x, ts, cond={"class_labels": y}, generator=torch.Generator().manual_seed(2)
    )
    plain = SAMPLERS[sampler](
        oracle, x, ts, cond={"class_labels": y}, generator=torch.Generator().manual_seed(2)
    )
    # gamma = 1 multiplies (eps_c - eps_u) by exactly 0, so the only difference left is the
    # rounding of the oracle's conditional half computed in a batch of 2B instead of B (float64).
    torch.testing.assert_close(guided, plain, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("convention", "scale", "gamma"),
    [("w", 2.5, 3.5), ("gamma", 0.0, 0.0), ("gamma", 4.0, 4.0), ("w", -0.5, 0.5)],
)
@pytest.mark.parametrize("schedule", [SCHEDULE, cosine_logsnr()], ids=["linear", "cosine-logsnr"])
def test_cfg_is_the_guided_score_of_the_seeds(convention, scale, gamma, schedule):
    """eps = -sigma [(1 - gamma) grad log q_t(x) + gamma grad log q_t(x | y)], with both scores
    from the oracle's closed form (an independent code path: ``oracle.score``)."""
    oracle = mixture(schedule)
    cfg = ClassifierFreeGuidance(oracle, scale, convention=convention, null_label=K)
    assert cfg.gamma == gamma
    x, t, y = points()
    pred = cfg(x, t, {"class_labels": y})
    sigma = schedule.alpha_sigma(t)[1][:, None]
    score_c = oracle.score(x, t, {"class_labels": y})
    score_u = oracle.score(x, t)
    want = -sigma * ((1 - gamma) * score_u + gamma * score_c)
    torch.testing.assert_close(pred.eps, want, rtol=1e-9, atol=1e-12)
    # a consistent prediction at the same point: x_t = alpha x0 + sigma eps
    assert torch.equal(pred.x_t, x)
    torch.testing.assert_close(pred.alpha * pred.x0 + pred.sigma * pred.eps, x, rtol=0, atol=1e-9)


@pytest.mark.parametrize("kind", ["x0", "v", "score"])
def test_cfg_of_any_parameterization_is_the_same_guided_prediction(kind):
    """Guidance combines the form the denoiser gave (eps for an eps network, x0 for an x0 one);
    the result is one and the same guided prediction whatever the network predicts."""
    oracle = mixture()
    x, t, y = points()
    cond = {"class_labels": y}
    reference = ClassifierFreeGuidance(
        Denoiser(oracle.as_network("eps"), SCHEDULE), 2.0, null_label=K
    )
    other = ClassifierFreeGuidance(
        Denoiser(oracle.as_network(kind), SCHEDULE, kind), 2.0, null_label=K
    )
    want, got = reference(x, t, cond), other(x, t, cond)
    torch.testing.assert_close(got.x0, want.x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got.eps, want.eps, rtol=1e-9, atol=1e-9)


class CountingUNet(UNet):
    """A U-Net that records the batch size of every call."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.batch_sizes: list[int] = []

    def forward(self, x, c_noise, **cond):
        self.batch_sizes.append(x.shape[0])
        return super().forward(x, c_noise, **cond)


@pytest.mark.parametrize("with_low_res", [False, True])
def test_cfg_batches_both_passes_into_one_call_equal_to_two_calls(with_low_res):
    torch.manual_seed(0)
    net = CountingUNet(
        channels=8, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(4,), image_size=8,
        num_heads=2, num_classes=4, cond_channels=1 if with_low_res else 0,
    )  # fmt: skip
    with torch.no_grad():  # the output layers start at zero: give every path a say
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    net.eval()
    den = Denoiser(net, SCHEDULE, "v")
    B = 6
    x = torch.randn(B, 1, 8, 8)
    t = torch.rand(B, dtype=torch.float64) * 0.9 + 0.05
    cond = {"class_labels": torch.tensor([0, 1, 2, 3, 0, 1])}
    if with_low_res:
        cond["low_res"] = torch.randn(B, 1, 4, 4)  # shared by both passes
    w = 2.0
    with torch.inference_mode():
        pred = ClassifierFreeGuidance(den, w, null_label=4)(x, t, cond)
        assert net.batch_sizes == [2 * B]  # one call on [x; x]
        p_c = den(x, t, cond)
        p_u = den(x, t, {**cond, "class_labels": torch.full((B,), 4)})
    assert net.batch_sizes == [2 * B, B, B]
    # Same per-example arithmetic in a batch of 2B or of B: float32 rounding only (~1e-6).
    torch.testing.assert_close(pred.eps, (1 + w) * p_c.eps - w * p_u.eps, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pred.x0, (1 + w) * p_c.x0 - w * p_u.x0, rtol=1e-4, atol=1e-5)
    assert (p_c.eps - p_u.eps).abs().max() > 1e-2  # the label matters, so the test can fail


def test_cfg_needs_the_condition_and_one_null():
    oracle = mixture()
    with pytest.raises(ValueError, match="exactly one"):
        ClassifierFreeGuidance(oracle, 1.0)
    with pytest.raises(ValueError, match="convention"):
        ClassifierFreeGuidance(oracle, 1.0, convention="lambda", null_label=K)
    x, t, _ = points(4)
    with pytest.raises(ValueError, match="class_labels"):
        ClassifierFreeGuidance(oracle, 1.0, null_label=K)(x, t, None)


# --- classifier guidance -------------------------------------------------------------------------


def test_classifier_guidance_with_the_exact_posterior_is_bayes_rule():
    """grad log q_t(x | y) = grad log q_t(x) + grad log p(y | x_t): at s = 1 the guided
    unconditional oracle is the conditional oracle, at every point and time."""
    oracle = mixture()
    x, t, y = points()
    cond = {"class_labels": y}
    guided = ClassifierGuidance(oracle, exact_classifier(oracle), 1.0)
    with torch.inference_mode():  # as inside a sampler
        pred = guided(x, t, cond)
    want = oracle(x, t, cond)
    torch.testing.assert_close(pred.eps, want.eps, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(pred.x0, want.x0, rtol=1e-9, atol=1e-9)


def test_classifier_guidance_at_scale_one_samples_the_conditional_distribution():
    oracle = mixture()
    guided = ClassifierGuidance(oracle, exact_classifier(oracle), 1.0)
    n, label = 4000, 0
    cond = {"class_labels": torch.full((n,), label)}
    # Pathwise: the same noise through DDIM gives the conditional oracle's samples.
    x = noise(n, 3)
    ts = SCHEDULE.timesteps(30)
    torch.testing.assert_close(
        SAMPLERS["ddim"](guided, x, ts, cond=cond),
        SAMPLERS["ddim"](oracle, x, ts, cond=cond),
        rtol=0,
        atol=1e-8,
    )
    # In distribution: DPM-Solver++(2M) with 50 steps against the exact N(m_y, C_y). Its
    # discretisation error on this mixture is below 0.01 in every moment (measured with 20,000
    # samples); the sampling error of n = 4000 draws is se(mean_i) = sqrt(C_ii / n) and
    # se(C_ij) = sqrt((C_ii C_jj + C_ij^2) / n). Tolerance: 4 se + 0.01.
    samples = SAMPLERS["dpmpp_2m"](guided, x, SCHEDULE.timesteps(50), cond=cond)
    mean, cov = oracle.means[label], oracle.covs[label]
    se_mean = (cov.diagonal() / n).sqrt()
    assert ((samples.mean(0) - mean).abs() <= 4 * se_mean + 0.01).all()
    se_cov = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / n).sqrt()
    assert ((samples.T.cov() - cov).abs() <= 4 * se_cov + 0.01).all()
    # and not the unconditional mixture, whose spread is much larger
    assert samples.T.cov().trace() < 0.5 * oracle.sample(n, torch.Generator()).T.cov().trace()


def test_classifier_guidance_sharpens_as_the_scale_grows():
    """Samples of p(x) p(y|x)^s: within-class spread sqrt(tr Cov) falls and the exact classifier
    grows more confident as s grows. Same noise for every s (common random numbers); the
    measured gaps (0.91, 0.72, 0.62, 0.55 for s = 1, 2, 4, 8) are many times the standard error
    of a spread from 2000 draws (about spread / sqrt(2n) ~ 0.015), so a margin of 0.03 holds."""
    oracle = mixture()
    n, label = 2000, 0
    x = noise(n, 4)
    cond = {"class_labels": torch.full((n,), label)}
    spreads, confidences = [], []
    for s in (1.0, 2.0, 4.0, 8.0):
        guided = ClassifierGuidance(oracle, exact_classifier(oracle), s)
        samples = SAMPLERS["ddim"](guided, x, SCHEDULE.timesteps(50), cond=cond)
        spreads.append(float(samples.T.cov().trace().sqrt()))
        confidences.append(float(oracle.class_posterior(samples, 0.0)[:, label].mean()))
    assert all(a - b > 0.03 for a, b in itertools.pairwise(spreads)), spreads
    assert all(a < b for a, b in itertools.pairwise(confidences)), confidences
    assert confidences[-1] > 0.999


class RecordingDenoiser:
    """A plain function denoiser (exact oracle) that records the conditions it is given."""

    def __init__(self, oracle):
        self.oracle, self.schedule, self.seen = oracle, oracle.schedule, []

    def __call__(self, x, t, cond=None, *, alpha_sigma=None):
        self.seen.append(cond)
        return self.oracle(x, t, cond, alpha_sigma=alpha_sigma)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [({}, None), ({"null_label": K}, K), ({"conditional": True}, "labels")],
)
def test_classifier_guidance_gives_the_denoiser_the_labels_it_asks_for(kwargs, expected):
    oracle = mixture()
    spy = RecordingDenoiser(oracle)
    x, t, y = points(8)
    ClassifierGuidance(spy, exact_classifier(oracle), 2.0, **kwargs)(x, t, {"class_labels": y})
    seen = spy.seen[0].get("class_labels")
    if expected is None:
        assert seen is None
    elif expected == "labels":
        assert torch.equal(seen, y)
    else:
        assert torch.equal(seen, torch.full_like(y, expected))


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_classifier_guidance_with_a_network_runs_in_every_sampler(sampler):
    """Gradients through an nn.Module classifier inside each sampler's inference mode."""
    torch.manual_seed(0)
    net = UNet(channels=8, channel_mults=(1, 2), num_res_blocks=1, image_size=8, num_heads=2)
    classifier = NoisyClassifier(1, 10, channels=8).eval()
    den = Denoiser(net, SCHEDULE, "eps")
    x = torch.randn(4, 1, 8, 8)
    cond = {"class_labels": torch.tensor([1, 2, 3, 4])}
    ts = SCHEDULE.timesteps(3)
    guided = ClassifierGuidance(den, classifier, 5.0)
    out = SAMPLERS[sampler](guided, x, ts, cond=cond, generator=torch.Generator().manual_seed(0))
    plain = SAMPLERS[sampler](den, x, ts, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert (out - plain).abs().max() > 1e-4  # the classifier's gradient moved the samples


def test_noisy_classifier_trains_on_noisy_inputs_and_reloads(tmp_path):
    """A few Adam steps on noisy digits: above chance (0.1) on held-out digits at low noise, at
    chance where the input carries no information (t = 1), and the reloaded EMA weights give the
    same logits as the trainer's EMA. 360 held-out digits: the binomial sd of an accuracy near
    0.1 is 0.016, so 0.3 is far above chance and 0.2 far below what a signal would give."""
    recipe, cfg = load_config(
        "digits-tiny",
        [f"train.out={tmp_path}", "train.steps=30", "train.batch_size=32", "train.lr=0.003",
         "train.warmup=5", "classifier.channels=8"],
        recipe="classifier",
    )  # fmt: skip
    result = recipe.train(cfg, progress=False)
    assert result.steps == 30
    loaded = load(tmp_path, "cpu").model
    assert loaded.class_names == [str(d) for d in range(10)]
    assert loaded.schedule.config() == build_schedule(cfg.diffusion).config()
    _, held_out = digits_split()
    gen = torch.Generator().manual_seed(0)
    acc = {t: noisy_accuracy(loaded.net, loaded.schedule, held_out.x, held_out.labels, t, gen)
           for t in (0.02, 1.0)}  # fmt: skip
    assert acc[0.02] > 0.3 and acc[1.0] < 0.2, acc
    x, t = held_out.x[:4], torch.full((4,), 0.5, dtype=torch.float64)
    with torch.no_grad():
        ema = load_checkpoint(tmp_path).ema
        fresh = NoisyClassifier(1, 10, channels=8, channel_mults=(1, 2), num_res_blocks=1)
        fresh.load_state_dict(ema)
        assert torch.equal(fresh(x, t), loaded.net(x, t))


# --- conditioning dropout ------------------------------------------------------------------------


def test_drop_labels_reaches_the_null_label_at_the_configured_rate():
    n, p, null = 200_000, 0.15, 10
    labels = torch.arange(n) % 10
    dropped = drop_labels(labels, null, p, torch.Generator().manual_seed(0))
    is_null = dropped == null
    # Binomial(n, p): mean n p, sd sqrt(n p (1 - p)) ~ 160; 5 sd is exceeded with prob. < 1e-6.
    assert abs(int(is_null.sum()) - n * p) < 5 * math.sqrt(n * p * (1 - p))
    assert torch.equal(dropped[~is_null], labels[~is_null])  # the others are untouched
    assert torch.equal(drop_labels(labels, null, 0.0, torch.Generator()), labels)


class LabelSpy(torch.nn.Module):
    """Stands in for the network in the image recipe's loss and records the labels it sees."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.labels: list[Tensor] = []

    def forward(self, x, c_noise, class_labels=None):
        self.labels.append(class_labels)
        return x * self.weight


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_training_loss_feeds_the_null_label_at_cond_drop(p):
    """The image recipe's training loss (what ``difflab train`` runs) drops labels to the null
    label ``K`` with probability ``diffusion.cond_drop``."""
    _, cfg = load_config("digits-tiny", [f"diffusion.cond_drop={p}"])
    loss = make_loss(cfg.diffusion, num_classes=10)
    spy = LabelSpy()
    gen = torch.Generator().manual_seed(0)
    n, batches = 5000, 4
    for _ in range(batches):
        labels = torch.randint(0, 10, (n,), generator=gen)
        loss(spy, (torch.zeros(n, 1, 8, 8), labels), gen)
    seen = torch.cat(spy.labels)
    total = n * batches
    null_count = int((seen == 10).sum())
    # Binomial(20000, p): sd = sqrt(20000 p (1 - p)) ~ 57 for p = 0.2; 5 sd tolerance.
    assert abs(null_count - total * p) <= 5 * math.sqrt(total * p * (1 - p))
    if p > 0:
        assert null_count > 0


# --- thresholding --------------------------------------------------------------------------------


def fixed_x0(values: Tensor):
    """A denoiser whose data estimate is ``values`` whatever ``x_t`` (``x0`` parameterization)."""
    return Denoiser(lambda x, c_noise, **cond: values.to(x.dtype), SCHEDULE, "x0")


def wide_mixture() -> GaussianMixtureOracle:
    """Data mostly outside [-1, 1]: components at -2 and +2.5 with std 0.5, in 16 dimensions."""
    means = torch.stack([torch.full((16,), -2.0), torch.full((16,), 2.5)]).double()
    return GaussianMixtureOracle(means, 0.5, None, SCHEDULE)


@pytest.mark.parametrize(
    "wrap", [lambda d: StaticThresholding(d), lambda d: DynamicThresholding(d, 0.9)]
)
def test_thresholding_keeps_every_x0_estimate_in_range_during_sampling(wrap):
    oracle = wide_mixture()
    raw, kept = [], []
    x = noise(256, 5, dim=16)
    ts = SCHEDULE.timesteps(20)
    SAMPLERS["ddim"](oracle, x, ts, callback=lambda i, t, x_t, x0: raw.append(x0))
    SAMPLERS["ddim"](wrap(oracle), x, ts, callback=lambda i, t, x_t, x0: kept.append(x0))
    assert max(float(r.abs().max()) for r in raw) > 2.0  # the unthresholded estimates leave it
    assert len(kept) == 20
    assert all(float(k.abs().max()) <= 1.0 for k in kept)


@pytest.mark.parametrize("wrap", [StaticThresholding, DynamicThresholding])
def test_thresholding_is_exactly_the_identity_inside_the_range(wrap):
    """The oracle computes x0 and eps separately, so recomputing eps from x0 would change its
    last bits: equality here means the wrapper returned both untouched."""
    means = torch.stack([torch.full((1, 8, 8), -0.3), torch.full((1, 8, 8), 0.3)]).double()
    oracle = GaussianMixtureOracle(means, 0.2, None, SCHEDULE)
    g = torch.Generator().manual_seed(0)
    t = torch.full((16,), 0.3, dtype=torch.float64)
    x0 = oracle.sample(16, g)
    x = q_sample(SCHEDULE, x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    want, got = oracle(x, t), wrap(oracle)(x, t)
    assert float(want.x0.abs().max()) <= 1.0  # nothing to threshold
    assert not torch.equal(want.with_x0(want.x0).eps, want.eps)  # recomputing would show
    assert torch.equal(got.x0, want.x0) and torch.equal(got.eps, want.eps)


def test_static_thresholding_clips_and_stays_consistent():
    values = torch.tensor([[-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 7.0]])
    den = fixed_x0(values)
    x = torch.randn(1, 8)
    t = torch.tensor([0.4], dtype=torch.float64)
    pred = StaticThresholding(den, limit=1.0)(x, t)
    assert torch.equal(pred.x0, values.clamp(-1, 1))
    inside = values.abs() <= 1
    assert torch.equal(pred.eps[inside], den(x, t).eps[inside])
    torch.testing.assert_close(pred.alpha * pred.x0 + pred.sigma * pred.eps, x)


def test_dynamic_thresholding_matches_imagen_per_sample():
    """s = max(1, quantile(|x0|, p)) over each sample's pixels, x0 <- clip(x0, -s, s) / s,
    against numpy's quantile (same linear interpolation); each sample gets its own s."""
    g = torch.Generator().manual_seed(1)
    values = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64) * torch.tensor(
        [0.2, 1.0, 2.0, 5.0, 0.5], dtype=torch.float64
    ).reshape(5, 1, 1, 1)
    den = fixed_x0(values)
    x = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.full((5,), 0.5, dtype=torch.float64)
    p = 0.9
    pred = DynamicThresholding(den, p)(x, t)
    v = values.numpy().reshape(5, -1)
    s = np.maximum(1.0, np.quantile(np.abs(v), p, axis=1))[:, None]
    want = (np.clip(v, -s, s) / s).reshape(values.shape)
    np.testing.assert_allclose(pred.x0.numpy(), want, rtol=1e-6, atol=1e-7)
    assert s[0, 0] == 1.0 < s[3, 0]  # one sample inside the range, others rescaled
    assert float(pred.x0.abs().max()) <= 1.0
    torch.testing.assert_close(pred.alpha * pred.x0 + pred.sigma * pred.eps, x)


def test_thresholding_rejects_bad_settings():
    oracle = mixture()
    with pytest.raises(ValueError, match="limit"):
        StaticThresholding(oracle, limit=0.0)
    with pytest.raises(ValueError, match="percentile"):
        DynamicThresholding(oracle, percentile=1.5)
    with pytest.raises(ValueError, match="unknown threshold 'soft': choose one of none, static"):
        thresholded(oracle, "soft")


def test_thresholded_by_name():
    oracle = mixture()
    assert thresholded(oracle, "none") is oracle
    static = thresholded(oracle, "static")
    assert isinstance(static, StaticThresholding) and static.limit == 1.0
    dynamic = thresholded(oracle, "dynamic", percentile=0.9)
    assert isinstance(dynamic, DynamicThresholding) and dynamic.percentile == 0.9
