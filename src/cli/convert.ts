/**
 * `conceptmoe convert`: a trained MoE run becomes a ConceptMoE run that `train --resume` continues
 * (continual-training conversion, `train/Convert.ts`).
 *
 * @since 0.4.0
 */
import { Console, Effect, Option } from "effect"
import { Command, Flag } from "effect/cli"
import { formatPercent } from "../internal/Table.ts"
import { convertRun } from "../train/Convert.ts"
import { format, handled, positive, ratioFlag, tolerance, UsageError } from "./shared.ts"

export const convert = Command.make(
  "convert",
  {
    checkpoint: Flag.String("checkpoint").pipe(Flag.withDescription("run directory of a trained MoE (conceptmoe train), holding checkpoint.safetensors")),
    ratio: ratioFlag.pipe(Flag.withDescription("target compression ratio R > 1")),
    strategy: Flag.Literals("strategy", ["topk", "loop"]).pipe(
      Flag.withDescription("topk: more activated experts; loop: more experts and looped layers (no new parameters either way)"),
      Flag.withDefault("topk")
    ),
    encoderLayers: Flag.Int("encoder-layers").pipe(Flag.withDescription("source layers that become the encoder (default: a quarter, at least 1)"), Flag.optional),
    decoderLayers: Flag.Int("decoder-layers").pipe(Flag.withDescription("source layers that become the decoder, with joint decoding (default: a quarter, at least 1)"), Flag.optional),
    exact: Flag.Boolean("exact").pipe(
      Flag.withDescription("keep top-k, loop nothing: at the ramp's start (every token a boundary) the logits equal the source's; not matched"),
      Flag.withDefault(false)
    ),
    rampSteps: Flag.Int("ramp-steps").pipe(Flag.withDescription("steps over which the target R ramps from 1 to R (recorded in the model config)"), Flag.withDefault(100)),
    merge: Flag.Literals("merge", ["sum", "last"]).pipe(Flag.withDescription("how a chunk becomes a concept (the paper converts with last)"), Flag.withDefault("last")),
    steps: Flag.Int("steps").pipe(Flag.withDescription("steps of the continued run (default: the source run's)"), Flag.optional),
    tolerance,
    format,
    out: Flag.String("out").pipe(Flag.withDescription("the new run directory"))
  },
  Effect.fn("convert")(function*(f) {
    yield* positive("ramp-steps", Option.some(f.rampSteps))
    yield* positive("steps", f.steps)
    for (const [name, v] of [["encoder-layers", f.encoderLayers], ["decoder-layers", f.decoderLayers]] as const) {
      if (Option.isSome(v) && v.value < 1) return yield* new UsageError({ message: `--${name} must be 1 or more, got ${v.value}` })
    }
    const r = yield* convertRun(f.checkpoint, f.out, {
      ratio: f.ratio,
      strategy: f.strategy,
      exact: f.exact,
      rampSteps: f.rampSteps,
      merge: f.merge,
      tolerance: f.tolerance,
      ...(Option.isSome(f.encoderLayers) ? { encoderLayers: f.encoderLayers.value } : {}),
      ...(Option.isSome(f.decoderLayers) ? { decoderLayers: f.decoderLayers.value } : {}),
      ...(Option.isSome(f.steps) ? { steps: f.steps.value } : {})
    })
    if (f.format === "json") {
      yield* Console.log(JSON.stringify({ source: r.source, config: r.config, budget: r.budget, matched: r.matched !== undefined, files: r.files, continueWith: r.continueWith }, null, 2))
      return
    }
    const c = r.model.concept!
    const spec = c.spec
    yield* Console.log([
      `converted ${r.source.name} (step ${r.source.step}) into ${r.model.name}: encoder layers ${c.layout.encoder.join("–")}, concept model ${c.layout.concept.join("–")}, decoder ${c.layout.decoder.join("–")} (of ${c.layout.baselineLayers}), R ${spec.ratio}, merge ${spec.merge}`,
      `  concept model: top-${spec.topK ?? "(unchanged)"}${c.layout.loop === null ? "" : `, layers ${c.layout.loop.start}–${c.layout.loop.start + c.layout.loop.layers - 1} looped ${c.layout.loop.times}×`}; chunk module identity-initialised; joint-decoding projections zero`,
      `  vs the source: params ${formatPercent(r.budget.paper.params)}, FLOPs/token ${formatPercent(r.budget.paper.flops)} (paper's convention: chunk module and joint decoding left out)` +
      `; all parts counted: params ${formatPercent(r.budget.all.params)}, FLOPs/token ${formatPercent(r.budget.all.flops)}`,
      r.matched === undefined ? "  exact mode: not matched (the source's top-k); at ramp 0 its logits are the source's" : `  matched within ±${f.tolerance * 100}% (paper's convention)`,
      `  ramp: every token a boundary at step 0, target R reached at step ${spec.rampSteps}; Adam moments zero, step count 0`,
      `wrote ${r.files.checkpoint}, ${r.files.model}, ${r.files.train}`,
      `continue with: ${r.continueWith}`
    ].join("\n"))
  }, handled)
).pipe(Command.withDescription("Convert a trained MoE run into a ConceptMoE run (continual training): layers split, chunk module added, ramped from the source's function to R."))
