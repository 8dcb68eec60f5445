"""Self-conditioning (Chen et al. 2023, seed 003) for the Gaussian image recipes: one mechanism
(difflab.gaussian.self_conditioning) for images and continuous text. With the flag off the model
is the plain one bit for bit; every sampler feeds each network evaluation the estimate of the
one before (zeros first), classifier-free guidance's branches each their own; training reads
zeros in half of the batches by one seeded coin per batch; a tiny digits run trains, samples and
evaluates from the command line; the flag is refused where it does not apply."""

from __future__ import annotations

import math

import pytest
import torch
from cli_run import run
from safetensors.torch import load_file

import difflab
from difflab.gaussian.guidance import ClassifierFreeGuidance
from difflab.gaussian.objectives import make_objective
from difflab.gaussian.parameterization import Denoiser
from difflab.gaussian.samplers import SAMPLERS, time_grid
from difflab.gaussian.schedules import make_schedule
from difflab.gaussian.self_conditioning import SelfConditioned, SelfConditionedTraining, restart
from difflab.nets.dit import DiT
from difflab.nets.unet import UNet
from difflab.recipes.image import DiffusionConfig, make_loss

SCHEDULE = make_schedule("cosine", T=50)
TINY = ["train.steps=2", "train.batch_size=8", "train.log_every=1", "model.unet.channels=8",
        "model.unet.num_heads=2", "diffusion.T=20", "sample.steps=2"]  # fmt: skip


def unet(self_condition: bool | None) -> UNet:
    torch.manual_seed(0)
    extra = {} if self_condition is None else {"self_condition": self_condition}
    return UNet(in_channels=1, channels=8, num_heads=2, image_size=8, num_res_blocks=1, **extra)


def dit(self_condition: bool | None) -> DiT:
    torch.manual_seed(0)
    extra = {} if self_condition is None else {"self_condition": self_condition}
    return DiT(in_channels=1, image_size=8, width=16, depth=1, num_heads=2, **extra)


# ---------------------------------------------------------------- the flag off is the plain model


@pytest.mark.parametrize("build", [unet, dit])
def test_the_networks_without_the_flag_are_the_plain_ones(build):
    plain, off, on = build(None), build(False), build(True)
    for (name, a), (_, b) in zip(plain.state_dict().items(), off.state_dict().items(),
                                 strict=True):  # fmt: skip
        assert torch.equal(a, b), name
    first = next(iter(on.state_dict().values()))
    assert any(v.shape[1] == 2 for v in on.state_dict().values() if v.ndim == 4), first.shape
    x, c = torch.randn(3, 1, 8, 8), torch.full((3,), 500.0)
    with pytest.raises(ValueError, match="without self_condition"):
        off(x, c, self_cond=torch.zeros_like(x))
    with pytest.raises(ValueError, match="x's shape"):
        on(x, c, self_cond=torch.zeros(3, 1, 4, 4))
    # no estimate means zeros; an estimate changes the output of a network that reads it
    torch.nn.init.normal_(on.conv_out.weight if build is unet else on.proj_out.weight)
    assert torch.equal(on(x, c), on(x, c, self_cond=torch.zeros_like(x)))
    assert not torch.allclose(on(x, c), on(x, c, self_cond=torch.ones_like(x)))


def test_a_run_trained_with_the_flag_off_is_the_run_trained_without_it(tmp_path):
    """The whole checkpoint (weights, EMA, optimizer state) is equal bit for bit."""
    difflab.train("digits-tiny", TINY, out=str(tmp_path / "plain"), progress=False)
    difflab.train("digits-tiny", [*TINY, "model.self_condition=false"],
                  out=str(tmp_path / "off"), progress=False)  # fmt: skip
    files = sorted(p.name for p in (tmp_path / "plain").glob("*.safetensors"))
    assert files
    for name in files:
        a, b = load_file(tmp_path / "plain" / name), load_file(tmp_path / "off" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


# ---------------------------------------------------------------- sampling


class Recording:
    """A network of the ``x0`` parameterization that records the ``self_cond`` it reads and
    returns an estimate depending on ``x_t``, the class label and the call count."""

    def __init__(self):
        self.seen: list[torch.Tensor] = []
        self.returned: list[torch.Tensor] = []

    def __call__(self, x_t, c_noise, class_labels=None, self_cond=None):
        self.seen.append(self_cond.clone())
        out = torch.tanh(x_t) + 0.01 * len(self.seen)
        if class_labels is not None:
            out = out + 0.1 * class_labels.to(out.dtype).reshape(-1, *[1] * (x_t.ndim - 1))
        self.returned.append(out.clone())
        return out


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_feeds_the_previous_evaluations_estimate(sampler):
    net = Recording()
    denoiser = SelfConditioned(Denoiser(net, SCHEDULE, "x0"))
    ts = time_grid(SCHEDULE, 5, "trailing")
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = SAMPLERS[sampler](denoiser, x * SCHEDULE.prior_std, ts,
                            generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert torch.isfinite(out).all()
    assert len(net.seen) >= 5
    assert torch.equal(net.seen[0], torch.zeros_like(x))
    for k in range(1, len(net.seen)):
        assert torch.equal(net.seen[k], net.returned[k - 1]), k
    # the next run starts from zeros again
    restart(denoiser)
    SAMPLERS[sampler](denoiser, x, ts, generator=torch.Generator().manual_seed(1))
    first_of_second_run = net.seen[len(net.returned) // 2]
    assert torch.equal(first_of_second_run, torch.zeros_like(x))


def test_a_kept_estimate_of_another_shape_is_refused_not_fed():
    denoiser = SelfConditioned(Denoiser(Recording(), SCHEDULE, "x0"))
    t = torch.full((2,), 0.5, dtype=torch.float64)
    denoiser(torch.randn(2, 1, 4, 4), t)
    with pytest.raises(ValueError, match="restart"):
        denoiser(torch.randn(3, 1, 4, 4), t.new_full((3,), 0.5))


@pytest.mark.parametrize("sampler", ["ddim", "heun"])
def test_each_branch_of_classifier_free_guidance_keeps_its_own_estimate(sampler):
    net = Recording()
    guided = ClassifierFreeGuidance(SelfConditioned(Denoiser(net, SCHEDULE, "x0")), 2.0,
                                    null_label=10)  # fmt: skip
    labels = torch.tensor([3, 7])
    SAMPLERS[sampler](guided, torch.randn(2, 1, 4, 4), time_grid(SCHEDULE, 4, "trailing"),
                      cond={"class_labels": labels})  # fmt: skip
    assert torch.equal(net.seen[0], torch.zeros(4, 1, 4, 4))
    for k in range(1, len(net.seen)):
        previous = net.returned[k - 1]
        assert torch.equal(net.seen[k][:2], previous[:2]), k  # conditional rows (labels 3, 7)
        assert torch.equal(net.seen[k][2:], previous[2:]), k  # unconditional rows (null 10)
        assert not torch.equal(previous[:2], previous[2:])


# ---------------------------------------------------------------- training


def test_training_reads_zeros_in_half_the_batches_by_one_seeded_coin_each():
    calls: list[tuple[torch.Tensor, bool]] = []

    def net(x_t, c_noise, self_cond):
        calls.append((self_cond.clone(), torch.is_grad_enabled()))
        return 0.5 * x_t + 0.001 * c_noise.reshape(-1, 1, 1, 1)

    batches, seed = 400, 7
    training = SelfConditionedTraining(Denoiser(net, SCHEDULE, "x0"),
                                       torch.Generator().manual_seed(seed))  # fmt: skip
    for _ in range(batches):
        x_t = torch.randn(4, 1, 2, 2)
        t = torch.rand(4, dtype=torch.float64)
        start = len(calls)
        pred = training(x_t, t)
        mine = calls[start:]
        if len(mine) == 1:  # no estimate: zeros, and the only call is the trained one
            assert torch.equal(mine[0][0], torch.zeros_like(x_t)) and mine[0][1]
        else:  # the stop-gradient first estimate from the same x_t, read by the trained call
            (first_in, first_grad), (second_in, second_grad) = mine
            assert torch.equal(first_in, torch.zeros_like(x_t)) and not first_grad
            assert second_grad
            expected = 0.5 * x_t + 0.001 * (1000.0 * t).to(x_t.dtype).reshape(-1, 1, 1, 1)
            assert torch.equal(second_in, expected)
        assert pred.x0.shape == x_t.shape
    # exactly the coins of the seeded generator, one per batch: rand() < 1/2 means an estimate
    coins = torch.Generator().manual_seed(seed)
    expected = sum(bool(torch.rand((), generator=coins) < 0.5) for _ in range(batches))
    assert training.used == expected == len(calls) - batches
    assert abs(expected - batches / 2) < 3 * math.sqrt(batches / 4)


def test_the_image_loss_trains_a_self_conditioned_network_self_conditioned():
    calls: list[bool] = []

    class Net(torch.nn.Module):
        self_condition = True

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.5))

        def forward(self, x_t, c_noise, self_cond=None):
            calls.append(bool(self_cond.abs().sum() > 0))
            return self.w * x_t + 0.1 * self_cond

    loss = make_loss(DiffusionConfig(prediction="x0", schedule="cosine", T=50), None)
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        loss(Net(), (torch.randn(8, 1, 2, 2),), gen).backward()
    with_estimate = sum(calls)  # the trained calls that read a (non-zero) estimate
    assert len(calls) == 100 + with_estimate
    assert 20 < with_estimate < 80
    # without the flag: one call per batch, no self_cond passed
    plain_calls = []

    def plain(x_t, c_noise):
        plain_calls.append(1)
        return x_t

    objective = make_objective("x0", "simple")
    objective(Denoiser(plain, SCHEDULE, "x0"), torch.randn(8, 1, 2, 2), None, gen)
    assert plain_calls == [1]


# ---------------------------------------------------------------- command line


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_a_self_conditioned_digits_run_trains_samples_and_evaluates(kind, tmp_path, monkeypatch,
                                                                     capsys):  # fmt: skip
    out = tmp_path / "run"
    dit = ["model.kind=dit", "model.unet=null", "model.dit.width=16", "model.dit.depth=1",
           "model.dit.num_heads=2"]  # fmt: skip
    args = TINY if kind == "unet" else [a for a in TINY if not a.startswith("model.unet")] + dit
    code, _, err = run(monkeypatch, capsys, "train", "digits-tiny", f"train.out={out}", *args,
                       "model.self_condition=true")  # fmt: skip
    assert code == 0, err
    loaded = difflab.load(out, "cpu")
    assert loaded.config.model.self_condition is True
    assert loaded.model.denoiser.net.self_condition is True
    for sampler in ("ddim", "heun"):
        code, _, err = run(monkeypatch, capsys, "sample", str(out), "--n", "4", "--sampler",
                           sampler, "--guidance", "1",
                           "--out", str(tmp_path / sampler))  # fmt: skip
        assert code == 0, err
    code, stdout, err = run(monkeypatch, capsys, "eval", str(out), "--n", "4", "--t-samples", "3")
    assert code == 0, err
    assert "bits/dim" in stdout and "no previous estimate" in stdout


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("preset", "args", "recipe", "message"),
    [
        ("moons", [], None, "model.self_condition applies to model.kind=unet or dit, not mlp"),
        ("digits-tiny", ["classifier.channels=8"], "classifier",
         "model.self_condition does not apply to this recipe"),
        ("digits-tiny", [], "cascade", "model.self_condition does not apply to this recipe"),
        ("digits-tiny", [], "text-to-digit", "model.self_condition does not apply"),
        ("digits-tiny", [], "consistency", "model.self_condition does not apply to this recipe"),
        ("digits-tiny", ["model.self_condition=yes-please"], None, "self_condition"),
    ],
)  # fmt: skip
def test_the_flag_is_refused_where_it_does_not_apply(preset, args, recipe, message, tmp_path,
                                                     monkeypatch, capsys):  # fmt: skip
    out = tmp_path / "run"
    extra = [] if recipe is None else ["--recipe", recipe]
    code, stdout, err = run(monkeypatch, capsys, "train", preset, *extra, f"train.out={out}",
                            "model.self_condition=true", *args)  # fmt: skip
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and err.startswith("difflab: error: ") and message in err, err
    assert not out.exists()


def test_distilling_a_self_conditioned_run_is_refused(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    difflab.train("digits-tiny", [*TINY, "model.self_condition=true"], out=str(out),
                  progress=False)  # fmt: skip
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, _, err = run(monkeypatch, capsys, "distill", str(out), "--method", "progressive")
    assert code == 2 and err.count("\n") == 1
    assert "does not distil a self-conditioned run" in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_the_flag_is_recorded_in_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    difflab.train("digits-tiny", [*TINY, "model.self_condition=true"], out=str(out),
                  progress=False)  # fmt: skip
    from difflab.recipes import run_metadata

    assert run_metadata(out)["config"]["model"]["self_condition"] is True


def test_a_run_saved_before_the_flag_resumes():
    """A checkpoint's config without ``model.self_condition`` (saved before it existed) matches
    today's default, which is empty; the flag given is a difference."""
    from difflab.config import to_dict
    from difflab.recipes import load_config
    from difflab.train.trainer import _config_differences

    _, cfg = load_config("digits-tiny", [])
    now = {"recipe": "image", "config": to_dict(cfg)}
    model = {k: v for k, v in now["config"]["model"].items() if k != "self_condition"}
    saved = {"recipe": "image", "config": {**now["config"], "model": model}}
    assert _config_differences(saved, now) == []
    now["config"]["model"]["self_condition"] = True
    assert _config_differences(saved, now) == [
        "model.self_condition is absent in the checkpoint but true now"
    ]
