"""Networks: embeddings against their closed form, attention against a hand-written reference,
shapes, zero output at initialisation, conditioning paths that matter (and masks that must not),
gradient reaching every parameter, and the ability to fit a fixed batch."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from difflab.nets.attention import CrossAttention, SelfAttention
from difflab.nets.dit import DiT
from difflab.nets.embeddings import ConditionEmbedding, TimestepEmbedding, sinusoidal_embedding
from difflab.nets.mlp import MLPDenoiserNet
from difflab.nets.unet import UNet, group_norm


def tiny_unet(**kw) -> UNet:
    args = dict(channels=16, channel_mults=(1, 2), num_res_blocks=1, image_size=8, num_heads=2)
    return UNet(**{**args, **kw})


def tiny_dit(**kw) -> DiT:
    args = dict(in_channels=1, image_size=8, patch_size=2, width=32, depth=2, num_heads=2)
    return DiT(**{**args, **kw})


def perturb_(model: nn.Module, scale: float = 0.05) -> nn.Module:
    """Add noise to every parameter, so zero-initialised layers no longer hide the rest."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def adam_steps(model: nn.Module, loss_fn, steps: int, lr: float = 1e-3) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# --- embeddings -----------------------------------------------------------------------------


def test_sinusoidal_embedding_matches_closed_form():
    # PE(c, 2i) = sin(c / 10000^(2i/d)), PE(c, 2i+1) = cos(...), stored sines first.
    dim, c = 16, torch.tensor([0.0, 1.0, 37.5, 999.0, 1000.0])
    got = sinusoidal_embedding(c, dim).double()
    i = torch.arange(dim // 2, dtype=torch.float64)
    angles = c.double()[:, None] / 10000.0 ** (2 * i / dim)
    want = torch.cat([angles.sin(), angles.cos()], dim=1)
    # float32 angles up to 1000 rad carry ~1e3 * 2^-24 * few ~ 1e-4 absolute error.
    torch.testing.assert_close(got, want, atol=5e-4, rtol=0)
    assert torch.equal(got[0], torch.cat([torch.zeros(dim // 2), torch.ones(dim // 2)]).double())
    with pytest.raises(ValueError, match="even"):
        sinusoidal_embedding(c, 7)


def test_timestep_embedding_deterministic_and_distinct_on_training_grid():
    torch.manual_seed(0)
    emb = TimestepEmbedding(64, freq_dim=64)
    c = torch.arange(1001, dtype=torch.float32)  # c_noise = 1000 t on the DDPM grid
    e1, e2 = emb(c), emb(c.clone())
    assert torch.equal(e1, e2)
    # Adjacent steps are 2 sin(1/2) = 0.96 apart from the frequency-1 pair alone; over all pairs
    # the measured minimum is 1.47 for the features and 0.15 after the random MLP (seed 0), so
    # the bounds below leave a margin of 3x and 15x while still catching collapsed embeddings.
    for features, bound in ((sinusoidal_embedding(c, 64), 0.5), (e1, 1e-2)):
        dist = torch.cdist(features.double(), features.double())
        dist.fill_diagonal_(math.inf)
        assert dist.min() > bound


def test_class_embedding_null_row_and_addition():
    torch.manual_seed(0)
    emb = ConditionEmbedding(8, num_classes=5)
    assert emb.null_class == 5 and emb.label.table.num_embeddings == 6
    c = torch.tensor([3.0, 700.0])
    assert torch.equal(emb(c, None, 2), emb(c, torch.tensor([5, 5]), 2))
    want = emb.time(c) + emb.label.table.weight[[1, 4]]
    torch.testing.assert_close(emb(c, torch.tensor([1, 4]), 2), want)
    assert torch.equal(emb(torch.tensor(7.0), None, 3), emb(torch.full((3,), 7.0), None, 3))
    with pytest.raises(ValueError, match="num_classes"):
        ConditionEmbedding(8)(c, torch.tensor([0, 1]), 2)


def test_null_class_index_is_num_classes():
    for net in (
        tiny_unet(num_classes=10),
        tiny_dit(num_classes=10),
        MLPDenoiserNet(2, num_classes=10),
    ):
        assert net.null_class == 10
    for net in (tiny_unet(), tiny_dit(), MLPDenoiserNet(2)):
        assert net.null_class is None


# --- attention ------------------------------------------------------------------------------


def reference_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Tensor | None) -> Tensor:
    """Per sample and head, softmax(Q K^T / sqrt(d)) V with explicit loops (float64)."""
    batch, _, dim = q.shape
    d = dim // heads
    out = torch.zeros_like(q)
    for b in range(batch):
        keep = slice(None) if mask is None else mask[b]
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            qh, kh, vh = q[b, :, cols], k[b, keep, cols], v[b, keep, cols]
            out[b, :, cols] = torch.softmax(qh @ kh.T / math.sqrt(d), dim=-1) @ vh
    return out


def test_self_attention_matches_reference():
    torch.manual_seed(0)
    attn = SelfAttention(12, num_heads=3).double()
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    want = attn.out(reference_attention(q, k, v, 3, None))
    torch.testing.assert_close(attn(x), want, atol=1e-12, rtol=1e-12)


def test_cross_attention_matches_reference_and_ignores_padding():
    torch.manual_seed(0)
    attn = CrossAttention(8, context_dim=5, num_heads=2).double()
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    ctx = torch.randn(3, 6, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 0], [0, 0, 0, 1, 0, 0]]).bool()
    k, v = attn.kv(ctx).chunk(2, dim=-1)
    want = attn.out(reference_attention(attn.q(x), k, v, 2, mask))
    got = attn(x, ctx, mask)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(
        attn(x, ctx), attn.out(reference_attention(attn.q(x), k, v, 2, None))
    )
    # Padded tokens have no effect, whatever they hold.
    ctx2 = torch.where(mask[..., None], ctx, 100.0 * torch.randn_like(ctx))
    assert torch.equal(attn(x, ctx2, mask), got)
    # A sample with no real token attends to nothing: exactly zero, and no NaN for the rest.
    empty = mask.clone()
    empty[1] = False
    out = attn(x, ctx, empty)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out[[0, 2]], got[[0, 2]])
    with pytest.raises(ValueError, match="context_mask"):
        attn(x, ctx, mask.float())


# --- shapes and initialisation ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "shape"),
    [
        (dict(), (2, 1, 8, 8)),
        (dict(), (2, 1, 12, 20)),  # another size, not square
        (dict(in_channels=3, out_channels=6, channels=12, num_heads=3), (2, 3, 8, 8)),
        (
            dict(in_channels=2, channel_mults=(1, 2, 3), attn_resolutions=(8, 4), image_size=16),
            (2, 2, 16, 16),
        ),
        (dict(channels=8, channel_mults=(1,), attn_resolutions=(), image_size=5), (2, 1, 5, 5)),
    ],
)
def test_unet_shapes_and_zero_output_at_init(kw, shape):
    torch.manual_seed(0)
    net = tiny_unet(**kw)
    x = torch.randn(*shape)
    out = net(x, torch.tensor([1.0, 900.0]))
    assert out.shape == (shape[0], net.out_channels, *shape[2:])
    assert torch.equal(out, torch.zeros_like(out))


def test_default_unet_output_shape():
    net = UNet()
    out = net(torch.randn(2, 1, 8, 8), torch.tensor([0.0, 1000.0]))
    assert out.shape == (2, 1, 8, 8) and torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize(
    ("kw", "shape"),
    [
        (dict(), (2, 1, 8, 8)),
        (dict(in_channels=3, out_channels=2, patch_size=4), (2, 3, 16, 8)),
        (dict(patch_size=1, image_size=4), (2, 1, 6, 4)),
    ],
)
def test_dit_shapes_and_zero_output_at_init(kw, shape):
    net = tiny_dit(**kw)
    out = net(torch.randn(*shape), torch.tensor([5.0, 500.0]))
    assert out.shape == (shape[0], net.out_channels, *shape[2:])
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("patch_size", [1, 2, 4])
def test_every_fresh_dit_block_is_the_identity_on_its_residual_stream(patch_size):
    # adaLN-Zero: the gates g1, g2 come out of zero-initialised layers and the cross-attention's
    # output projection starts at zero, so h -> h exactly, whatever h, e and the context are.
    torch.manual_seed(0)
    net = tiny_dit(patch_size=patch_size, num_classes=3, context_dim=5)
    h = torch.randn(2, (8 // patch_size) ** 2, 32)
    emb_act = torch.randn(2, 32)
    ctx, mask = torch.randn(2, 4, 5), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]).bool()
    for block in net.blocks:
        assert torch.equal(block(h, emb_act, ctx, mask), h)
    # ... and the network's output is exactly zero. The first step only opens the zero final
    # layer (no gradient reaches the blocks through it); from the second the blocks move.
    x, c = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 700.0])
    labels = torch.tensor([0, 2])
    assert torch.equal(net(x, c, labels, ctx, mask), torch.zeros_like(x))
    adam_steps(net, lambda: (net(x, c, labels, ctx, mask) - x).pow(2).mean(), steps=1)
    assert net(x, c, labels, ctx, mask).abs().min() > 0
    assert torch.equal(net.blocks[0](h, emb_act, ctx, mask), h)
    adam_steps(net, lambda: (net(x, c, labels, ctx, mask) - x).pow(2).mean(), steps=1)
    assert not torch.equal(net.blocks[0](h, emb_act, ctx, mask), h)


@pytest.mark.parametrize("patch_size", [1, 2, 4])
def test_unpatchify_inverts_the_cut_into_patches(patch_size):
    # torch's unfold cuts (B, C, H, W) into row-major p x p patches flattened channel first;
    # reorder each to (row, column, channel) and unpatchify must give the image back exactly.
    from difflab.nets.dit import unpatchify

    p = patch_size
    x = torch.randn(2, 3, 8, 12)
    cut = torch.nn.functional.unfold(x, p, stride=p).transpose(1, 2)  # (B, L, C p p)
    tokens = cut.reshape(2, -1, 3, p, p).permute(0, 1, 3, 4, 2).reshape(2, -1, p * p * 3)
    assert torch.equal(unpatchify(tokens, p, 8, 12), x)


def test_mlp_shape_and_zero_output_at_init():
    net = MLPDenoiserNet(3, hidden=32, depth=2)
    out = net(torch.randn(5, 3), torch.rand(5) * 1000)
    assert out.shape == (5, 3) and torch.equal(out, torch.zeros_like(out))


def test_dit_unpatchify_inverts_patchify():
    # With no blocks every token is processed on its own, so a change in one input pixel may only
    # change the output patch that contains it: this pins the token order of unpatchify.
    torch.manual_seed(0)
    net = perturb_(tiny_dit(depth=0, in_channels=2, patch_size=2), 0.3)
    x = torch.randn(1, 2, 8, 6)
    c = torch.tensor([10.0])
    base = net(x, c)
    x2 = x.clone()
    x2[0, 1, 5, 2] += 1.0  # pixel (5, 2) lies in patch rows 4..5, cols 2..3
    changed = (net(x2, c) - base).abs().amax(dim=1)[0] > 0
    expected = torch.zeros(8, 6, dtype=torch.bool)
    expected[4:6, 2:4] = True
    assert torch.equal(changed, expected)


@pytest.mark.parametrize("kind", ["unet", "dit", "mlp"])
def test_output_nonzero_after_one_step(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        net, x = MLPDenoiserNet(2, hidden=32, depth=2), torch.randn(8, 2)
    else:
        net, x = (tiny_unet() if kind == "unet" else tiny_dit()), torch.randn(8, 1, 8, 8)
    c = torch.rand(8) * 1000
    adam_steps(net, lambda: (net(x, c) - x).pow(2).mean(), steps=1)
    assert net(x, c).abs().min() > 0


def test_group_norm_divides_channels():
    for channels, groups in [(1, 1), (6, 1), (12, 3), (16, 4), (64, 16), (96, 24), (256, 32)]:
        norm = group_norm(channels)
        assert norm.num_groups == groups and channels % norm.num_groups == 0


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    net = perturb_(tiny_unet(num_classes=3))
    x, c, y = torch.randn(4, 1, 8, 8), torch.rand(4) * 1000, torch.tensor([0, 1, 2, 3])
    want = net(x, c, y)
    net_cl = net.to(memory_format=torch.channels_last)
    got = net_cl(x.contiguous(memory_format=torch.channels_last), c, y)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --- conditioning -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["unet", "dit", "mlp"])
def test_class_labels_change_the_output_after_training(kind):
    # Residual branches start at zero, so a label can only reach the output once a few steps have
    # opened them; train on two classes with different targets and compare the predictions.
    torch.manual_seed(0)
    if kind == "mlp":
        net, x = MLPDenoiserNet(2, hidden=32, depth=2, num_classes=2), torch.randn(8, 2)
    else:
        make = tiny_unet if kind == "unet" else tiny_dit
        net, x = make(num_classes=2), torch.randn(8, 1, 8, 8)
    labels = torch.tensor([0, 1] * 4)
    target = torch.where(labels.view(-1, *[1] * (x.ndim - 1)) == 0, x, -x)
    c = torch.full((8,), 300.0)
    adam_steps(net, lambda: (net(x, c, labels) - target).pow(2).mean(), steps=5)
    out0, out1 = net(x, c, torch.zeros_like(labels)), net(x, c, torch.ones_like(labels))
    out_null = net(x, c)
    assert (out0 - out1).abs().max() > 1e-3
    assert (out_null - out0).abs().max() > 1e-3
    assert torch.equal(out_null, net(x, c, torch.full_like(labels, net.null_class)))


def test_low_res_conditioning_is_upsampled_and_used():
    torch.manual_seed(0)
    net = perturb_(tiny_unet(cond_channels=2))
    x, c = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 20.0])
    low = torch.randn(2, 2, 4, 4)
    out = net(x, c, low_res=low)
    assert out.shape == x.shape
    assert (net(x, c, low_res=low + 1.0) - out).abs().max() > 1e-3
    # Bilinear upsampling: a 4x4 input equals its own upsampling passed at full size.
    up = nn.functional.interpolate(low, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(net(x, c, low_res=up), out)
    assert net(x, c, low_res=torch.randn(2, 2, 3, 5)).shape == x.shape
    with pytest.raises(ValueError, match="low_res"):
        net(x, c)
    with pytest.raises(ValueError, match="low_res"):
        net(x, c, low_res=torch.randn(2, 1, 4, 4))
    with pytest.raises(ValueError, match="low_res"):
        tiny_unet()(x, c, low_res=low)


@pytest.mark.parametrize("make", [tiny_unet, tiny_dit], ids=["unet", "dit"])
def test_cross_attention_uses_context_and_ignores_padding(make):
    torch.manual_seed(0)
    net = perturb_(make(context_dim=6))
    x, c = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 20.0])
    ctx = torch.randn(2, 5, 6)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]]).bool()
    out = net(x, c, context=ctx, context_mask=mask)
    changed_real = ctx.clone()
    changed_real[:, 0] += 1.0
    assert (net(x, c, context=changed_real, context_mask=mask) - out).abs().max() > 1e-4
    changed_pad = torch.where(mask[..., None], ctx, 50.0 * torch.randn_like(ctx))
    torch.testing.assert_close(net(x, c, context=changed_pad, context_mask=mask), out)
    # Masking is equivalent to dropping the padded tokens (sample 0 keeps its first two).
    torch.testing.assert_close(net(x[:1], c[:1], context=ctx[:1, :2]), out[:1])
    with pytest.raises(ValueError, match="context"):
        net(x, c)
    with pytest.raises(ValueError, match="context"):
        make()(x, c, context=ctx)


def test_input_errors_are_clear():
    with pytest.raises(ValueError, match="attn_resolutions"):
        UNet(image_size=16)
    with pytest.raises(ValueError, match="divisible"):
        UNet(image_size=9)
    with pytest.raises(ValueError, match="divisible"):
        UNet()(torch.randn(1, 1, 8, 7), torch.zeros(1))
    with pytest.raises(ValueError, match="num_heads"):
        UNet(num_heads=7)
    with pytest.raises(ValueError, match="num_classes"):
        tiny_unet()(torch.randn(1, 1, 8, 8), torch.zeros(1), class_labels=torch.zeros(1).long())
    with pytest.raises(ValueError, match="patch_size"):
        tiny_dit()(torch.randn(1, 1, 7, 8), torch.zeros(1))
    with pytest.raises(ValueError, match="shape"):
        MLPDenoiserNet(2)(torch.randn(3, 4), torch.zeros(3))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: tiny_unet(num_heads=0), "num_heads must be a positive integer, got 0"),
        (lambda: tiny_unet(num_heads=3), "num_heads=3 does not divide the attention width 32"),
        # Attention only in the middle block (width 32): 32 heads of width 1 divide it.
        (lambda: tiny_unet(attn_resolutions=(), num_heads=32), None),
        (lambda: tiny_unet(attn_resolutions=(8,), num_heads=32), "does not divide .* width 16"),
        (lambda: tiny_unet(attn_resolutions=(3,)), r"attn_resolutions \[3\] match no level"),
        (lambda: tiny_unet(channels=0), "channels must be a positive integer, got 0"),
        (lambda: tiny_unet(in_channels=-1), "in_channels must be a positive integer"),
        (lambda: tiny_unet(out_channels=0), "out_channels must be a positive integer"),
        (lambda: tiny_unet(image_size=0), "image_size must be a positive integer"),
        (lambda: tiny_unet(channel_mults=()), "channel_mults must list at least one level"),
        (lambda: tiny_unet(channel_mults=(1, 0)), r"channel_mults\[1\] must be a positive"),
        (lambda: tiny_unet(num_res_blocks=-1), "num_res_blocks must be a non-negative integer"),
        (lambda: tiny_unet(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (lambda: tiny_unet(context_dim=0), "context_dim must be a positive integer"),
        (lambda: tiny_dit(patch_size=3), "image_size 8 is not divisible by patch_size 3"),
        (lambda: tiny_dit(patch_size=0), "patch_size must be a positive integer"),
        (lambda: tiny_dit(width=34), "width 34 is not divisible by 4, which the 2-D sin-cos"),
        (lambda: tiny_dit(width=36, num_heads=8), "num_heads=8 does not divide .* width 36"),
        (lambda: tiny_dit(depth=-2), "depth must be a non-negative integer"),
        (lambda: tiny_dit(mlp_ratio=0.0), "mlp_ratio 0.0 leaves the MLP"),
        (lambda: tiny_dit(num_classes=0), "num_classes must be a positive integer"),
        (lambda: MLPDenoiserNet(0), "dim must be a positive integer"),
        (lambda: MLPDenoiserNet(2, hidden=2.5), "hidden must be a positive integer, got 2.5"),
        (lambda: MLPDenoiserNet(2, depth=-1), "depth must be a non-negative integer"),
        (lambda: SelfAttention(12, 5), "num_heads=5 does not divide the attention width 12"),
        (lambda: CrossAttention(8, 0, 2), "context_dim must be a positive integer"),
        (lambda: TimestepEmbedding(8, freq_dim=7), "even width, got 7"),
    ],
)
def test_constructors_refuse_impossible_arguments_in_one_sentence(build, message):
    if message is None:
        build()
        return
    with pytest.raises(ValueError, match=message) as info:
        build()
    assert "\n" not in str(info.value)


# --- gradients and fitting ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["unet", "dit", "mlp"])
def test_every_parameter_receives_gradient(kind):
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 2, 1])
    if kind == "unet":
        net = tiny_unet(num_classes=2, cond_channels=1, context_dim=4)
        x = torch.randn(4, 1, 8, 8)
        cond = dict(
            class_labels=labels,
            low_res=torch.randn(4, 1, 4, 4),
            context=torch.randn(4, 3, 4),
            context_mask=torch.tensor([[1, 1, 0]] * 4).bool(),
        )
    elif kind == "dit":
        net, x = tiny_dit(num_classes=2, context_dim=4), torch.randn(4, 1, 8, 8)
        cond = dict(
            class_labels=labels,
            context=torch.randn(4, 3, 4),
            context_mask=torch.tensor([[1, 1, 0]] * 4).bool(),
        )
    else:
        net, x = MLPDenoiserNet(2, hidden=16, depth=2, num_classes=2), torch.randn(4, 2)
        cond = dict(class_labels=labels)
    perturb_(net)
    net(x, torch.rand(4) * 1000, **cond).pow(2).sum().backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert dead == []


@pytest.mark.parametrize("kind", ["unet", "dit", "mlp"])
def test_tiny_network_overfits_a_fixed_batch(kind):
    # Regress a fixed noise-free target from fixed noisy inputs: a network that trains at all
    # drives the loss down by far more than 10x from its initial value mean(target^2) ~ 1.
    torch.manual_seed(0)
    if kind == "mlp":
        net, x0 = MLPDenoiserNet(2, hidden=64, depth=2), torch.randn(16, 2)
    else:
        net = tiny_unet() if kind == "unet" else tiny_dit()
        x0 = torch.randn(8, 1, 8, 8)
    c = torch.rand(x0.shape[0]) * 1000
    xt = 0.6 * x0 + 0.8 * torch.randn_like(x0)
    losses = adam_steps(net, lambda: (net(xt, c) - x0).pow(2).mean(), steps=60, lr=3e-3)
    assert losses[-1] < losses[0] / 10, losses[::10]


def test_pooled_context_adds_the_mean_of_the_real_tokens():
    # e = MLP(PE(c)) + W mean_{real tokens}(context) + b; a context without real tokens adds b.
    torch.manual_seed(0)
    embed = ConditionEmbedding(8, context_dim=4)
    c = torch.tensor([3.0, 30.0, 300.0])
    ctx = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]).bool()
    got = embed(c, None, 3, ctx, mask)
    pooled = torch.stack([ctx[0, :2].mean(0), ctx[1].mean(0), torch.zeros(4)])
    want = embed.time(c) + pooled @ embed.context.weight.T + embed.context.bias
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(embed(c, None, 3, ctx), embed.time(c) + embed.context(ctx.mean(1)))
    # Networks built with pooled_context read it: real tokens move the output; a context
    # without any leaves it alone.
    for make in (tiny_unet, tiny_dit):
        net = perturb_(make(context_dim=4, pooled_context=True))
        x, t = torch.randn(3, 1, 8, 8), c
        assert (net(x, t, context=ctx, context_mask=mask)
                - net(x, t, context=ctx + 1, context_mask=mask))[:2].abs().max() > 1e-4  # fmt: skip
        torch.testing.assert_close(net(x, t, context=ctx, context_mask=mask)[2],
                                   net(x, t, context=ctx + 1, context_mask=mask)[2])  # fmt: skip
