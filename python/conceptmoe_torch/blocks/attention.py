"""Multi-head attention (MHA / GQA / MQA) and ConceptMoE's joint-decoding attention.

q, k, v projections (optional biases), optional QK RMSNorm per head (``head``) or over the whole
projection (``full``), eps 1e-6; rotary on the first ``rope.dim`` features of each head
(rotate-half); causal and/or sliding-window masks within each row; output projection. Joint
decoding adds the dechunked concept projected by ``qc``, ``kc``, ``vc`` into q, k and v.
"""
from ..context import attend, linear, rms_norm, rotate
from ..graph import Block, register


def apply_attention(block: Block, ctx, x, joint: bool):
    s, p = block.spec, block.p
    n = x.shape[0]
    q = linear(x, p("q.weight"), p("q.bias"))
    k = linear(x, p("k.weight"), p("k.bias"))
    v = linear(x, p("v.weight"), p("v.bias"))
    if joint:
        if ctx.concept is None:
            raise RuntimeError("joint-decoding attention runs after a concept stage, which sets the concept side input")
        q = q + linear(ctx.concept, p("qc.weight"))
        k = k + linear(ctx.concept, p("kc.weight"))
        v = v + linear(ctx.concept, p("vc.weight"))
    if s["qkNorm"] == "full":
        q = rms_norm(q, p("qNorm.weight"), 1e-6)
        k = rms_norm(k, p("kNorm.weight"), 1e-6)
    q = q.reshape(n, s["heads"], s["headDim"])
    k = k.reshape(n, s["kvHeads"], s["headDim"])
    if s["qkNorm"] == "head":
        q = rms_norm(q, p("qNorm.weight"), 1e-6)
        k = rms_norm(k, p("kNorm.weight"), 1e-6)
    if s["rope"] is not None:
        cos, sin = ctx.rope_tables(s["rope"]["dim"], s["rope"]["base"], s["rope"].get("scaling"))
        q = rotate(q, s["rope"]["dim"], cos, sin)
        k = rotate(k, s["rope"]["dim"], cos, sin)
    out = attend(ctx, q, k, v.reshape(n, s["kvHeads"], s["headDim"]), s["causal"], s["window"])
    return linear(out, p("o.weight"), p("o.bias"))


@register("attention")
class Attention(Block):
    def forward(self, ctx, x):
        return apply_attention(self, ctx, x, joint=False)


@register("joint-attention")
class JointAttention(Block):
    def forward(self, ctx, x):
        return apply_attention(self, ctx, x, joint=True)
