import pytest
import torch
import torchvision.ops

from spotocc.models.deform_conv import deform_conv2d_by_sampling


@pytest.mark.parametrize(
    ("shape", "groups", "padding", "kernel"),
    [((2, 8, 6, 10), 4, 1, 3), ((1, 4, 1, 5), 2, 1, 3), ((2, 6, 7, 3), 3, 0, 3), ((1, 4, 6, 6), 1, 2, 5)],
)
def test_equals_torchvision_forward_and_backward(shape, groups, padding, kernel):
    gen = torch.Generator().manual_seed(0)
    b, c, h, w = shape
    out_h, out_w = h + 2 * padding - kernel + 1, w + 2 * padding - kernel + 1
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    # offsets of a few pixels: many samples fall partly or wholly outside the image
    offset = torch.randn(b, 2 * kernel * kernel, out_h, out_w, generator=gen, dtype=torch.float64) * 2.0
    weight = torch.randn(c, c // groups, kernel, kernel, generator=gen, dtype=torch.float64)
    probe = torch.randn(b, c, out_h, out_w, generator=gen, dtype=torch.float64)
    ours = [t.clone().requires_grad_() for t in (x, offset, weight)]
    theirs = [t.clone().requires_grad_() for t in (x, offset, weight)]
    out = deform_conv2d_by_sampling(*ours, padding=padding)
    expected = torchvision.ops.deform_conv2d(*theirs, padding=padding)
    torch.testing.assert_close(out, expected)
    (out * probe).sum().backward()
    (expected * probe).sum().backward()
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine.grad, reference.grad)


def test_whole_pixel_offsets_shift_the_plain_convolution():
    x = torch.arange(12.0).view(1, 1, 3, 4)
    weight = torch.zeros(1, 1, 3, 3)
    weight[0, 0, 1, 1] = 1.0  # the centre tap only: the output is the sample itself
    offset = torch.zeros(1, 18, 3, 4)
    offset[:, 2 * 4 + 1] = 1.0  # centre tap: dx = +1
    out = deform_conv2d_by_sampling(x, offset, weight, padding=1)
    expected = torch.tensor([[1.0, 2.0, 3.0, 0.0], [5.0, 6.0, 7.0, 0.0], [9.0, 10.0, 11.0, 0.0]])
    torch.testing.assert_close(out[0, 0], expected)  # the right-most column reads outside: zero
    offset[:, 2 * 4 + 1] = 0.5  # half a pixel: the mean of two neighbours, half of the last one
    out = deform_conv2d_by_sampling(x, offset, weight, padding=1)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.5, 1.5, 2.5, 1.5]))


def test_bad_shapes_are_named():
    x = torch.zeros(1, 4, 5, 5)
    with pytest.raises(ValueError, match=r"offset \(1, 9, 5, 5\), expected \(1, 18, 5, 5\)"):
        deform_conv2d_by_sampling(x, torch.zeros(1, 9, 5, 5), torch.zeros(4, 2, 3, 3), padding=1)
    with pytest.raises(ValueError, match="does not fit 4 input channels"):
        deform_conv2d_by_sampling(x, torch.zeros(1, 18, 5, 5), torch.zeros(4, 3, 3, 3), padding=1)
