"""Feature extractors: pixels, a user-supplied TorchScript Inception, the project's domain CNN."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from fedspine.data.prepared import load_prepared, write_prepared
from fedspine.evaluation.features import (
    DomainExtractor,
    FeatureExtractor,
    FeatureExtractorError,
    InceptionTorchScript,
    PixelExtractor,
    extract,
)


class _FakeInception(torch.nn.Module):
    """Stands in for the FID Inception: insists on uint8 [N, 3, 299, 299], returns 2048 values."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.shape[1] != 3 or x.shape[2] != 299 or x.shape[3] != 299:
            raise RuntimeError("expected uint8 [N, 3, 299, 299]")
        if not return_features:
            raise RuntimeError("expected return_features=True")
        return x.float().flatten(1)[:, :2048]


class _SmallFeatures(torch.nn.Module):
    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return x.float().flatten(1)[:, :16]


class _NoFeaturesFlag(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean(dim=(1, 2, 3))


def _script(module: torch.nn.Module, path):
    with pytest.warns(DeprecationWarning):
        torch.jit.script(module).save(str(path))
    return path


def test_pixel_extractor_area_pools_exactly():
    rng = np.random.default_rng(0)
    blocks = rng.random((5, 16, 16))
    images = np.kron(blocks, np.ones((2, 2)))[:, None]  # 32 px, constant 2x2 blocks
    pixels = PixelExtractor(16)
    assert isinstance(pixels, FeatureExtractor)
    np.testing.assert_allclose(pixels(images), blocks.reshape(5, -1), atol=1e-6)
    assert pixels.name == "pixels 16x16 (area-downsampled raw pixels, D=256)"
    assert "baseline" in pixels.describe()


def test_extract_batches_and_accepts_uint8_and_3d():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 32, 32), dtype=np.uint8)
    pixels = PixelExtractor(8)
    whole = pixels(images.astype(np.float32)[:, None] / 255.0)
    batched = extract(pixels, images, batch=3)
    assert batched.dtype == np.float64 and batched.shape == (7, 64)
    np.testing.assert_allclose(batched, whole, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        extract(pixels, np.full((2, 1, 8, 8), 2.0))
    with pytest.raises(ValueError, match="grey images"):
        extract(pixels, np.zeros((2, 3, 8, 8)))
    with pytest.raises(ValueError, match="batch"):
        extract(pixels, images, batch=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_inception_torchscript_file_is_called_as_fid_tools_do(tmp_path):
    path = _script(_FakeInception(), tmp_path / "pt_inception-test.pt")
    inception = InceptionTorchScript(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert inception.name == f"inception-v3 (user file pt_inception-test.pt, sha256 {digest[:12]})"
    assert digest in inception.describe()
    images = np.full((3, 1, 32, 32), 0.5, dtype=np.float32)
    images[1] = 1.0
    feats = extract(inception, images, batch=2)
    assert feats.shape == (3, 2048)
    np.testing.assert_array_equal(feats[0], 128.0)  # round(0.5 * 255)
    np.testing.assert_array_equal(feats[1], 255.0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_inception_torchscript_errors_name_the_file(tmp_path):
    with pytest.raises(FeatureExtractorError, match="missing.pt: Inception-v3 TorchScript file"):
        InceptionTorchScript(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not torchscript")
    with pytest.raises(FeatureExtractorError, match="junk.pt: not a loadable TorchScript"):
        InceptionTorchScript(junk)
    small = InceptionTorchScript(_script(_SmallFeatures(), tmp_path / "small.pt"))
    with pytest.warns(UserWarning, match="small.pt: features have 16 dimensions"):
        assert small(np.zeros((2, 1, 8, 8), dtype=np.float32)).shape == (2, 16)
    wrong = InceptionTorchScript(_script(_NoFeaturesFlag(), tmp_path / "wrong.pt"))
    with pytest.raises(FeatureExtractorError, match="wrong.pt: calling model"):
        wrong(np.zeros((1, 1, 8, 8), dtype=np.float32))


def _bands_dataset(root, n_per_class=60, size=32, seed=0):
    """Class 0: a bright horizontal band; class 1: a vertical one; noisy, random positions."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(2 * n_per_class):
        label = i % 2
        img = rng.normal(60, 20, (size, size))
        pos = rng.integers(4, size - 8)
        if label == 0:
            img[pos : pos + 4, :] += 120
        else:
            img[:, pos : pos + 4] += 120
        images.append(np.clip(img, 0, 255).astype(np.uint8))
        labels.append(label)
    n = len(images)
    splits = ["train"] * (n - 40) + ["val"] * 20 + ["test"] * 20
    return load_prepared(
        write_prepared(
            root,
            images=np.stack(images),
            files=[f"img{i}.png" for i in range(n)],
            patient_ids=[f"p{i}" for i in range(n)],
            splits=splits,
            labels=labels,
            findings=np.zeros((n, 0), dtype=np.uint8),
            finding_names=[],
            class_names=["horizontal", "vertical"],
            rejected=[],
            manifest={"source": "test"},
        )
    )


def test_domain_extractor_learns_classes_and_round_trips(tmp_path):
    torch.set_num_threads(1)
    data = _bands_dataset(tmp_path / "prepared")
    extractor = DomainExtractor.fit(data, epochs=4, seed=0, input_size=32)
    assert isinstance(extractor, FeatureExtractor)
    assert extractor.name == (
        f"fedspine-domain-cnn v1 (trained on {data.content_hash[:12]} train split, D=128)"
    )
    assert extractor.meta["train_images"] == int((data.splits == "train").sum())

    train, test = data.select("train"), data.select("test")
    f_train, f_test = (
        extract(extractor, train.images_float()),
        extract(extractor, test.images_float()),
    )
    assert f_test.shape == (20, 128)
    np.testing.assert_allclose(np.linalg.norm(f_test, axis=1), 1.0, atol=1e-6)
    centroids = np.stack([f_train[train.labels == c].mean(0) for c in (0, 1)])
    predicted = np.argmax(f_test @ centroids.T, axis=1)
    assert np.mean(predicted == test.labels) >= 0.9

    loaded = DomainExtractor.load(extractor.save(tmp_path / "domain.pt"))
    assert loaded.name == extractor.name
    np.testing.assert_array_equal(extract(loaded, test.images_float()), f_test)
    again = DomainExtractor.fit(data, epochs=1, seed=0, input_size=32)
    once_more = DomainExtractor.fit(data, epochs=1, seed=0, input_size=32)
    np.testing.assert_array_equal(again(test.images_float()), once_more(test.images_float()))


def test_domain_extractor_errors(tmp_path):
    data = _bands_dataset(tmp_path / "prepared", n_per_class=25)
    single = data.select(None)
    single.labels = np.zeros_like(single.labels)
    with pytest.raises(ValueError, match="single class"):
        DomainExtractor.fit(single, epochs=1)
    with pytest.raises(FeatureExtractorError, match="not found"):
        DomainExtractor.load(tmp_path / "nothing.pt")
    other = tmp_path / "other.pt"
    torch.save({"format": "something-else"}, other)
    with pytest.raises(FeatureExtractorError, match="other.pt: not a fedspine domain extractor"):
        DomainExtractor.load(other)
