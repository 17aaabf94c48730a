"""Rotary position embedding as a block of its own, on ``[N, heads·headDim]``."""
from ..context import rotate
from ..graph import Block, register


@register("rotary")
class Rotary(Block):
    def forward(self, ctx, x):
        s = self.spec
        cos, sin = ctx.rope_tables(s["dim"], s["base"], s.get("scaling"))
        y = rotate(x.reshape(x.shape[0], s["heads"], s["headDim"]), s["dim"], cos, sin)
        return y.reshape(x.shape[0], -1)
