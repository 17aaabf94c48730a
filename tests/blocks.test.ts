/**
 * Every block kind against numbers derived by hand from its formula.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import { attention } from "../src/blocks/Attention.ts"
import { embedding } from "../src/blocks/Embedding.ts"
import { layerNorm } from "../src/blocks/LayerNorm.ts"
import { linear } from "../src/blocks/Linear.ts"
import { lmHead } from "../src/blocks/LMHead.ts"
import { mla } from "../src/blocks/MLA.ts"
import { mlp } from "../src/blocks/MLP.ts"
import { moe } from "../src/blocks/MoE.ts"
import { rmsNorm } from "../src/blocks/RMSNorm.ts"
import { rotary } from "../src/blocks/Rotary.ts"
import * as Cost from "../src/cost/Cost.ts"
import { analyze } from "../src/graph/Analyze.ts"
import type { AnyBlock } from "../src/graph/Block.ts"
import { sequence } from "../src/graph/Combinators.ts"

const costOf = (b: AnyBlock) => Effect.map(analyze(b), (a) => a.cost)
const params = (c: Cost.Cost) => Cost.total(c.params)
const activated = (c: Cost.Cost) => Cost.total(c.activated)
const flops = (c: Cost.Cost) => Cost.matmulPerToken(c)

describe("linear", () => {
  it.effect("32→64 with bias: 2,112 params, 4,096 FLOPs/token", () =>
    Effect.gen(function*() {
      const c = yield* costOf(linear({ dIn: 32, dOut: 64, bias: true, part: "proj" }))
      assert.strictEqual(params(c), 32 * 64 + 64)
      assert.deepStrictEqual(c.flops, { proj: 2 * 32 * 64 })
      assert.deepStrictEqual(c.params, { proj: 2112 })
    }))
})

describe("norms", () => {
  it.effect("RMSNorm has d params, LayerNorm 2d (d without bias), no FLOPs", () =>
    Effect.gen(function*() {
      assert.strictEqual(params(yield* costOf(rmsNorm({ d: 48 }))), 48)
      assert.strictEqual(params(yield* costOf(layerNorm({ d: 48 }))), 96)
      assert.strictEqual(params(yield* costOf(layerNorm({ d: 48, bias: false }))), 48)
      assert.strictEqual(flops(yield* costOf(layerNorm({ d: 48 }))), 0)
    }))
})

describe("embedding and LM head", () => {
  it.effect("embedding: V·d (+ positions·d), no FLOPs; untied head V·d and 2·d·V FLOPs", () =>
    Effect.gen(function*() {
      const e = yield* costOf(embedding({ vocab: 100, d: 16, positions: 32 }))
      assert.strictEqual(params(e), 100 * 16 + 32 * 16)
      assert.strictEqual(flops(e), 0)
      const h = yield* costOf(lmHead({ d: 16, vocab: 100 }))
      assert.strictEqual(params(h), 1600)
      assert.deepStrictEqual(h.flops, { lmHead: 3200 })
    }))

  it.effect("a tied head adds no parameters but keeps its FLOPs", () =>
    Effect.gen(function*() {
      const c = yield* costOf(sequence([
        embedding({ vocab: 100, d: 16, name: "embed" }),
        lmHead({ d: 16, vocab: 100, tiedTo: "embed/weight", name: "head" })
      ]))
      assert.strictEqual(params(c), 1600)
      assert.strictEqual(activated(c), 1600)
      assert.deepStrictEqual(c.flops, { lmHead: 3200 })
    }))
})

describe("attention (GQA)", () => {
  // d=64, H=8, KV=2, hd=8: q 64·64, k 64·16, v 64·16, o 64·64
  const gqa = attention({ d: 64, heads: 8, kvHeads: 2 })

  it.effect("params 10,240, FLOPs/token 20,480, KV 32 elements per position", () =>
    Effect.gen(function*() {
      const c = yield* costOf(gqa)
      assert.strictEqual(params(c), 4096 + 1024 + 1024 + 4096)
      assert.strictEqual(flops(c), 2 * 10240)
      assert.strictEqual(Cost.kvElementsPerToken(c), 2 * 2 * 8)
      assert.strictEqual(Cost.kvElements(c, 10), 320)
    }))

  it.effect("attention map: full 2·H·(hd+hd)·T², causal T(T+1)/2 pairs, sliding window caps pairs", () =>
    Effect.gen(function*() {
      const c = yield* costOf(gqa)
      assert.strictEqual(Cost.attentionMapFlops(c, 10), 2 * 8 * 16 * 100)
      assert.strictEqual(Cost.attentionMapFlops(c, 10, true), 2 * 8 * 16 * 55)
      const w = yield* costOf(attention({ d: 64, heads: 8, kvHeads: 2, window: 4 }))
      // causal with window 4 over 10 positions: 1+2+3+4 + 6·4 = 34 pairs; full: 10·4 = 40
      assert.strictEqual(Cost.attentionMapFlops(w, 10, true), 2 * 8 * 16 * 34)
      assert.strictEqual(Cost.attentionMapFlops(w, 10), 2 * 8 * 16 * 40)
      // the window also caps the KV cache: 4 positions
      assert.strictEqual(Cost.kvElements(w, 10), 4 * 32)
    }))

  it.effect("biases and QK norms add exactly their sizes", () =>
    Effect.gen(function*() {
      const base = params(yield* costOf(gqa))
      assert.strictEqual(params(yield* costOf(attention({ d: 64, heads: 8, kvHeads: 2, qkvBias: true }))) - base, 64 + 16 + 16)
      assert.strictEqual(params(yield* costOf(attention({ d: 64, heads: 8, kvHeads: 2, outBias: true }))) - base, 64)
      assert.strictEqual(params(yield* costOf(attention({ d: 64, heads: 8, kvHeads: 2, qkNorm: "head" }))) - base, 16)
      assert.strictEqual(params(yield* costOf(attention({ d: 64, heads: 8, kvHeads: 2, qkNorm: "full" }))) - base, 64 + 16)
    }))

  it.effect("an explicit headDim decouples heads from d (Qwen3: 32 heads × 128 on d=2048)", () =>
    Effect.gen(function*() {
      const c = yield* costOf(attention({ d: 2048, heads: 32, kvHeads: 4, headDim: 128 }))
      assert.strictEqual(params(c), 2048 * 4096 * 2 + 2048 * 512 * 2)
    }))
})

describe("MLA", () => {
  // d=32, H=4, r_q=8, r_kv=6, nope=4, rope=2, v=3
  const spec = { d: 32, heads: 4, kvLoraRank: 6, qkNopeHeadDim: 4, qkRopeHeadDim: 2, vHeadDim: 3 } as const

  it.effect("with q-LoRA: params and FLOPs by hand", () =>
    Effect.gen(function*() {
      const c = yield* costOf(mla({ ...spec, qLoraRank: 8 }))
      const weights = 32 * 8 + 8 * 4 * 6 + 32 * (6 + 2) + 6 * 4 * (4 + 3) + 4 * 3 * 32
      assert.strictEqual(params(c), weights + 8 + 6) // + qANorm + kvANorm
      assert.strictEqual(flops(c), 2 * weights)
      assert.strictEqual(Cost.kvElementsPerToken(c), 6 + 2)
      assert.strictEqual(Cost.attentionMapFlops(c, 5), 2 * 4 * (6 + 3) * 25)
      assert.strictEqual(Cost.rotaryTableFlops(c, 5), 2 * 5)
    }))

  it.effect("without q-LoRA: a direct q projection; bias adds to q, kvA and o", () =>
    Effect.gen(function*() {
      const c = yield* costOf(mla(spec))
      const weights = 32 * 4 * 6 + 32 * (6 + 2) + 6 * 4 * (4 + 3) + 4 * 3 * 32
      assert.strictEqual(params(c), weights + 6)
      const b = yield* costOf(mla({ ...spec, bias: true }))
      assert.strictEqual(params(b) - params(c), 4 * 6 + (6 + 2) + 32)
    }))
})

describe("dense MLP", () => {
  it.effect("SwiGLU: 3·d·h params, 6·d·h FLOPs; GELU: 2·d·h and 4·d·h; bias adds h(+h)+d", () =>
    Effect.gen(function*() {
      const s = yield* costOf(mlp({ d: 16, hidden: 40 }))
      assert.strictEqual(params(s), 3 * 16 * 40)
      assert.strictEqual(flops(s), 6 * 16 * 40)
      const g = yield* costOf(mlp({ d: 16, hidden: 40, activation: "gelu", bias: true }))
      assert.strictEqual(params(g), 2 * 16 * 40 + 40 + 16)
      assert.strictEqual(flops(g), 4 * 16 * 40)
    }))
})

describe("MoE", () => {
  // d=16, E=4, top-2, h=8, shared h=8 with gate
  const m = moe({ d: 16, experts: 4, topK: 2, expertHidden: 8, shared: { hidden: 8, gate: true } })

  it.effect("params, activated and FLOPs by part", () =>
    Effect.gen(function*() {
      const c = yield* costOf(m)
      assert.deepStrictEqual(c.params, { router: 16 * 4 + 16, experts: 4 * 3 * 16 * 8, sharedExperts: 3 * 16 * 8 })
      assert.deepStrictEqual(c.activated, { router: 80, experts: 2 * 3 * 16 * 8, sharedExperts: 384 })
      assert.deepStrictEqual(c.flops, { router: 2 * 64 + 2 * 16, experts: 2 * 2 * 3 * 16 * 8, sharedExperts: 2 * 384 })
    }))

  it.effect("fine-grained experts: 4× as many, ¼ as wide, 4× top-k keep params and FLOPs", () =>
    Effect.gen(function*() {
      const coarse = yield* costOf(moe({ d: 16, experts: 4, topK: 1, expertHidden: 32 }))
      const fine = yield* costOf(moe({ d: 16, experts: 16, topK: 4, expertHidden: 8 }))
      assert.strictEqual(coarse.params["experts"], fine.params["experts"])
      assert.strictEqual(coarse.flops["experts"], fine.flops["experts"])
      assert.isTrue(fine.params["router"]! > coarse.params["router"]!)
    }))
})

describe("rotary", () => {
  it.effect("a standalone rotary block maps heads·headDim to itself with no params or FLOPs", () =>
    Effect.gen(function*() {
      const r = rotary({ heads: 4, headDim: 16, dim: 8 })
      assert.strictEqual(r.in, 64)
      const c = yield* costOf(r)
      assert.strictEqual(params(c) + flops(c), 0)
    }))
})
