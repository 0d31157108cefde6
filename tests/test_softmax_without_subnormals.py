"""attnpool::_softmax_without_subnormals, the softmax of the path that
projects the keys: ATen's softmax with every weight below 2^-100 set to 0, as
the pooling kernels set theirs. Its weights at each CPU instruction set are
tested in test_cpu_isa.py; here its autograd, its registrations, its errors,
and that the projection path calls it."""

import pytest
import torch
from helpers import DEVICES

op = torch.ops.attnpool._softmax_without_subnormals


def _scores(*shape, spread=1.0, device="cpu", dtype=torch.float64):
    gen = torch.Generator().manual_seed(sum(shape))
    return (torch.randn(shape, generator=gen, dtype=dtype) * spread).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weights_are_the_softmax_with_tiny_ones_zero(device, dtype):
    scores = _scores(3, 4, 70, spread=40.0, device=device, dtype=dtype)
    want = torch.softmax(scores.double(), -1)
    smallest = 2.0**-100 if dtype == torch.float32 else 2.0**-996
    got = op(scores)
    assert got.dtype == dtype and got.shape == scores.shape
    assert (got[want < smallest / 2] == 0).all()
    # (Each weight's argument s - max, up to about 200 here, rounds to dtype.)
    rtol = 2e-5 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(got.double(), want, atol=smallest, rtol=rtol)


# (gradcheck calls the deprecated torch.jit.script inside.)
@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")
@pytest.mark.parametrize("device", DEVICES)
def test_gradients_forward_and_reverse(device):
    scores = _scores(2, 3, 33, device=device).requires_grad_()
    assert torch.autograd.gradcheck(op, (scores,), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(op, (scores,))


def test_no_gradient_to_a_cut_weight():
    # The gradient of a score whose weight is 0 is exactly 0: no subnormal
    # reaches the products after it.
    scores = _scores(4, 200, spread=60.0, dtype=torch.float32).requires_grad_()
    weights = op(scores)
    assert (weights == 0).any()
    (grad,) = torch.autograd.grad(weights, scores, torch.randn_like(weights))
    assert (grad[weights == 0] == 0).all()


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
def test_opcheck(device, requires_grad):
    scores = _scores(2, 5, 19, device=device).requires_grad_(requires_grad)
    torch.library.opcheck(op.default, (scores,))


def test_meta_shape():
    assert op(torch.empty(2, 3, 40, device="meta")).shape == (2, 3, 40)


def test_empty_scores():
    assert op(torch.empty(3, 0)).shape == (3, 0)
    assert op(torch.empty(0, 5)).shape == (0, 5)


def test_strided_scores():
    scores = _scores(6, 40, dtype=torch.float32)[:, ::2]
    torch.testing.assert_close(op(scores), torch.softmax(scores, -1))


def test_errors_name_the_scores():
    with pytest.raises(TypeError, match="scores must be float32 or float64"):
        op(torch.randn(3, 4).bfloat16())
    with pytest.raises(ValueError, match="scores must have at least one dimension"):
        op(torch.tensor(1.0))
