/**
 * The inference benchmark: prefill time over prompt lengths and per-token decode time over KV
 * lengths, for a MoE baseline and its `Matched` ConceptMoE variants, measured in one process with
 * the models alternating, next to the speedup our static cost model predicts for the same lengths.
 *
 * Boundaries are forced to the target ratio (every R-th token, staggered across rows, so rows emit
 * concepts at different steps) and labelled `forced`: the variants are untrained, and random
 * boundaries would not hold R. Each measurement prefills a `rows`-row batch of L tokens in pieces
 * (`chunk` tokens) through the KV caches (the prefill time), then times `decodeSteps` single-token
 * steps of the same batch (the decode time at KV length L: the mean step). Models alternate in rotating order.
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
  /** Decode steps timed at each KV length (after one untimed warm-up step); their mean is kept. */
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
  /** (1 + measured speedup) / (1 + predicted): the measured time ratio over the FLOP prediction's. */
  readonly timeRatio: number
  /** Predicted FLOPs of the phase, all rows: a whole prefill, or one decode step. */
  readonly flopsBaseline: number
  readonly flopsConcept: number
  /** tfjs kernels the phase ran: a whole prefill, or one decode step (mean of the timed steps). */
  readonly kernelsBaseline: number
  readonly kernelsConcept: number
  /** The time model's milliseconds (see {@link timeModel}) and the speedup it predicts. */
  readonly msModelBaseline: number
  readonly msModelConcept: number
  readonly speedupTimeModel: number
  /** (1 + measured speedup) / (1 + the time model's). */
  readonly timeRatioModel: number
}

/**
 * The time model's constants, measured on this machine by {@link calibrate} before the models run:
 * milliseconds per FLOP of a prefill's products (hundreds of rows) and of a decode step's (1–2
 * rows per product), and microseconds per kernel: `usPerKernel`, the model's b, from decode steps
 * of a probe model that is not benchmarked (a tiny dense decoder, whose steps are all kernels and
 * the host work around them), and `usPerTinyKernel`, the cost of a tiny kernel alone (for
 * comparison: the host work of a block's apply comes on top of it).
 */
export interface Calibration {
  readonly msPerGflopPrefill: number
  readonly msPerGflopDecode: number
  readonly usPerKernel: number
  readonly usPerTinyKernel: number
}

/** The probe model of {@link calibrate}'s cost per kernel: a decoder far smaller than any benchmarked, its FLOPs negligible. */
export const probeConfig = { kind: "dense", name: "calibration-probe", vocab: 256, hidden: 32, layers: 2, heads: 2, ffnHidden: 64, activation: "gelu", contextLength: 256 } as const

/** Predicted milliseconds of a phase: a·FLOPs + b·kernels, with a the phase's ms per FLOP and b the ms per kernel. */
export const timeModel = (c: Calibration, phase: "prefill" | "decode", flops: number, kernels: number): number =>
  ((phase === "prefill" ? c.msPerGflopPrefill : c.msPerGflopDecode) * flops) / 1e9 + (c.usPerKernel * kernels) / 1000

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
  readonly calibration: Calibration
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
export const tokens = (rows: number, length: number, vocab: number, salt: number) =>
  new Int32Array(rows * length).map((_, i) => (i * 31 + salt * 17 + ((i * i) % 97)) % vocab)

export interface Contender {
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
 * Counts the kernels tfjs's engine runs from now until `stop` (registered kernels, those run inside
 * other kernels and custom gradients included; the custom-gradient scopes themselves not).
 */
export const kernelCounter = (tf: Lowered["tf"]) => {
  const engine = tf.engine() as unknown as { runKernelFunc: (p: { readonly kernelName?: string }) => unknown }
  const own = Object.prototype.hasOwnProperty.call(engine, "runKernelFunc")
  const original = engine.runKernelFunc
  const counter = { count: 0, stop: () => {} }
  engine.runKernelFunc = function(this: unknown, p: { readonly kernelName?: string }) {
    if (p.kernelName != null) counter.count++
    return original.call(this, p)
  }
  counter.stop = () => {
    if (own) engine.runKernelFunc = original
    else delete (engine as { runKernelFunc?: unknown }).runKernelFunc
  }
  return counter
}

/** Milliseconds per call of `f` (its result disposed), after one untimed call. */
const timeOf = (f: () => { dispose(): void }, n: number) => {
  f().dispose()
  const t = performance.now()
  for (let i = 0; i < n; i++) f().dispose()
  return (performance.now() - t) / n
}

/**
 * Measures the time model's constants on the current backend with generic products and tiny
 * kernels (never the benchmarked models): per FLOP, a 2-D product and the two batched products of
 * attention at 512 rows (prefill) and at 1–2 rows (decode), 2,048 keys; per kernel, a cycle of
 * tiny element-wise, reshape, slice and concat kernels on `[2, 128]` tensors (a decode step's
 * activations), the median of 7 timings after 3 untimed.
 */
export const calibrate = async (tf: Lowered["tf"], probe: Contender, settings: BenchSettings): Promise<Calibration> => {
  const perGflop = (rows: number, batchRows: number) => {
    const a = tf.randomNormal([rows, 128]), w = tf.randomNormal([128, 512])
    const q = tf.randomNormal([8, batchRows, 32]), k = tf.randomNormal([8, 32, 2048]), p = tf.randomNormal([8, batchRows, 2048]), v = tf.randomNormal([8, 2048, 32])
    const n = rows > 2 ? 4 : 40
    const ms = timeOf(() => tf.matMul(a, w), n) + timeOf(() => tf.matMul(q, k), n) + timeOf(() => tf.matMul(p, v), n)
    const flops = 2 * rows * 128 * 512 + 2 * 2 * 8 * batchRows * 32 * 2048
    for (const t of [a, w, q, k, p, v]) t.dispose()
    return (ms / flops) * 1e9
  }
  const x = tf.randomNormal([2, 128])
  const cycle = 100
  // add, mul, sigmoid, 2 slices, concat, reshape
  const pass = () =>
    tf.tidy(() => {
      let y = x
      for (let i = 0; i < cycle; i++) {
        const z = tf.sigmoid(tf.mul(tf.add(y, x), x))
        y = tf.reshape(tf.concat([tf.slice(z, [0, 0], [2, 64]), tf.slice(z, [0, 64], [2, 64])], 1), [2, 128])
      }
      return y
    })
  // 3 untimed (the JIT), then the median of 7 (garbage collection and the other processes of a shared machine move single runs)
  const ms = median(Array.from({ length: 10 }, () => timeOf(pass, 3)).slice(3))
  // kernels counted as the models' are (a reshape on cpu, wasm and webgpu dispatches none: runtime/Fixes.ts, fix 16)
  const counter = kernelCounter(tf)
  try {
    pass().dispose()
  } finally {
    counter.stop()
  }
  x.dispose()
  const usPerTinyKernel = (ms * 1000) / counter.count
  const msPerGflopPrefill = perGflop(512, 256)
  const msPerGflopDecode = perGflop(2, 1)
  // b: the probe's decode steps at 64 positions, less their (tiny) FLOPs' time, per kernel; the median of 3
  const perKernel: Array<number> = []
  for (let i = 0; i < 4; i++) {
    const m = await measure(probe, { ...settings, decodeSteps: 16 }, 64, 256)
    const flopsMs = (msPerGflopDecode * settings.rows * decodeFlops(probe.model.analysis, 64)) / 1e9
    if (i > 0) perKernel.push(((m.decode.ms - flopsMs) * 1000) / m.decode.kernels)
  }
  return { msPerGflopPrefill, msPerGflopDecode, usPerKernel: median(perKernel), usPerTinyKernel }
}

/**
 * One measurement: a prefill of `length` tokens per row, then `decodeSteps` timed single-token steps
 * (their mean is kept). The prefill and each step end with a read of their last logits, so
 * the time includes the device's work (webgpu runs asynchronously; on cpu and wasm the read is
 * immediate).
 */
const measure = async (c: Contender, settings: BenchSettings, length: number, vocab: number) => {
  const rows = settings.rows
  const s = session(c.low, { rows, ...(c.ratio === null ? {} : { forcedBoundary: forcedEvery(c.ratio) }) })
  const ids = tokens(rows, length, vocab, 1)
  // with imposed boundaries a piece reads back at most the fitted dispatch's counts, on wasm, which reads synchronously: feed runs on every backend
  const done = async (t: Tensor) => {
    await t.data()
    t.dispose()
  }
  const counter = kernelCounter(c.low.tf)
  let prefillMs = 0, prefillKernels = 0, decodeMs = 0, decodeKernels = 0
  let afterPrefill = { ...s.compression }, before = { ...s.compression }
  try {
    const t0 = performance.now()
    await done(s.prefill(ids, length, settings.chunk))
    prefillMs = performance.now() - t0
    prefillKernels = counter.count
    afterPrefill = { ...s.compression }
    await done(s.feed(tokens(rows, 1, vocab, 2), 1))
    before = { ...s.compression }
    const beforeKernels = counter.count
    // each step read back (as generation reads its logits to sample); the mean step, since steps
    // differ by design (a concept model runs on the steps where a row closes a concept)
    const t1 = performance.now()
    for (let i = 0; i < settings.decodeSteps; i++) await done(s.feed(tokens(rows, 1, vocab, 3 + i), 1))
    decodeMs = (performance.now() - t1) / settings.decodeSteps
    decodeKernels = (counter.count - beforeKernels) / settings.decodeSteps
  } finally {
    counter.stop()
  }
  const ratio = (tokens: number, concepts: number) => (concepts > 0 ? tokens / concepts : 1)
  const out = {
    prefill: { ms: prefillMs, kernels: prefillKernels, compression: ratio(afterPrefill.tokens, afterPrefill.concepts) },
    decode: { ms: decodeMs, kernels: decodeKernels, compression: ratio(s.compression.tokens - before.tokens, s.compression.concepts - before.concepts) },
    bytes: s.cacheBytes()
  }
  s.dispose()
  return out
}

/**
 * The baseline (materialized) and, per strategy and ratio, the solver's best `Matched` ConceptMoE
 * variant of it (materialized), in that order.
 */
export const contendersOf = (baseline: LoadedModel, baselineJson: unknown, settings: Pick<BenchSettings, "ratios" | "strategies" | "tolerance" | "encoderLayers" | "decoderLayers">) =>
  Effect.gen(function*() {
    const { tf } = yield* Tensors
    if (baseline.decoder === undefined) return yield* Effect.die(new Error("the baseline must be a decoder config"))
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
    return contenders
  })

/**
 * Runs the benchmark on the current backend. Its progress goes through Effect's logger
 * (`internal/Progress.ts`): a line per measured row, and a tick per measurement (on the command
 * line's terminal, a bar with the time left); `quiet`: neither.
 */
export const run = (baseline: LoadedModel, baselineJson: unknown, settings: BenchSettings, options: { readonly quiet?: boolean } = {}) =>
  Effect.gen(function*() {
    const log = (line: string) => (options.quiet === true ? Effect.void : Progress.line(line))
    const { description } = yield* Tensors
    if (baseline.decoder === undefined) return yield* Effect.die(new Error("the baseline must be a decoder config"))
    const vocab = baseline.decoder.vocab
    const contenders = yield* contendersOf(baseline, baselineJson, settings)
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
    const probeModel = yield* modelFromJson(probeConfig, "(the time model's probe)")
    const probe: Contender = { model: probeModel, low: materialize(contenders[0]!.low.tf, probeModel.analysis, 0), ratio: null, strategy: null }
    const calibration = yield* Effect.promise(() => calibrate(contenders[0]!.low.tf, probe, settings)).pipe(Effect.ensuring(Effect.sync(() => release(probe.low))))
    const rows: Array<BenchRow> = []
    const caches: Array<CacheRow> = []
    const layers = baseline.decoder.layers.length
    const measurements = settings.lengths.reduce((n, length) => n + (length <= settings.repeatUpTo ? settings.repeats : 1) * contenders.length, 0)
    let measured = 0
    for (const length of settings.lengths) {
      const times = { prefill: contenders.map(() => [] as Array<number>), decode: contenders.map(() => [] as Array<number>) }
      const kernels = { prefill: contenders.map(() => 0), decode: contenders.map(() => 0) }
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
            kernels[phase][i] = m[phase].kernels
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
          const flopsBaseline = settings.rows * flops(baseline.analysis, length)
          const flopsConcept = settings.rows * flops(c.model.analysis, length)
          const msModelBaseline = timeModel(calibration, phase, flopsBaseline, kernels[phase][0]!)
          const msModelConcept = timeModel(calibration, phase, flopsConcept, kernels[phase][i]!)
          const speedupPredicted = flopsBaseline / flopsConcept - 1
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
            speedupPredicted,
            attentionShare: attentionShare(baseline.analysis, phase, length),
            compression: compression[phase][i]!,
            boundaries: "forced",
            timeRatio: base / ms / (1 + speedupPredicted),
            flopsBaseline,
            flopsConcept,
            kernelsBaseline: kernels[phase][0]!,
            kernelsConcept: kernels[phase][i]!,
            msModelBaseline,
            msModelConcept,
            speedupTimeModel: msModelBaseline / msModelConcept - 1,
            timeRatioModel: (base / ms) / (msModelBaseline / msModelConcept)
          }
          rows.push(row)
          lines.push(
            `${phase.padEnd(7)} L=${String(length).padStart(5)}  ${c.model.name.padEnd(16)} ${ms.toFixed(1).padStart(9)} ms vs ${base.toFixed(1).padStart(9)} ms  ` +
              `speedup ${(row.speedupMeasured * 100).toFixed(1).padStart(6)}% (predicted ${(row.speedupPredicted * 100).toFixed(1).padStart(6)}%, time model ${(row.speedupTimeModel * 100).toFixed(1).padStart(6)}%)  R ${row.compression.toFixed(2)}`
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
    return { backend: description, settings, models, rows, caches, calibration } satisfies BenchResult
  })
