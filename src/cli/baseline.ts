/**
 * The MoE baseline that `reallocate`, `report` and `compare` start from, and the solver run on it
 * with its refusals naming the command's flags.
 *
 * @since 0.5.0
 */
import { Effect, type FileSystem, Option } from "effect"
import type { DecoderConfig } from "../models/Decoder.ts"
import type { ConfigError } from "../models/Errors.ts"
import { type LoadedModel, modelFromJson, readJson } from "../models/Load.ts"
import { InvalidReallocation, reallocate, type ReallocateOptions } from "../models/Reallocate.ts"
import { seqLenWithin, UsageError } from "./shared.ts"

/** A baseline: its config as read, the loaded model, and its decoder. */
export interface Baseline {
  readonly json: unknown
  readonly model: LoadedModel
  readonly decoder: DecoderConfig
}

/** Reads a baseline config: the JSON as read, and the model, which must be a decoder (an MoE). */
export const loadBaseline = (file: string): Effect.Effect<Baseline, ConfigError | UsageError, FileSystem.FileSystem> =>
  Effect.gen(function*() {
    const json = yield* readJson(file)
    const model = yield* modelFromJson(json, file)
    if (model.decoder === undefined) {
      return yield* new UsageError({ message: `${file}: the baseline must be a decoder config (moe, or a Hugging Face MoE), not ${model.format}` })
    }
    return { json, model, decoder: model.decoder }
  })

/** `--seq-len` checked against the model's context, or the context length when it is not given. */
export const seqLenFor = (value: Option.Option<number>, model: { readonly name: string; readonly contextLength: number }) =>
  Effect.as(seqLenWithin(value, model), Option.getOrElse(value, () => model.contextLength))

/** The solver's options from the flags that `reallocate` and `compare` share. */
export const solverOptions = (f: Required<Pick<ReallocateOptions, "ratio" | "strategy" | "tolerance" | "overheads" | "encoderLayers" | "decoderLayers">>) => ({
  ratio: f.ratio,
  strategy: f.strategy,
  tolerance: f.tolerance,
  overheads: f.overheads,
  encoderLayers: f.encoderLayers,
  decoderLayers: f.decoderLayers
})

/** The flags that set each solver field. */
const fieldFlags: Readonly<Record<string, ReadonlyArray<string>>> = {
  encoderLayers: ["--encoder-layers", "--decoder-layers"],
  decoderLayers: ["--encoder-layers", "--decoder-layers"],
  loopLayers: ["--loop-layers"],
  ratio: ["--ratio"],
  strategy: ["--strategy"]
}

/**
 * What to change for a field the solver refuses: the command's flags that set it, or the baseline
 * file when the command has none (its layers, its attention, its depth).
 */
export const flagsOf = (field: string, baseline: string, flags: ReadonlyArray<string>): string => {
  const named = (fieldFlags[field] ?? []).filter((f) => flags.includes(f))
  return named.length > 0 ? named.join(", ") : baseline
}

/**
 * The solver on a loaded baseline; a refused field ({@link InvalidReallocation}) is led by the
 * command's flags that set it (`flags`: those the command has), or by the baseline's file.
 */
export const solveOn = (
  baseline: Baseline,
  options: ReallocateOptions,
  flags: ReadonlyArray<string>
) =>
  reallocate(baseline.decoder, baseline.model.analysis, options).pipe(
    Effect.mapError((e) =>
      e._tag === "InvalidReallocation"
        ? new InvalidReallocation({ field: e.field, message: `${flagsOf(e.field, baseline.model.file, flags)}: ${e.message}` })
        : e
    )
  )
