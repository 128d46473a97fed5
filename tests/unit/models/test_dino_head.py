"""DINOHead: official key names, weight normalisation, L2 bottleneck, gradients."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from app.models import DINOHead


def test_state_dict_keys_match_official_training_checkpoints():
    head = DINOHead(384, 1000, hidden_dim=64, bottleneck_dim=32)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {
        "mlp.0.weight": (64, 384), "mlp.0.bias": (64,),
        "mlp.2.weight": (64, 64), "mlp.2.bias": (64,),
        "mlp.4.weight": (32, 64), "mlp.4.bias": (32,),
        "last_layer.weight_g": (1000, 1), "last_layer.weight_v": (1000, 32),
    }
    one = DINOHead(384, 10, nlayers=1, bottleneck_dim=32)
    assert set(one.state_dict()) == {"mlp.weight", "mlp.bias", "last_layer.weight_g", "last_layer.weight_v"}


def test_init_weight_g_ones_and_zero_bias():
    head = DINOHead(16, 100, hidden_dim=2048, bottleneck_dim=256)
    assert torch.all(head.last_layer.weight_g == 1)
    assert torch.count_nonzero(head.mlp[0].bias) == 0
    assert 0.015 < head.mlp[0].weight.std() < 0.025


def test_prototypes_keep_nn_linears_default_init_like_the_reference():
    """The reference's weight-normed last layer is created after the head's trunc-normal(0.02)
    init, so it keeps nn.Linear's U(+-1/sqrt(in)): std 1/sqrt(3 * 256) = 0.036 for bottleneck 256."""
    torch.manual_seed(0)
    v = DINOHead(16, 4096, hidden_dim=64, bottleneck_dim=256).last_layer.weight_v.detach()
    bound = 1 / 256 ** 0.5
    assert float(v.abs().max()) <= bound
    assert float(v.std()) == pytest.approx(bound / 3 ** 0.5, rel=0.02)


def _teacher_like_head(seed=0, prototypes=8192):
    """A head whose prototypes sit near its own bottleneck outputs, so that the targets at
    temperature 0.04 are as peaked as a trained teacher's (largest probability ~0.33)."""
    torch.manual_seed(seed)
    head = DINOHead(192, prototypes, hidden_dim=512, bottleneck_dim=256)
    x = torch.randn(64, 192)
    with torch.no_grad():
        z = head.bottleneck(x)
        for _ in range(8):
            rows = torch.randint(0, prototypes, (64,))
            head.last_layer.weight_v[rows] = z + 1.5 * F.normalize(torch.randn(64, 256), dim=-1)
    return head, x


def test_teacher_targets_under_bf16_autocast_stay_close_to_fp32():
    """The prototype layer and the L2 bottleneck compute in fp32 under bf16 autocast: the softmax
    targets at temperature 0.04 move < 0.5% in total variation from an all-fp32 pass (a bf16
    prototype layer moves them ~1.7% here; what remains is the MLP's bf16)."""
    from app.ssl.centering import softmax_center_teacher

    head, x = _teacher_like_head()
    center = torch.zeros(1, head.out_dim)
    with torch.no_grad():
        reference = softmax_center_teacher(head(x), center, 0.04)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = head(x)
        assert logits.dtype == torch.float32
        targets = softmax_center_teacher(logits.float(), center, 0.04)
    assert float(reference.max(-1).values.mean()) > 0.2  # peaked like a teacher's
    tv = 0.5 * (targets - reference).abs().sum(-1)
    assert float(tv.mean()) < 0.005, float(tv.mean())


def test_bf16_parameters_still_give_fp32_logits_and_bf16_gradients():
    head = DINOHead(16, 20, hidden_dim=24, bottleneck_dim=8).to(torch.bfloat16)
    out = head(torch.randn(3, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.float32
    out.logsumexp(-1).sum().backward()
    assert head.last_layer.weight_v.grad.dtype == torch.bfloat16


def test_logits_equal_normalised_bottleneck_times_weight_normalised_prototypes():
    torch.manual_seed(0)
    head = DINOHead(16, 50, hidden_dim=24, bottleneck_dim=8)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)
    x = torch.randn(4, 16)
    h = x
    for layer in head.mlp:
        h = layer(h)
    z = h / h.norm(dim=-1, keepdim=True)
    v, g = head.last_layer.weight_v, head.last_layer.weight_g
    expected = z @ (g * v / v.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.bottleneck(x).norm(dim=-1), torch.ones(4))


def test_matches_torch_weight_norm_with_the_same_state_dict():
    torch.manual_seed(0)
    head = DINOHead(16, 30, hidden_dim=24, bottleneck_dim=8)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = nn.utils.weight_norm(nn.Linear(8, 30, bias=False))  # the API official heads were saved with
    ref.load_state_dict({k.removeprefix("last_layer."): v for k, v in head.state_dict().items()
                         if k.startswith("last_layer.")}, strict=True)
    z = F.normalize(torch.randn(5, 8), dim=-1)
    torch.testing.assert_close(head.last_layer(z), ref(z), rtol=1e-5, atol=1e-6)


def test_logits_do_not_depend_on_the_scale_of_weight_v():
    head = DINOHead(16, 20, hidden_dim=24, bottleneck_dim=8)
    x = torch.randn(3, 16)
    before = head(x)
    with torch.no_grad():
        head.last_layer.weight_v.mul_(7.0)
    torch.testing.assert_close(head(x), before)


@pytest.mark.parametrize("nlayers, use_bn", [(3, False), (1, False), (2, True)])
def test_gradients_reach_all_parameters(nlayers, use_bn):
    head = DINOHead(16, 20, nlayers=nlayers, hidden_dim=24, bottleneck_dim=8, use_bn=use_bn)
    head(torch.randn(4, 16)).logsumexp(-1).sum().backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []
    assert all(type(p) is nn.Parameter for p in head.parameters())  # no hooks/parametrizations


def test_nlayers_must_be_positive():
    with pytest.raises(ValueError, match="nlayers"):
        DINOHead(16, 20, nlayers=0)
