"""Evaluation (Section 4.2): ``oracleface eval --data DIR --checkpoint CKPT --masks random|center``.

Metrics on the held-out split at the model's resolution, with the valid pixels copied
into the output (the composite ``image·(1−M) + output·M``), as the paper reports them:

- L1 (%): mean absolute error over all pixels and channels, ×100 (images in [0, 1]);
- PSNR (dB) and SSIM: ``torchmetrics`` with ``data_range=1``, per image, then averaged;
- LPIPS: the ``lpips`` package (v0.1 linear layers, which ship in its wheel), backbone
  ``--lpips-net alex`` (default, the LPIPS authors' choice) or ``vgg``. The backbone's
  ImageNet weights are torchvision's files in the torch hub cache
  (``$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth``, the
  latter also via ``$ORACLEFACE_VGG16_WEIGHTS``); nothing is downloaded. Without the file
  LPIPS is reported as unavailable (``null`` in the JSON, ``n/a`` in the table, with the
  reason naming the file), never as a number. The backbone is recorded in the JSON
  (``lpips_net``) and in the table's column name.

The test images are the run's held-out files (``RUN_DIR/split.json``, written by the
trainer; ``--test-list`` to name another), so files added to the folder since, or a
dataset cache inside it, never enter the test set; masks are a pure function of
``(seed, image index)``, so two runs give the same numbers.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from oracleface.common import composite

METRICS = ("l1_percent", "psnr", "ssim", "lpips")
MASK_CHOICES = ("random", "center")


# LPIPS backbones: torchvision's weight file (found in the torch hub cache, never
# downloaded) and how many conv layers of it LPIPS uses.
LPIPS_BACKBONES = {"alex": ("alexnet-owt-7be5be79.pth", 5), "vgg": ("vgg16-397923af.pth", 13)}
DEFAULT_LPIPS_NET = "alex"  # the LPIPS authors' default


def lpips_backbone_weights(net: str) -> Path:
    """torchvision's ImageNet weights of the LPIPS backbone ``net``: for ``vgg`` the file the
    perceptual loss uses (``oracleface.losses.resolve_vgg16_weights``), for ``alex``
    ``$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth``. A missing file raises
    FileNotFoundError naming it."""
    from oracleface.losses import resolve_vgg16_weights

    if net not in LPIPS_BACKBONES:
        raise ValueError(f"LPIPS backbone must be one of {sorted(LPIPS_BACKBONES)}; got {net!r}")
    if net == "vgg":
        return resolve_vgg16_weights()
    path = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONES[net][0]
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS-{net} needs torchvision's {path.name} at {path} (nothing is "
                                "downloaded; copy the file there or set TORCH_HOME)")
    return path


def load_lpips(device, net: str = DEFAULT_LPIPS_NET) -> tuple[torch.nn.Module | None, str | None]:
    """``(LPIPS module with backbone net, None)``, or ``(None, reason)`` when the backbone's
    weights are absent (the reason names the file)."""
    import lpips

    try:
        path = lpips_backbone_weights(net)
    except FileNotFoundError as error:
        return None, f"LPIPS unavailable: {error}"
    # pnet_rand=True: build the backbone without torchvision's download; the ImageNet
    # features are loaded from the local file below, the linear layers from the wheel.
    with warnings.catch_warnings():  # torchvision's deprecation notes about lpips' `pretrained=`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    features = torch.load(path, map_location="cpu", weights_only=True)
    loaded = 0
    for slice_index in range(1, model.net.N_slices + 1):
        for name, layer in getattr(model.net, f"slice{slice_index}").named_children():
            if isinstance(layer, torch.nn.Conv2d):
                layer.weight.data.copy_(features[f"features.{name}.weight"])
                layer.bias.data.copy_(features[f"features.{name}.bias"])
                loaded += 1
    expected = LPIPS_BACKBONES[net][1]
    if loaded != expected:
        raise ValueError(f"{path}: expected {expected} conv layers for LPIPS-{net}, loaded {loaded}")
    return model.eval().requires_grad_(False).to(device), None


def image_metrics(prediction: torch.Tensor, target: torch.Tensor, lpips_model=None) -> dict[str, torch.Tensor]:
    """Per-image metrics ``(B,)`` of ``prediction`` vs ``target`` (``(B, 3, H, W)`` in [0, 1])."""
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    prediction, target = prediction.float().clamp(0, 1), target.float()
    metrics = {
        "l1_percent": (prediction - target).abs().flatten(1).mean(1) * 100,
        "psnr": peak_signal_noise_ratio(prediction, target, data_range=1.0, reduction="none",
                                        dim=(1, 2, 3)),
        "ssim": structural_similarity_index_measure(prediction, target, data_range=1.0, reduction="none"),
    }
    if lpips_model is not None:
        metrics["lpips"] = lpips_model(prediction * 2 - 1, target * 2 - 1).flatten()
    return metrics


@torch.no_grad()
def evaluate(generator: torch.nn.Module, dataset, batch_size: int = 8, device="cpu",
             lpips_model=None, progress: bool = True) -> dict[str, float | None]:
    """Mean metrics of ``generator`` (eval mode) over ``dataset`` (``FaceFolder`` items)."""
    from tqdm import tqdm

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    generator.eval()
    sums: dict[str, float] = {}
    count = 0
    for batch in tqdm(loader, desc="eval", unit="batch", disable=not progress):
        image, hole_mask = batch["image"].to(device), batch["hole_mask"].to(device)
        completed = composite(image, generator(image, hole_mask), hole_mask)
        for name, values in image_metrics(completed, image, lpips_model).items():
            sums[name] = sums.get(name, 0.0) + float(values.sum())
        count += image.shape[0]
    return {name: (sums[name] / count if name in sums else None) for name in METRICS} | {"images": count}


def format_table(results: dict) -> str:
    """A small text table of ``results`` (``n/a`` for unavailable metrics)."""
    lpips_column = f"LPIPS-{results.get('lpips_net', DEFAULT_LPIPS_NET)}"
    header = f"{'masks':<8} {'images':>6} {'L1 (%)':>8} {'PSNR':>8} {'SSIM':>8} {lpips_column:>10}"

    def cell(value, digits, width=8):
        return f"{value:>{width}.{digits}f}" if value is not None else f"{'n/a':>{width}}"

    row = (f"{results['masks']:<8} {results['images']:>6} {cell(results['l1_percent'], 3)} "
           f"{cell(results['psnr'], 3)} {cell(results['ssim'], 4)} {cell(results['lpips'], 4, 10)}")
    lines = [header, row]
    if results.get("lpips_unavailable"):
        lines.append(results["lpips_unavailable"])
    return "\n".join(lines)


def recorded_test_list(checkpoint, test_list=None) -> list[str] | None:
    """The run's held-out files: ``test_list`` (a ``split.json``), else the ``split.json`` of
    the run folder holding ``checkpoint`` (``RUN_DIR/checkpoints/*.pt``); None (with a
    warning) when there is none."""
    from oracleface.data.folders import TEST_LIST_FILE, read_test_list

    if test_list is not None:
        return read_test_list(test_list)
    beside = Path(checkpoint).resolve().parent.parent / TEST_LIST_FILE
    if beside.is_file():
        return read_test_list(beside)
    warnings.warn(f"no recorded test list ({beside} does not exist): evaluating on the files the "
                  "split rule holds out of the folder as it is now, which may include files the run "
                  "trained on; pass --test-list RUN_DIR/split.json", UserWarning, stacklevel=2)
    return None


def run_evaluation(data, checkpoint, masks: str = "random", batch_size: int = 8, device: str = "auto",
                   limit: int | None = None, progress: bool = True, test_list=None,
                   lpips_net: str = DEFAULT_LPIPS_NET) -> dict:
    """Load ``checkpoint``, evaluate on the run's held-out images of ``data`` (see
    ``recorded_test_list``); returns the results dict."""
    from oracleface.training.checkpoint import generator_from_checkpoint
    from oracleface.data.folders import FaceFolder
    from oracleface.training.runtime import resolve_device

    if masks not in MASK_CHOICES:
        raise ValueError(f"masks must be one of {MASK_CHOICES}; got {masks!r}")
    if not Path(data).is_dir():
        raise FileNotFoundError(f"--data {data}: no such folder")
    device = resolve_device(device)
    generator, state = generator_from_checkpoint(checkpoint, device)
    config = state["config"]
    dataset = FaceFolder(data, resolution=generator.resolution, split="test",
                         test_size=config.get("test_size"), seed=config.get("seed", 0), masks=masks,
                         test_files=recorded_test_list(checkpoint, test_list))
    if limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    lpips_model, reason = load_lpips(device, lpips_net)
    metrics = evaluate(generator, dataset, batch_size, device, lpips_model, progress)
    return {"checkpoint": str(checkpoint), "step": state["step"], "data": str(data), "masks": masks,
            "resolution": generator.resolution, **metrics, "lpips_net": lpips_net,
            "lpips_unavailable": reason}
