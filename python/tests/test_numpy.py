"""The NumPy path: the same functions on NumPy arrays return NumPy results; results equal
the torch path's; any strides (negative included) and read-only arrays are read in place;
the package imports and works without torch."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import softce
from conftest import assert_close

rng = np.random.default_rng(0)
X = rng.standard_normal((6, 5, 3))
P = np.exp(X) / np.exp(X).sum(1, keepdims=True)
P = np.ascontiguousarray(np.flip(P, 0))
INDEX = rng.integers(0, 5, (6, 3))
TEACHER = rng.standard_normal((6, 5, 3))


CALLS = {
    "ce_index": lambda x, **kw: softce.cross_entropy(x, INDEX, label_smoothing=0.1, **kw),
    "ce_probs": lambda x, **kw: softce.cross_entropy(x, P, np.linspace(0.5, 2, 5), **kw),
    "ce_mask": lambda x, **kw: softce.cross_entropy(x, P, mask=INDEX > 1, **kw),
    "ce_topk": lambda x, **kw: softce.cross_entropy(
        x, softce.TopK(np.argsort(-P, 1)[:, :2].transpose(0, 2, 1),
                       -np.sort(-P, 1)[:, :2].transpose(0, 2, 1)), **kw),
    "kl": lambda x, **kw: softce.kl_div(x, P, reduction="batchmean", **kw),
    "bce": lambda x, **kw: softce.binary_cross_entropy_with_logits(
        x, P, pos_weight=np.full(3, 2.0), **kw),
    "distill": lambda x, **kw: softce.distillation_loss(x, TEACHER, divergence="jsd", dim=1,
                                                        **kw),
    "cewp": lambda x, **kw: softce.cross_entropy_with_probs(x, P, **kw),
}


@pytest.mark.parametrize("name", sorted(CALLS))
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_numpy_equals_torch_path(name, dtype):
    fn = CALLS[name]
    x = X.astype(dtype)
    loss = fn(x)
    assert isinstance(loss, np.generic) and loss.dtype == dtype
    loss2, grad = fn(x, return_grad=True)
    assert loss2 == loss and isinstance(grad, np.ndarray) and grad.dtype == dtype
    assert grad.shape == x.shape
    t_loss, t_grad = fn(torch.from_numpy(x), return_grad=True)
    assert loss.item() == t_loss.item() or (np.isnan(loss) and torch.isnan(t_loss))
    np.testing.assert_array_equal(grad, t_grad.numpy())


def test_reduction_none_returns_arrays():
    losses = softce.cross_entropy(X, P, reduction="none")
    assert isinstance(losses, np.ndarray) and losses.shape == (6, 3)
    expected = F.cross_entropy(torch.from_numpy(X), torch.from_numpy(P), reduction="none")
    assert_close(losses, expected)
    elementwise = softce.kl_div(X, P, reduction="none")
    assert elementwise.shape == X.shape
    assert softce.cross_entropy(X[0, :, 0], 2, reduction="none").shape == ()


def test_any_strides_are_read_in_place():
    base = rng.standard_normal((8, 12, 4))
    views = [base[::2, ::3], base[::-1], base[:, ::-1, 1:3], np.moveaxis(base, 1, 2)[:, :, ::2],
             np.broadcast_to(base[:1], (8, 12, 4))]
    for x in views:
        t = np.broadcast_to(np.eye(x.shape[1])[:1, :, None], x.shape)  # read-only, stride 0
        loss, grad = softce.cross_entropy(x, t, return_grad=True)
        ref_loss, ref_grad = softce.cross_entropy(np.ascontiguousarray(x),
                                                  np.ascontiguousarray(t), return_grad=True)
        assert loss == ref_loss
        np.testing.assert_array_equal(grad, ref_grad)
        assert_close(loss, F.cross_entropy(torch.from_numpy(x.copy()), torch.from_numpy(
            t.copy())))


def test_inplace_backward_with_numpy():
    x = X.copy()
    loss, grad = softce.cross_entropy(x, P, return_grad=True)
    loss2, grad2 = softce.cross_entropy(x, P, return_grad=True, inplace_backward=True)
    assert grad2 is x and loss2 == loss
    np.testing.assert_array_equal(x, grad)


def test_lists_and_dlpack_objects_are_accepted():
    class OnlyDLPack:  # e.g. a JAX CPU array: has __dlpack__, is not a NumPy array
        def __init__(self, array):
            self.array = array

        def __dlpack__(self, **kwargs):
            return self.array.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self.array.__dlpack_device__()

    x = [[1.0, 2.0, 3.0], [0.5, 0.0, -1.0]]
    expected = F.cross_entropy(torch.tensor(x, dtype=torch.float64), torch.tensor([2, 0]))
    assert_close(softce.cross_entropy(x, [2, 0]), expected)
    assert_close(softce.cross_entropy(OnlyDLPack(np.array(x)), OnlyDLPack(np.array([2, 0]))),
                 expected)


def test_import_and_numpy_path_without_torch():
    code = """
import sys
sys.modules["torch"] = None  # `import torch` now raises ImportError
import numpy as np
import softce
loss, grad = softce.cross_entropy(np.array([[1.0, 2.0, 0.5]]), np.array([1]), return_grad=True)
assert abs(loss - 0.46436878410794) < 1e-12, loss  # log(1 + e^-1 + e^-1.5)
assert softce.distillation_loss(np.zeros((2, 3)), np.zeros((2, 3))) == 0
try:
    softce.nn
except ImportError:
    pass
else:
    raise AssertionError("softce.nn needs torch")
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
