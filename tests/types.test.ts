/**
 * Sizes are checked by the type checker where they are literal types. `npm test` runs `tsc` over
 * this file first: each `@ts-expect-error` below must stay an error, or the build fails.
 */
import { describe, expectTypeOf, it } from "@effect/vitest"
import { attention } from "../src/blocks/Attention.ts"
import { embedding } from "../src/blocks/Embedding.ts"
import { linear } from "../src/blocks/Linear.ts"
import { lmHead } from "../src/blocks/LMHead.ts"
import { rmsNorm } from "../src/blocks/RMSNorm.ts"
import type { Block } from "../src/graph/Block.ts"
import { loop, residual, sequence } from "../src/graph/Combinators.ts"

describe("typed sizes", () => {
  it("a well-formed chain has the outer sizes in its type", () => {
    const net = sequence([linear({ dIn: 32, dOut: 64 }), linear({ dIn: 64, dOut: 8 })])
    expectTypeOf(net).toEqualTypeOf<Block<32, 8>>()
    const lm = sequence([
      embedding({ vocab: 100, d: 16 }),
      residual([rmsNorm({ d: 16 }), attention({ d: 16, heads: 4 })]),
      lmHead({ d: 16, vocab: 100 })
    ])
    expectTypeOf(lm).toEqualTypeOf<Block<"ids", 100>>()
  })

  it("mismatches do not compile", () => {
    // @ts-expect-error 64 → 16: the second block expects 16
    sequence([linear({ dIn: 32, dOut: 64 }), linear({ dIn: 16, dOut: 8 })])
    // @ts-expect-error the embedding's output (16) does not feed an attention of width 32
    sequence([embedding({ vocab: 100, d: 16 }), attention({ d: 32, heads: 4 })])
    // @ts-expect-error a residual branch must keep its size
    residual([linear({ dIn: 8, dOut: 4 })])
    // @ts-expect-error a looped body must map a size to itself
    loop(linear({ dIn: 8, dOut: 4 }), 2)
  })

  it("sizes only known at run time are accepted and checked by analyze", () => {
    const d: number = 16
    const net = sequence([linear({ dIn: 8, dOut: d }), linear({ dIn: d, dOut: 4 })])
    expectTypeOf(net).toEqualTypeOf<Block<8, 4>>()
  })
})
