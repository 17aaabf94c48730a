"""sequence, residual, loop and branch: the combinators of ``src/graph/Combinators.ts``."""
import torch

from ..graph import Block, register


@register("sequence")
class Sequence(Block):
    def forward(self, ctx, x):
        for child in self.children_in_order:
            x = child(ctx, x)
        return x


@register("residual")
class Residual(Block):
    def forward(self, ctx, x):
        y = x
        for child in self.children_in_order:
            y = child(ctx, y)
        return x + y


@register("loop")
class Loop(Block):
    """The same weights applied ``times`` times."""

    def forward(self, ctx, x):
        for _ in range(self.spec["times"]):
            for child in self.children_in_order:
                x = child(ctx, x)
        return x


@register("branch")
class Branch(Block):
    def forward(self, ctx, x):
        outs = [child(ctx, x) for child in self.children_in_order]
        return torch.stack(outs).sum(0) if self.spec["merge"] == "sum" else torch.cat(outs, dim=-1)
