"""pretrain: the SSL losses against oracles, the EMA update, one tiny epoch per method, resume."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from coopt_fast import augment
from coopt_fast.errors import CooptError
from coopt_fast.priors import build_backbone, load_backbone, load_prior, read_checkpoint
from coopt_fast.ssl import BYOL, byol_loss, nt_xent, pretrain

from .conftest import requires_fmnist

TINY = dict(batch_size=32, limit=64, input_size=16, progress=False)  # 2 steps


def nt_xent_loop(z1, z2, t):
    """Oracle: SimCLR's loss written out per anchor, in float64."""
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    n, b = len(z), len(z1)
    total = 0.0
    for i in range(n):
        pos = (i + b) % n
        num = math.exp(float(z[i] @ z[pos]) / t)
        den = sum(math.exp(float(z[i] @ z[j]) / t) for j in range(n) if j != i)
        total += -math.log(num / den)
    return total / n


@pytest.mark.parametrize("b, d, t", [(4, 8, 0.2), (7, 3, 0.5), (1, 5, 0.1)])
def test_nt_xent_matches_loop_oracle(b, d, t):
    g = torch.Generator().manual_seed(b * d)
    z1, z2 = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    assert nt_xent(z1, z2, t).item() == pytest.approx(nt_xent_loop(z1, z2, t), rel=1e-5)


def test_nt_xent_gradient_and_minimum():
    z1 = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(6, 5, dtype=torch.float64)
    # gradcheck through the float32 cast would be noisy: check the math in float64 directly
    def f(a):
        z = F.normalize(torch.cat([a, z2]), dim=1)
        sim = (z @ z.T / 0.2).masked_fill(torch.eye(12, dtype=torch.bool), float("-inf"))
        return F.cross_entropy(sim, torch.cat([torch.arange(6, 12), torch.arange(6)]))
    assert torch.autograd.gradcheck(f, (z1,))
    # aligned, well-separated pairs score far lower than random pairs
    e = torch.eye(5)
    assert nt_xent(e, e, 0.2).item() < nt_xent(torch.randn(5, 5), torch.randn(5, 5), 0.2).item()


def test_byol_loss_values_and_stop_gradient():
    p = torch.randn(4, 8, requires_grad=True)
    z = torch.randn(4, 8, requires_grad=True)
    assert byol_loss(z, z).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(-z, z).item() == pytest.approx(4.0, abs=1e-5)
    byol_loss(p, z).backward()
    assert p.grad is not None and torch.isfinite(p.grad).all()
    assert z.grad is None  # the target branch gets no gradient


def test_byol_target_is_an_ema_of_the_online_network():
    backbone, dim, _ = build_backbone("convnet", 16, 0)
    m = BYOL(backbone, dim, hidden=16, out=8, pred_hidden=16)
    assert all(not p.requires_grad for p in m.target_backbone.parameters())
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(1.0)
    before = [p.clone() for p in m.target_backbone.parameters()]
    m.update_target(1.0)  # tau = 1: target unchanged
    assert all(torch.equal(a, b) for a, b in zip(before, m.target_backbone.parameters()))
    m.update_target(0.75)
    for b0, t, o in zip(before, m.target_backbone.parameters(), m.backbone.parameters()):
        assert torch.allclose(t, 0.75 * b0 + 0.25 * o, atol=1e-6)
    m.update_target(0.0)  # tau = 0: a copy
    assert all(torch.equal(t, o) for t, o in zip(m.target_backbone.parameters(), m.backbone.parameters()))


def test_augmentations_are_seeded_and_shaped():
    imgs = torch.randint(0, 256, (5, 28, 28, 1), dtype=torch.uint8)
    rgb = torch.randint(0, 256, (5, 20, 24, 3), dtype=torch.uint8)
    for x in (imgs, rgb):
        cfg = augment.ViewConfig(solarize_p=0.5)
        a = augment.ssl_view(x, 16, torch.Generator().manual_seed(1), cfg, (0.5,) * 3, (0.5,) * 3)
        b = augment.ssl_view(x, 16, torch.Generator().manual_seed(1), cfg, (0.5,) * 3, (0.5,) * 3)
        c = augment.ssl_view(x, 16, torch.Generator().manual_seed(2), cfg, (0.5,) * 3, (0.5,) * 3)
        assert a.shape == (5, 3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
        assert a.min() >= -1.0 - 1e-6 and a.max() <= 1.0 + 1e-6  # stays in the normalised [0, 1] range
    # scale (1, 1), no flip: the crop is the whole image, resized
    whole = augment.random_resized_crop(augment.to_float(imgs), 28, torch.Generator(), scale=(1, 1), ratio=(1, 1),
                                        flip_p=0.0)
    assert torch.allclose(whole, augment.to_float(imgs), atol=1e-5)
    flipped = augment.random_resized_crop(augment.to_float(imgs), 28, torch.Generator(), scale=(1, 1), ratio=(1, 1),
                                          flip_p=1.0)
    assert torch.allclose(flipped, augment.to_float(imgs).flip(-1), atol=1e-5)
    # hue rotation by 0 is the identity, and gray images are unchanged by any hue
    x = torch.rand(3, 3, 4, 4)
    assert torch.allclose(augment._hue_rotate(x, torch.zeros(3)), x, atol=1e-5)
    gray = torch.rand(3, 1, 4, 4).expand(-1, 3, -1, -1)
    assert torch.allclose(augment._hue_rotate(gray, torch.full((3,), 1.0)), gray, atol=1e-5)


@requires_fmnist
@pytest.mark.parametrize("method, suffix", [("supervised", ".pt"), ("byol", ".safetensors"), ("simclr", ".pt")])
def test_pretrain_one_tiny_epoch_gives_a_loadable_prior(tmp_path, method, suffix):
    out = tmp_path / f"prior{suffix}"
    s = pretrain("fashion-mnist", method, "convnet", 1, out, **TINY)
    assert (s["epochs"], s["steps"], s["samples"]) == (1, 2, 64) and np.isfinite(s["loss"])
    _, meta = read_checkpoint(out)
    for k, v in {"arch": "convnet", "input_size": 16, "method": method, "epochs": 1, "data": "fashion-mnist",
                 "seed": 0, "limit": 64}.items():
        assert meta[k] == v, k
    model, dim, _ = load_backbone("convnet", out)  # what extract --prior convnet:OUT does
    prior = load_prior(f"convnet:{out}")
    assert dim == 256 and prior.input_size == 16 and prior.checkpoint_sha256
    assert (tmp_path / f"prior{suffix}.log.jsonl").read_text().count("\n") == 1


@requires_fmnist
def test_supervised_labeled_fraction_and_refusals(tmp_path):
    s = pretrain("fashion-mnist", "supervised", "convnet", 1, tmp_path / "p.pt", labeled_fraction=0.5, **TINY)
    assert s["samples"] == 32 and s["steps"] == 1
    np.save(tmp_path / "x.npy", np.zeros((8, 8, 8), np.uint8))
    with pytest.raises(CooptError, match="needs a labelled data set"):
        pretrain(f"npy:{tmp_path / 'x.npy'}", "supervised", "convnet", 1, tmp_path / "q.pt", progress=False)
    with pytest.raises(CooptError, match="unknown method"):
        pretrain("fashion-mnist", "moco", "convnet", 1, tmp_path / "q.pt", **TINY)
    with pytest.raises(CooptError, match="supervised only"):
        pretrain("fashion-mnist", "byol", "convnet", 1, tmp_path / "q.pt", labeled_fraction=0.5, **TINY)
    with pytest.raises(CooptError, match=r"\.pt, \.pth or \.safetensors"):
        pretrain("fashion-mnist", "byol", "convnet", 1, tmp_path / "q.ckpt", **TINY)


@requires_fmnist
def test_byol_resume_is_bitwise_equal(tmp_path):
    kw = dict(TINY, limit=96, proj_hidden=64)  # 3 steps per epoch, 2 epochs; narrow MLPs: CPU time
    pretrain("fashion-mnist", "byol", "convnet", 2, tmp_path / "full.pt", **kw)
    pretrain("fashion-mnist", "byol", "convnet", 2, tmp_path / "part.pt", max_steps=4, **kw)
    s = pretrain("fashion-mnist", "byol", "convnet", 2, tmp_path / "part.pt", resume=True, **kw)
    assert s["resumed"] and s["steps"] == 6
    a = torch.load(tmp_path / "full.pt.state.pt", weights_only=True)
    b = torch.load(tmp_path / "part.pt.state.pt", weights_only=True)
    for k in a["model"]:  # online, predictor and the EMA target network
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["aug_rng"], b["aug_rng"])


@requires_fmnist
def test_pretrain_snapshots_beside_the_checkpoint(tmp_path):
    s = pretrain("fashion-mnist", "simclr", "convnet", 2, tmp_path / "p.safetensors", snapshots=2, **TINY)
    assert [(r["k"], r["step"]) for r in s["snapshots"]] == [(1, 2), (2, 4)]
    assert [r["path"] for r in s["snapshots"]] == [str(tmp_path / f"p.snap{k}.safetensors") for k in (1, 2)]
    final, _ = read_checkpoint(tmp_path / "p.safetensors")
    last, meta = read_checkpoint(tmp_path / "p.snap2.safetensors")
    assert meta["snapshot"] == 2 and meta["method"] == "simclr" and all(torch.equal(final[k], last[k]) for k in final)
