/**
 * Pieces every command shares: flags, the block registry from `--blocks`, and error reporting.
 *
 * @since 0.1.0
 */
import { Console, Context, Effect, Option, Result, Schema } from "effect"
import { Flag } from "effect/cli"
import * as path from "node:path"
import { pathToFileURL } from "node:url"
import { formatLimit, limits } from "../graph/Limits.ts"
import { BlockRegistry, builtins, isBlockKind, register } from "../blocks/Registry.ts"

/** A bad command-line value: exit code 2, one line on stderr. */
export class UsageError extends Schema.TaggedError<UsageError>()("UsageError", { message: Schema.String }) {}

/** Caps on command-line numbers that no config limit already covers. */
export const flagLimits = {
  kvBytes: 64,
  depth: limits.depth,
  steps: 100_000_000,
  batch: 65_536,
  seed: 2 ** 32 - 1,
  candidates: 1_000
} as const

const range = (min: number, max: number) => `${formatLimit(min)} to ${formatLimit(max)}`

/**
 * An integer flag in [min, max]. A value out of range, fractional or not a number is a usage
 * error naming the flag: `Invalid value for flag --kv-bytes: "-2". Expected: an integer from 1 to 64`.
 */
export const intFlag = (name: string, min: number, max: number) =>
  Flag.Int(name).pipe(Flag.filter((n) => Number.isSafeInteger(n) && n >= min && n <= max, () => `an integer from ${range(min, max)}`))

/** A finite number flag in [min, max] (`above`: strictly greater than min). */
export const numberFlag = (name: string, min: number, max: number, options?: { readonly above?: boolean }) =>
  Flag.Finite(name).pipe(Flag.filter(
    (x) => (options?.above === true ? x > min : x >= min) && x <= max,
    () => `a number ${options?.above === true ? "above" : "from"} ${min} ${options?.above === true ? "and at most" : "to"} ${formatLimit(max)}`
  ))

export const format = Flag.Literals("format", ["table", "json"]).pipe(
  Flag.withDescription("table (human) or json (one JSON document)"),
  Flag.withDefault("table")
)

export const seqLen = intFlag("seq-len", 1, limits.seqLen).pipe(
  Flag.withDescription("sequence length T for the attention-map, forward and KV-cache figures (default: the model's context length; at most the context length)"),
  Flag.optional
)

export const kvBytes = intFlag("kv-bytes", 1, flagLimits.kvBytes).pipe(Flag.withDescription("bytes per cached KV element"), Flag.withDefault(2))

export const tolerance = numberFlag("tolerance", 0, 1).pipe(
  Flag.withDescription("relative tolerance on total params and FLOPs/token (0 to 1)"),
  Flag.withDefault(0.01)
)

/** A compression ratio R: above 1, at most the longest sequence. */
export const ratioFlag = numberFlag("ratio", 1, limits.seqLen, { above: true })

export const blocks = Flag.String("blocks").pipe(
  Flag.withDescription("comma-separated TypeScript/JavaScript modules whose exported block kinds are registered (for \"kind\": \"graph\" configs)"),
  Flag.optional
)

/** Checks a positive integer flag. */
export const positive = (name: string, value: Option.Option<number>) =>
  Option.isSome(value) && !(value.value > 0)
    ? Effect.fail(new UsageError({ message: `--${name} must be a positive number, got ${value.value}` }))
    : Effect.void

/**
 * Checks `--seq-len` against the model's context: a sequence longer than the model is made for is
 * a usage error naming both.
 */
export const seqLenWithin = (value: Option.Option<number>, model: { readonly name: string; readonly contextLength: number }) =>
  Option.isSome(value) && value.value > model.contextLength
    ? Effect.fail(new UsageError({ message: `--seq-len ${value.value} exceeds the context length of ${model.name} (${formatLimit(model.contextLength)} tokens)` }))
    : Effect.void

/** Imports modules and registers every block kind they export. */
export const registryWith = (modules: Option.Option<string>) =>
  Effect.gen(function*() {
    if (Option.isNone(modules)) return builtins
    let registry = builtins
    for (const m of modules.value.split(",").map((s) => s.trim()).filter((s) => s !== "")) {
      const mod = yield* Effect.tryPromise({
        try: () => import(pathToFileURL(path.resolve(m)).href) as Promise<Record<string, unknown>>,
        catch: (e) => new UsageError({ message: `--blocks ${m}: cannot import: ${(e as Error).message.split("\n")[0]}` })
      })
      const kinds = Object.values(mod).filter(isBlockKind)
      if (kinds.length === 0) return yield* new UsageError({ message: `--blocks ${m}: the module exports no block kind` })
      const next = register(registry, ...kinds)
      if (Result.isFailure(next)) return yield* new UsageError({ message: `--blocks ${m}: ${next.failure}` })
      registry = next.success
    }
    return registry
  })

/** Runs `self` with the block kinds of `--blocks` registered (the built-ins without it). */
export const withBlocks = <A, E, R>(modules: Option.Option<string>, self: Effect.Effect<A, E, R>) =>
  Effect.flatMap(registryWith(modules), (registry) => Effect.provideService(self, BlockRegistry, registry))

/**
 * Where a run of the command line records its exit code: 0, 1 (a failure), 2 (a usage error).
 * `Run.ts` gives each run its own cell.
 */
export const ExitCode = Context.Reference<{ code: number }>("conceptmoe/cli/ExitCode", { defaultValue: () => ({ code: 0 }) })

/** Prints one clear line (no stack trace) and sets the exit code: 2 for a usage error, 1 otherwise. */
export const reportFailure = (message: string, code: 1 | 2 = 1) =>
  Effect.gen(function*() {
    const exit = yield* ExitCode
    exit.code = code
    yield* Console.error(`error: ${message.trimEnd()}`)
  })

/**
 * Every typed failure of a command becomes one `error:` line: exit code 2 for a {@link UsageError},
 * 1 for anything else.
 */
export const handled = <A, E extends { readonly message: string }, R>(self: Effect.Effect<A, E, R>) =>
  self.pipe(Effect.catch((e) => reportFailure(withFile(e), isUsage(e) ? 2 : 1)))

const isUsage = (e: unknown): boolean => typeof e === "object" && e !== null && (e as { _tag?: unknown })._tag === "UsageError"

/** An error's message, led by the file it is about when it has one the message does not name. */
const withFile = (e: { readonly message: string; readonly file?: unknown }): string =>
  typeof e.file === "string" && !e.message.includes(e.file) ? `${e.file}: ${e.message}` : e.message
