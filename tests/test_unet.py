import pytest
import torch

from diffusion_core.runtime import use_channels_last
from diffusion_core.unet import ResBlock, SelfAttention, UNet, count_parameters


@pytest.mark.parametrize("channels,size,mult,attn,patch", [
    (1, 28, (1, 2, 2), (7,), 1), (3, 32, (1, 2, 2), (16, 8), 1), (1, 28, (1, 2), (14,), 1),
    (1, 28, (1, 1), (7,), 2), (3, 32, (1, 2, 2), (8,), 2),
])
def test_output_shape_equals_input_shape(channels, size, mult, attn, patch):
    model = UNet(in_channels=channels, image_size=size, base_channels=8, channel_mult=mult,
                 attention_resolutions=attn, num_heads=2, norm_groups=4, patch_size=patch)
    x = torch.randn(2, channels, size, size)
    out = model(x, torch.tensor([0, 999]), torch.tensor([3, 10]))  # 10 = null class
    assert out.shape == x.shape
    assert sum(isinstance(m, SelfAttention) for m in model.modules()) > 0
    rows = model.describe()
    assert sum(r["params"] for r in rows) == count_parameters(model)
    full = {f"{size}x{size}"} if patch > 1 else set()  # the pixel_shuffle row
    assert {r["resolution"] for r in rows} - {"-"} == {f"{r}x{r}" for r in model.resolutions} | full
    assert model.resolutions[0] == size // patch


@pytest.mark.parametrize("mult,blocks,patch", [((1, 1), 1, 2), ((1, 2, 2), 2, 1)])
def test_skips_blocks_drops_one_decoder_block_per_level_and_keeps_every_block_skip(mult, blocks, patch):
    """skips="blocks": the decoder concatenates only the residual blocks' outputs, so it has
    num_res_blocks blocks per level instead of num_res_blocks + 1; every one of them still sees an
    encoder feature map, and the output keeps the input's shape."""
    kw = dict(base_channels=8, channel_mult=mult, num_res_blocks=blocks, attention_resolutions=(), norm_groups=4, patch_size=patch)
    full, lean = UNet(**kw), UNet(**kw, skips="blocks")
    decoder_blocks = lambda m: [b for b in m.up if isinstance(b[0], ResBlock)]  # noqa: E731
    assert len(decoder_blocks(full)) == len(mult) * (blocks + 1)
    assert len(decoder_blocks(lean)) == len(mult) * blocks
    assert count_parameters(lean) < count_parameters(full)
    in_chs = [b[0].conv1.in_channels for b in decoder_blocks(lean)]
    widths = [8 * m for m in reversed(mult) for _ in range(blocks)]
    assert all(c > w for c, w in zip(in_chs, widths))  # each takes the previous block's output plus a skip
    x = torch.randn(2, 1, 28, 28, requires_grad=True)
    out = lean(x, torch.tensor([0, 999]), torch.tensor([3, 10]))
    assert out.shape == x.shape
    with pytest.raises(ValueError, match="skips"):
        UNet(**kw, skips="none")


def test_patch_2_runs_no_convolution_at_full_resolution():
    """pixel_unshuffle folds 2x2 pixels into channels: every conv sees 14x14 or less, and the
    output still depends on every input pixel of its 2x2 patch."""
    torch.manual_seed(0)
    model = UNet(base_channels=8, channel_mult=(1, 1), attention_resolutions=(7,), num_heads=2, norm_groups=4, patch_size=2)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    sizes = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda mod, inp, out: sizes.append(inp[0].shape[-1]))
    x = torch.randn(1, 1, 28, 28, requires_grad=True)
    out = model(x, torch.tensor([10]), torch.tensor([1]))
    assert max(sizes) == 14
    out[0, 0, 0, 0].backward()
    assert (x.grad[0, 0, :2, :2] != 0).all()


def test_time_and_class_condition_the_output():
    torch.manual_seed(0)
    model = UNet(base_channels=8, channel_mult=(1, 2), attention_resolutions=(), norm_groups=4)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    x = torch.randn(1, 1, 28, 28)
    base = model(x, torch.tensor([10]), torch.tensor([1]))
    assert not torch.allclose(base, model(x, torch.tensor([500]), torch.tensor([1])))
    assert not torch.allclose(base, model(x, torch.tensor([10]), torch.tensor([2])))


def test_bad_geometry_is_refused():
    with pytest.raises(ValueError, match="attention_resolutions"):
        UNet(base_channels=8, channel_mult=(1, 2), attention_resolutions=(7,), norm_groups=4)
    with pytest.raises(ValueError, match="channel_mult"):
        UNet(base_channels=8, channel_mult=(1, 2, 2, 2), norm_groups=4)  # 28 -> 14 -> 7 -> 3.5
    with pytest.raises(ValueError, match="patch_size"):
        UNet(base_channels=8, channel_mult=(1,), attention_resolutions=(), norm_groups=4, patch_size=3)  # 28 / 3


def test_channels_last_is_the_same_network():
    """Channels-last (NHWC) changes the memory layout only: same outputs and gradients to float
    rounding, weights and activations really NHWC, and back to NCHW on request."""
    torch.manual_seed(0)
    model = UNet(base_channels=8, channel_mult=(1, 1), attention_resolutions=(7,), num_heads=2, norm_groups=4, patch_size=2)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    x, t, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 9, 10])
    ref = model(x, t, y)
    ref.square().sum().backward()
    ref_grad = model.conv_in.weight.grad.clone()
    model.zero_grad()
    layouts = []
    model.conv_in.register_forward_hook(lambda m, i, o: layouts.append(o.is_contiguous(memory_format=torch.channels_last)))
    assert model.set_channels_last(True) is model
    assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.conv_in.weight.is_contiguous()
    out = model(x, t, y)
    out.square().sum().backward()
    assert layouts == [True]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.conv_in.weight.grad, ref_grad, rtol=1e-3, atol=1e-5)
    model.set_channels_last(False)
    assert model.conv_in.weight.is_contiguous() and not model.channels_last


def test_memory_format_auto_is_channels_last_for_float32_on_cpu_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_channels_last("auto", cpu, None)
    assert not use_channels_last("auto", cpu, torch.bfloat16)  # measured twice as slow with bf16 autocast
    assert not use_channels_last("auto", cuda, torch.bfloat16)
    assert use_channels_last("channels_last", cuda, torch.bfloat16)
    assert not use_channels_last("contiguous", cpu, None)


@pytest.mark.parametrize("conditioning", ["add", "silu_add", "scale_shift"])
def test_conditioning_modes_build_and_only_add_keeps_class_and_time_apart(conditioning):
    """``add`` feeds each block a linear image of time_mlp(t) + class_emb(y), so the class moves
    every block by the same offset at every t; with SiLU first (``silu_add``, ``scale_shift``) the
    class's effect depends on t."""
    torch.manual_seed(0)
    model = UNet(base_channels=8, channel_mult=(1, 1), attention_resolutions=(), num_heads=2, norm_groups=4,
                 patch_size=2, conditioning=conditioning)
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    block = model.mid1
    assert block.emb.out_features == (16 if conditioning == "scale_shift" else 8)
    x = torch.randn(2, 1, 28, 28)
    out = model(x, torch.tensor([5, 900]), torch.tensor([3, 10]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    t = torch.tensor([50, 50, 900, 900])
    y = torch.tensor([3, 7, 3, 7])
    off = block.project(model.embed(t, y))  # what the block adds, or its (scale, shift)
    class_effect_early, class_effect_late = off[0] - off[1], off[2] - off[3]
    assert class_effect_early.abs().max() > 1e-3
    if conditioning == "add":
        torch.testing.assert_close(class_effect_early, class_effect_late)
    else:
        assert (class_effect_early - class_effect_late).abs().max() > 1e-3


def test_scale_shift_scales_the_normalised_features():
    """scale_shift: h = norm(h) * (1 + scale) + shift with (scale, shift) from the embedding."""
    torch.manual_seed(0)
    from diffusion_core.unet import ResBlock

    block = ResBlock(8, 8, 16, 4, 0.0, "scale_shift")
    x, emb = torch.randn(2, 8, 5, 5), torch.randn(2, 16)
    seen = []
    block.conv2.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    block(x, emb)
    scale, shift = block.emb(torch.nn.functional.silu(emb)).chunk(2, dim=1)  # by hand, not block.project
    h = block.norm2(block.conv1(torch.nn.functional.silu(block.norm1(x))))
    expected = torch.nn.functional.silu(h * (1 + scale[:, :, None, None]) + shift[:, :, None, None])
    torch.testing.assert_close(seen[0], expected)
    with pytest.raises(ValueError, match="conditioning must be one of"):
        ResBlock(8, 8, 16, 4, 0.0, "film")


@pytest.mark.parametrize("n,nrow,channels", [(40, 4, 1), (7, 3, 1), (2, 8, 3), (1, 1, 1)])
def test_make_grid_lays_out_images_as_torchvision_does(n, nrow, channels):
    """diffusion_core.images.make_grid avoids importing torchvision (2 s per stage); its grids are
    torchvision's, pixel for pixel (torchvision repeats a single channel three times)."""
    from torchvision.utils import make_grid as tv_make_grid

    from diffusion_core.images import grid_image, make_grid

    images = torch.randint(0, 255, (n, channels, 5, 6), dtype=torch.uint8)
    ours = make_grid(images, nrow=nrow, padding=2, pad_value=255)
    theirs = tv_make_grid(images, nrow=nrow, padding=2, pad_value=255)
    assert torch.equal(ours, theirs[:channels])
    img = grid_image(images, nrow)
    assert img.size == (theirs.shape[2], theirs.shape[1]) and img.mode == ("L" if channels == 1 else "RGB")
