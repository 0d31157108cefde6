"""What users do around the op: transforms (forward-mode AD, TorchScript) and
changes to the modules' Linears (parametrizations, pruning, hooks, wrappers).
Each gives the right answer or a clear error, never a silently wrong one.
(torch.compile and torch.export have their own files.)"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.utils.prune
from helpers import make_inputs
from torch import nn

import attnpool
from attnpool import reference

# torch.jit.script is deprecated, but serving code still uses it (and torch.func
# calls it inside); the warning says nothing about attnpool.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")

FORWARD_AD_REFUSED = r"attnpool::\w+: forward-mode AD .* is not implemented"


def _folded(inputs):
    u = attnpool.fold_query(inputs.query, inputs.w_q, inputs.w_k, 2)
    return inputs.x, u


# --- forward-mode AD: refused, never a zero tangent ---------------------------------


@pytest.mark.parametrize("tangent_of", ["x", "query", "w_q", "w_k"])
def test_dual_tensor_input_is_refused(tangent_of):
    inputs = make_inputs(2, 5, 8)
    args = dict(x=inputs.x, query=inputs.query, w_q=inputs.w_q, w_k=inputs.w_k)
    with fwAD.dual_level():
        args[tangent_of] = fwAD.make_dual(args[tangent_of], torch.ones_like(args[tangent_of]))
        with pytest.raises(NotImplementedError, match=FORWARD_AD_REFUSED):
            attnpool.attention_pool(**args)


def test_dual_tensors_are_refused_by_each_part():
    inputs = make_inputs(2, 5, 8, num_queries=2)
    x, u = _folded(inputs)
    with fwAD.dual_level():
        dual_u = fwAD.make_dual(u, torch.ones_like(u))
        with pytest.raises(NotImplementedError, match=r"folded_attention_pool: forward-mode"):
            attnpool.folded_attention_pool(x, dual_u)
        dual_query = fwAD.make_dual(inputs.query, torch.ones_like(inputs.query))
        with pytest.raises(NotImplementedError, match=r"fold_query: forward-mode"):
            attnpool.fold_query(dual_query, inputs.w_q, inputs.w_k)


def test_func_jvp_and_jacfwd_are_refused():
    inputs = make_inputs(2, 5, 8)

    def pool(x):
        return attnpool.attention_pool(x, inputs.query, inputs.w_q, inputs.w_k)

    with pytest.raises(NotImplementedError, match=FORWARD_AD_REFUSED):
        torch.func.jvp(pool, (inputs.x,), (torch.ones_like(inputs.x),))
    with pytest.raises(NotImplementedError, match=FORWARD_AD_REFUSED):
        torch.func.jacfwd(pool)(inputs.x)


def test_gradcheck_with_forward_ad_reports_not_implemented():
    inputs = make_inputs(1, 3, 4).requiring_grad()
    with pytest.raises(NotImplementedError, match=FORWARD_AD_REFUSED):
        torch.autograd.gradcheck(
            lambda x: attnpool.attention_pool(x, inputs.query, inputs.w_q, inputs.w_k),
            (inputs.x,),
            check_forward_ad=True,
            check_backward_ad=False,
            check_batched_grad=False,
        )


# --- torch.func: an error or the right values, for now -----------------------------


def test_func_grad_raises_instead_of_a_wrong_gradient():
    inputs = make_inputs(2, 5, 8)

    def loss(x):
        return attnpool.attention_pool(x, inputs.query, inputs.w_q, inputs.w_k).sum()

    with pytest.raises(RuntimeError, match="functorch transforms"):
        torch.func.grad(loss)(inputs.x)


def test_func_vmap_of_the_forward_matches_the_batched_op():
    inputs = make_inputs(4, 5, 8, num_queries=2)

    def pool_one(x):
        return attnpool.attention_pool(x[None], inputs.query, inputs.w_q, inputs.w_k, None, 2)[0]

    got = torch.func.vmap(pool_one)(inputs.x)
    want = attnpool.attention_pool(inputs.x, inputs.query, inputs.w_q, inputs.w_k, None, 2)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# --- TorchScript ---------------------------------------------------------------------


@pytest.mark.parametrize("num_queries", [1, 3])
def test_torch_jit_script_of_attention_pooling_matches_eager(num_queries):
    torch.manual_seed(0)
    module = attnpool.AttentionPooling(8, num_heads=2, num_queries=num_queries).double()
    scripted = torch.jit.script(module)
    x = torch.randn(3, 6, 8, dtype=torch.float64)
    mask = torch.rand(3, 6) > 0.3
    torch.testing.assert_close(scripted(x, mask), module(x, mask), rtol=0, atol=0)
    torch.testing.assert_close(scripted(x), module(x), rtol=0, atol=0)


def test_torch_jit_script_of_weighted_pooling_matches_eager():
    module = attnpool.WeightedPooling(6)
    with torch.no_grad():
        module.weight.copy_(torch.linspace(-1, 1, 6))
    scripted = torch.jit.script(module)
    x = torch.randn(3, 5, 4)
    mask = torch.rand(3, 5) > 0.3
    torch.testing.assert_close(scripted(x, mask), module(x, mask), rtol=0, atol=0)


# --- what users do to q_proj and k_proj ---------------------------------------------


def _module_and_input():
    torch.manual_seed(0)
    module = attnpool.AttentionPooling(8, num_heads=2, num_queries=2).double()
    x = torch.randn(3, 6, 8, dtype=torch.float64)
    return module, x


def _expected(module, x):
    """The reference with the weights the Linears would use in their forward."""
    w_q = module.q_proj(torch.eye(8, dtype=torch.float64)).T
    w_k = module.k_proj(torch.eye(8, dtype=torch.float64)).T
    return reference.attention_pool(x, module.query, w_q, w_k, None, module.num_heads)


class _LowRankAdapter(nn.Module):
    """A LoRA-style wrapper: its forward adds a low-rank update to the Linear's."""

    def __init__(self, linear):
        super().__init__()
        self.base = linear
        self.weight = linear.weight
        self.down = nn.Linear(8, 2, bias=False, dtype=torch.float64)
        self.up = nn.Linear(2, 8, bias=False, dtype=torch.float64)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


class _AdaptedLinear(nn.Linear):
    """A Linear subclass whose forward differs from nn.Linear's."""

    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize("name", ["q_proj", "k_proj"])
def test_parametrized_weight_is_used(name):
    module, x = _module_and_input()

    class Doubled(nn.Module):
        def forward(self, weight):
            return 2 * weight

    torch.nn.utils.parametrize.register_parametrization(getattr(module, name), "weight", Doubled())
    torch.testing.assert_close(module(x), _expected(module, x))


@pytest.mark.parametrize("name", ["q_proj", "k_proj"])
def test_parametrizations_weight_norm_and_spectral_norm_are_used(name):
    for apply in (
        torch.nn.utils.parametrizations.weight_norm,
        torch.nn.utils.parametrizations.spectral_norm,
    ):
        module, x = _module_and_input()
        apply(getattr(module, name))
        module.eval()  # spectral_norm: no power iteration between the two calls
        torch.testing.assert_close(module(x), _expected(module, x))


HOOKED = [
    ("prune", lambda linear: torch.nn.utils.prune.l1_unstructured(linear, "weight", amount=0.3)),
    ("old-weight-norm", lambda linear: torch.nn.utils.weight_norm(linear)),
    ("old-spectral-norm", lambda linear: torch.nn.utils.spectral_norm(linear)),
    ("forward-hook", lambda linear: linear.register_forward_hook(lambda *args: None)),
    ("forward-pre-hook", lambda linear: linear.register_forward_pre_hook(lambda *args: None)),
]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the old weight_norm is deprecated
@pytest.mark.parametrize("name", ["q_proj", "k_proj"])
@pytest.mark.parametrize("how", [c[1] for c in HOOKED], ids=[c[0] for c in HOOKED])
def test_hooked_projection_is_refused(name, how):
    module, x = _module_and_input()
    how(getattr(module, name))
    with pytest.raises(ValueError, match=rf"AttentionPooling: {name} has module hooks"):
        module(x)


@pytest.mark.parametrize("name", ["q_proj", "k_proj"])
@pytest.mark.parametrize("wrap", [_LowRankAdapter, None], ids=["wrapper-module", "linear-subclass"])
def test_projection_with_its_own_forward_is_refused(name, wrap):
    module, _ = _module_and_input()
    old = getattr(module, name)
    if wrap is None:
        new = _AdaptedLinear(8, 8, bias=False, dtype=torch.float64)
    else:
        new = wrap(old)
    setattr(module, name, new)
    x = torch.randn(3, 6, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match=rf"AttentionPooling: {name} must be a plain nn.Linear"):
        module(x)
