"""Fused output layer + loss: hidden states in, the N x V logits never materialised.

``linear_cross_entropy(input, weight, target, bias)`` is exactly
``cross_entropy(F.linear(input, weight, bias), target, ...)`` and
``linear_distillation_loss`` the same for ``distillation_loss``, with gradients for
``input``, ``weight`` and ``bias``. The logits are computed a block of rows at a time into a
buffer of at most ``memory_budget`` bytes (default 64 MiB, raised to blocks of 512 rows
for large V); softce's fused loss turns the
block into its own logit gradient in place, and two more products turn that into the
gradients of the hidden states and of the weight. Peak extra memory: the gradients of input
and weight plus the budget (float32 copies of bfloat16 / float16 weights and the
bfloat16 gradient accumulator on top).

Torch tensors: the block products run through torch's own matmul (the user's BLAS, e.g.
MKL), so the fused call is never slower than the three GEMMs PyTorch itself would run; the
gradients are computed in forward and only scaled in backward (for ``reduction="none"``
backward recomputes the blocks with the upstream per-row weights). The operation is the
custom operator ``softce::linear_loss`` (``torch.compile(fullgraph=True)`` traces it as one
node). A budget too small for one row of V logits falls back to the C++ path, which splits
the classes into blocks too. NumPy arrays: the C++ path (OpenBLAS), ``return_grad=True``
returns ``(loss, grad_input, grad_weight, grad_bias)``.

No gradient flows to targets, teacher logits or teacher hidden states / weights.

``process_group=`` (torch.distributed): vocabulary-parallel, weight rows per rank, through
the C++ core's class-parallel protocol (softce/distributed.py, docs/linear.md).
"""

# (no `from __future__ import annotations`: torch.library reads the operator's annotations)

import sys
from typing import Optional, Tuple

import numpy as np

from . import _core
from .functional import TopK

__all__ = ["linear_cross_entropy", "linear_distillation_loss", "DEFAULT_MEMORY_BUDGET"]

DEFAULT_MEMORY_BUDGET = 64 << 20


def _is_tensor(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _split_teacher(teacher, teacher_weight):
    """(teacher array, topk values or None, tail) of a distillation teacher."""
    if isinstance(teacher, TopK):
        if teacher_weight is not None:
            raise ValueError("linear_distillation_loss: teacher_weight: expected none with a TopK teacher")
        return teacher.indices, teacher.values, bool(teacher.tail)
    return teacher, None, False


def linear_cross_entropy(
    input,
    weight,
    target,
    bias=None,
    *,
    class_weight=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    mask=None,
    memory_budget: Optional[int] = None,
    return_grad: bool = False,
    process_group=None,
):
    """``cross_entropy(F.linear(input, weight, bias), target, class_weight, ...)``, fused.

    ``input`` (..., D), ``weight`` (V, D), ``bias`` (V,); ``target``: class indices (the
    row shape ``input.shape[:-1]``), class probabilities (..., V) or a :class:`TopK`.
    ``mask`` (bool per row) excludes rows for probability / top-k targets.
    ``memory_budget``: bytes for the block of logits (default: 64 MiB, raised to blocks of
    min(N, 512) rows for large V, where smaller blocks slow the products down).
    ``return_grad=True`` (NumPy, or tensors without autograd) returns
    ``(loss, grad_input, grad_weight, grad_bias)``.
    ``process_group`` (torch.distributed): vocabulary-parallel; ``weight``, ``bias``,
    ``class_weight`` and probability targets hold this rank's rows / classes (in rank order),
    ``input`` and index / top-k targets are the same on every rank; the loss is global and the
    input gradient full (docs/linear.md, "Class-parallel").
    """
    if isinstance(target, TopK):
        t, values, tail = target.indices, target.values, bool(target.tail)
    else:
        t, values, tail = target, None, False
    args = dict(family="ce", target=t, topk_values=values, tail=tail, teacher_weight=None,
                teacher_bias=None, class_weight=class_weight, mask=mask,
                ignore_index=int(ignore_index), reduction=str(reduction),
                label_smoothing=float(label_smoothing), temperature=1.0, divergence="kl",
                beta=0.5, memory_budget=memory_budget)
    if process_group is not None:
        from . import distributed

        return distributed.run_linear("ce", input, weight, bias, args, bool(return_grad), process_group)
    if _is_tensor(input):
        return _torch_call(input, weight, bias, args, return_grad)
    return _numpy_call(input, weight, bias, args, return_grad)


def linear_distillation_loss(
    input,
    weight,
    teacher,
    *,
    teacher_weight=None,
    bias=None,
    teacher_bias=None,
    temperature: float = 1.0,
    divergence: str = "kl",
    beta: float = 0.5,
    reduction: str = "batchmean",
    mask=None,
    memory_budget: Optional[int] = None,
    return_grad: bool = False,
    process_group=None,
):
    """``distillation_loss(F.linear(input, weight, bias), teacher_logits, ...)``, fused.

    ``teacher``: teacher logits (..., V), a :class:`TopK` of probabilities, or — with
    ``teacher_weight`` (V, Dt) and optional ``teacher_bias`` — the teacher's hidden states
    (..., Dt), whose logits are computed block by block too (neither side's logits exist).
    The class dimension is the last. Gradients flow to the student only.
    ``process_group``: vocabulary-parallel as in :func:`linear_cross_entropy` (teacher logits,
    ``teacher_weight`` and ``teacher_bias`` hold this rank's classes; teacher hidden states
    are the same on every rank).
    """
    t, values, tail = _split_teacher(teacher, teacher_weight)
    args = dict(family="distill", target=t, topk_values=values, tail=tail,
                teacher_weight=teacher_weight, teacher_bias=teacher_bias, class_weight=None,
                mask=mask, ignore_index=-100, reduction=str(reduction), label_smoothing=0.0,
                temperature=float(temperature), divergence=str(divergence), beta=float(beta),
                memory_budget=memory_budget)
    if process_group is not None:
        from . import distributed

        return distributed.run_linear("distill", input, weight, bias, args, bool(return_grad),
                                      process_group)
    if _is_tensor(input):
        return _torch_call(input, weight, bias, args, return_grad)
    return _numpy_call(input, weight, bias, args, return_grad)


# ---------------------------------------------------------------------------------------
# the C++ path (NumPy, and torch when the budget needs class blocks)


def _core_call(hidden, weight, bias, a, losses=None, grad_hidden=None, grad_weight=None,
               grad_bias=None, validate_only=False, memory_budget=None):
    budget = a["memory_budget"] if memory_budget is None else memory_budget
    if a["family"] == "ce":
        return _core.linear_cross_entropy(
            hidden, weight, bias, a["target"], a["topk_values"], a["tail"], a["class_weight"],
            a["ignore_index"], a["reduction"], a["label_smoothing"], a["mask"], budget, losses,
            grad_hidden, grad_weight, grad_bias, False, validate_only)
    return _core.linear_distillation_loss(
        hidden, weight, bias, a["target"], a["topk_values"], a["tail"], a["teacher_weight"],
        a["teacher_bias"], a["temperature"], a["divergence"], a["beta"], a["reduction"],
        a["mask"], budget, losses, grad_hidden, grad_weight, grad_bias, False, validate_only)


def _as_np(x):
    if x is None or isinstance(x, np.ndarray):
        return x
    if _is_tensor(x):
        raise TypeError("softce.linear: got a torch.Tensor while input is not a tensor; pass all "
                        "arrays as torch tensors or all as NumPy arrays")
    return np.asarray(x)


def _numpy_call(input, weight, bias, args, return_grad):
    h, w, b = _as_np(input), _as_np(weight), _as_np(bias)
    a = {k: (_as_np(v) if k in ("target", "topk_values", "teacher_weight", "teacher_bias",
                                "class_weight", "mask") else v) for k, v in args.items()}
    grad_dtype = np.float64 if h.dtype == np.float64 else np.float32
    losses = np.empty(h.shape[:-1], dtype=grad_dtype) if a["reduction"] == "none" else None
    gh = np.empty(h.shape, dtype=grad_dtype) if return_grad else None
    gw = np.empty(w.shape, dtype=grad_dtype) if return_grad else None
    gb = np.empty(b.shape, dtype=grad_dtype) if return_grad and b is not None else None
    value = _core_call(h, w, b, a, losses, gh, gw, gb)
    loss = losses if losses is not None else grad_dtype(value)
    return (loss, gh, gw, gb) if return_grad else loss


# ---------------------------------------------------------------------------------------
# the torch path

_torch_ops = None


def _torch_call(input, weight, bias, args, return_grad):
    import torch

    ops = _register()
    budget = _default_budget(input, weight, args) if args["memory_budget"] is None else int(args["memory_budget"])
    if return_grad:
        with torch.no_grad():
            loss, gh, gw, gb = ops(input, weight, bias, args, budget, (True, True, bias is not None),
                                   None)
        return loss, gh, gw, (gb if bias is not None else None)
    return _LinearLossApply.apply(input, weight, bias, args, budget)


def _default_budget(input, weight, args):
    """64 MiB, raised to blocks of min(N, 512) rows: with fewer rows per block the products
    run below the BLAS's speed and GEMM 3 re-reads grad_weight once per block (measured at
    N = 2048, D = 2048, V = 128256: 130-row blocks 1.67 x the GEMM floor, 512-row blocks
    1.18 x). The extra memory stays below a quarter of grad_weight's when D >= 512."""
    V = weight.shape[0] if weight.dim() == 2 else 1
    rows = input.numel() // max(input.shape[-1], 1) if input.dim() else 1
    itemsize = 8 if input.dtype == sys.modules["torch"].float64 else 4
    blocks = 2 if args["teacher_weight"] is not None else 1
    return max(DEFAULT_MEMORY_BUDGET, min(rows, 512) * V * itemsize * blocks)


def _register():
    """Defines the custom operator softce::linear_loss on first use (torch imported)."""
    global _torch_ops
    if _torch_ops is not None:
        return _torch_ops
    import torch
    from torch import Tensor

    @torch.library.custom_op("softce::linear_loss", mutates_args=())
    def linear_loss(input: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                    topk_values: Optional[Tensor], teacher_weight: Optional[Tensor],
                    teacher_bias: Optional[Tensor], class_weight: Optional[Tensor],
                    mask: Optional[Tensor], row_scale: Optional[Tensor], family: str, tail: bool,
                    ignore_index: int, reduction: str, label_smoothing: float,
                    temperature: float, divergence: str, beta: float, memory_budget: int,
                    grad_input: bool, grad_weight: bool, grad_bias: bool
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        a = dict(family=family, target=target, topk_values=topk_values, tail=tail,
                 teacher_weight=teacher_weight, teacher_bias=teacher_bias,
                 class_weight=class_weight, mask=mask, ignore_index=ignore_index,
                 reduction=reduction, label_smoothing=label_smoothing, temperature=temperature,
                 divergence=divergence, beta=beta, memory_budget=memory_budget)
        return _torch_forward(input, weight, bias, a, (grad_input, grad_weight, grad_bias),
                              row_scale)

    @linear_loss.register_fake
    def _(input, weight, bias, target, topk_values, teacher_weight, teacher_bias, class_weight,
          mask, row_scale, family, tail, ignore_index, reduction, label_smoothing, temperature,
          divergence, beta, memory_budget, grad_input, grad_weight, grad_bias):
        loss_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
        loss = input.new_empty(input.shape[:-1] if reduction == "none" else (), dtype=loss_dtype)
        gi = torch.empty_like(input) if grad_input else input.new_empty(0)
        gw = torch.empty_like(weight) if grad_weight else weight.new_empty(0)
        gb = torch.empty_like(bias) if (grad_bias and bias is not None) else input.new_empty(0)
        return loss, gi, gw, gb

    def setup_context(ctx, inputs, output):
        (input, weight, bias, target, topk_values, teacher_weight, teacher_bias, class_weight,
         mask, row_scale, family, tail, ignore_index, reduction, label_smoothing, temperature,
         divergence, beta, memory_budget, grad_input, grad_weight, grad_bias) = inputs
        ctx.per_row = reduction == "none"
        ctx.has_bias = bias is not None
        # the gradient outputs carry no gradient: otherwise autograd materialises a zero
        # "incoming gradient" of each, a second (V, D) tensor during backward
        ctx.mark_non_differentiable(output[1], output[2], output[3])
        ctx.set_materialize_grads(False)
        if ctx.per_row:  # backward recomputes with the upstream per-row weights
            ctx.save_for_backward(input, weight, bias, target, topk_values, teacher_weight,
                                  teacher_bias, class_weight, mask)
            ctx.args = (family, tail, ignore_index, reduction, label_smoothing, temperature,
                        divergence, beta, memory_budget)
        else:
            ctx.save_for_backward(output[1], output[2], output[3])

    def backward(ctx, grad_loss, _g1, _g2, _g3):
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # create_graph=True: the stored gradients are not differentiable; refuse rather
            # than drop the second-order term
            raise RuntimeError(
                "softce::linear_loss: double backward (create_graph=True) is not supported by "
                "the fused linear losses; compute F.linear and use softce.cross_entropy / "
                "distillation_loss, which support it")
        if grad_loss is None:  # an undefined (zero) upstream gradient: zero gradients
            return (None,) * 22
        if ctx.per_row:
            (input, weight, bias, target, topk_values, teacher_weight, teacher_bias,
             class_weight, mask) = ctx.saved_tensors
            _, gi, gw, gb = linear_loss(input, weight, bias, target, topk_values, teacher_weight,
                                        teacher_bias, class_weight, mask,
                                        grad_loss.reshape(-1), *ctx.args,
                                        bool(needs[0]), bool(needs[1]),
                                        bool(needs[2]) and ctx.has_bias)
        else:
            gi, gw, gb = ctx.saved_tensors
            if not (not torch.compiler.is_compiling() and grad_loss.numel() == 1
                    and float(grad_loss) == 1.0):
                gi, gw, gb = gi * grad_loss, gw * grad_loss, gb * grad_loss
        return ((gi if needs[0] else None), (gw if needs[1] else None),
                (gb if needs[2] and ctx.has_bias else None)) + (None,) * 19

    linear_loss.register_autograd(backward, setup_context=setup_context)

    def call(input, weight, bias, a, budget, grads, row_scale):
        loss, gi, gw, gb = linear_loss(
            input, weight, bias, a["target"], a["topk_values"], a["teacher_weight"],
            a["teacher_bias"], a["class_weight"], a["mask"], row_scale, a["family"], a["tail"],
            a["ignore_index"], a["reduction"], a["label_smoothing"], a["temperature"],
            a["divergence"], a["beta"], budget, *grads)
        return loss, gi, gw, gb

    _torch_ops = call
    return call


class _LinearLossApply:
    """Calls the operator with the gradient flags autograd needs (computed in forward)."""

    @staticmethod
    def apply(input, weight, bias, a, budget):
        import torch

        enabled = torch.is_grad_enabled()
        if enabled:  # gradients flow to input, weight and bias only: refuse, never drop
            fn = "linear_cross_entropy" if a["family"] == "ce" else "linear_distillation_loss"
            side = "target" if a["family"] == "ce" else "teacher"
            for name, t in ((side, a["target"]), (f"{side}.values", a["topk_values"]),
                            ("teacher_weight", a["teacher_weight"]),
                            ("teacher_bias", a["teacher_bias"]),
                            ("class_weight", a["class_weight"])):
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    raise NotImplementedError(
                        f"{fn}: {name}: a gradient with respect to it is not supported by the "
                        f"fused linear losses (only input, weight and bias); detach it, or "
                        f"compute F.linear and use softce's loss, which differentiates it")
        grads = (enabled and input.requires_grad, enabled and weight.requires_grad,
                 enabled and bias is not None and bias.requires_grad)
        if a["reduction"] == "none":
            grads = (False, False, False)  # backward recomputes
        loss, _, _, _ = _register()(input, weight, bias, a, budget, grads, None)
        return loss


def _torch_forward(input, weight, bias, a, grads, row_scale):
    """The blocked loop: logits by torch.mm into a budgeted buffer, the fused loss in place,
    the gradient products by torch.mm / addmm (alpha = the reduction's 1 / denominator)."""
    import torch

    from . import _gradient_cache

    # every argument checked by the C++ core (same messages as the C++ API), nothing computed
    _core_call(input.detach(), weight.detach(), _det(bias), _detach_args(a), validate_only=True)
    want_gi, want_gw, want_gb = grads
    want_gb = want_gb and bias is not None
    cdt = torch.float64 if input.dtype == torch.float64 else torch.float32
    D = input.shape[-1]
    V = weight.shape[0]
    h = input.detach().reshape(-1, D)
    N = h.shape[0]
    family, reduction = a["family"], a["reduction"]
    per_row = reduction == "none"
    teacher_hidden = a["teacher_weight"] is not None
    itemsize = 8 if cdt == torch.float64 else 4
    budget = int(a["memory_budget"])
    rows_per_block = min(N, budget // (V * itemsize * (2 if teacher_hidden else 1)))
    loss_dtype = cdt
    def empty():  # a fresh tensor per unused output (outputs may not alias each other)
        return input.new_empty(0)

    if rows_per_block < 1 and N > 0:
        if row_scale is None:  # class blocks: the C++ path does them
            return _torch_via_core(input, weight, bias, a, grads, row_scale, cdt)
        # backward of reduction='none' with a budget below one row: one row per block (the
        # budget is exceeded by at most one row of logits)
        rows_per_block = 1

    t = a["target"].detach() if a["target"] is not None else None
    values = a["topk_values"]
    mask = a["mask"].reshape(-1) if a["mask"] is not None else None
    cw = a["class_weight"]
    topk = values is not None
    index = family == "ce" and not topk and not t.is_floating_point()
    if topk:
        t = t.reshape(N, t.shape[-1])
        values = values.detach().reshape(N, values.shape[-1])
    elif teacher_hidden:
        t = t.reshape(N, t.shape[-1])
    elif index:
        t = t.reshape(N)
    else:
        t = t.reshape(N, V)

    # the reduction's denominator (global; the blocks are summed)
    if reduction in ("mean", "batchmean"):
        if index:
            keep = t != a["ignore_index"]
            if cw is not None:
                w32 = cw.detach().to(cdt).to(torch.float64)
                den = float(w32[t[keep]].sum())
            else:
                den = float(keep.sum())
        else:
            den = float(mask.sum()) if mask is not None else float(N)
            if family == "distill" and reduction == "mean":
                den *= V
    else:
        den = 1.0
    coef = 0.0 if den == 0.0 else 1.0 / den

    w = weight.detach()
    wc = w if w.dtype == cdt else w.to(cdt)
    bc = None if bias is None else bias.detach().to(cdt)
    tw = tb = None
    if teacher_hidden:
        tw = a["teacher_weight"].detach().to(cdt)
        tb = None if a["teacher_bias"] is None else a["teacher_bias"].detach().to(cdt)

    losses = torch.empty(N, dtype=loss_dtype) if per_row and row_scale is None else None
    # the gradients and the blocks from the cache of released buffers: a fresh (V, D) weight
    # gradient and a fresh block are page faults on every call (~0.3 s per GiB here)
    gi = _gradient_cache.empty((N, D), cdt) if want_gi else None
    gw = (torch.zeros(V, D, dtype=cdt) if N == 0 else _gradient_cache.empty((V, D), cdt)) if want_gw else None
    gb = torch.zeros(V, dtype=torch.float64) if want_gb else None
    block = _gradient_cache.empty((max(rows_per_block, 0) * V,), cdt)
    tblock = _gradient_cache.empty((max(rows_per_block, 0) * V,), cdt) if teacher_hidden else None
    block_reduction = "none" if losses is not None else "sum"
    total = 0.0
    for r0 in range(0, N, max(rows_per_block, 1)):
        r1 = min(N, r0 + rows_per_block)
        rows = r1 - r0
        hb = h[r0:r1]
        if hb.dtype != cdt:
            hb = hb.to(cdt)
        L = block[: rows * V].view(rows, V)
        if bc is not None:
            torch.addmm(bc, hb, wc.t(), out=L)
        else:
            torch.mm(hb, wc.t(), out=L)
        mb = mask[r0:r1] if mask is not None else None
        lb = losses[r0:r1] if losses is not None else None
        if family == "ce":
            if topk:
                total += _core.cross_entropy_topk(L, t[r0:r1], values[r0:r1], a["tail"], cw,
                                                  a["ignore_index"], block_reduction,
                                                  a["label_smoothing"], mb, L, lb)
            else:
                total += _core.cross_entropy(L, t[r0:r1], cw, a["ignore_index"], block_reduction,
                                             a["label_smoothing"], mb, L, lb)
        else:
            if topk:
                total += _core.distillation_loss_topk(L, t[r0:r1], values[r0:r1], a["tail"],
                                                      a["temperature"], a["divergence"], a["beta"],
                                                      block_reduction, mb, L, lb)
            else:
                if teacher_hidden:
                    TL = tblock[: rows * V].view(rows, V)
                    tbh = t[r0:r1] if t.dtype == cdt else t[r0:r1].to(cdt)
                    if tb is not None:
                        torch.addmm(tb, tbh, tw.t(), out=TL)
                    else:
                        torch.mm(tbh, tw.t(), out=TL)
                else:
                    TL = t[r0:r1]
                total += _core.distillation_loss(L, TL, a["temperature"], a["divergence"],
                                                 a["beta"], block_reduction, mb, L, lb)
        if row_scale is not None:
            L.mul_(row_scale[r0:r1].to(cdt).unsqueeze(1))
        if gb is not None:
            gb += L.sum(0, dtype=torch.float64)
        # the reduction's 1 / denominator as the products' alpha (beta = 0: the first block
        # overwrites, ignoring the uninitialised memory)
        if gi is not None:
            gib = gi[r0:r1]
            torch.addmm(gib, L, wc, beta=0, alpha=coef, out=gib)
        if gw is not None:
            torch.addmm(gw, L.t(), hb, beta=0 if r0 == 0 else 1, alpha=coef, out=gw)
    if gb is not None and coef != 1.0:
        gb.mul_(coef)
    if per_row:
        loss = losses.reshape(input.shape[:-1]) if losses is not None else torch.empty(
            input.shape[:-1], dtype=loss_dtype)
    elif reduction in ("mean", "batchmean"):
        loss = torch.tensor(float("nan") if den == 0.0 else total / den, dtype=loss_dtype)
    else:
        loss = torch.tensor(total, dtype=loss_dtype)
    return (loss,
            gi.reshape(input.shape).to(input.dtype) if gi is not None else empty(),
            gw.to(weight.dtype) if gw is not None else empty(),
            gb.to(bias.dtype) if gb is not None else empty())


def _det(x):
    return None if x is None else x.detach()


def _detach_args(a):
    return {k: (v.detach() if _is_tensor(v) else v) for k, v in a.items()}


def _torch_via_core(input, weight, bias, a, grads, row_scale, cdt):
    """The C++ path (class blocks) for tensors: outputs allocated here."""
    import torch

    want_gi, want_gw, want_gb = grads
    want_gb = want_gb and bias is not None
    losses = torch.empty(input.shape[:-1], dtype=cdt) if a["reduction"] == "none" else None
    gi = torch.empty(input.shape, dtype=cdt) if want_gi else None
    gw = torch.empty(weight.shape, dtype=cdt) if want_gw else None
    gb = torch.empty(bias.shape, dtype=cdt) if want_gb else None
    value = _core_call(input.detach(), weight.detach(), _det(bias), _detach_args(a), losses, gi, gw, gb)
    def empty():  # a fresh tensor per unused output (outputs may not alias each other)
        return input.new_empty(0)
    loss = losses if losses is not None else torch.tensor(value, dtype=cdt)
    return (loss,
            gi.to(input.dtype) if gi is not None else empty(),
            gw.to(weight.dtype) if gw is not None else empty(),
            gb.to(bias.dtype) if gb is not None else empty())


# With torch already imported, define softce::linear_loss now, so that the first call may
# happen inside torch.compile (defining an operator cannot be traced). Without torch, nothing
# of it is imported.
if sys.modules.get("torch") is not None:
    _register()
