"""A real training loop: a small MLP on 2000 Fashion-MNIST images (Debian's
dataset-fashion-mnist), trained with softce's losses and with torch's from the same
initialisation; the loss curves and the final weights must agree to float tolerance."""

import gzip
import os
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import softce

DATA_DIR = "/usr/share/datasets/fashion-mnist"


def read_idx(path):
    """Reads an IDX file (gzip): big-endian magic (0, 0, dtype code, ndim), ndim uint32 sizes,
    then the data. Fashion-MNIST uses unsigned bytes (code 0x08)."""
    with gzip.open(path, "rb") as f:
        zero, code, ndim = struct.unpack(">HBB", f.read(4))
        assert zero == 0 and code == 0x08, f"{path}: not an unsigned-byte IDX file"
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        data = np.frombuffer(f.read(), dtype=np.uint8)
    return data.reshape(shape)


@pytest.fixture(scope="module")
def fashion_mnist():
    images_path = os.path.join(DATA_DIR, "train-images-idx3-ubyte.gz")
    labels_path = os.path.join(DATA_DIR, "train-labels-idx1-ubyte.gz")
    assert os.path.exists(images_path), (
        f"{images_path} is missing: install Debian's dataset-fashion-mnist "
        "(scripts/setup.sh does)")
    images = read_idx(images_path)[:2000]
    labels = read_idx(labels_path)[:2000]
    assert images.shape == (2000, 28, 28) and labels.max() == 9
    x = torch.from_numpy(images.reshape(2000, -1).astype(np.float32) / 255.0)
    return (x - x.mean()) / x.std(), torch.from_numpy(labels.astype(np.int64))


def soft_targets(labels, batch_index):
    """Mixup-style soft labels: each target mixes the label with the next image's label."""
    g = torch.Generator().manual_seed(batch_index)
    lam = torch.rand(labels.shape[0], 1, generator=g) * 0.5 + 0.5
    one_hot = F.one_hot(labels, 10).float()
    return lam * one_hot + (1 - lam) * one_hot.roll(1, 0)


LOSSES = {
    # name: (softce loss, torch loss), each (logits, labels, batch index) -> scalar
    "ce_index_smoothing": (
        lambda z, y, i: softce.cross_entropy(z, y, label_smoothing=0.1),
        lambda z, y, i: F.cross_entropy(z, y, label_smoothing=0.1)),
    "ce_soft_targets": (
        lambda z, y, i: softce.nn.CrossEntropyLoss()(z, soft_targets(y, i)),
        lambda z, y, i: torch.nn.CrossEntropyLoss()(z, soft_targets(y, i))),
    "kl_soft_targets": (
        lambda z, y, i: softce.kl_div(torch.log_softmax(z, 1), soft_targets(y, i),
                                      reduction="batchmean"),
        lambda z, y, i: F.kl_div(torch.log_softmax(z, 1), soft_targets(y, i),
                                 reduction="batchmean")),
    "bce_soft_targets": (
        lambda z, y, i: softce.binary_cross_entropy_with_logits(z, soft_targets(y, i)),
        lambda z, y, i: F.binary_cross_entropy_with_logits(z, soft_targets(y, i))),
}


def train(loss_fn, data, steps=25, batch=200, inplace_backward=False):
    x, y = data
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    curve = []
    for step in range(steps):
        start = (step * batch) % x.shape[0]
        xb, yb = x[start:start + batch], y[start:start + batch]
        optimizer.zero_grad()
        loss = loss_fn(model(xb), yb, step)
        loss.backward()
        optimizer.step()
        curve.append(loss.item())
    return np.array(curve), model


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_same_loss_curve_as_torch(fashion_mnist, name):
    ours, theirs = LOSSES[name]
    curve, model = train(ours, fashion_mnist)
    expected, expected_model = train(theirs, fashion_mnist)
    assert curve[-1] < 0.8 * curve[0], "the model learns"
    np.testing.assert_allclose(curve, expected, rtol=2e-5, atol=1e-6)
    for a, b in zip(model.parameters(), expected_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_inplace_backward_training_gives_the_same_curve(fashion_mnist):
    def ce(inplace):
        return lambda z, y, i: softce.cross_entropy(z, soft_targets(y, i),
                                                    inplace_backward=inplace)

    curve, _ = train(ce(False), fashion_mnist, steps=10)
    curve_inplace, _ = train(ce(True), fashion_mnist, steps=10)
    np.testing.assert_array_equal(curve, curve_inplace)
