"""oracleface.evaluation: metric definitions, LPIPS availability, the table."""
import math

import pytest
import torch

from oracleface.evaluation import format_table, image_metrics, load_lpips


def test_l1_psnr_and_ssim_per_image():
    target = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prediction = target.clone()
    prediction[1] = (prediction[1] + 0.1).clamp(0, 1)
    metrics = image_metrics(prediction, target)
    # Plain floats on both sides: pytest >= 9.2 rejects approx() against 0-d tensors.
    values = {name: metric.tolist() for name, metric in metrics.items()}
    assert values["l1_percent"][0] == 0 and values["ssim"][0] == pytest.approx(1.0, abs=1e-6)
    error = (prediction[1] - target[1])
    assert values["l1_percent"][1] == pytest.approx(error.abs().mean().item() * 100, rel=1e-5)
    assert values["psnr"][1] == pytest.approx(-10 * math.log10(error.pow(2).mean().item()), rel=1e-4)
    assert values["ssim"][1] < 1 and "lpips" not in metrics


@pytest.mark.parametrize("net, file", [("alex", "alexnet-owt-7be5be79.pth"), ("vgg", "vgg16-397923af.pth")])
def test_lpips_is_unavailable_without_its_backbone_weights_and_names_the_file(tmp_path, monkeypatch, net, file):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("ORACLEFACE_VGG16_WEIGHTS", raising=False)
    model, reason = load_lpips("cpu", net)
    assert model is None
    assert str(tmp_path / "hub" / "checkpoints" / file) in reason


def test_lpips_defaults_to_alexnet_loaded_from_the_torch_hub_cache(tmp_path, monkeypatch):
    import torchvision

    features = torchvision.models.alexnet(weights=None).features
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()},
               checkpoints / "alexnet-owt-7be5be79.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model, reason = load_lpips("cpu")
    assert reason is None and type(model.net).__name__ == "alexnet"
    torch.testing.assert_close(getattr(model.net.slice1, "0").weight, features[0].weight)
    torch.testing.assert_close(getattr(model.net.slice5, "10").bias, features[10].bias)
    image = torch.rand(1, 3, 64, 64)
    assert image_metrics(image, image, model)["lpips"].item() == pytest.approx(0.0, abs=1e-6)
    assert image_metrics(image, image.flip(-1), model)["lpips"].item() > 0.01


def test_table_shows_na_for_unavailable_lpips():
    table = format_table({"masks": "center", "images": 3, "l1_percent": 2.5, "psnr": 25.0, "ssim": 0.9,
                          "lpips": None, "lpips_net": "vgg", "lpips_unavailable": "LPIPS unavailable: no weights"})
    assert "n/a" in table and "2.500" in table and "LPIPS unavailable" in table and "LPIPS-vgg" in table


def test_eval_uses_the_runs_recorded_test_list(tmp_path):
    from oracleface.data.folders import write_test_list
    from oracleface.evaluation import recorded_test_list

    checkpoint = tmp_path / "run" / "checkpoints" / "latest.pt"
    with pytest.warns(UserWarning, match="no recorded test list"):
        assert recorded_test_list(checkpoint) is None
    write_test_list(tmp_path / "run", ["b.png", "a.png"], seed=0)
    assert recorded_test_list(checkpoint) == ["a.png", "b.png"]
    other = write_test_list(tmp_path / "other", ["c.png"], seed=0)
    assert recorded_test_list(checkpoint, test_list=other) == ["c.png"]
