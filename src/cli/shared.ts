/**
 * Pieces every command shares: flags, the block registry from `--blocks`, and error reporting.
 *
 * @since 0.1.0
 */
import { Effect, Option, Result, Schema } from "effect"
import { Flag } from "effect/cli"
import * as path from "node:path"
import { pathToFileURL } from "node:url"
import { builtins, isBlockKind, register } from "../graph/Registry.ts"

/** A bad command-line value. */
export class UsageError extends Schema.TaggedError<UsageError>()("UsageError", { message: Schema.String }) {}

export const format = Flag.Literals("format", ["table", "json"]).pipe(
  Flag.withDescription("table (human) or json (one JSON document)"),
  Flag.withDefault("table")
)

export const seqLen = Flag.Int("seq-len").pipe(
  Flag.withDescription("sequence length T for the attention-map, forward and KV-cache figures (default: the model's context length)"),
  Flag.optional
)

export const kvBytes = Flag.Int("kv-bytes").pipe(Flag.withDescription("bytes per cached KV element"), Flag.withDefault(2))

export const tolerance = Flag.Finite("tolerance").pipe(
  Flag.withDescription("relative tolerance on total params and FLOPs/token"),
  Flag.withDefault(0.01)
)

export const blocks = Flag.String("blocks").pipe(
  Flag.withDescription("comma-separated TypeScript/JavaScript modules whose exported block kinds are registered (for \"kind\": \"graph\" configs)"),
  Flag.optional
)

/** Checks a positive integer flag. */
export const positive = (name: string, value: Option.Option<number>) =>
  Option.isSome(value) && !(value.value > 0)
    ? Effect.fail(new UsageError({ message: `--${name} must be a positive number, got ${value.value}` }))
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

/** Prints one clear line (no stack trace) and sets a failing exit code. */
export const reportFailure = (message: string) =>
  Effect.sync(() => {
    process.stderr.write(`error: ${message}\n`)
    process.exitCode = 1
  })

/** Every typed failure of a command becomes one `error:` line and exit code 1. */
export const handled = <A, E extends { readonly message: string }, R>(self: Effect.Effect<A, E, R>) =>
  self.pipe(Effect.catch((e) => reportFailure(withFile(e))))

/** An error's message, led by the file it is about when it has one the message does not name. */
const withFile = (e: { readonly message: string; readonly file?: unknown }): string =>
  typeof e.file === "string" && !e.message.includes(e.file) ? `${e.file}: ${e.message}` : e.message
