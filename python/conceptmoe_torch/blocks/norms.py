"""RMSNorm and LayerNorm over the last axis."""
from ..context import layer_norm, rms_norm
from ..graph import Block, register


@register("rmsnorm")
class RMSNorm(Block):
    def forward(self, ctx, x):
        return rms_norm(x, self.p("weight"), self.spec["eps"])


@register("layernorm")
class LayerNorm(Block):
    def forward(self, ctx, x):
        return layer_norm(x, self.p("weight"), self.p("bias"), self.spec["eps"])
