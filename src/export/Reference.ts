/**
 * Reference values for checking an exported model on the PyTorch side: one evaluation forward pass
 * (logits, executed matmul FLOPs, the concept stages' own boundaries) and one training pass (loss,
 * its parts, every parameter's gradient, the boundaries it sampled), computed by this runtime on a
 * small random batch with a document start inside a row. Written next to an export by
 * `conceptmoe export --reference`; `python -m conceptmoe_torch.check DIR` compares.
 *
 * @since 0.4.0
 */
import type * as TF from "@tensorflow/tfjs"
import type { Tf } from "../graph/Apply.ts"
import { prng } from "../internal/Random.ts"
import { type Batch, forward, loss, type Lowered, mixSeed } from "../runtime/Lower.ts"
import { staticFlopsAt } from "../runtime/Verify.ts"

export interface Reference {
  readonly batch: { readonly rows: number; readonly length: number; readonly ids: ReadonlyArray<number>; readonly targets: ReadonlyArray<number>; readonly documentStarts: ReadonlyArray<number> }
  readonly seed: number
  readonly balanceWeight: number
  readonly eval: {
    readonly flops: { readonly weights: number; readonly attentionMap: number; readonly other: number }
    /** Static weight FLOPs of the batch at the concepts the pass made (all of them without a concept stage). */
    readonly staticFlops: number
    readonly boundaries: ReadonlyArray<number> | null
  }
  readonly train: { readonly loss: number; readonly ce: number; readonly aux: number; readonly boundaries: ReadonlyArray<number> | null }
}

/** A batch of random ids with next-token targets, a document start in the middle of the last row. */
export const referenceBatch = (vocab: number, rows: number, length: number, seed: number): Batch => {
  const random = prng(seed)
  const ids = Int32Array.from({ length: rows * length }, () => Math.floor(random() * vocab))
  const start = (rows - 1) * length + Math.floor(length / 2)
  const targets = Int32Array.from(ids, (_, t) => ((t + 1) % length === 0 || t + 1 === start ? -1 : ids[t + 1]!))
  return { rows, length, ids, targets, documentStarts: new Set([start]) }
}

/**
 * Adds normal noise (std 0.02) to every variable, so that zero-initialised parameters (biases, joint
 * decoding's concept projections) and the identity chunk projections take part in the check.
 */
export const perturb = (low: Lowered, seed: number): void => {
  const { tf } = low
  let i = 0
  for (const v of low.variables.values()) {
    const noise = tf.randomNormal(v.shape, 0, 0.02, "float32", mixSeed(seed, 1000 + i++))
    v.assign(tf.add(v, noise) as TF.Tensor)
    noise.dispose()
  }
}

/** Computes the reference values of a lowered model on `batch`; returns them and the gradients by path. */
export const reference = (tf: Tf, low: Lowered, batch: Batch, options: { readonly seed: number; readonly balanceWeight: number }) => {
  let ev: { logits: TF.Tensor; flops: { weights: number; attentionMap: number; other: number }; concepts: number | undefined; boundaries: Array<number> | null } | undefined
  tf.tidy(() => {
    const { ctx, logits } = forward(low, batch, { training: false, seed: 0 })
    ev = {
      logits: tf.keep(logits),
      flops: { ...ctx.flops },
      concepts: ctx.compression.tokens > 0 ? ctx.compression.concepts : undefined,
      boundaries: ctx.chunk === undefined ? null : [...ctx.chunk.boundaries]
    }
  })
  let parts = { ce: 0, aux: 0 }
  let boundaries: Array<number> | null = null
  const names = [...low.variables.keys()]
  const { grads, value } = tf.variableGrads(() => {
    const r = loss(low, batch, { training: true, seed: options.seed, balanceWeight: options.balanceWeight })
    parts = { ce: r.ce.dataSync()[0]!, aux: r.aux.dataSync()[0]! }
    boundaries = r.ctx.chunk === undefined ? null : [...r.ctx.chunk.boundaries]
    return r.total
  }, names.map((n) => low.variables.get(n)!))
  const gradients = new Map<string, Float32Array>()
  for (const n of names) {
    const g = grads[low.variables.get(n)!.name]
    gradients.set(n, g === undefined ? new Float32Array(low.variables.get(n)!.size) : g.dataSync() as Float32Array)
  }
  if (ev === undefined) throw new Error("the evaluation pass did not run")
  const logits = ev.logits.dataSync() as Float32Array
  const result: Reference = {
    batch: { rows: batch.rows, length: batch.length, ids: [...batch.ids], targets: [...batch.targets!], documentStarts: [...batch.documentStarts!] },
    seed: options.seed,
    balanceWeight: options.balanceWeight,
    eval: { flops: ev.flops, staticFlops: staticFlopsAt(low.analysis, batch.rows * batch.length, ev.concepts), boundaries: ev.boundaries },
    train: { loss: value.dataSync()[0]!, ...parts, boundaries }
  }
  tf.dispose([ev.logits, value, ...Object.values(grads)])
  return { reference: result, logits, logitsShape: [batch.rows * batch.length, logits.length / (batch.rows * batch.length)], gradients }
}
