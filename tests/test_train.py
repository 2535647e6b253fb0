"""End-to-end training on the CPU: run folder, exact resume, eval and complete on its checkpoint.

A narrow model (``--width 0.125``) on six generated 64×64 PNGs (resized to 256² by the
dataset). The resume comparison uses ``--attention none`` and no perceptual term so
that its eight steps stay cheap; one full step (DSA, oracle KL, random-weight VGG-16)
checks that the paper's configuration trains too.
"""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from oracleface.cli import main

FAST = ["--batch-size", "2", "--workers", "0", "--width", "0.125", "--device", "cpu", "--no-progress",
        "--log-every", "1", "--dsa-backend", "reference"]
CHEAP = ["--attention", "none", "--lambda-perceptual", "0"]


def scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


@pytest.fixture(scope="module")
def straight_run(faces, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "straight"
    assert main(["train", "--data", str(faces), "--out", str(run), "--steps", "4", "--sample-every", "2",
                 "--checkpoint-every", "2", *FAST, *CHEAP]) == 0
    return run


@pytest.mark.slow
def test_run_folder_holds_config_checkpoints_events_and_samples(straight_run):
    import yaml

    config = yaml.safe_load((straight_run / "config.yaml").read_text())
    assert config["steps"] == 4 and config["batch_size"] == 2 and config["lr_generator"] == 1e-4
    checkpoints = sorted(p.name for p in (straight_run / "checkpoints").iterdir())
    assert checkpoints == ["latest.pt", "step_00000002.pt", "step_00000004.pt"]
    state = torch.load(straight_run / "checkpoints" / "latest.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (4, 2, 0)  # 5 train images: 2 batches/epoch
    losses = scalars(straight_run, "generator/g_total")
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())
    assert sorted(scalars(straight_run, "throughput/images_per_second")) == [1, 2, 3, 4]
    for step in (2, 4):
        grid = Image.open(straight_run / "samples" / f"step_{step:08d}.png")
        assert grid.size == (3 * 256 + 2 * 2, 2 * 256 + 2)  # 2 rows of input | output | truth


@pytest.mark.slow
def test_resume_replays_the_uninterrupted_run(faces, straight_run, tmp_path, capsys):
    run = tmp_path / "interrupted"
    common = ["--data", str(faces), "--out", str(run), "--sample-every", "100", *FAST, *CHEAP]
    assert main(["train", *common, "--steps", "2", "--resume", "if-any"]) == 0
    assert "nothing to resume in" in capsys.readouterr().out  # if-any: a fresh run, said so
    assert main(["train", *common, "--steps", "4", "--resume"]) == 0
    latest = run / "checkpoints" / "latest.pt"
    assert f"resuming from step 2 (epoch 1) — {latest}" in capsys.readouterr().out
    straight = {tag: scalars(straight_run, tag) for tag in ("generator/g_total", "discriminator/d_total")}
    resumed = {tag: scalars(run, tag) for tag in straight}
    for tag in straight:
        assert sorted(resumed[tag]) == [1, 2, 3, 4]
        for step in (3, 4):
            assert resumed[tag][step] == straight[tag][step], (tag, step)
    a = torch.load(straight_run / "checkpoints" / "latest.pt", weights_only=True)
    b = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    for name in a["generator"]:
        torch.testing.assert_close(a["generator"][name], b["generator"][name], rtol=0, atol=0)
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])


@pytest.mark.slow
def test_eval_prints_every_metric_and_repeats_exactly(faces, straight_run, tmp_path, capsys):
    checkpoint = straight_run / "checkpoints" / "latest.pt"
    outputs = []
    for name in ("a.json", "b.json"):
        assert main(["eval", "--data", str(faces), "--checkpoint", str(checkpoint), "--masks", "random",
                     "--out", str(tmp_path / name), "--device", "cpu", "--no-progress"]) == 0
        outputs.append(json.loads((tmp_path / name).read_text()))
    table = capsys.readouterr().out
    for column in ("L1 (%)", "PSNR", "SSIM", "LPIPS"):
        assert column in table
    first, second = outputs
    assert first == second and first["images"] == 1
    assert 0 < first["l1_percent"] < 100 and first["psnr"] > 0 and -1 <= first["ssim"] <= 1
    assert first["lpips_net"] == "alex" and "LPIPS-alex" in table
    if first["lpips"] is None:
        assert "n/a" in table and "alexnet-owt-7be5be79.pth" in first["lpips_unavailable"]


@pytest.mark.slow
def test_complete_keeps_known_pixels_of_any_image_size(straight_run, tmp_path):
    rng = np.random.default_rng(1)
    photo = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)  # not square, not 256
    Image.fromarray(photo).save(tmp_path / "photo.png")
    hole = np.zeros((70, 90), dtype=np.uint8)
    hole[20:45, 30:60] = 255
    Image.fromarray(hole).save(tmp_path / "mask.png")
    out, pair = tmp_path / "out.png", tmp_path / "pair.png"
    assert main(["complete", str(tmp_path / "photo.png"), "--mask", str(tmp_path / "mask.png"),
                 "--checkpoint", str(straight_run / "checkpoints" / "latest.pt"), "--out", str(out),
                 "--side-by-side", str(pair), "--device", "cpu"]) == 0
    result = np.asarray(Image.open(out))
    assert result.shape == photo.shape
    known = hole == 0
    np.testing.assert_array_equal(result[known], photo[known])
    assert not np.array_equal(result[~known], photo[~known])  # the hole was filled by the model
    assert Image.open(pair).size == (3 * 90 + 2 * 2, 70)


@pytest.mark.slow
def test_paper_configuration_trains_one_step_with_random_vgg(faces, tmp_path):
    run = tmp_path / "paper"
    with pytest.warns(UserWarning, match="RANDOM weights"):
        assert main(["train", "--data", str(faces), "--out", str(run), "--steps", "1",
                     "--no-perceptual-pretrained", "--sample-every", "1", *FAST]) == 0
    for tag in ("generator/g_kl", "generator/g_perceptual", "generator/g_reconstruction",
                "generator/g_adversarial", "discriminator/d_total"):
        (value,) = scalars(run, tag).values()
        assert math.isfinite(value)
    assert scalars(run, "generator/g_perceptual")[1] > 0
    assert scalars(run, "generator/g_kl")[1] >= 0
    assert (run / "samples" / "step_00000001.png").is_file()


def test_oracle_pass_stops_at_the_last_supervised_layer():
    """Layers after the last KL layer run once per step (the prediction), earlier ones twice."""
    from oracleface.data.landmarks import boxes_tensor, canonical_landmarks, component_boxes
    from oracleface.data.masks import center_mask
    from oracleface.training.step import OracleFaceModel
    from oracleface.training.trainer import ZeroPerceptual

    torch.manual_seed(0)
    model = OracleFaceModel(256, dsa_backend="reference", width=0.125, perceptual=ZeroPerceptual())
    calls = {}
    for name, layer in model.generator.layers.items():
        layer.register_forward_hook(lambda module, args, out, name=int(name): calls.__setitem__(
            name, calls.get(name, 0) + 1))
    boxes = boxes_tensor(component_boxes(canonical_landmarks(256), 256))
    batch = {"image": torch.rand(2, 3, 256, 256), "hole_mask": torch.stack([center_mask(256)] * 2),
             "boxes": torch.stack([boxes, boxes])}
    g_optimizer = torch.optim.RMSprop(model.generator.parameters())
    d_optimizer = torch.optim.RMSprop(model.discriminator.parameters())
    model.training_step(batch, g_optimizer, d_optimizer)
    last_supervised = max(model.oracle_layers)
    assert last_supervised == 12
    assert all(calls[layer] == 2 for layer in range(1, last_supervised + 1))
    assert all(calls[layer] == 1 for layer in range(last_supervised + 1, model.generator.last_layer + 1))


def test_width_scales_generator_and_critic_channels():
    """The additive ``width`` option (oracleface.models) that narrow smoke-run models use."""
    from oracleface.models import Generator, MultiDiscriminator, generator_layer_table

    paper = generator_layer_table(256)
    narrow = generator_layer_table(256, width=0.125)
    for full, small in zip(paper, narrow):
        expected = full.out_channels if full.out_channels == 3 else max(8, round(full.out_channels / 8))
        assert small.out_channels == expected and small.kernel == full.kernel
    assert Generator(256, dsa_backend="reference", width=0.125).layers["1"][0].out_channels == 8
    critic = MultiDiscriminator(256, width=0.5).critics["global"]
    assert next(critic.parameters()).shape[0] == 32  # C = 64 in Table 7
    with pytest.raises(ValueError, match="width"):
        generator_layer_table(256, width=0)
