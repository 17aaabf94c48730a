/**
 * Typed errors of running a model that a user can cause: bad input to a decoding session, a graph
 * or a setting the runtime cannot run, a piece past the context, an environment variable with a
 * bad value. Each is a `Schema.TaggedError` whose message names the input, variable or node and
 * says what was expected.
 *
 * Tensor code is synchronous and runs inside `tf.tidy` and kernels, where an Effect cannot be
 * returned: it `throw`s these errors. Where the code is called from an Effect, {@link attempt}
 * (synchronous) and {@link attemptPromise} (asynchronous) turn a thrown {@link RunFailure} into a
 * typed failure and anything else into a defect (a bug). The command line treats a
 * {@link RunFailure} that reached it as a defect the same way: one `error:` line, exit code 1.
 *
 * What stays a plain `Error` is what no input can cause: invariants between the runtime's own parts
 * (a replayed read that does not match its recording, cache row counts that blocks compute) and
 * control flow (`PendingRead`, `NotCapturable`, caught where they are thrown).
 *
 * @since 0.5.0
 */
import { Effect, Schema } from "effect"

/**
 * An input that does not have the shape or values expected: `input` names it (`feed ids`,
 * `prefill ids`), `expected` and `got` say what it should be and what it is.
 */
export class InvalidInput extends Schema.TaggedError<InvalidInput>()("InvalidInput", {
  input: Schema.String,
  expected: Schema.String,
  got: Schema.String
}) {
  override get message(): string {
    return `${this.input}: expected ${this.expected}, got ${this.got}`
  }
}

/**
 * A combination the runtime does not run: sparse MoE dispatch over padded positions, non-causal
 * attention decoded incrementally, more token-expert pairs than float32 counts exactly, a dechunk
 * outside a concept stage. `at` is where (a node scope, or what was asked for), `problem` what is
 * wrong and what to do instead.
 */
export class Unsupported extends Schema.TaggedError<Unsupported>()("Unsupported", {
  at: Schema.String,
  problem: Schema.String
}) {
  override get message(): string {
    return `${this.at === "" ? "(root)" : this.at}: ${this.problem}`
  }
}

const nodeAt = (path: string) => (path === "" ? "(root)" : path)

/** A kind in the graph that has no `apply`: the graph can be costed but not run. */
export class NotLowerable extends Schema.TaggedError<NotLowerable>()("NotLowerable", {
  path: Schema.String,
  kind: Schema.String
}) {
  override get message(): string {
    return `block kind "${this.kind}" at ${nodeAt(this.path)} has no tensor implementation (apply)`
  }
}

/** A kind in the graph that does not declare how it runs on a stream cut into pieces. */
export class NotDecodable extends Schema.TaggedError<NotDecodable>()("NotDecodable", {
  path: Schema.String,
  kind: Schema.String
}) {
  override get message(): string {
    return `block kind "${this.kind}" at ${nodeAt(this.path)} does not declare \`stream\`: it cannot be decoded incrementally`
  }
}

/** A piece that would take a row past the session's maximum length. */
export class ContextOverflow extends Schema.TaggedError<ContextOverflow>()("ContextOverflow", {
  length: Schema.Number,
  maxLength: Schema.Number
}) {
  override get message(): string {
    return `${this.length} tokens exceed the model's context of ${this.maxLength}`
  }
}

/** `feed` on a backend that reads only asynchronously met a piece that needs a host value. */
export class NeedsFeedAsync extends Schema.TaggedError<NeedsFeedAsync>()("NeedsFeedAsync", {
  backend: Schema.String
}) {
  override get message(): string {
    return `this model reads host values while decoding (concept boundaries), which the ${this.backend} backend does only asynchronously: use feedAsync / prefillAsync`
  }
}

/** An environment variable with a value that is not one of those expected. */
export class SettingError extends Schema.TaggedError<SettingError>()("SettingError", {
  variable: Schema.String,
  value: Schema.String,
  expected: Schema.String
}) {
  override get message(): string {
    return `${this.variable}="${this.value}": expected ${this.expected}`
  }
}

/** Every error of this module. */
export type RunFailure = InvalidInput | Unsupported | NotLowerable | NotDecodable | ContextOverflow | NeedsFeedAsync | SettingError

const classes = [InvalidInput, Unsupported, NotLowerable, NotDecodable, ContextOverflow, NeedsFeedAsync, SettingError] as const

/** Whether `u` is one of the errors of this module (thrown from tensor code). */
export const isRunFailure = (u: unknown): u is RunFailure => classes.some((c) => u instanceof c)

const sort = (e: unknown): Effect.Effect<never, RunFailure> => (isRunFailure(e) ? Effect.fail(e) : Effect.die(e))

/**
 * Runs synchronous tensor code: what it returns is the success, a {@link RunFailure} it throws the
 * typed failure, anything else it throws a defect.
 */
export const attempt = <A>(f: () => A): Effect.Effect<A, RunFailure> =>
  Effect.suspend(() => {
    try {
      return Effect.succeed(f())
    } catch (e) {
      return sort(e)
    }
  })

/** {@link attempt} for asynchronous code: a rejection with a {@link RunFailure} is the typed failure. */
export const attemptPromise = <A>(f: () => Promise<A>): Effect.Effect<A, RunFailure> =>
  Effect.tryPromise({ try: f, catch: (e) => e }).pipe(Effect.catch(sort))
