"""torch.compile(fullgraph=True) of a small model using every softce loss: it compiles
without graph breaks (the losses are softce::* custom operators with fake implementations
and registered autograd) and matches eager mode on the losses and the gradients.

One compiled training step computes all the losses, so the slow compilation happens once.
"""

import torch
import torch.nn.functional as F

import softce

torch.manual_seed(0)
N, D, C = 16, 12, 7


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(D, 32), torch.nn.Tanh(),
                                        torch.nn.Linear(32, C))
        self.ce = softce.nn.CrossEntropyLoss(label_smoothing=0.1)
        self.kl = softce.nn.KLDivLoss(reduction="batchmean")
        self.bce = softce.nn.BCEWithLogitsLoss(pos_weight=torch.linspace(0.5, 2, C))
        self.distill = softce.nn.DistillationLoss(temperature=2.0, divergence="jsd", beta=0.3)

    def forward(self, x, labels, probs, teacher, topk_indices, topk_values, mask):
        z = self.body(x)
        return torch.stack([
            self.ce(z, labels),
            self.ce(z, probs),
            softce.cross_entropy(z, softce.TopK(topk_indices, topk_values), mask=mask),
            softce.cross_entropy(z, probs, reduction="none").mean(),
            self.kl(torch.log_softmax(z, 1), probs),
            self.bce(z, probs),
            self.distill(z, teacher),
            softce.distillation_loss(z, softce.TopK(topk_indices, topk_values, tail=False),
                                     temperature=1.5, mask=mask),
            softce.cross_entropy_with_probs(z, probs),
        ])


def step(model, inputs):
    model.zero_grad()
    losses = model(*inputs)
    losses.sum().backward()
    return losses.detach(), [p.grad.clone() for p in model.parameters()]


def test_compiled_model_with_every_loss_matches_eager():
    model = Model()
    x = torch.randn(N, D)
    labels = torch.randint(0, C, (N,))
    probs = torch.softmax(torch.randn(N, C) * 2, 1)
    teacher = torch.randn(N, C) * 3
    top = torch.topk(probs, 3)
    mask = torch.rand(N) < 0.8
    inputs = (x, labels, probs, teacher, top.indices, top.values, mask)

    eager_losses, eager_grads = step(model, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # fails on any graph break
    compiled_losses, compiled_grads = step(compiled, inputs)

    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-6)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the compiled graph calls the custom operators, not a fallback
    explanation = torch._dynamo.explain(model)(*inputs)
    assert explanation.graph_break_count == 0
    ops = {str(node.target) for graph in explanation.graphs for node in graph.graph.nodes
           if node.op == "call_function"}
    assert {"softce.cross_entropy.default", "softce.kl_div.default",
            "softce.binary_cross_entropy_with_logits.default",
            "softce.distillation_loss.default",
            "softce.cross_entropy_with_probs.default"} <= ops, ops

    # a second call with new values reuses the graph and still matches eager
    inputs2 = (torch.randn(N, D),) + inputs[1:]
    torch.testing.assert_close(step(compiled, inputs2)[0], step(model, inputs2)[0],
                               rtol=1e-5, atol=1e-6)


def test_compiled_inference_runs_forward_only():
    model = torch.nn.Linear(D, C)
    x, labels = torch.randn(N, D), torch.randint(0, C, (N,))

    @torch.compile(fullgraph=True)
    def evaluate(x, labels):
        with torch.no_grad():
            return softce.cross_entropy(model(x), labels, reduction="none")

    with torch.no_grad():
        expected = F.cross_entropy(model(x), labels, reduction="none")
    torch.testing.assert_close(evaluate(x, labels), expected)
