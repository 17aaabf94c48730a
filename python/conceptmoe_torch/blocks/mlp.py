"""Dense feed-forward: ``down(act(gate(x)) ⊙ up(x))`` gated, ``down(act(up(x)))`` plain."""
from ..context import activate, linear
from ..graph import Block, register


def ffn(x, p, activation):
    """An FFN with the parameter names of ``ffnParams`` (``gate``/``up``/``down``), ``p(name)`` → tensor."""
    up = linear(x, p("up.weight"), p("up.bias"))
    gate = p("gate.weight")
    hidden = activate(up, activation) if gate is None else activate(linear(x, gate, p("gate.bias")), activation) * up
    return linear(hidden, p("down.weight"), p("down.bias"))


@register("mlp")
class MLP(Block):
    def forward(self, ctx, x):
        return ffn(x, self.p, self.spec["activation"])
