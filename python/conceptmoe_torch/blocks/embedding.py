"""Token embedding (+ learned absolute positions, GPT-2), and the LM head."""
from ..context import linear
from ..graph import Block, register


@register("embedding")
class Embedding(Block):
    def forward(self, ctx, ids):
        x = self.p("weight")[ids]
        pos = self.p("positions")
        return x if pos is None else x + pos[ctx.positions]


@register("lmhead")
class LMHead(Block):
    """Logits ``x·Wᵀ (+ b)``; tied, ``W`` is the embedding table itself."""

    def forward(self, ctx, x):
        return linear(x, self.p("weight"), self.p("bias"))
