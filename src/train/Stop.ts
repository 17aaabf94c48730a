/**
 * Stopping a run cleanly on SIGINT or SIGTERM. While {@link watch}'s scope is open the signals do
 * not interrupt the program: they are noted, and the training loop {@link poll}s between steps,
 * commits a final checkpoint and fails with {@link Stopped}. A second signal ends the process at
 * once (its temporary files removed, its locks released). When the outermost scope closes, the
 * previous handlers (the runtime's, which interrupt) are put back.
 *
 * @since 0.3.0
 */
import { Effect, Schema } from "effect"
import { cleanupSync } from "./RunDir.ts"

export type StopSignal = "SIGINT" | "SIGTERM"

const signals: ReadonlyArray<StopSignal> = ["SIGINT", "SIGTERM"]

/** The conventional exit status of a process ended by `signal`: 128 + its number. */
export const exitCode = (signal: StopSignal): number => (signal === "SIGINT" ? 130 : 143)

/** Training stopped at a signal, after committing a checkpoint. */
export class Stopped extends Schema.TaggedError<Stopped>()("Stopped", {
  signal: Schema.Literals(["SIGINT", "SIGTERM"]),
  /** Steps completed (the checkpoint's step). */
  step: Schema.Number,
  steps: Schema.Number,
  /** The run directory. */
  out: Schema.String,
  checkpoint: Schema.NullOr(Schema.String),
  /** In a series of runs (`compare`): the run directories that finished before this one. */
  finished: Schema.optional(Schema.Array(Schema.String)),
  /** In a series of runs: how many were not started. */
  remaining: Schema.optional(Schema.Number)
}) {
  override get message(): string {
    return `stopped by ${this.signal} after step ${this.step} of ${this.steps}` +
      (this.checkpoint === null ? "; no checkpoint was written" : `; checkpoint and metrics committed in ${this.out}`)
  }
}

let depth = 0
let requested: StopSignal | undefined
let saved: Array<readonly [StopSignal, Array<(...args: Array<unknown>) => void>]> = []

const onSignal = (signal: StopSignal) => () => {
  if (requested !== undefined) {
    // a second signal: stop now
    process.stderr.write(`\n${signal} again: stopping now, without a final checkpoint\n`)
    cleanupSync()
    process.exit(exitCode(signal))
  }
  requested = signal
  process.stderr.write(`\n${signal}: stopping at the end of the current step (send it again to stop now)\n`)
}
const handlers = { SIGINT: onSignal("SIGINT"), SIGTERM: onSignal("SIGTERM") }

/**
 * For the scope: SIGINT and SIGTERM are noted instead of interrupting. Nested scopes share one
 * state (a `compare` watches around its two `train`s, each of which watches too).
 */
export const watch = Effect.acquireRelease(
  Effect.sync(() => {
    if (depth++ === 0) {
      requested = undefined
      saved = signals.map((s) => [s, process.listeners(s) as Array<(...args: Array<unknown>) => void>] as const)
      for (const s of signals) {
        process.removeAllListeners(s)
        process.on(s, handlers[s])
      }
    }
  }),
  () =>
    Effect.sync(() => {
      if (--depth === 0) {
        for (const [s, fns] of saved) {
          process.removeListener(s, handlers[s])
          for (const f of fns) process.on(s, f)
        }
        saved = []
      }
    })
)

/**
 * The signal received so far, if any, after letting the event loop run once (a signal's handler
 * runs only there; a synchronous training loop would otherwise never see it).
 */
export const poll: Effect.Effect<StopSignal | undefined> = Effect.promise(() => new Promise<void>((resolve) => setImmediate(resolve))).pipe(
  Effect.map(() => requested)
)

/** The signal received so far, without yielding. */
export const pending = (): StopSignal | undefined => requested

/** Arguments quoted for a POSIX shell where they need it (for the "continue with" line). */
export const shellArgs = (args: ReadonlyArray<string>): Array<string> =>
  args.map((a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`))

/**
 * For a series of runs (`compare`'s models and seeds): a {@link Stopped} failure of one run is given
 * the runs that finished before it and the number not started.
 */
export const inSeries = (finished: ReadonlyArray<string>, total: number) => <A, E, R>(self: Effect.Effect<A, E, R>): Effect.Effect<A, E | Stopped, R> =>
  Effect.mapError(self, (e): E | Stopped => (e instanceof Stopped ? new Stopped({ ...e, finished: [...finished], remaining: total - finished.length - 1 }) : e))

/** For `compare`: which runs finished (and where their results are), which stopped, and how many did not start. */
export const seriesHint = (e: Stopped): string =>
  [
    ...(e.finished ?? []).map((dir) => `finished: ${dir} (checkpoint.safetensors, optimizer.safetensors, metrics.jsonl, loss.svg)`),
    `stopped: ${e.out} at step ${e.step} of ${e.steps} (its checkpoint and metrics so far)`,
    ...(e.remaining === undefined || e.remaining <= 0 ? [] : [`not started: ${e.remaining} more run(s)`]),
    "no comparison was written (summary.json, losses.svg); run compare again to train the pair"
  ].join("\n")

/**
 * For a command: a {@link Stopped} failure becomes its message and how to continue on stderr, and
 * the exit status 130 (SIGINT) or 143 (SIGTERM).
 */
export const report = (e: Stopped, hint: string) =>
  Effect.sync(() => {
    process.stderr.write(`${e.message}\n${hint}\n`)
    process.exitCode = exitCode(e.signal)
  })
