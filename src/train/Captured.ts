/**
 * Training steps that are recorded once and replayed (`runtime/webgpu/Capture.ts`) on webgpu, for models
 * whose step reads nothing back to the host: dense and MoE models (routing stays on the device) and
 * ConceptMoE models with static shapes (`ConceptFeeds`: padded concept slots, boundaries on the
 * device); a model that still reads host values trains step by step through tfjs.
 *
 * Step 0 runs through tfjs (shaders compile); steps 1 and 2 run through tfjs while being recorded;
 * if the two recordings did the same work and uploaded the same bytes, the second replaces tfjs from
 * step 3 on: each step writes the batch and `[lr, c1, c2]` (and a ConceptMoE's draws and document
 * starts) into the feed tensors and re-encodes the recorded dispatches, submitted in command buffers
 * of `CONCEPTMOE_SUBMIT_EVERY` dispatches. Otherwise every step stays a tfjs step, and `mode` says
 * why. Results equal the eager steps' (tests/webgpu.test.ts).
 *
 * With `CONCEPTMOE_MATMUL=auto` (the default), the matmul products of step 0 are tuned before step 1
 * (`runtime/webgpu/MatMul.ts`): step 0 runs tfjs's kernel, later steps the fastest that agrees with it.
 *
 * @since 0.3.0
 */
import type { Tensor } from "../graph/Apply.ts"
import { type Captured, capture, difference, NotCapturable, type StepProfile, writeFeeds } from "../runtime/webgpu/Capture.ts"
import { type Batch, conceptFeedValues, type Feeds, feedValues, type Lowered, mixSeed, recordReads } from "../runtime/Lower.ts"
import type { ConceptFeeds } from "../blocks/ConceptContext.ts"
import { conceptSlots } from "../blocks/Chunker.ts"
import { describeTuning, type TuneRow, tuneMatMuls, watchProducts } from "../runtime/webgpu/MatMul.ts"
import { settingsOf } from "../runtime/Env.ts"
import { betasOf, failOnGpuErrors, type Optimizer, packStats, type PassOptions, readStats, stepInputValues, stepOnDevice, stepOptions, type StepResult, trainStepAsync, type TrainSettings } from "./Step.ts"

export type Mode =
  | { readonly mode: "warming" }
  | { readonly mode: "replay"; readonly dispatches: number }
  | { readonly mode: "eager"; readonly reason: string }

/** One step's result (declared with the step, `Step.StepResult`). */
export type { StepResult }

export interface StepCallOptions {
  readonly profile?: "step" | "dispatches"
  readonly pass?: PassOptions
}

export interface CapturedTrainer {
  /**
   * One step: loss parts, learning rate and stage statistics, as `trainStepAsync`. With `profile`,
   * a replayed step is timed on the GPU (`Captured.profile`) and the result has `profile`; other
   * steps run as usual. `pass`: the step's ramp and ratio controller state (`Step.PassOptions`); the
   * controller's integral is a feed, so a replay uses each step's value.
   */
  readonly step: (batch: Batch, step: number, options?: StepCallOptions) => Promise<StepResult>
  /** Whether steps are replayed, and if not why. */
  readonly mode: () => Mode
  /**
   * Host time of the last step until its work was handed to the GPU (tfjs's ops, or the replay's
   * encoding and submit), in ms: the part of a step that the recording removes.
   */
  readonly issueMs: () => number
  /** What tuning the matmuls after step 0 found (empty when nothing was tuned). */
  readonly tuned: () => ReadonlyArray<TuneRow>
  /** The same as one line for a log, or undefined when nothing was tuned. */
  readonly tuning: () => string | undefined
  /** Frees the recording and the feed tensors. */
  readonly dispose: () => void
}

/**
 * The device inputs of a recorded step and how a batch fills them: the token feeds, `[lr, c1, c2]`,
 * and for a ConceptMoE (one concept stage, static shapes) its draws, document starts and the ratio
 * controller's integral; `fitsSlots` says whether a batch's forced boundaries fit the concept slots.
 */
const stepFeeds = (low: Lowered, settings: TrainSettings, rows: number, length: number) => {
  const { tf } = low
  const n = rows * length
  const feeds: Feeds = {
    ids: tf.keep(tf.zeros([n], "int32")),
    positions: tf.keep(tf.zeros([n], "int32")),
    labels: tf.keep(tf.zeros([n], "int32")),
    mask: tf.keep(tf.zeros([n], "float32"))
  }
  // [lr, c1, c2] for each β₁ the parameters train with (Step.betasOf)
  const stepValues = new Map(betasOf(low, settings).map((b) => [b, tf.keep(tf.zeros([3], "float32"))] as const))
  // a ConceptMoE (one concept stage) trains with static shapes: its draws and document starts are feeds
  const stages = low.analysis.rows.filter((r) => r.kind === "chunk")
  const ratio = stages.length === 1 ? (low.analysis.specs.get(stages[0]!.path) as { ratio: number }).ratio : undefined
  const concept: ConceptFeeds | undefined = ratio === undefined
    ? undefined
    : {
      random: tf.keep(tf.zeros([n], "float32")),
      documentStart: tf.keep(tf.zeros([n], "float32")),
      capacity: settings.conceptCapacity,
      ratioIntegral: tf.keep(tf.zeros([1], "float32"))
    }
  const slots = ratio === undefined ? 0 : conceptSlots(length, ratio, settings.conceptCapacity)
  const feedList: ReadonlyArray<Tensor> = [feeds.ids, feeds.positions, feeds.labels, feeds.mask, ...stepValues.values(), ...(concept === undefined ? [] : [concept.random, concept.documentStart, concept.ratioIntegral!])]
  const valuesOf = (batch: Batch, step: number, pass: PassOptions): ReadonlyArray<readonly [Tensor, Float32Array | Int32Array]> => {
    if (batch.rows * batch.length !== n) throw new Error(`a captured trainer for ${rows}×${length} tokens got a batch of ${batch.rows}×${batch.length}`)
    const v = feedValues(batch)
    const c = concept === undefined ? undefined : conceptFeedValues(batch, mixSeed(settings.seed, step))
    return [
      [feeds.ids, v.ids],
      [feeds.positions, v.positions],
      [feeds.labels, v.labels],
      [feeds.mask, v.mask],
      ...[...stepValues].map(([b, t]) => [t, Float32Array.from(stepInputValues(settings, step, b))] as const),
      ...(concept === undefined || c === undefined ? [] : [
        [concept.random, c.random],
        [concept.documentStart, c.documentStart],
        [concept.ratioIntegral!, Float32Array.of(pass.ratioControl?.integral ?? 0)]
      ] as const)
    ]
  }
  /** Whether every row's forced boundaries (its start, its documents' starts) fit the concept slots. */
  const fitsSlots = (batch: Batch) => {
    const forced = new Array<number>(batch.rows).fill(1)
    for (const t of batch.documentStarts ?? []) if (t % batch.length !== 0) forced[Math.floor(t / batch.length)]! += 1
    return forced.every((f) => f <= slots)
  }
  return { feeds, stepValues, concept, feedList, valuesOf, fitsSlots }
}

/** Recording unless it is turned off (`record: false`, or `CONCEPTMOE_CAPTURE=off`). */
const initialMode = (tf: Lowered["tf"], record: boolean | undefined): Mode =>
  record === false
    ? { mode: "eager", reason: "recording turned off" }
    : !settingsOf(tf).capture
    ? { mode: "eager", reason: "CONCEPTMOE_CAPTURE=off" }
    : { mode: "warming" }

/**
 * A trainer for batches of `rows × length` tokens on the webgpu backend. `record: false` (or
 * `CONCEPTMOE_CAPTURE=off`) runs every step through tfjs.
 */
export const capturedTrainer = (
  low: Lowered,
  opt: Optimizer,
  settings: TrainSettings,
  rows: number,
  length: number,
  options: { readonly record?: boolean } = {}
): CapturedTrainer => {
  const { tf } = low
  const { feeds, stepValues, concept, feedList, valuesOf, fitsSlots } = stepFeeds(low, settings, rows, length)
  let mode = initialMode(tf, options.record)
  let first: Captured | undefined
  let recording: Captured | undefined
  let calls = 0
  // static steps since the last (re)start: the first runs through tfjs, the next two are recorded
  let phase = 0
  let issued = NaN
  let readsHost = false
  // whether the first static step looked for host reads
  let checked = false
  let tuned: ReadonlyArray<TuneRow> = []
  // stops noting the products of step 0
  let stepZero: (() => ReadonlySet<string>) | undefined

  // whether the step's MoE layers dispatch by capacity (seen on the first step)
  let routes = false
  /** The step's scalars, packed into its one output (`packStats`). */
  const read = async (outputs: ReadonlyArray<Tensor>) => {
    const values = await outputs[0]!.data()
    failOnGpuErrors(tf)
    return { concepts: 0, boundaryProbSum: 0, thresholdConcepts: 0, ...readStats(values, { concepts: concept !== undefined, routing: routes }), ...(concept === undefined ? {} : { tokens: rows * length }) }
  }
  const eagerStep = (batch: Batch, step: number, pass: PassOptions) => {
    // every op on the GPU, as in a recording (tfjs otherwise runs small ops on the CPU)
    const cpuForward = tf.env().getBool("WEBGPU_CPU_FORWARD")
    tf.env().set("WEBGPU_CPU_FORWARD", false)
    try {
      const r = stepOnDevice(low, opt, batch, settings, step, undefined, { feeds, stepValues, ...(concept === undefined ? {} : { concept }) }, pass)
      routes = r.routing !== undefined
      return { outputs: [packStats(tf, r)] as ReadonlyArray<Tensor>, lr: r.lr, tokens: r.stats.tokens }
    } finally {
      tf.env().set("WEBGPU_CPU_FORWARD", cpuForward)
    }
  }
  const meta = (step: number) => ({ lr: stepInputValues(settings, step)[0]!, tokens: 0 })

  const step = async (batch: Batch, s: number, options: StepCallOptions = {}): Promise<StepResult> => {
    const pass = options.pass ?? {}
    const call = calls++
    if (call === 0) stepZero = watchProducts(tf)
    // the products step 0 ran (not, e.g., an evaluation's), before anything is recorded
    if (call === 1) tuned = await tuneMatMuls(tf, { products: stepZero?.() ?? new Set() })
    // a batch whose forced boundaries alone overflow the concept slots takes the host path (a
    // replay after it records again: the variables changed outside the recording)
    if (concept !== undefined && !fitsSlots(batch)) return trainStepAsync(low, opt, batch, settings, s, pass)
    if (!checked) {
      checked = true
      // only a step without host reads can be recorded
      if (concept !== undefined) writeFeeds(tf, valuesOf(batch, s, pass))
      const reads = await recordReads(low, batch, { ...stepOptions(low, settings, s, pass), ...(concept === undefined ? {} : { feeds, concept }) })
      if (reads.length > 0) {
        readsHost = true
        if (mode.mode === "warming") mode = { mode: "eager", reason: `the model reads ${reads.length} host value(s) per step (concept boundaries)` }
      }
    }
    if (readsHost) return trainStepAsync(low, opt, batch, settings, s, pass)
    if (recording !== undefined) {
      const t0 = performance.now()
      let profile: StepProfile | undefined
      try {
        if (options.profile === undefined) recording.run(valuesOf(batch, s, pass))
        else {
          // the replay is encoded and submitted before profile's first await
          const timed = recording.profile(valuesOf(batch, s, pass), options.profile)
          issued = performance.now() - t0
          profile = await timed
        }
      } catch (e) {
        if (!(e instanceof NotCapturable)) throw e
        // e.g. a checkpoint was loaded into the variables: nothing ran; record again
        recording.dispose()
        recording = undefined
        mode = { mode: "warming" }
        phase = 0
        return step(batch, s, options)
      }
      if (profile === undefined) issued = performance.now() - t0
      opt.step = s + 1
      return { ...meta(s), ...(await read(recording.outputs)), ...(profile === undefined ? {} : { profile }) }
    }
    writeFeeds(tf, valuesOf(batch, s, pass))
    // the first step runs through tfjs alone: it compiles the shaders and fills tfjs's caches, which
    // a recording would otherwise see as uploads that the next step does not repeat
    if (mode.mode === "eager" || phase++ === 0) {
      const t0 = performance.now()
      const r = eagerStep(batch, s, pass)
      issued = performance.now() - t0
      const values = await read(r.outputs)
      tf.dispose([...r.outputs])
      return { lr: r.lr, tokens: r.tokens, ...values }
    }
    let c: Captured
    try {
      c = capture(tf, feedList, () => eagerStep(batch, s, pass).outputs)
    } catch (e) {
      first?.dispose()
      first = undefined
      if (!(e instanceof NotCapturable)) throw e
      if (e.outputs === undefined) {
        // the step may have stopped half-way: do not run it again
        throw new Error(`recording training step ${s} failed: ${e.message}; set CONCEPTMOE_CAPTURE=off to train without recording`)
      }
      // the step ran to the end, it just cannot be replayed
      mode = { mode: "eager", reason: e.message }
      const values = await read(e.outputs)
      tf.dispose([...e.outputs])
      return { ...meta(s), ...values }
    }
    const values = { ...meta(s), ...(await read(c.outputs)) }
    if (first === undefined) first = c
    else {
      const why = difference(first, c)
      first.dispose()
      first = undefined
      if (why === undefined) {
        recording = c
        mode = { mode: "replay", dispatches: c.dispatches }
      } else {
        c.dispose()
        mode = { mode: "eager", reason: why }
      }
    }
    return values
  }

  return {
    step,
    mode: () => mode,
    issueMs: () => issued,
    tuned: () => tuned,
    tuning: () => (tuned.length > 0 ? describeTuning(tuned) : undefined),
    dispose: () => {
      stepZero?.()
      first?.dispose()
      recording?.dispose()
      tf.dispose([...feedList])
    }
  }
}
