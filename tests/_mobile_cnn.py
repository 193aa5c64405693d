"""A MobileNetV2 with the weight statistics of a pretrained one, built offline for tests.

Random initialisation gives depthwise convolutions whose folded weights have similar
ranges in every channel, so int8 looks harmless on them. Pretrained MobileNets do not:
their BatchNorm scales spread over orders of magnitude, a few channels are nearly dead
(gamma close to 0), and folding BatchNorm into the convolution carries that spread into
the weights (100x and more between the channels of one depthwise conv). This module
reproduces that: log-normal BatchNorm scales with a few near-dead channels, BatchNorm
statistics re-estimated on image crops, and a classifier fitted to pseudo-labels (k-means
clusters of the features) so the logits are decisive, as a trained model's are.

Images are crops of scikit-learn's two sample photographs (no download).
"""

from __future__ import annotations

import functools
import io

import numpy as np
import onnx

from edgeloop.data import Dataset

_MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
_LIBS: list[object] = []
_STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)


@functools.cache
def import_torchvision():
    """torchvision's model code without its C++ ops, which cannot load beside CPU torch:
    declaring the two operator schemas its Python code registers kernels for is enough."""
    import torch

    try:
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _LIBS.append(lib)  # the schemas live as long as the Library object
    except RuntimeError:  # already declared (by edgeloop's corpus, or an earlier import)
        pass
    import torchvision

    return torchvision


def image_crops(n: int, size: int, *, seed: int) -> np.ndarray:
    """``n`` random crops (scale, position, flip) of the two sample photographs, resized to
    ``size``, normalised as ImageNet models expect: float32 of shape (n, 3, size, size)."""
    import torch
    from sklearn.datasets import load_sample_images

    photos = [torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255.0
              for im in load_sample_images().images]
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), np.float32)
    for k in range(n):
        im = photos[k % len(photos)]
        h, w = im.shape[1:]
        side = int(rng.uniform(0.12, 0.6) * min(h, w))
        y, x = rng.integers(0, h - side), rng.integers(0, w - side)
        crop = im[:, y:y + side, x:x + side]
        if rng.random() < 0.5:
            crop = crop.flip(-1)
        crop = torch.nn.functional.interpolate(crop[None], size=(size, size), mode="bilinear",
                                               antialias=True, align_corners=False)
        out[k] = crop[0].numpy()
    return (out - _MEAN) / _STD


def realistic_mobilenet_v2(*, width: float = 0.35, size: int = 64, classes: int = 20,
                           gamma_sigma: float = 1.0, dead_fraction: float = 0.02,
                           residual_gain: float = 0.2, seed: int = 0,
                           ) -> tuple[onnx.ModelProto, Dataset, Dataset]:
    """A MobileNetV2 (torchvision's, ``width`` multiplier) exported to ONNX with dynamic
    batch, plus calibration (128) and held-out (256) image crops of ``size`` pixels."""
    import torch

    tv = import_torchvision()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = tv.models.mobilenet_v2(width_mult=width, num_classes=classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                gamma = rng.lognormal(0.0, gamma_sigma, c)
                dead = rng.random(c) < dead_fraction
                gamma[dead] = 10.0 ** rng.uniform(-6, -4, int(dead.sum()))
                m.weight.copy_(torch.from_numpy(gamma.astype(np.float32)))
                m.bias.copy_(torch.from_numpy(rng.normal(0.0, 0.3, c).astype(np.float32)))
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the re-estimation batches
        for block in model.modules():
            if getattr(block, "use_res_connect", False):
                block.conv[-1].weight.mul_(residual_gain)
    fit = torch.from_numpy(image_crops(512, size, seed=seed + 1))
    model.train()
    with torch.no_grad():
        for batch in fit.split(64):
            model(batch)
    model.eval()
    _fit_classifier(model, fit, classes, seed)

    calib = Dataset({"input": image_crops(128, size, seed=seed + 2)})
    test = Dataset({"input": image_crops(256, size, seed=seed + 3)})
    buf = io.BytesIO()
    torch.onnx.export(model, (torch.from_numpy(calib.inputs["input"][:1]),), buf,
                      input_names=["input"], output_names=["logits"], opset_version=17,
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False)
    return onnx.load_from_string(buf.getvalue()), calib, test


def _fit_classifier(model, images, classes: int, seed: int) -> None:
    """Fit the last Linear layer to k-means clusters of the pooled features."""
    import torch
    from sklearn.cluster import KMeans

    with torch.no_grad():
        feats = torch.nn.functional.adaptive_avg_pool2d(model.features(images), 1).flatten(1)
    labels = KMeans(classes, n_init=3, random_state=seed).fit_predict(feats.numpy())
    head = model.classifier[-1]
    target = torch.from_numpy(labels).long()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(feats), target).backward()
        opt.step()
