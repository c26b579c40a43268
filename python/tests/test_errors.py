"""Every error type with its message: ValueError / IndexError / TypeError carry the core's
text verbatim; GPU tensors get a clear "no GPU kernels in this build" error, never a crash."""

import ctypes
import re

import numpy as np
import pytest
import torch

import softce
from softce import _core

X = torch.randn(4, 10)
INDEX = torch.tensor([1, 2, 3, 4])
PROBS = torch.softmax(torch.randn(4, 10), 1)
BOOL = torch.ones(4, dtype=torch.bool)


def topk(indices, values=None, tail=False):
    indices = torch.tensor(indices)
    return softce.TopK(indices, torch.full(indices.shape, 0.3) if values is None else values,
                       tail)


CASES = [
    # (exception, exact message, call)
    (ValueError, "cross_entropy: target: expected shape (4) (the input's without the class "
     "dimension), got (3)", lambda: softce.cross_entropy(X, INDEX[:3])),
    (ValueError, "cross_entropy: target: expected shape (4, 10) (the input's), got (4)",
     lambda: softce.cross_entropy(X, INDEX.float())),
    (IndexError, "cross_entropy: target: class index 12 at row 3 is out of range for 10 "
     "classes", lambda: softce.cross_entropy(X, torch.tensor([1, 2, 3, 12]))),
    (IndexError, "cross_entropy: target: class index -5 at row 3 is out of range for 10 "
     "classes", lambda: softce.cross_entropy(X, torch.tensor([1, 2, 3, -5]))),
    (ValueError, re.compile(r"cross_entropy: label_smoothing: expected a value in \[0, 1\], "
                            r"got 1\.50*"),
     lambda: softce.cross_entropy(X, INDEX, label_smoothing=1.5)),
    (ValueError, "cross_entropy: target.indices: duplicate index 7 in row 2",
     lambda: softce.cross_entropy(X, topk([[1, 2], [1, 2], [7, 7], [0, 1]]))),
    (TypeError, "cross_entropy: target.indices: expected an int32 or int64 array, got float32",
     lambda: softce.cross_entropy(X, softce.TopK(torch.ones(4, 2), torch.ones(4, 2)))),
    (ValueError, "cross_entropy: target.tail: expected no class weight and no label smoothing "
     "with a tail bucket", lambda: softce.cross_entropy(
         X, topk([[1, 2]] * 4, tail=True), torch.ones(10))),
    (ValueError, "cross_entropy: reduction: expected one of 'none', 'mean', 'sum', got "
     "'batchmean'", lambda: softce.cross_entropy(X, INDEX, reduction="batchmean")),
    (ValueError, "parse_reduction: unknown reduction 'avg' (expected 'none', 'mean', 'sum' or "
     "'batchmean')", lambda: softce.cross_entropy(X, INDEX, reduction="avg")),
    (ValueError, "cross_entropy: mask: expected no mask with class-index targets (use "
     "ignore_index)", lambda: softce.cross_entropy(X, INDEX, mask=BOOL)),
    (ValueError, "cross_entropy: mask: expected shape (4) (the input's without the class "
     "dimension), got (3)", lambda: softce.cross_entropy(X, PROBS, mask=BOOL[:3])),
    (ValueError, "cross_entropy: weight: expected shape (10) (one value per class), got (3)",
     lambda: softce.cross_entropy(X, PROBS, torch.ones(3))),
    (ValueError, "cross_entropy: input: expected at most 8 dimensions, got 9",
     lambda: softce.cross_entropy(torch.randn([1] * 9), INDEX)),
    (ValueError, "cross_entropy: input: expected shape (C), (N, C) or (N, C, d1, ...), got a "
     "0-dimensional array", lambda: softce.cross_entropy(torch.tensor(1.0), INDEX)),
    (TypeError, "cross_entropy: input: expected a float32, float64, bfloat16 or float16 "
     "array, got int64", lambda: softce.cross_entropy(X.long(), INDEX)),
    (TypeError, "cross_entropy: input: unsupported dtype complex64",
     lambda: softce.cross_entropy(X.to(torch.complex64), INDEX)),
    (TypeError, "cross_entropy: target: unsupported dtype uint8",
     lambda: softce.cross_entropy(X, INDEX.to(torch.uint8))),
    (TypeError, "cross_entropy_with_probs: target: expected probabilities (float), got int64",
     lambda: softce.cross_entropy_with_probs(X, INDEX)),
    (ValueError, "kl_div: target: expected shape (4, 10) (the input's), got (2, 10)",
     lambda: softce.kl_div(X, PROBS[:2])),
    (ValueError, "binary_cross_entropy_with_logits: weight: expected a shape broadcastable to "
     "(4, 10) (the input's), got (3)",
     lambda: softce.binary_cross_entropy_with_logits(X, PROBS, torch.ones(3))),
    (ValueError, "binary_cross_entropy_with_logits: reduction: expected one of 'none', 'mean', "
     "'sum', got 'batchmean'",
     lambda: softce.binary_cross_entropy_with_logits(X, PROBS, reduction="batchmean")),
    (ValueError, re.compile(r"distillation_loss: temperature: expected a finite value > 0, "
                            r"got 0(\.0*)?"),
     lambda: softce.distillation_loss(X, X, temperature=0)),
    (ValueError, re.compile(r"distillation_loss: beta: expected a value in \[0, 1\], "
                            r"got 2(\.0*)?"),
     lambda: softce.distillation_loss(X, X, divergence="jsd", beta=2)),
    (ValueError, "parse_divergence: unknown divergence 'x' (expected 'kl', 'reverse_kl' or "
     "'jsd')", lambda: softce.distillation_loss(X, X, divergence="x")),
    (ValueError, "distillation_loss: teacher: expected teacher logits for divergence 'jsd' (a "
     "top-k teacher supports 'kl' only)",
     lambda: softce.distillation_loss(X, topk([[1, 2]] * 4), divergence="jsd")),
    (ValueError, "set_num_threads: threads: expected a value >= 1, got 0",
     lambda: softce.set_num_threads(0)),
    # the same errors from the NumPy path
    (IndexError, "cross_entropy: target: class index 12 at row 3 is out of range for 10 "
     "classes", lambda: softce.cross_entropy(X.numpy(), np.array([1, 2, 3, 12]))),
    (ValueError, "kl_div: target: expected shape (4, 10) (the input's), got (2, 10)",
     lambda: softce.kl_div(X.numpy(), PROBS[:2].numpy())),
    # raised by the Python front
    (TypeError, "cross_entropy: target: got a torch.Tensor while input is not a tensor; pass "
     "all arrays as torch tensors or all as NumPy arrays",
     lambda: softce.cross_entropy(X.numpy(), INDEX)),
    (ValueError, "inplace_backward=True needs return_grad=True for NumPy arrays",
     lambda: softce.cross_entropy(X.numpy(), INDEX.numpy(), inplace_backward=True)),
    (ValueError, "cross_entropy: inplace_backward=True would overwrite a leaf tensor that "
     "requires grad; it is meant for logits produced by the model (e.g. a Linear layer's "
     "output)", lambda: softce.cross_entropy(X.clone().requires_grad_(), INDEX,
                                             inplace_backward=True)),
    (ValueError, "cross_entropy: inplace_backward=True needs an input whose elements do not "
     "overlap (e.g. not an expanded tensor)",
     lambda: softce.cross_entropy((X[:1] * torch.ones(1, requires_grad=True)).expand(4, 10),
                                  INDEX, inplace_backward=True)),
    (ValueError, "cross_entropy: inplace_backward=True would overwrite a view of a leaf "
     "tensor that requires grad; it is meant for logits produced by the model (e.g. a Linear "
     "layer's output)", lambda: softce.cross_entropy(X.clone().requires_grad_()[:2],
                                                     INDEX[:2], inplace_backward=True)),
    (ValueError, "cross_entropy: inplace_backward=True: target overlaps the memory of the "
     "input, which the gradient overwrites; pass a copy (e.g. target.clone())",
     lambda: (lambda x: softce.cross_entropy(x, x, inplace_backward=True))(
         X.clone().requires_grad_() * 1)),
    (ValueError, "distillation_loss: student_logits has 3 dimensions: pass dim= to say which "
     "one holds the classes (dim=1 for PyTorch's (N, C, d1, ...) layout, dim=-1 for (batch, "
     "sequence, vocabulary) logits as in TRL and Hugging Face)",
     lambda: softce.distillation_loss(X.view(2, 2, 10), X.view(2, 2, 10))),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_error_type_and_message(case):
    exception, message, call = CASES[case]
    with pytest.raises(exception) as info:
        call()
    assert type(info.value) is exception
    if isinstance(message, re.Pattern):
        assert message.fullmatch(str(info.value)), str(info.value)
    else:
        assert str(info.value) == message


def test_softce_state_is_unchanged_after_errors():
    before = softce.get_num_threads()
    with pytest.raises(ValueError):
        softce.set_num_threads(-3)
    assert softce.get_num_threads() == before
    assert softce.cross_entropy(X, INDEX).isfinite()


# ---------------------------------------------------------------------------------------
# GPU tensors


@pytest.mark.parametrize("argument", ["input", "target", "weight", "mask"])
def test_non_cpu_torch_tensor_is_a_clear_error(argument):
    """A CUDA tensor takes the same path as this meta tensor: checked before any C++ call."""
    args = dict(input=X, target=PROBS, weight=torch.ones(10), mask=BOOL)
    args[argument] = args[argument].to("meta")
    with pytest.raises(TypeError) as info:
        softce.cross_entropy(args["input"], args["target"], args["weight"], mask=args["mask"])
    assert str(info.value) == (
        f"cross_entropy: {argument}: expected a CPU tensor, got a tensor on 'meta'; softce has "
        "no GPU kernels in this build (move the tensors to the CPU with .cpu())")


def test_cuda_device_message_names_the_device(monkeypatch):
    from softce import _torch

    class FakeCudaTensor:
        device = torch.device("cuda", 1)
    with pytest.raises(TypeError, match=r"input: expected a CPU tensor, got a tensor on "
                                        r"'cuda:1'; softce has no GPU kernels in this build"):
        _torch._check_cpu("cross_entropy", "input", FakeCudaTensor())


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


_DELETER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p),
                ("deleter", _DELETER)]


class FakeCudaArray:
    """A DLPack producer claiming CUDA memory (device type 2), like a CuPy array: exercises
    the C++ device check without a GPU. The data pointer is never dereferenced."""

    def __init__(self, shape):
        self.shape = (ctypes.c_int64 * len(shape))(*shape)
        self.deleter = _DELETER(lambda _: None)
        self.managed = _DLManagedTensor()
        t = self.managed.dl_tensor
        t.data = 0x1000
        t.device = _DLDevice(2, 0)
        t.ndim = len(shape)
        t.dtype = _DLDataType(2, 32, 1)  # float32
        t.shape = self.shape
        t.strides = None
        self.managed.deleter = self.deleter

    def __dlpack__(self, **kwargs):
        new_capsule = ctypes.pythonapi.PyCapsule_New
        new_capsule.restype = ctypes.py_object
        new_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        return new_capsule(ctypes.addressof(self.managed), b"dltensor", None)

    def __dlpack_device__(self):
        return (2, 0)


def test_cuda_dlpack_array_is_a_clear_error_in_the_core_bindings():
    fake = FakeCudaArray((4, 10))
    with pytest.raises(TypeError) as info:
        _core.cross_entropy(fake.__dlpack__(), INDEX.numpy(), None, -100, "mean", 0.0, None,
                            None, None)
    assert str(info.value) == (
        "cross_entropy: input: expected a CPU array, got an array on DLPack device type 2; "
        "softce has no GPU kernels in this build")


def test_cuda_dlpack_array_is_a_clear_error_in_the_numpy_path():
    with pytest.raises(TypeError) as info:
        softce.kl_div(FakeCudaArray((4, 10)), PROBS.numpy())
    assert str(info.value) == (
        "kl_div: input: expected a CPU array, got an array on DLPack device type 2; softce has "
        "no GPU kernels in this build")

