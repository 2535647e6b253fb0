"""Oracle supervision at every DSA layer: the streamed loss, the oracle pass, the switch."""
import argparse
import collections

import pytest
import torch

from dsa_ops import DualSpatialAttention, reference
from oracleface.losses import PerceptualLoss, attention_kl_loss, streaming_oracle_kl_loss
from oracleface.models import Generator
from oracleface.training.step import OracleFaceModel
from oracleface.cli.train import configure_parser

WIDTH = 0.125  # narrow generator: the CPU test budget


def _batch(batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, 1, 256, 256)
    mask[0, :, 64:192, 64:192] = 1
    mask[1:, :, 20:120, 100:210] = 1
    return torch.rand(batch, 3, 256, 256, generator=generator), mask


def _narrow_generator(oracle_layers):
    torch.manual_seed(0)
    generator = Generator(256, dsa_backend="reference", width=WIDTH, oracle_layers=oracle_layers)
    for module in generator.attention.values():  # α, β = 0 would hide the branches
        torch.nn.init.constant_(module.alpha, 0.5)
        torch.nn.init.constant_(module.beta, -0.3)
    return generator.train()


def test_oracle_layers_default_to_the_papers_and_are_validated():
    assert Generator(256, width=WIDTH).oracle_layers == (12,)
    assert Generator(1024, width=WIDTH).oracle_layers == (14,)
    assert Generator(256, attention="ca", width=WIDTH).oracle_layers == ()
    assert Generator(256, width=WIDTH, oracle_layers=[14, 12, 13]).oracle_layers == (12, 13, 14)
    with pytest.raises(ValueError, match="oracle layers must be DSA layers"):
        Generator(256, width=WIDTH, oracle_layers=(11,))
    with pytest.raises(ValueError, match="oracle layers need attention='dsa'"):
        Generator(256, attention="none", width=WIDTH, oracle_layers=(12,))


def test_streamed_loss_equals_the_dense_maps_loss_with_the_same_gradients():
    """Same passes, two losses: streamed from q, k vs Eq. 5 on the dense maps."""
    generator = _narrow_generator((12, 13))
    x, mask = _batch()
    output, predicted = generator.forward_queries_keys(x, mask)
    oracle = generator.oracle_queries_keys(x, mask)
    streamed = streaming_oracle_kl_loss(predicted, oracle)
    _, maps = generator(x, mask, return_attention=True, attention_layers=(12, 13))
    dense = attention_kl_loss(maps, generator.oracle_attention(x, mask, (12, 13)), mask)
    assert streamed.item() > 0
    torch.testing.assert_close(streamed, dense, rtol=1e-4, atol=1e-7)
    parameters = [p for name, p in generator.named_parameters() if "attention.13.projection" in name
                  or name.startswith("layers.1.")]
    for got, expected in zip(torch.autograd.grad(streamed, parameters),
                             torch.autograd.grad(dense, parameters)):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-6)


def test_oracle_pass_stops_after_the_last_supervised_projection(monkeypatch):
    generator = _narrow_generator((12, 13, 14))
    bn_state = {k: v.clone() for k, v in generator.state_dict().items() if "running" in k}
    # No dense map anywhere on the streamed path.
    monkeypatch.setattr(reference, "attention_probs", lambda *a, **k: pytest.fail("dense map"))
    x, mask = _batch()
    calls = collections.Counter()

    def counted(method):
        def run(module, *features):
            calls.update([module.projection])  # the projection GEMMs run inside these methods
            return method(module, *features)
        return run

    for name in ("_project", "_project_queries_keys"):
        monkeypatch.setattr(DualSpatialAttention, name, counted(getattr(DualSpatialAttention, name)))
    hook = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.update([m]))
    try:
        oracle = generator.oracle_queries_keys(x, mask)
    finally:
        hook.remove()
    runs = lambda name: calls[generator.get_submodule(name)]  # noqa: E731

    assert sorted(oracle) == [12, 13, 14]
    assert all(runs(f"layers.{i}") == 1 for i in range(1, 15))
    assert runs("layers.15") == runs("layers.16") == 0
    assert runs("attention.12") == runs("attention.13") == 1 and runs("attention.14") == 0
    assert runs("attention.14.projection") == 1
    for layer, entry in oracle.items():
        length = (16 << (layer - 12)) ** 2
        assert entry["foreground"].shape == (2, length) and entry["scale"] == 1.0
        for q, k in (entry["cross"], entry["self"]):
            assert q.shape == k.shape and q.shape[:2] == (2, length) and not q.requires_grad
    for key, value in generator.state_dict().items():
        if key in bn_state:
            assert torch.equal(value, bn_state[key]), key


@pytest.fixture(scope="module")
def perceptual():
    with pytest.warns(UserWarning):
        return PerceptualLoss(pretrained=False)


def test_training_step_supervising_every_dsa_layer(perceptual, monkeypatch):
    torch.manual_seed(0)
    model = OracleFaceModel(256, dsa_backend="reference", oracle_layers=(12, 13, 14), width=WIDTH,
                            perceptual=perceptual)
    assert model.oracle_layers == model.generator.oracle_layers == (12, 13, 14)
    monkeypatch.setattr(reference, "attention_probs", lambda *a, **k: pytest.fail("dense map"))
    x, mask = _batch()
    batch = {"image": x, "hole_mask": mask,
             "boxes": torch.tensor([[[80, 96, 128, 144], [128, 96, 176, 144], [104, 128, 152, 176],
                                     [96, 176, 160, 224]]]).repeat(2, 1, 1)}
    generated = model.generate(batch)
    assert sorted(generated.queries_keys) == [12, 13, 14] and generated.attention == {}
    kl = model.generator_losses(batch, generated)["g_kl"]
    assert kl.item() > 0
    # LKL reaches the 64² layer's projection: it is supervised.
    weight = model.generator.attention["14"].projection.weight
    (grad,) = torch.autograd.grad(kl, weight)
    assert grad.abs().sum() > 0
    g_opt = torch.optim.RMSprop(model.generator.parameters(), lr=1e-4)
    d_opt = torch.optim.RMSprop(model.discriminator.parameters(), lr=1e-4)
    terms = model.training_step(batch, g_opt, d_opt)
    assert all(v == v and abs(v) != float("inf") for v in terms.values())


def test_train_flag_oracle_layers():
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    assert parser.parse_args(["--oracle-layers", "12,13,14"]).oracle_layers == [12, 13, 14]
    assert parser.parse_args(["--oracle-layers", ""]).oracle_layers == []
    with pytest.raises(SystemExit):
        parser.parse_args(["--oracle-layers", "12,x"])
