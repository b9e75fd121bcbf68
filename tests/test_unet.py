import pytest
import torch

from diffusion_core.unet import SelfAttention, UNet, count_parameters


@pytest.mark.parametrize("channels,size,mult,attn", [(1, 28, (1, 2, 2), (7,)), (3, 32, (1, 2, 2), (16, 8)), (1, 28, (1, 2), (14,))])
def test_output_shape_equals_input_shape(channels, size, mult, attn):
    model = UNet(in_channels=channels, image_size=size, base_channels=8, channel_mult=mult,
                 attention_resolutions=attn, num_heads=2, norm_groups=4)
    x = torch.randn(2, channels, size, size)
    out = model(x, torch.tensor([0, 999]), torch.tensor([3, 10]))  # 10 = null class
    assert out.shape == x.shape
    assert sum(isinstance(m, SelfAttention) for m in model.modules()) > 0
    rows = model.describe()
    assert sum(r["params"] for r in rows) == count_parameters(model)
    assert {r["resolution"] for r in rows} - {"-"} == {f"{r}x{r}" for r in model.resolutions}


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
