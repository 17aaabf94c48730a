/**
 * Combinators are blocks too: they hold children and derive shape and cost from them.
 *
 * - {@link sequence}: children run one after another; costs add.
 * - {@link residual}: `x + f(x)` for a chain `f`; costs add (the addition is not a matmul).
 * - {@link repeat}: `n` copies with distinct weights (a sequence of the same value, paths `0..n-1`).
 * - {@link loop}: the same weights run `n` times: parameters counted once, compute `n` times.
 * - {@link branch}: children see the same input; outputs are summed or concatenated.
 *
 * All are closed under composition and check at the type level that sizes line up where they are
 * literal types, and in {@link analyze} always.
 *
 * @since 0.1.0
 */
import { Schema } from "effect"
import * as Cost from "../cost/Cost.ts"
import { type AnyBlock, type Block, type BlockKind, make, type Width } from "./Block.ts"
import { Dim } from "./Spec.ts"

type InOf<B> = B extends Block<infer I, any> ? I : never
type OutOf<B> = B extends Block<any, infer O> ? O : never
/** True when a size is not a literal (decided at run time). */
type Loose<W> = number extends W ? true : false
type Fits<H extends AnyBlock, Prev> = [Prev] extends [never] ? H
  : true extends Loose<Prev> | Loose<InOf<H>> ? H
  : Block<Prev & Width, OutOf<H>>

/**
 * Requires each block's input size to equal the previous block's output size, for tuples whose sizes
 * are literal types.
 */
export type Chain<Bs extends ReadonlyArray<AnyBlock>, Prev = never> = number extends Bs["length"] ? Bs
  : Bs extends readonly [infer H extends AnyBlock, ...infer Rest extends ReadonlyArray<AnyBlock>]
    ? readonly [Fits<H, Prev>, ...Chain<Rest, OutOf<H>>]
  : readonly []

/** Requires a chain to map its input size to itself, where both sizes are literal types. */
export type KeepsSize<Bs extends ReadonlyArray<AnyBlock>> = true extends Loose<First<Bs>> | Loose<Last<Bs>> ? unknown
  : [First<Bs>] extends [Last<Bs>] ? [Last<Bs>] extends [First<Bs>] ? unknown
    : { readonly "a residual or looped body must keep its size": never }
  : { readonly "a residual or looped body must keep its size": never }

type First<Bs extends ReadonlyArray<AnyBlock>> = Bs extends readonly [infer H, ...Array<any>] ? InOf<H> : Width
type Last<Bs extends ReadonlyArray<AnyBlock>> = Bs extends readonly [...Array<any>, infer L] ? OutOf<L> : Width

const EmptySpec = Schema.Struct({})

const chainProblems = (children: ReadonlyArray<Block>): Array<string> => {
  if (children.length === 0) return ["has no children"]
  const out: Array<string> = []
  for (let i = 1; i < children.length; i++) {
    const prev = children[i - 1]!
    const next = children[i]!
    if (prev.out !== next.in) {
      out.push(
        `child ${label(next, i)} expects input size ${next.in} but child ${label(prev, i - 1)} outputs ${prev.out}`
      )
    }
  }
  return out
}

const label = (b: Block, i: number) => (b.name === undefined ? `${i}` : `${i} ("${b.name}")`)

const chainIo = (children: ReadonlyArray<Block>) => ({
  in: children[0]?.in ?? 0,
  out: children[children.length - 1]?.out ?? 0
})

/** @category kinds */
export const Sequence: BlockKind<{}> = {
  name: "sequence",
  summary: "children in order",
  spec: EmptySpec,
  io: (_, children) => chainIo(children),
  connect: (_, children) => chainProblems(children),
  cost: (_, { children }) => Cost.sum(children),
  stream: "local",
  apply: (_ctx, _s, x, _p, children) => children.reduce((y, f) => f(y), x)
}

/** @category kinds */
export const Residual: BlockKind<{}> = {
  name: "residual",
  summary: "x + f(x)",
  spec: EmptySpec,
  io: (_, children) => ({ in: children[0]?.in ?? 0, out: children[0]?.in ?? 0 }),
  connect: (_, children) => {
    const problems = chainProblems(children)
    const io = chainIo(children)
    if (children.length > 0 && io.in !== io.out) {
      problems.push(`the residual branch maps size ${io.in} to ${io.out}; it must keep the size`)
    }
    return problems
  },
  cost: (_, { children }) => Cost.sum(children),
  stream: "local",
  apply: (ctx, _s, x, _p, children) => ctx.tf.add(x, children.reduce((y, f) => f(y), x))
}

const LoopSpec = Schema.Struct({ times: Dim })

/** @category kinds */
export const Loop: BlockKind<typeof LoopSpec.Type> = {
  name: "loop",
  summary: "the same weights applied n times",
  spec: LoopSpec,
  io: (_, children) => chainIo(children),
  connect: (_, children) => {
    const problems = chainProblems(children)
    const io = chainIo(children)
    if (children.length > 0 && io.in !== io.out) {
      problems.push(`a looped body must keep its size, but it maps ${io.in} to ${io.out}`)
    }
    return problems
  },
  cost: (spec, { children }) => Cost.loop(Cost.sum(children), spec.times),
  stream: "local",
  apply: (ctx, spec, x, _p, children) => {
    // each pass has its own scope, so stateful children (KV caches) keep one state per pass
    let y = x
    for (let i = 0; i < spec.times; i++) y = ctx.withScope(`${ctx.scope}#${i}`, () => children.reduce((z, f) => f(z), y))
    return y
  }
}

const BranchSpec = Schema.Struct({ merge: Schema.Literals(["sum", "concat"]) })

/** @category kinds */
export const Branch: BlockKind<typeof BranchSpec.Type> = {
  name: "branch",
  summary: "parallel children on one input, outputs summed or concatenated",
  spec: BranchSpec,
  io: (spec, children) => ({
    in: children[0]?.in ?? 0,
    out: spec?.merge === "concat"
      ? children.reduce((a, c) => a + (typeof c.out === "number" ? c.out : NaN), 0)
      : children[0]?.out ?? 0
  }),
  connect: (spec, children) => {
    if (children.length === 0) return ["has no children"]
    const out: Array<string> = []
    const first = children[0]!
    children.forEach((c, i) => {
      if (c.in !== first.in) out.push(`branch ${label(c, i)} expects input size ${c.in}, branch 0 expects ${first.in}`)
      if (spec.merge === "sum" && c.out !== first.out) {
        out.push(`branch ${label(c, i)} outputs size ${c.out}, branch 0 outputs ${first.out}; a sum needs equal sizes`)
      }
      if (spec.merge === "concat" && typeof c.out !== "number") out.push(`branch ${label(c, i)} outputs ids`)
    })
    return out
  },
  cost: (_, { children }) => Cost.sum(children),
  stream: "local",
  apply: (ctx, spec, x, _p, children) => {
    const outs = children.map((f) => f(x))
    return spec.merge === "sum" ? ctx.tf.addN(outs) : ctx.tf.concat(outs, -1)
  }
}

interface Opts {
  readonly name?: string
}

/**
 * Children in order. Sizes must chain: `sequence([linear(32, 64), linear(64, 8)])` is a
 * `Block<32, 8>`; `sequence([linear(32, 64), linear(16, 8)])` does not compile.
 *
 * @category combinators
 */
export const sequence = <const Bs extends readonly [AnyBlock, ...Array<AnyBlock>] | ReadonlyArray<AnyBlock>>(
  blocks: Bs & Chain<Bs>,
  options?: Opts
): Block<First<Bs>, Last<Bs>> => make(Sequence, {}, { name: options?.name, children: blocks })

/**
 * `x + f(x)` where `f` is the chain of `blocks`, which must map a size to itself.
 *
 * @category combinators
 */
export const residual = <const Bs extends readonly [AnyBlock, ...Array<AnyBlock>] | ReadonlyArray<AnyBlock>>(
  blocks: Bs & Chain<Bs> & KeepsSize<Bs>,
  options?: Opts
): Block<First<Bs>, First<Bs>> => make(Residual, {}, { name: options?.name, children: blocks })

/**
 * `times` passes through the same weights: parameters are counted once and compute `times` times;
 * each pass has its own attention map and KV cache.
 *
 * @category combinators
 */
export const loop = <W extends Width>(body: Block<W, W>, times: number, options?: Opts): Block<W, W> =>
  make(Loop, { times }, { name: options?.name, children: [body] })

/**
 * `times` copies of a block with distinct weights, named `0..times-1`: a sequence whose children are
 * the same value, so building a deep stack costs no more than one layer.
 *
 * @category combinators
 */
export const repeat = <W extends Width>(body: Block<W, W>, times: number, options?: Opts): Block<W, W> =>
  make(Sequence, {}, {
    name: options?.name,
    children: Array.from({ length: times }, (_, i) => Object.freeze({ ...body, name: `${i}` }))
  })

/**
 * Children all read the same input; their outputs are summed (`"sum"`) or concatenated along the
 * feature axis (`"concat"`).
 *
 * @category combinators
 */
export const branch = <In extends Width>(
  blocks: ReadonlyArray<Block<In, any>>,
  merge: "sum" | "concat",
  options?: Opts
): Block<In, number> => make(Branch, { merge }, { name: options?.name, children: blocks })
