"""The training-step API: one full CPU step at batch 2."""
import pytest
import torch

from oracleface.losses import PerceptualLoss
from oracleface.models.discriminators import DISCRIMINATOR_NAMES
from oracleface.training.step import OracleFaceModel, check_batch

BOXES = torch.tensor([[[80, 96, 128, 144], [128, 96, 176, 144], [104, 128, 152, 176], [96, 176, 160, 224]]])


def _batch():
    torch.manual_seed(0)
    mask = torch.zeros(2, 1, 256, 256)
    mask[0, :, 64:192, 64:192] = 1
    mask[1, :, 20:120, 100:210] = 1
    return {"image": torch.rand(2, 3, 256, 256), "hole_mask": mask, "boxes": BOXES.repeat(2, 1, 1)}


@pytest.fixture(scope="module")
def perceptual():
    with pytest.warns(UserWarning):
        return PerceptualLoss(pretrained=False)


def test_full_training_step_updates_generator_and_every_critic(perceptual):
    torch.manual_seed(0)
    model = OracleFaceModel(256, dsa_backend="reference", perceptual=perceptual)
    assert model.oracle_layers == (12,)
    g_opt = torch.optim.RMSprop(model.generator.parameters(), lr=1e-4)
    d_opt = torch.optim.RMSprop(model.discriminator.parameters(), lr=1e-4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    terms = model.training_step(_batch(), g_opt, d_opt)

    expected = {f"d_{n}" for n in DISCRIMINATOR_NAMES} | {
        "d_wasserstein", "d_gp", "d_total", "g_reconstruction", "g_perceptual", "g_kl",
        "g_adversarial", "g_total"}
    assert set(terms) == expected
    assert all(isinstance(v, float) and v == v and abs(v) != float("inf") for v in terms.values())
    assert terms["g_kl"] > 0  # the oracle sees the ground truth inside the hole
    after = model.state_dict()
    for name in DISCRIMINATOR_NAMES:
        prefix = f"discriminator.critics.{name}."
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(prefix)), name
    assert not torch.equal(before["generator.layers.1.0.weight"], after["generator.layers.1.0.weight"])
    assert not torch.equal(before["generator.attention.12.projection.weight"],
                           after["generator.attention.12.projection.weight"])
    assert all(p.requires_grad for p in model.discriminator.parameters())


def test_configuration_and_batch_validation(perceptual):
    with pytest.raises(ValueError, match="oracle layers need attention='dsa'"):
        OracleFaceModel(256, attention="none", oracle_layers=(12,), perceptual=perceptual)
    with pytest.raises(ValueError, match="oracle layers must be DSA layers"):
        OracleFaceModel(256, oracle_layers=(15,), perceptual=perceptual)
    assert OracleFaceModel(256, attention="ca", perceptual=perceptual).oracle_layers == ()
    batch = _batch()
    with pytest.raises(ValueError, match="boxes"):
        check_batch({**batch, "boxes": batch["boxes"].int()}, 256)
    with pytest.raises(ValueError, match="missing"):
        check_batch({"image": batch["image"]}, 256)
