/**
 * Text generation from a trained checkpoint: prefill the prompt with KV caches, then sample one
 * token at a time (temperature, top-k, seeded), streaming each piece of text as it is produced.
 *
 * @since 0.2.0
 */
import { Effect, FileSystem, Path, Schema } from "effect"
import { prng } from "../internal/Random.ts"
import { attemptPromise, type RunFailure } from "../internal/RunErrors.ts"
import { type LoadedModel, loadModel, modelFromJson } from "../models/Load.ts"
import { syncReads, Tensors } from "../runtime/Backend.ts"
import { fitsInMemory } from "../runtime/Memory.ts"
import { type Session, session } from "../runtime/Decode.ts"
import { type Lowered, materialize, release } from "../runtime/Lower.ts"
import { readChecked as readCheckpoint } from "../train/Checkpoint.ts"
import type { Tokenizer } from "../train/Data.ts"
import { CheckpointMismatch, loadParams } from "../train/Train.ts"

/** A generation request that cannot run: empty prompt, prompt past the context, bad settings. */
export class GenerateError extends Schema.TaggedError<GenerateError>()("GenerateError", {
  field: Schema.String,
  problem: Schema.String
}) {
  override get message(): string {
    return `${this.field} ${this.problem}`
  }
}

/** The prompt's tokens, checked: not empty, within the model's context. */
export const promptIds = (model: LoadedModel, tokenizer: Tokenizer, prompt: string): Effect.Effect<Int32Array, GenerateError> => {
  const ids = tokenizer.encode(prompt)
  if (ids.length === 0) return Effect.fail(new GenerateError({ field: "--prompt", problem: "is empty: give at least one character" }))
  if (ids.length > model.contextLength) {
    return Effect.fail(new GenerateError({ field: "--prompt", problem: `has ${ids.length} tokens; ${model.name}'s context is ${model.contextLength}` }))
  }
  return Effect.succeed(ids)
}

/**
 * Reads a checkpoint (a run directory or its `checkpoint.safetensors`) and builds the model it was
 * trained for, from the config stored in its metadata (or from `configFile`), with its parameters.
 */
export const loadTrained = (checkpoint: string, configFile?: string) =>
  Effect.gen(function*() {
    const fs = yield* FileSystem.FileSystem
    const path = yield* Path.Path
    const { tf } = yield* Tensors
    if (checkpoint === "") {
      return yield* new CheckpointMismatch({ file: `""`, message: "the path is empty; expected a run directory or its checkpoint.safetensors" })
    }
    const info = yield* fs.stat(checkpoint).pipe(
      Effect.mapError((e) =>
        new CheckpointMismatch({
          file: checkpoint,
          message: e.reason._tag === "NotFound" ? "no such checkpoint file or run directory" : `cannot read: ${e.message}`
        })
      )
    )
    const file = info.type === "Directory" ? path.join(checkpoint, "checkpoint.safetensors") : checkpoint
    const ck = yield* readCheckpoint(file, { optimizer: "skip" })
    let model: LoadedModel
    if (configFile !== undefined) {
      model = yield* loadModel(configFile)
    } else {
      const stored = ck.metadata.config
      if (stored === undefined) {
        return yield* new CheckpointMismatch({ file, message: "stores no model config (written by an older version): pass the model's config with --config" })
      }
      model = yield* modelFromJson(stored, `${file} (metadata "config")`)
    }
    yield* fitsInMemory(model, (yield* Tensors).name, "run")
    const low = materialize(tf, model.analysis, 0)
    yield* loadParams(low, file, ck.tensors).pipe(Effect.tapError(() => Effect.sync(() => release(low))))
    return { model, low, file, step: ck.metadata.step }
  })

export const SamplingSettings = Schema.Struct({
  maxTokens: Schema.Int.pipe(Schema.check(Schema.isGreaterThanOrEqualTo(1))),
  /** 0 is greedy. */
  temperature: Schema.Finite.pipe(Schema.check(Schema.isGreaterThanOrEqualTo(0))),
  /** Sample among the k most likely tokens; 0 for all. */
  topK: Schema.Int.pipe(Schema.check(Schema.isGreaterThanOrEqualTo(0))),
  seed: Schema.Int
})
export type SamplingSettings = typeof SamplingSettings.Type

/** Draws a token from one row of logits. */
export const sample = (logits: ArrayLike<number>, s: Pick<SamplingSettings, "temperature" | "topK">, random: () => number): number => {
  const n = logits.length
  let order = Array.from({ length: n }, (_, i) => i)
  if (s.temperature === 0 || s.topK === 1) return order.reduce((best, i) => (logits[i]! > logits[best]! ? i : best), 0)
  if (s.topK > 0 && s.topK < n) order = order.sort((a, b) => logits[b]! - logits[a]!).slice(0, s.topK)
  const max = Math.max(...order.map((i) => logits[i]!))
  const weights = order.map((i) => Math.exp((logits[i]! - max) / s.temperature))
  let u = random() * weights.reduce((a, b) => a + b, 0)
  for (let j = 0; j < order.length; j++) {
    u -= weights[j]!
    if (u <= 0) return order[j]!
  }
  return order[order.length - 1]!
}

export interface GenerateStats {
  readonly promptTokens: number
  readonly generatedTokens: number
  readonly prefillSeconds: number
  readonly decodeSeconds: number
  /** Compression realised on the prompt (tokens / concepts), for ConceptMoE. */
  readonly promptCompression: number | undefined
  /** Compression over prompt and generated text. */
  readonly totalCompression: number | undefined
  /** Bytes held by the KV caches at the end. */
  readonly cacheBytes: number
  /** Why generation stopped. */
  readonly stop: "max-tokens" | "context"
}

/**
 * Generates after `prompt`, calling `emit` with each newly decodable piece of text. Stops after
 * `maxTokens` or at the model's context length.
 */
export const generate = (
  model: LoadedModel,
  low: Lowered,
  tokenizer: Tokenizer,
  prompt: string,
  settings: SamplingSettings,
  emit: (text: string) => void
): Effect.Effect<GenerateStats, GenerateError | RunFailure> =>
  Effect.gen(function*() {
    const ids = yield* promptIds(model, tokenizer, prompt)
    return yield* attemptPromise(async () => {
      const s = session(low, { rows: 1, maxLength: model.contextLength })
      // the session's KV caches are released on every exit: done, a failed step, or a throwing `emit`
      try {
        return await decodeAfter(model, s, low, tokenizer, ids, settings, emit)
      } finally {
        s.dispose()
      }
    })
  })

/** The prefill of `ids` and the decode loop of {@link generate}, in session `s` (which the caller releases). */
const decodeAfter = async (
  model: LoadedModel,
  s: Session,
  low: Lowered,
  tokenizer: Tokenizer,
  ids: Int32Array,
  settings: SamplingSettings,
  emit: (text: string) => void
): Promise<GenerateStats> => {
  // webgpu in Node reads only asynchronously: pieces that need host values go through feedAsync
  const sync = syncReads(low.tf)
  const feed = (next: Int32Array, n: number) => (sync ? s.feed(next, n) : s.feedAsync(next, n))
  const random = prng(settings.seed)
  const decoder = new TextDecoder("utf-8")
  const t0 = performance.now()
  let logits = sync ? s.prefill(ids, ids.length) : await s.prefillAsync(ids, ids.length)
  let prefillSeconds = 0
  let promptCompression: number | undefined
  let t1 = 0
  let generated = 0
  let stop: GenerateStats["stop"] = "max-tokens"
  try {
    let row = (await logits.data()) as Float32Array
    prefillSeconds = (performance.now() - t0) / 1000
    promptCompression = s.compression.concepts > 0 ? s.compression.tokens / s.compression.concepts : undefined
    t1 = performance.now()
    while (generated < settings.maxTokens) {
      const next = sample(row, settings, random)
      generated++
      // byte tokens: emit only complete UTF-8 characters
      emit(tokenizer.name === "bytes" ? decoder.decode(Uint8Array.of(next), { stream: true }) : tokenizer.decode([next]))
      if (generated === settings.maxTokens) break
      if (s.length >= model.contextLength) {
        stop = "context"
        break
      }
      logits.dispose()
      logits = await feed(Int32Array.of(next), 1)
      row = (await logits.data()) as Float32Array
    }
    if (tokenizer.name === "bytes") emit(decoder.decode())
  } finally {
    logits.dispose()
  }
  return {
    promptTokens: ids.length,
    generatedTokens: generated,
    prefillSeconds,
    decodeSeconds: (performance.now() - t1) / 1000,
    promptCompression,
    totalCompression: s.compression.concepts > 0 ? s.compression.tokens / s.compression.concepts : undefined,
    cacheBytes: s.cacheBytes().total,
    stop
  }
}
