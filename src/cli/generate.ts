/**
 * `conceptmoe generate`: text from a trained checkpoint, streamed as it is produced.
 *
 * @since 0.2.0
 */
import { Console, Effect, Option, Schema } from "effect"
import { Command, Flag } from "effect/cli"
import { formatNumber } from "../internal/Table.ts"
import { generate as run, GenerateError, type GenerateStats, loadTrained, promptIds, SamplingSettings } from "../infer/Generate.ts"
import { layer as backendLayer } from "../runtime/Backend.ts"
import { release } from "../runtime/Lower.ts"
import { byteTokenizer } from "../train/Data.ts"
import { limits } from "../graph/Limits.ts"
import { blocks, flagLimits, handled, intFlag, numberFlag, withBlocks } from "./shared.ts"
import { backend } from "./train.ts"

/** The figures `generate` reports: counts, times, rates (tokens per second; null for no time), compression, cache. */
export const generateFigures = (stats: GenerateStats) => {
  const rate = (n: number, s: number) => (s > 0 ? n / s : null)
  return {
    ...stats,
    prefillTokensPerSecond: rate(stats.promptTokens, stats.prefillSeconds),
    decodeTokensPerSecond: rate(stats.generatedTokens, stats.decodeSeconds),
    promptCompression: stats.promptCompression ?? null,
    totalCompression: stats.totalCompression ?? null
  }
}

export const generate = Command.make(
  "generate",
  {
    checkpoint: Flag.String("checkpoint").pipe(Flag.withDescription("a run directory (e.g. runs/moe-tiny) or its checkpoint.safetensors")),
    prompt: Flag.String("prompt").pipe(Flag.withDescription("the text to continue")),
    maxTokens: intFlag("max-tokens", 1, limits.seqLen).pipe(Flag.withDescription("tokens (bytes) to generate"), Flag.withDefault(200)),
    temperature: numberFlag("temperature", 0, 1000).pipe(Flag.withDescription("sampling temperature; 0 is greedy"), Flag.withDefault(0.8)),
    topK: intFlag("top-k", 0, limits.vocab).pipe(Flag.withDescription("sample among the k most likely tokens; 0 for all"), Flag.withDefault(40)),
    seed: intFlag("seed", 0, flagLimits.seed).pipe(Flag.withDescription("sampling seed"), Flag.withDefault(0)),
    config: Flag.String("config").pipe(Flag.withDescription("the model config, for checkpoints that do not store theirs"), Flag.optional),
    blocks,
    backend,
    format: Flag.Literals("format", ["table", "json"]).pipe(
      Flag.withDescription("table: the text streamed to stdout, the figures on stderr; json: one JSON document on stdout with the text and the figures"),
      Flag.withDefault("table")
    )
  },
  Effect.fn("generate")(function*(f) {
    const settings = yield* Schema.decodeUnknownEffect(SamplingSettings)({ maxTokens: f.maxTokens, temperature: f.temperature, topK: f.topK, seed: f.seed }).pipe(
      Effect.mapError(() =>
        new GenerateError({ field: "sampling", problem: "needs --max-tokens ≥ 1, --temperature ≥ 0 and --top-k a whole number ≥ 0" })
      )
    )
    const json = f.format === "json"
    const pieces: Array<string> = []
    const { stats, source } = yield* Effect.gen(function*() {
      const { model, low, file, step } = yield* withBlocks(f.blocks, loadTrained(f.checkpoint, Option.getOrUndefined(f.config)))
      const ids = yield* promptIds(model, byteTokenizer, f.prompt).pipe(Effect.tapError(() => Effect.sync(() => release(low))))
      if (!json) yield* Console.error(`${model.name} from ${file} (step ${step}); prompt ${ids.length} bytes`)
      if (!json) yield* Effect.sync(() => process.stdout.write(f.prompt))
      const r = yield* run(model, low, byteTokenizer, f.prompt, settings, (text) => (json ? void pieces.push(text) : void process.stdout.write(text))).pipe(
        Effect.ensuring(Effect.sync(() => release(low)))
      )
      return { stats: r, source: { model: model.name, checkpoint: file, step } }
    }).pipe(Effect.provide(backendLayer(Option.getOrUndefined(f.backend))))
    if (json) {
      yield* Console.log(JSON.stringify({ ...source, prompt: f.prompt, text: pieces.join(""), settings, ...generateFigures(stats) }, null, 2))
      return
    }
    yield* Effect.sync(() => process.stdout.write("\n"))
    const rate = (n: number, s: number) => (s > 0 ? `${formatNumber(Math.round(n / s))} tokens/s` : "-")
    yield* Console.error(
      `prefill ${stats.promptTokens} tokens in ${(stats.prefillSeconds * 1000).toFixed(0)} ms (${rate(stats.promptTokens, stats.prefillSeconds)}); ` +
        `decode ${stats.generatedTokens} tokens in ${(stats.decodeSeconds * 1000).toFixed(0)} ms (${rate(stats.generatedTokens, stats.decodeSeconds)})` +
        (stats.promptCompression === undefined ? "" : `; compression on the prompt R = ${stats.promptCompression.toFixed(2)}, overall ${stats.totalCompression!.toFixed(2)}`) +
        `; KV cache ${formatNumber(stats.cacheBytes)} bytes` +
        (stats.stop === "context" ? "; stopped at the model's context length" : "")
    )
  }, handled)
).pipe(Command.withDescription("Generate text from a trained checkpoint (prefill, then decode with KV caches), streamed as it is produced."))
