/**
 * The concept stage of ConceptMoE: chunk → merge → concept model at rate 1/R → dechunk.
 * `[batch, seq, d] → [batch, seq, d]`.
 *
 * Children, in order: a {@link Chunker} (token rate), the concept model (any block mapping `d → d`,
 * e.g. `[projector d→d_c, layers…, projector d_c→d]`, run on the ~N/R merged positions), a
 * {@link Dechunk} (token rate). Merge (`sum` of each chunk's tokens, or its `last` token) has no
 * parameters and no matmul.
 *
 * Cost: chunk + atRate(concept model, 1/R) + dechunk: the concept model's per-token FLOPs are divided
 * by R, its attention map sees N/R positions (R² less) and its KV cache holds N/R (R less).
 * R is the target ratio; the runtime checks it against the ratio it measures.
 *
 * @since 0.1.0
 */
import { Schema } from "effect"
import * as Cost from "../cost/Cost.ts"
import { type AnyBlock, type Block, type BlockKind, make, type Named } from "../graph/Block.ts"
import type { ChildApply, ForwardContext, Tensor, Tensor2D, TokenStream } from "../graph/Apply.ts"
import type { Tensor1D } from "@tensorflow/tfjs"
import { crossCheck, PositiveNumber } from "../graph/Spec.ts"
import { Chunker } from "./Chunker.ts"
import { Dechunk } from "./Dechunk.ts"
import { type ChunkState, ConceptOps } from "./ConceptContext.ts"
import { Unsupported } from "../internal/RunErrors.ts"

export const ConceptStageSpec = Schema.Struct({
  ratio: PositiveNumber,
  merge: Schema.Literals(["sum", "last"])
}).pipe(Schema.check(crossCheck((s) => s.ratio <= 1 ? ["ratio", `the compression ratio must exceed 1, got ${s.ratio}`] : undefined)))
export type ConceptStageSpec = typeof ConceptStageSpec.Type

/**
 * Chunk, merge, run the concept model on each row's concepts, dechunk. Merge `sum` adds the tokens
 * (φ(m−1), φ(m)] of each chunk (a chunk closed by a document start keeps only that token, so no
 * document leaks into the next); `last` takes the boundary token. Tokens after a row's last
 * boundary close no chunk and merge into nothing.
 *
 * The stage hands its children what they need, each for the time it runs (`ConceptOps.inStage`):
 * the chunk module a place for its chunk state, the concept model nothing (it runs on the concept
 * stream), the dechunk that chunk state and a place for the dechunked concept, which the stage then
 * reports (`ConceptOps.finished`) for the joint-decoding attention after it.
 */
const applyStage = (ctx: ForwardContext, spec: ConceptStageSpec, x: Tensor, _p: unknown, children: ReadonlyArray<ChildApply>): Tensor => {
  const { tf, cache } = ctx
  const concepts = ctx.get(ConceptOps)
  const [chunkChild, body, deChild] = children as [ChildApply, ChildApply, ChildApply]
  const rows = ctx.stream.layout
  const d = x.shape[1]!
  // decoding: concepts emitted so far per row, and (sum) each row's tokens since its last boundary
  const state = cache?.state(ctx.scope, () => ({
    concepts: new Array<number>(rows.length).fill(0),
    pending: spec.merge === "sum" ? tf.keep(tf.zeros([rows.length, d])) as Tensor : undefined
  }))
  if (state !== undefined && ctx.stream.documentStarts.size > 0) throw new Unsupported({ at: ctx.scope, problem: "incremental decoding does not take document starts inside a row" })
  let handed: ChunkState | undefined
  concepts.inStage({ chunked: (c) => (handed = c) }, () => chunkChild(x))
  // connect checks that child 0 is a chunk module, which always hands its state over
  if (handed === undefined) throw new Error(`${ctx.scope}: the chunk module handed no state to its concept stage`)
  const ch: ChunkState = handed
  // the concept model runs with no stage scope; the dechunk gets the chunk state, and hands back the concept
  const model = (f: () => Tensor) => concepts.inStage({}, f)
  const de = (y: Tensor): Tensor => {
    let concept: Tensor2D | undefined
    const z = concepts.inStage({ chunk: ch, dechunked: (c) => (concept = c) }, () => deChild(y))
    if (concept === undefined) throw new Error(`${ctx.scope}: the dechunk handed no concept to its concept stage`)
    concepts.finished(ch, concept)
    return z
  }
  if (ch.slots !== undefined) return staticStage(ctx, concepts, spec, x, ch, (m) => model(() => body(m)), de)
  const n = ch.boundaries.length
  const total = ch.concepts.reduce((a, b) => a + b, 0)
  let start = 0
  let merged: Tensor
  if (spec.merge === "last") {
    const bounds: Array<number> = []
    for (let i = 0; i < n; i++) if (ch.boundaries[i] === 1) bounds.push(i)
    merged = tf.gather(x, tf.tensor1d(bounds, "int32"))
  } else {
    // each token goes to the chunk closed by the first boundary at or after it (same row); tokens
    // after a row's last boundary go to segment total + row (pending, kept when decoding)
    const seg = new Int32Array(n).fill(total + rows.length)
    let first = 0
    let offset = 0
    rows.forEach((L, r) => {
      let k = offset + ch.concepts[r]! // one past this row's last concept
      let next = -1
      for (let i = L - 1; i >= 0; i--) {
        const t = first + i
        if (ch.boundaries[t] === 1) {
          k--
          next = t
        }
        // a chunk closed by a document start holds only that token
        if (next === -1) seg[t] = total + r
        else seg[t] = ctx.stream.documentStarts.has(next) && t !== next ? total + rows.length : k
      }
      offset += ch.concepts[r]!
      first += L
    })
    const sums = tf.unsortedSegmentSum(x, tf.tensor1d(seg, "int32"), total + rows.length + 1)
    merged = tf.slice(sums, [0, 0], [total, -1])
    if (state?.pending !== undefined) {
      // a row's first new concept also holds the tokens pending from earlier pieces
      const first = new Int32Array(total).fill(rows.length)
      let o = 0
      ch.concepts.forEach((m, r) => {
        if (m > 0) first[o] = r
        o += m
      })
      const padded = tf.concat([state.pending, tf.zeros([1, d])], 0)
      merged = tf.add(merged, tf.gather(padded, tf.tensor1d(first, "int32")))
      const keepOld = tf.tensor2d(ch.concepts.map((m) => (m === 0 ? 1 : 0)), [rows.length, 1])
      const next = tf.keep(tf.add(tf.slice(sums, [total, 0], [rows.length, -1]), tf.mul(state.pending, keepOld)))
      state.pending.dispose()
      state.pending = next
    }
  }
  const tokenDocuments = ctx.stream.documents
  // a concept's document is its boundary token's (a document start is a forced boundary, so no
  // concept spans two); its position counts from its document's first concept, as token positions do
  const positions = new Int32Array(total)
  const documents = new Float32Array(total)
  let o = 0
  start = 0
  rows.forEach((L, r) => {
    let pos = state?.concepts[r] ?? 0
    let doc = 0
    for (let i = 0; i < L; i++) {
      const t = start + i
      const opens = i > 0 && ctx.stream.documentStarts.has(t)
      if (opens) doc++
      if (ch.boundaries[t] !== 1) continue
      if (opens) pos = 0
      documents[o] = doc
      positions[o++] = pos++
    }
    start += L
  })
  let t: Tensor | undefined
  const stream: TokenStream = {
    ...ctx.stream,
    layout: ch.concepts,
    positions,
    ...(tokenDocuments === undefined ? {} : { documents: () => t ??= tf.tensor1d(documents) })
  }
  // decoding a piece in which no row closed a chunk: the concept model has nothing to run on
  const y = total === 0 ? tf.zeros([0, d]) : model(() => ctx.withStream(stream, () => body(merged)))
  if (state !== undefined) ch.concepts.forEach((M, r) => (state.concepts[r]! += M))
  return de(total === 0 ? y : rampResidual(ctx, concepts, y, merged))
}

/**
 * A converted model's ramp (`ConceptOps.ramp` = s): the dechunk gets ĉ − (1 − s)·c, where c is
 * the concept model's input. The decoder input z = ĥ + ĉ^ema of the paper counts ĥ twice when every
 * token is its own concept (c = ĥ and ĉ = ĥ + what the concept model adds); at s = 0 this is
 * z = ĥ + (ĉ − ĥ) = ĉ, the source MoE's residual stream, and from s = 1 on it is the paper's.
 */
const rampResidual = (ctx: ForwardContext, concepts: ConceptOps, y: Tensor, merged: Tensor): Tensor =>
  concepts.ramp === undefined || concepts.ramp >= 1 ? y : ctx.tf.sub(y, ctx.tf.mul(merged, 1 - concepts.ramp))

/**
 * The stage with static shapes (the chunk module ran with `ConceptFeeds`): every row's concepts in
 * `C` slots, the unused ones zero, so the concept model runs on `[rows·C, d]` with uniform rows
 * (its attention is causal, so real concepts, which come first, never see the padding; the concept
 * stream's `valid` tells MoE balance losses which slots are real). Merges as `applyStage` does, with segment sums
 * over device indices.
 */
const staticStage = (
  ctx: ForwardContext,
  concepts: ConceptOps,
  spec: ConceptStageSpec,
  x: Tensor,
  ch: ChunkState,
  body: ChildApply,
  de: ChildApply
): Tensor => {
  const { tf } = ctx
  const { b, receive, capacity: C, documentStart } = ch.slots!
  const rows = ctx.stream.layout
  const R = rows.length
  const L = rows[0]!
  const n = R * L
  const trash = R * C
  const b2 = tf.reshape(b, [R, L])
  const rowBase = tf.reshape(tf.tensor1d(Array.from({ length: R }, (_, r) => r * C), "int32"), [R, 1])
  const count = tf.sum(b2, 1, true)
  // the slot a boundary token closes (others: the trash slot)
  const closes = tf.where(tf.greater(b, 0), receive, tf.fill([n], trash, "int32"))
  let merged: Tensor
  if (spec.merge === "last") {
    merged = tf.unsortedSegmentSum(tf.mul(x, tf.reshape(b, [n, 1])), closes as Tensor1D, trash + 1)
  } else {
    // each token goes to the chunk closed by the first boundary at or after it: index = boundaries
    // before it; after a row's last boundary, to the trash
    const before = tf.cumsum(b2, 1, true)
    const inRow = tf.reshape(tf.less(before, count), [n])
    let seg = tf.where(inRow, tf.reshape(tf.add(tf.cast(before, "int32"), rowBase), [n]), tf.fill([n], trash, "int32"))
    // a chunk closed by a document start holds only that token
    const closedByDocument = tf.unsortedSegmentSum(tf.mul(b, documentStart), closes as Tensor1D, trash + 1)
    const alone = tf.logicalAnd(tf.greater(tf.gather(closedByDocument, seg), 0), tf.equal(documentStart, 0))
    seg = tf.where(alone, tf.fill([n], trash, "int32"), seg)
    merged = tf.unsortedSegmentSum(x, seg as Tensor1D, trash + 1)
  }
  merged = tf.slice(merged, [0, 0], [trash, -1])
  const tokenDocuments = ctx.stream.documents
  // each concept slot takes its boundary token's document (padding slots take 0: their outputs
  // are never received by a token)
  const slots = tokenDocuments === undefined
    ? undefined
    : ctx.stop(tf.slice(tf.unsortedSegmentSum(tf.mul(ctx.stop(tokenDocuments()), b), closes as Tensor1D, trash + 1), [0], [trash]))
  const stream: TokenStream = {
    ...ctx.stream,
    layout: rows.map(() => C),
    positions: Int32Array.from({ length: trash }, (_, i) => i % C),
    valid: tf.reshape(tf.cast(tf.less(tf.tensor2d(Array.from({ length: R }, () => Array.from({ length: C }, (_, k) => k))), count), "float32"), [trash]),
    ...(slots === undefined ? {} : { documents: () => slots })
  }
  const y = ctx.withStream(stream, () => body(merged))
  return de(rampResidual(ctx, concepts, y, merged))
}

export const ConceptStage: BlockKind<ConceptStageSpec> = {
  name: "concept-stage",
  summary: "chunk, merge, concept model at rate 1/R, dechunk",
  spec: ConceptStageSpec,
  io: (_, children) => ({ in: children[0]?.in ?? 0, out: children[children.length - 1]?.out ?? 0 }),
  connect: (spec, children) => {
    const [chunk, body, de] = children
    if (children.length !== 3 || chunk === undefined || body === undefined || de === undefined) {
      return [`expects 3 children (chunk, concept model, dechunk), got ${children.length}`]
    }
    const out: Array<string> = []
    if (chunk.kind !== Chunker) out.push(`child 0 must be a "chunk" block, got "${chunk.kind.name}"`)
    if (de.kind !== Dechunk) out.push(`child 2 must be a "dechunk" block, got "${de.kind.name}"`)
    if (chunk.kind === Chunker && (chunk.spec as { ratio?: number }).ratio !== spec.ratio) {
      out.push(`the chunk module's ratio ${(chunk.spec as { ratio?: number }).ratio} differs from the stage's ${spec.ratio}`)
    }
    if (body.in !== chunk.out || body.out !== chunk.out) {
      out.push(`the concept model maps ${body.in} → ${body.out}, but the token stream has size ${chunk.out}`)
    }
    if (de.in !== chunk.out) out.push(`the dechunk has size ${de.in}, the token stream ${chunk.out}`)
    return out
  },
  childRate: (spec, i) => (i === 1 ? 1 / spec.ratio : 1),
  cost: (spec, { children }) =>
    Cost.add(Cost.add(children[0] ?? Cost.zero, Cost.atRate(children[1] ?? Cost.zero, 1 / spec.ratio)), children[2] ?? Cost.zero),
  stream: "stateful",
  apply: applyStage
}

/** @category constructors */
export const conceptStage = <D extends number>(
  spec: ConceptStageSpec & Named,
  children: readonly [chunk: Block<D, D>, conceptModel: Block<D, D>, dechunk: Block<D, D>]
): Block<D, D> => make(ConceptStage, { ratio: spec.ratio, merge: spec.merge }, { name: spec.name, children: children as ReadonlyArray<AnyBlock> })
