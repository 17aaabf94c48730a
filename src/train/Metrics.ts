/**
 * A training run's per-step record (`metrics.jsonl`, one JSON object a line) and its reader.
 *
 * @since 0.6.0
 */
import { Effect, FileSystem, Schema } from "effect"
import { parseJson } from "../models/Load.ts"
import { CheckpointError } from "./Checkpoint.ts"

/** One training step's measures; evaluation steps add the validation ones. */
export interface StepMetrics {
  readonly step: number
  readonly loss: number
  readonly ce: number
  readonly aux: number
  readonly lr: number
  readonly tokensPerSecond: number
  readonly compression?: number
  /** Sampled boundaries dropped for want of concept slots (webgpu's static-shape ConceptMoE steps). */
  readonly droppedBoundaries?: number
  /** Token-expert pairs dropped for want of expert slots, as a fraction of those routed (capacity dispatch, webgpu). */
  readonly droppedExpertPairs?: number
  /** Sampled boundary rate F of a ConceptMoE step (concepts / tokens; `compression` is its inverse, the sampled R). */
  readonly boundaryRate?: number
  /** Mean boundary probability G over the step's tokens (the ratio loss's differentiable part). */
  readonly boundaryProb?: number
  /**
   * The boundary rate the step's batch would have at evaluation (tokens with p ≥ ½, forced ones
   * included, over tokens): the training-time counterpart of `valCompression`.
   */
  readonly thresholdRate?: number
  /** The ratio loss as added to the step's loss (weighted; `Chunker.ratioLossValue`). */
  readonly ratioLoss?: number
  readonly valBitsPerByte?: number
  /** Threshold R on the validation batches at an evaluation step (tokens / boundaries with p ≥ ½). */
  readonly valCompression?: number
}

const MetricsLine = Schema.Struct({ step: Schema.Int.pipe(Schema.check(Schema.isGreaterThanOrEqualTo(0))) })

/** Reads `metrics.jsonl` (absent: none); a line that is not a metrics record is a typed error naming its number. */
export const readMetrics = (fs: FileSystem.FileSystem, file: string) =>
  Effect.gen(function*() {
    if (!(yield* fs.exists(file).pipe(Effect.orElseSucceed(() => false)))) return []
    const text = yield* fs.readFileString(file).pipe(Effect.mapError((e) => new CheckpointError({ file, message: `cannot read: ${e.message}` })))
    const out: Array<StepMetrics> = []
    const lines = text.split("\n")
    for (let i = 0; i < lines.length; i++) {
      if (lines[i]!.trim() === "") continue
      const json = yield* parseJson(lines[i]!, file).pipe(Effect.mapError(() => new CheckpointError({ file, field: `line ${i + 1}`, message: `line ${i + 1} is not JSON` })))
      yield* Schema.decodeUnknownEffect(MetricsLine)(json).pipe(
        Effect.mapError(() => new CheckpointError({ file, field: `line ${i + 1}`, message: `line ${i + 1}: expected a metrics record with a whole-number "step"` }))
      )
      out.push(json as StepMetrics)
    }
    return out
  })
