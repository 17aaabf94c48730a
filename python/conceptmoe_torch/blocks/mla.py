"""DeepSeek multi-head latent attention: low-rank queries (optional) and a compressed KV latent,
RMSNorm (eps 1e-6) on the latents, rotary on a separate per-head part shared by all heads' keys
(``ropeScaling``: scaled frequencies; ``scoreScale``: a factor on the scores, applied to the queries)."""
import torch

from ..context import attend, linear, rms_norm, rotate
from ..graph import Block, register


@register("mla")
class MLA(Block):
    def forward(self, ctx, x):
        s, p = self.spec, self.p
        n, H = x.shape[0], s["heads"]
        nope, rope, dv, r = s["qkNopeHeadDim"], s["qkRopeHeadDim"], s["vHeadDim"], s["kvLoraRank"]
        if s["qLoraRank"] is None:
            q = linear(x, p("q.weight"), p("q.bias"))
        else:
            q = linear(rms_norm(linear(x, p("qA.weight"), p("qA.bias")), p("qANorm.weight"), 1e-6), p("qB.weight"))
        q = q.reshape(n, H, nope + rope)
        kv_a = linear(x, p("kvA.weight"), p("kvA.bias"))
        latent = rms_norm(kv_a[:, :r], p("kvANorm.weight"), 1e-6)
        k_rope = kv_a[:, r:r + rope].reshape(n, 1, rope)
        kv = linear(latent, p("kvB.weight")).reshape(n, H, nope + dv)
        cos, sin = ctx.rope_tables(rope, s["ropeBase"], s.get("ropeScaling"))
        q_full = torch.cat([q[:, :, :nope], rotate(q[:, :, nope:], rope, cos, sin)], dim=2)
        if s.get("scoreScale", 1) != 1:
            q_full = q_full * s["scoreScale"]
        k_full = torch.cat([kv[:, :, :nope], rotate(k_rope, rope, cos, sin).expand(n, H, rope)], dim=2)
        out = attend(ctx, q_full, k_full, kv[:, :, nope:], s["causal"], s["window"])
        return linear(out, p("o.weight"), p("o.bias"))
