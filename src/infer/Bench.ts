/**
 * The inference benchmark: prefill time over prompt lengths and per-token decode time over KV
 * lengths, for a MoE baseline and its `Matched` ConceptMoE variants, measured in one process with
 * the models alternating, next to the speedup our static cost model predicts for the same lengths.
 *
 * Boundaries are forced to the target ratio (every R-th token, staggered across rows, so rows emit
 * concepts at different steps) and labelled `forced`: the variants are untrained, and random
 * boundaries would not hold R. Each measurement prefills a `rows`-row batch of L tokens in pieces
 * (`chunk` tokens) through the KV caches (the prefill time), then times `decodeSteps` single-token
 * steps of the same batch (the decode time at KV length L). Models alternate in rotating order.
 *
 * Predicted time ∝ weight-matmul FLOPs + attention-map FLOPs (causal pairs), from the analysis:
 * prefill of L tokens: F·L + Σ 2·H·(d_qk + d_v)·pairs(rate·L) per attention pass; one decode step
 * at KV length L: F + Σ rate·2·H·(d_qk + d_v)·min(rate·L, window) (a concept layer runs on a fraction
 * `rate` of the steps, over rate·L keys).
 *
 * @since 0.2.0
 */
import { Effect } from "effect"
import * as Cost from "../cost/Cost.ts"
import type { Analysis } from "../graph/Analyze.ts"
import type { Tensor } from "../graph/Apply.ts"
import type { LoadedModel } from "../models/Load.ts"
import { modelFromJson } from "../models/Load.ts"
import { reallocate, type Strategy } from "../models/Reallocate.ts"
import { Tensors } from "../runtime/Backend.ts"
import { session } from "../runtime/Decode.ts"
import { type Lowered, materialize, release } from "../runtime/Lower.ts"
import * as Progress from "../internal/Progress.ts"

export interface BenchSettings {
  readonly ratios: ReadonlyArray<number>
  readonly strategies: ReadonlyArray<Strategy>
  readonly encoderLayers: number
  readonly decoderLayers: number
  /** Prompt lengths for prefill (and KV lengths for decode). */
  readonly lengths: ReadonlyArray<number>
  /** Rows of the batch (prefilled together, then decoded together). */
  readonly rows: number
  /** Decode steps timed at each KV length (after one untimed warm-up step). */
  readonly decodeSteps: number
  /** Repetitions of each measurement up to `repeatUpTo` tokens (the median is kept); longer lengths run once. */
  readonly repeats: number
  readonly repeatUpTo: number
  /** Prefill piece length. */
  readonly chunk: number
  readonly tolerance: number
}

export interface BenchRow {
  readonly model: string
  readonly baseline: string
  readonly ratio: number
  readonly strategy: Strategy
  readonly phase: "prefill" | "decode"
  readonly length: number
  readonly rows: number
  /** Milliseconds: a whole prefill, or one decode step. */
  readonly msBaseline: number
  readonly msConcept: number
  readonly speedupMeasured: number
  readonly speedupPredicted: number
  /** Share of the baseline's predicted FLOPs spent in the attention map at this length. */
  readonly attentionShare: number
  /** Compression measured by the concept stages during this measurement. */
  readonly compression: number
  readonly boundaries: "forced"
}

export interface CacheRow {
  readonly model: string
  readonly length: number
  readonly rows: number
  /** Bytes holding entries (float32), by part of the model. */
  readonly encoder: number
  readonly conceptModel: number
  readonly decoder: number
  readonly total: number
  readonly allocated: number
}

export interface BenchResult {
  readonly backend: string
  readonly settings: BenchSettings
  readonly models: ReadonlyArray<{ readonly name: string; readonly ratio: number | null; readonly strategy: Strategy | null; readonly params: number; readonly flopsPerToken: number }>
  readonly rows: ReadonlyArray<BenchRow>
  readonly caches: ReadonlyArray<CacheRow>
}

/** Predicted FLOPs of a prefill of `length` tokens (one row). */
export const prefillFlops = (a: Analysis, length: number): number =>
  Cost.matmulPerToken(a.cost) * length + Cost.attentionMapFlops(a.cost, length, true)

/** Predicted FLOPs of one decode step at KV length `length` (one row, averaged over steps). */
export const decodeFlops = (a: Analysis, length: number): number => {
  let map = 0
  for (const t of a.cost.attention) map += t.passes * t.rate * 2 * t.heads * (t.dQK + t.dV) * Math.min(t.rate * length, t.window ?? Infinity)
  return Cost.matmulPerToken(a.cost) + map
}

/** The attention-map part of the predicted FLOPs. */
const attentionShare = (a: Analysis, phase: "prefill" | "decode", length: number) => {
  const total = phase === "prefill" ? prefillFlops(a, length) : decodeFlops(a, length)
  return (total - (phase === "prefill" ? Cost.matmulPerToken(a.cost) * length : Cost.matmulPerToken(a.cost))) / total
}

/** Boundary every R-th token, with a per-row phase so rows emit concepts at different steps. */
export const forcedEvery = (ratio: number) => (row: number, position: number): boolean => {
  const shifted = position + row
  return Math.floor(shifted / ratio) !== Math.floor((shifted - 1) / ratio)
}

const median = (xs: ReadonlyArray<number>) => {
  const s = [...xs].sort((a, b) => a - b)
  return s.length % 2 === 1 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2
}

/** Deterministic token ids (the model is untrained; only the shapes matter for speed). */
const tokens = (rows: number, length: number, vocab: number, salt: number) =>
  new Int32Array(rows * length).map((_, i) => (i * 31 + salt * 17 + ((i * i) % 97)) % vocab)

interface Contender {
  readonly model: LoadedModel
  readonly low: Lowered
  readonly ratio: number | null
  readonly strategy: Strategy | null
}

/** Part of the model a cache scope belongs to. */
const partOf = (scope: string, baseline: boolean, encoderLayers: number, layers: number, decoderLayers: number): "encoder" | "conceptModel" | "decoder" => {
  if (!baseline) return scope.startsWith("encoder/") ? "encoder" : scope.startsWith("concept/") ? "conceptModel" : "decoder"
  const layer = Number(/^layers\/(\d+)\//.exec(scope)?.[1] ?? "0")
  return layer < encoderLayers ? "encoder" : layer >= layers - decoderLayers ? "decoder" : "conceptModel"
}

/**
 * One measurement: a prefill of `length` tokens per row, then `decodeSteps` timed single-token steps.
 * Each phase ends with a read of its last logits, so the time includes the device's work (webgpu
 * runs asynchronously; on cpu and wasm the read is immediate).
 */
const measure = async (c: Contender, settings: BenchSettings, length: number, vocab: number) => {
  const rows = settings.rows
  const s = session(c.low, { rows, ...(c.ratio === null ? {} : { forcedBoundary: forcedEvery(c.ratio) }) })
  const ids = tokens(rows, length, vocab, 1)
  // with imposed boundaries nothing is read back while decoding: feed runs on every backend
  const done = async (t: Tensor) => {
    await t.data()
    t.dispose()
  }
  const t0 = performance.now()
  await done(s.prefill(ids, length, settings.chunk))
  const prefillMs = performance.now() - t0
  const afterPrefill = { ...s.compression }
  await done(s.feed(tokens(rows, 1, vocab, 2), 1))
  const before = { ...s.compression }
  const t1 = performance.now()
  let last: Tensor | undefined
  for (let i = 0; i < settings.decodeSteps; i++) {
    last?.dispose()
    last = s.feed(tokens(rows, 1, vocab, 3 + i), 1)
  }
  if (last !== undefined) await done(last)
  const decodeMs = (performance.now() - t1) / settings.decodeSteps
  const ratio = (tokens: number, concepts: number) => (concepts > 0 ? tokens / concepts : 1)
  const out = {
    prefill: { ms: prefillMs, compression: ratio(afterPrefill.tokens, afterPrefill.concepts) },
    decode: { ms: decodeMs, compression: ratio(s.compression.tokens - before.tokens, s.compression.concepts - before.concepts) },
    bytes: s.cacheBytes()
  }
  s.dispose()
  return out
}

/**
 * Runs the benchmark on the current backend. Its progress goes through Effect's logger
 * (`internal/Progress.ts`): a line per measured row, and a tick per measurement (on the command
 * line's terminal, a bar with the time left); `quiet`: neither.
 */
export const run = (baseline: LoadedModel, baselineJson: unknown, settings: BenchSettings, options: { readonly quiet?: boolean } = {}) =>
  Effect.gen(function*() {
    const log = (line: string) => (options.quiet === true ? Effect.void : Progress.line(line))
    const { tf, description } = yield* Tensors
    if (baseline.decoder === undefined) return yield* Effect.die(new Error("the baseline must be a decoder config"))
    const vocab = baseline.decoder.vocab
    const contenders: Array<Contender> = [{ model: baseline, low: materialize(tf, baseline.analysis, 0), ratio: null, strategy: null }]
    for (const strategy of settings.strategies) {
      for (const ratio of settings.ratios) {
        const [best] = yield* reallocate(baseline.decoder, baseline.analysis, {
          ratio,
          strategy,
          tolerance: settings.tolerance,
          encoderLayers: settings.encoderLayers,
          decoderLayers: settings.decoderLayers,
          limit: 1
        })
        const { ratio: r, ...rest } = best!.spec
        const model = yield* modelFromJson({ kind: "conceptmoe", name: best!.name, baseline: baselineJson, ratio: r, ...rest }, baseline.file)
        contenders.push({ model, low: materialize(tf, model.analysis, 0), ratio, strategy })
      }
    }
    const maxLength = Math.max(...settings.lengths)
    for (const c of contenders) {
      if (c.model.contextLength < maxLength + settings.decodeSteps + 1) {
        yield* log(`note: ${c.model.name} has context ${c.model.contextLength}; measuring up to ${maxLength + settings.decodeSteps + 1} positions (rotary positions extrapolate)`)
        break
      }
    }
    // warm-up: every model once at the shortest length (kernel setup, JIT), untimed
    const shortest = Math.min(...settings.lengths)
    for (const c of contenders) yield* Effect.promise(() => measure(c, { ...settings, decodeSteps: 2 }, shortest, vocab))
    const rows: Array<BenchRow> = []
    const caches: Array<CacheRow> = []
    const layers = baseline.decoder.layers.length
    const measurements = settings.lengths.reduce((n, length) => n + (length <= settings.repeatUpTo ? settings.repeats : 1) * contenders.length, 0)
    let measured = 0
    for (const length of settings.lengths) {
      const times = { prefill: contenders.map(() => [] as Array<number>), decode: contenders.map(() => [] as Array<number>) }
      const compression = { prefill: contenders.map(() => 1), decode: contenders.map(() => 1) }
      const repeats = length <= settings.repeatUpTo ? settings.repeats : 1
      for (let rep = 0; rep < repeats; rep++) {
        // alternate: every model once per repetition, in rotating order
        for (let j = 0; j < contenders.length; j++) {
          const i = (j + rep) % contenders.length
          const c = contenders[i]!
          const m = yield* Effect.promise(() => measure(c, settings, length, vocab))
          if (options.quiet !== true) yield* Progress.tick(`bench ${baseline.name}`, ++measured, measurements)
          for (const phase of ["prefill", "decode"] as const) {
            times[phase][i]!.push(m[phase].ms)
            compression[phase][i] = m[phase].compression
          }
          if (rep === 0) {
            const parts = { encoder: 0, conceptModel: 0, decoder: 0 }
            for (const [scope, b] of m.bytes.byScope) parts[partOf(scope, c.ratio === null, settings.encoderLayers, layers, settings.decoderLayers)] += b.used
            caches.push({ model: c.model.name, length: length + settings.decodeSteps + 1, rows: settings.rows, ...parts, total: m.bytes.used, allocated: m.bytes.total })
          }
        }
      }
      const lines: Array<string> = []
      for (const phase of ["prefill", "decode"] as const) {
        const base = median(times[phase][0]!)
        contenders.forEach((c, i) => {
          if (i === 0) return
          const ms = median(times[phase][i]!)
          const flops = phase === "prefill" ? prefillFlops : decodeFlops
          const row: BenchRow = {
            model: c.model.name,
            baseline: baseline.name,
            ratio: c.ratio!,
            strategy: c.strategy!,
            phase,
            length,
            rows: settings.rows,
            msBaseline: base,
            msConcept: ms,
            speedupMeasured: base / ms - 1,
            speedupPredicted: flops(baseline.analysis, length) / flops(c.model.analysis, length) - 1,
            attentionShare: attentionShare(baseline.analysis, phase, length),
            compression: compression[phase][i]!,
            boundaries: "forced"
          }
          rows.push(row)
          lines.push(
            `${phase.padEnd(7)} L=${String(length).padStart(5)}  ${c.model.name.padEnd(16)} ${ms.toFixed(1).padStart(9)} ms vs ${base.toFixed(1).padStart(9)} ms  ` +
              `speedup ${(row.speedupMeasured * 100).toFixed(1).padStart(6)}% (predicted ${(row.speedupPredicted * 100).toFixed(1).padStart(6)}%)  R ${row.compression.toFixed(2)}`
          )
        })
      }
      for (const line of lines) yield* log(line)
    }
    const models = contenders.map((c) => ({
      name: c.model.name,
      ratio: c.ratio,
      strategy: c.strategy,
      params: c.model.analysis.rows[0]!.params,
      flopsPerToken: Cost.matmulPerToken(c.model.analysis.cost)
    }))
    for (const c of contenders) release(c.low)
    return { backend: description, settings, models, rows, caches } satisfies BenchResult
  })
