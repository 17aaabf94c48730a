/**
 * Whether a model's parameters can be held on a backend at all, checked before anything is
 * allocated: a config may be costed at any size (DeepSeek-V3's 671 billion parameters), but
 * building its weights would allocate until the process runs out of memory (or, on wasm, aborts).
 * The check is a floor — float32 parameters, once for inference and four times for training
 * (weights, gradients and AdamW's two moments), activations not counted — so it refuses only models
 * that cannot fit.
 *
 * @since 0.3.0
 */
import { Effect, Schema } from "effect"
import * as os from "node:os"
import type { Analysis } from "../graph/Analyze.ts"

/** The model's parameters cannot fit in the memory the backend can use. */
export class ModelTooLarge extends Schema.TaggedError<ModelTooLarge>()("ModelTooLarge", {
  model: Schema.String,
  message: Schema.String
}) {}

/** The wasm backend's heap is a 32-bit WebAssembly memory. */
const wasmHeap = 4 * 1024 ** 3

/** The most memory a backend can use, and why. */
export const memoryLimit = (backend: string): { readonly bytes: number; readonly why: string } =>
  backend === "wasm"
    ? { bytes: wasmHeap, why: "a WebAssembly heap holds at most 4 GiB" }
    : { bytes: os.totalmem(), why: "this machine's memory" }

/** The parameters the runtime allocates (a tied parameter once). */
export const allocatedParams = (analysis: Analysis): number => {
  let n = 0
  for (const p of analysis.params) if (p.tiedTo === undefined) n += p.numel
  return n
}

const gib = (bytes: number) => `${(bytes / 1024 ** 3).toLocaleString("en-US", { maximumFractionDigits: bytes < 1024 ** 3 ? 3 : 1 })} GiB`

/**
 * Fails with {@link ModelTooLarge} when the model's parameters, as float32, cannot fit in what
 * `backend` can use: once to run the model (`use: "run"`), four times to train it.
 */
export const fitsInMemory = (
  model: { readonly name: string; readonly file: string; readonly analysis: Analysis },
  backend: string,
  use: "run" | "train"
): Effect.Effect<void, ModelTooLarge> =>
  Effect.suspend(() => {
    const params = allocatedParams(model.analysis)
    const bytes = params * 4 * (use === "train" ? 4 : 1)
    const limit = memoryLimit(backend)
    if (bytes <= limit.bytes) return Effect.void
    return Effect.fail(
      new ModelTooLarge({
        model: model.name,
        message: `${model.file}: ${model.name} has ${params.toLocaleString("en-US")} parameters, which need at least ${gib(bytes)} to ` +
          (use === "train" ? "train (float32 weights, gradients and two AdamW moments)" : "run (float32 weights)") +
          `; the ${backend} backend can use at most ${gib(limit.bytes)} (${limit.why})`
      })
    )
  })
