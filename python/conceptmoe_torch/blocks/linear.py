"""A linear map, and the width projector of a wider concept model (the same map)."""
from ..context import linear
from ..graph import Block, register


@register("linear")
@register("projector")
class Linear(Block):
    def forward(self, ctx, x):
        return linear(x, self.p("weight"), self.p("bias"))
