/**
 * Continual-training conversion (paper §4.3): a trained MoE checkpoint becomes a ConceptMoE
 * checkpoint that `train --resume` continues.
 *
 * - The source's L layers split into an encoder (the first `encoderLayers`), a concept model and a
 *   decoder (the last `decoderLayers`); every trained weight is copied to its new path.
 * - New parameters take their declared init: the chunk module's q/k the identity, the decoder's
 *   joint-decoding projections W_q^c, W_k^c, W_v^c zeros (the paper's CT init).
 * - The compute freed by running the concept model on ~N/R concepts goes to more activated experts
 *   (`topk`) or more experts and looped layers (`loop`), as the solver (`Reallocate.ts`) chooses, so
 *   that the result is `Matched` with its source. The match uses the paper's convention (chunk module
 *   and joint decoding left out of both budgets): with them counted, something trained would have to
 *   be cut to pay for their parameters (fewer or narrower experts), so the solver's expert lever is
 *   off here. The residual with every part counted is reported beside it.
 * - `exact`: top-k unchanged, nothing looped (not matched: it spends less): at ramp position 0 its
 *   logits are the source's.
 * - The converted config has `rampSteps`: training ramps s from 0 to 1 over them
 *   (`ConceptOps.ramp` in blocks/ConceptContext.ts). At s the chunk module floors p at 1 − s·(1 − p) and aims at
 *   R_s = 1 + s·(R − 1), and the dechunk gets ĉ − (1 − s)·c (c the concept model's input). At s = 0
 *   every token is a boundary, the EMA is the identity, and the decoder input is ĥ + (ĉ − ĥ) = ĉ: the
 *   source's residual stream, where the paper's z = ĥ + ĉ would count ĥ twice. From s = 1 on it is the
 *   paper's model.
 * - Optimizer state: the step count restarts at 0 with the run's own warm-up, and every Adam moment
 *   is zero, the copied parameters' too (moments carried over with a restarted step count would be
 *   inflated by the bias correction 1/(1 − βᵗ)).
 *
 * @since 0.4.0
 */
import { Effect, Path, Result, Schema } from "effect"
import { checkpointFiles, readChecked, type TensorData } from "./Checkpoint.ts"
import { commit, ensureDir } from "./RunDir.ts"
import { budgetOf, relative } from "../cost/Budget.ts"
import type { Matched } from "../cost/Budget.ts"
import { type LoadedModel, modelFromJson } from "../models/Load.ts"
import { buildConceptMoE, type ConceptSpec } from "../models/ConceptMoE.ts"
import { type InvalidReallocation, type NoReallocation, reallocate } from "../models/Reallocate.ts"

/** A conversion that cannot be done: the field or file at fault and why. */
export class ConvertError extends Schema.TaggedError<ConvertError>()("ConvertError", {
  field: Schema.String,
  message: Schema.String
}) {}

export interface ConvertOptions {
  readonly ratio: number
  readonly strategy: "topk" | "loop"
  readonly encoderLayers?: number
  readonly decoderLayers?: number
  /** Top-k unchanged and nothing looped: at ramp 0 the logits are the source's (not matched). */
  readonly exact?: boolean
  /** Steps over which the ramp goes from the source's function to the target R (default 100). */
  readonly rampSteps?: number
  /** Merge of the converted model (default `last`, the paper's for CT). */
  readonly merge?: "sum" | "last"
  /** Relative tolerance of the match (default 0.01). */
  readonly tolerance?: number
  /** Name of the converted model (default `<source>-ct-R<R>`). */
  readonly name?: string
}

export interface Conversion {
  /** The converted model's config, self-contained (the source config inline as its baseline). */
  readonly config: Record<string, unknown>
  readonly model: LoadedModel
  /** The proof of the match (paper's convention), or undefined for `exact`. */
  readonly matched: Matched | undefined
  /** Relative differences from the source in params and matmul FLOPs/token, both conventions. */
  readonly budget: {
    readonly paper: { readonly params: number; readonly flops: number }
    readonly all: { readonly params: number; readonly flops: number }
  }
}

/**
 * The converted model for a source model: the concept spec (the solver's best candidate, or the
 * exact one) and its config.
 */
export const convertModel = (
  source: LoadedModel,
  options: ConvertOptions
): Effect.Effect<Conversion, ConvertError | InvalidReallocation | NoReallocation> =>
  Effect.gen(function*() {
    const base = source.decoder
    if (base === undefined || source.concept !== undefined) {
      return yield* new ConvertError({ field: "checkpoint", message: `the source must be a dense-layer MoE (a decoder config), got ${source.format}` })
    }
    if (!base.layers.some((l) => l.ffn.kind === "moe")) {
      return yield* new ConvertError({ field: "checkpoint", message: `the source ${source.name} has no MoE layer: there are no experts to reallocate` })
    }
    const L = base.layers.length
    const encoderLayers = options.encoderLayers ?? Math.max(1, Math.floor(L / 4))
    const decoderLayers = options.decoderLayers ?? Math.max(1, Math.floor(L / 4))
    const merge = options.merge ?? "last"
    const rampSteps = options.rampSteps ?? 100
    if (!Number.isInteger(rampSteps) || rampSteps < 1) {
      return yield* new ConvertError({ field: "ramp-steps", message: `expected a whole number of steps ≥ 1, got ${rampSteps}` })
    }
    let spec: ConceptSpec
    let matched: Matched | undefined
    if (options.exact === true) {
      spec = { ratio: options.ratio, encoderLayers, decoderLayers, merge, tau: 6, lambda: 0.03, jointDecoding: true, loopLayers: 0, loopTimes: 2 }
      if (!(options.ratio > 1)) return yield* new ConvertError({ field: "ratio", message: `the compression ratio R must exceed 1, got ${options.ratio}` })
      const built = buildConceptMoE(base, spec)
      if (Result.isFailure(built)) return yield* new ConvertError({ field: built.failure.field, message: built.failure.message })
    } else {
      const candidates = yield* reallocate(base, source.analysis, {
        ratio: options.ratio,
        strategy: options.strategy,
        tolerance: options.tolerance ?? 0.01,
        overheads: "exclude",
        encoderLayers,
        decoderLayers,
        merge,
        expertLever: false,
        limit: 1
      })
      spec = candidates[0]!.spec
      matched = candidates[0]!.matched
    }
    const name = options.name ?? `${source.name}-ct-R${Number(options.ratio.toFixed(2))}${options.exact === true ? "-exact" : ""}`
    const { ratioControl: _rc, kp: _kp, ki: _ki, ...rest } = spec
    const config: Record<string, unknown> = {
      kind: "conceptmoe",
      name,
      baseline: source.config,
      ...rest,
      ...(spec.ratioControl === undefined ? {} : { ratioControl: spec.ratioControl }),
      rampSteps
    }
    const model = yield* modelFromJson(config, `${name}.json`).pipe(
      Effect.mapError((e) => new ConvertError({ field: "config", message: `the converted config does not load: ${e.message}` }))
    )
    const budgetAt = (exclude: ReadonlyArray<string>) => {
      const a = budgetOf(source.analysis, exclude)
      const b = budgetOf(model.analysis, exclude)
      return { params: relative(a.params, b.params), flops: relative(a.matmulPerToken, b.matmulPerToken) }
    }
    return { config, model, matched, budget: { paper: budgetAt(["chunk", "jointDecoding"]), all: budgetAt([]) } }
  })

/**
 * The source parameter a converted parameter is copied from, or undefined for a new one (the chunk
 * module, the joint-decoding projections).
 */
export const sourcePath = (path: string, layers: number, encoderLayers: number, decoderLayers: number): string | undefined => {
  if (path.startsWith("concept/chunk/") || /^decoder\/\d+\/mixer\/attn\/[qkv]c\.weight$/.test(path)) return undefined
  const m = /^(encoder|concept\/model(?:\/loop)?|decoder)\/(\d+)\/(.*)$/.exec(path)
  if (m === null) return path
  const i = Number(m[2])
  const at = m[1] === "encoder" ? i : m[1] === "decoder" ? layers - decoderLayers + i : encoderLayers + i
  return `layers/${at}/${m[3]}`
}

/** A new parameter's initial value from its declared init (identity, zeros or ones). */
const initial = (shape: ReadonlyArray<number>, init: string | undefined, path: string): Result.Result<TensorData, ConvertError> => {
  const n = shape.reduce((a, b) => a * b, 1)
  const data = new Float32Array(n)
  if (init === "zeros") return Result.succeed({ shape, data })
  if (init === "ones") return Result.succeed({ shape, data: data.fill(1) })
  if (init === "identity" && shape.length === 2 && shape[0] === shape[1]) {
    for (let i = 0; i < shape[0]!; i++) data[i * shape[0]! + i] = 1
    return Result.succeed({ shape, data })
  }
  return Result.fail(new ConvertError({ field: "checkpoint", message: `new parameter ${path} has init ${init ?? "random"}: a conversion adds only identity- or zero-initialised parameters` }))
}

/**
 * The converted checkpoint's tensors: `param/…` (copied from the source's `param/…`, or the new
 * parameters' init), `adam.m/…` and `adam.v/…` zero.
 */
export const convertTensors = (
  source: LoadedModel,
  target: LoadedModel,
  tensors: ReadonlyMap<string, TensorData>,
  file: string
): Effect.Effect<Map<string, TensorData>, ConvertError> =>
  Effect.gen(function*() {
    const c = target.concept
    if (c === undefined) return yield* new ConvertError({ field: "config", message: "the converted model is not a ConceptMoE" })
    const L = c.layout.baselineLayers
    const E = c.layout.encoder[1]
    const D = c.layout.decoder[1] - c.layout.decoder[0]
    const sourceShapes = new Map(source.analysis.params.map((p) => [p.path, p.shape] as const))
    const out = new Map<string, TensorData>()
    const used = new Set<string>()
    for (const p of target.analysis.params) {
      if (p.tiedTo !== undefined) continue
      const from = sourcePath(p.path, L, E, D)
      let value: TensorData
      if (from === undefined) {
        const r = initial(p.shape, typeof p.init === "string" ? p.init : undefined, p.path)
        if (Result.isFailure(r)) return yield* r.failure
        value = r.success
      } else {
        const t = tensors.get(`param/${from}`)
        if (t === undefined || !sourceShapes.has(from)) {
          return yield* new ConvertError({ field: "checkpoint", message: `${file} has no tensor param/${from} for ${p.path}: it was not written by this source model` })
        }
        if (t.shape.join(",") !== p.shape.join(",")) {
          return yield* new ConvertError({ field: "checkpoint", message: `${file}: param/${from} has shape [${t.shape}], ${p.path} needs [${p.shape}]` })
        }
        used.add(from)
        value = t
      }
      out.set(`param/${p.path}`, value)
      out.set(`adam.m/${p.path}`, { shape: p.shape, data: new Float32Array(value.data.length) })
      out.set(`adam.v/${p.path}`, { shape: p.shape, data: new Float32Array(value.data.length) })
    }
    const dropped = source.analysis.params.filter((p) => !used.has(p.path) && !p.tiedTo)
    if (dropped.length > 0) {
      return yield* new ConvertError({ field: "checkpoint", message: `the conversion would drop trained parameters (${dropped.map((p) => p.path).slice(0, 3).join(", ")}…)` })
    }
    return out
  })

/** What {@link convertRun} wrote. */
export interface ConvertedRun extends Conversion {
  readonly source: { readonly name: string; readonly step: number; readonly checkpoint: string }
  /** The run directory's files: checkpoint, model config, training config. */
  readonly files: { readonly checkpoint: string; readonly model: string; readonly train: string }
  /** The command that continues it. */
  readonly continueWith: string
}

/**
 * Converts the checkpoint of an MoE run directory (`conceptmoe train`) into a new run directory
 * `out`: `checkpoint.safetensors` (step 0, the converted weights, zero Adam moments), `model.json`
 * (the converted config) and `train.json` (the source run's settings, `steps` replaced when given,
 * with `model: "model.json"`), which `conceptmoe train --config <out>/train.json --out <out>
 * --resume` continues. Files are written atomically (temporary file, fsync, rename).
 */
export const convertRun = (checkpointDir: string, out: string, options: ConvertOptions & { readonly steps?: number }) =>
  Effect.gen(function*() {
    const path = yield* Path.Path
    const file = path.join(checkpointDir, "checkpoint.safetensors")
    // the model, and the run's settings from its optimizer file when there
    const ck = yield* readChecked(file, { optimizer: "optional" })
    if (ck.metadata.config === undefined) {
      return yield* new ConvertError({ field: "checkpoint", message: `${file} records no model config (metadata "config"): it was not written by conceptmoe train` })
    }
    const source = yield* modelFromJson(ck.metadata.config, `${file} (metadata "config")`).pipe(
      Effect.mapError((e) => new ConvertError({ field: "checkpoint", message: `${file}: metadata "config" is not a model config: ${e.message}` }))
    )
    const conversion = yield* convertModel(source, options)
    const tensors = yield* convertTensors(source, conversion.model, ck.tensors, file)
    const settings = typeof ck.metadata.settings === "object" && ck.metadata.settings !== null ? ck.metadata.settings as Record<string, unknown> : {}
    const train = { model: "model.json", ...settings, ...(options.steps === undefined ? {} : { steps: options.steps }) }
    const files = { checkpoint: path.join(out, "checkpoint.safetensors"), model: path.join(out, "model.json"), train: path.join(out, "train.json") }
    const converted = {
      source: source.name,
      sourceCheckpoint: file,
      sourceStep: ck.metadata.step,
      ratio: options.ratio,
      strategy: options.exact === true ? "exact" : options.strategy,
      budget: conversion.budget
    }
    const metadata: Record<string, string> = {
      format: "conceptmoe/v1",
      step: "0",
      model: conversion.model.name,
      config: JSON.stringify(conversion.config),
      settings: JSON.stringify({ ...settings, ...(options.steps === undefined ? {} : { steps: options.steps }) }),
      converted: JSON.stringify(converted)
    }
    yield* ensureDir(out)
    // the configs first, the checkpoint last: a run directory with a checkpoint is complete
    yield* commit([
      { file: files.model, bytes: JSON.stringify(conversion.config, null, 2) + "\n" },
      { file: files.train, bytes: JSON.stringify(train, null, 2) + "\n" },
      ...checkpointFiles(conversion.model, files.checkpoint, tensors, metadata)
    ])
    return {
      ...conversion,
      source: { name: source.name, step: ck.metadata.step, checkpoint: file },
      files,
      continueWith: `conceptmoe train --config ${files.train} --out ${out} --resume`
    } satisfies ConvertedRun
  })
