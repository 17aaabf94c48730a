"""The concept stage: chunk → merge → concept model on each row's concepts → dechunk.

Merge ``sum`` adds the tokens of each chunk (φ(m−1), φ(m)] (a chunk closed by a document start keeps
only that token); ``last`` takes the boundary token. Tokens after a row's last boundary merge into
nothing. The concept model sees rows of the concepts' counts; a concept belongs to its boundary
token's document, and its position counts from the first concept of that document.
"""
import torch

from ..graph import Block, register


@register("concept-stage")
class ConceptStage(Block):
    def forward(self, ctx, x):
        chunk, body, de = self.children_in_order
        chunk(ctx, x)
        ch = ctx.chunk
        b, concepts = ch["b"], ch["concepts"]
        total, n, device = sum(concepts), x.shape[0], x.device
        if self.spec["merge"] == "last":
            merged = x[b]
        else:
            trash = total
            seg = torch.full((n,), trash, dtype=torch.int64, device=device)
            index = torch.arange(n, device=device)
            doc = ctx.document_starts
            start = 0
            for length in ctx.layout:
                if length > 0:
                    rb = b[start:start + length]
                    # the first boundary at or after each token, in this row (−1: none)
                    at = torch.where(rb, index[start:start + length], torch.full_like(rb, 1 << 62, dtype=torch.int64))
                    nxt = torch.flip(torch.cummin(torch.flip(at, [0]), 0).values, [0])
                    has = nxt < (1 << 62)
                    nxt_c = torch.where(has, nxt, torch.zeros_like(nxt))
                    target = ch["receive"][nxt_c]
                    alone = doc[nxt_c] & (nxt_c != index[start:start + length]) if doc.shape[0] == n else torch.zeros_like(has)
                    seg[start:start + length] = torch.where(has & ~alone, target, torch.full_like(target, trash))
                start += length
            merged = torch.zeros(total + 1, x.shape[1], dtype=x.dtype, device=device).index_add(0, seg, x)[:total]
        saved = (ctx.layout, ctx.positions, ctx.documents)
        # a concept's document is its boundary token's; positions count from its document's first concept
        row = torch.repeat_interleave(torch.arange(len(ctx.layout), device=device), torch.tensor(ctx.layout, device=device))[b]
        doc = torch.zeros_like(row) if ctx.documents is None else ctx.documents[b]
        index = torch.arange(total, device=device)
        opens = torch.ones(total, dtype=torch.bool, device=device)
        opens[1:] = (row[1:] != row[:-1]) | (doc[1:] != doc[:-1])
        ctx.positions = index - torch.cummax(torch.where(opens, index, torch.zeros_like(index)), 0).values
        ctx.documents = None if ctx.documents is None else doc
        ctx.layout = concepts
        y = body(ctx, merged)
        ctx.layout, ctx.positions, ctx.documents = saved
        ctx.chunk = ch
        return de(ctx, y)
