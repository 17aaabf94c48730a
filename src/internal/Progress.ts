/**
 * Progress of long runs (training, comparisons) through Effect's logger, so that the command line's
 * `--log-level` governs it: progress is logged at level Info, which `--log-level warn` filters out.
 *
 * - {@link line}: a line of progress ("step 120/250  loss 2.31 …"), printed as it is.
 * - {@link tick}: one finished step of a run. On a terminal, the {@link layer}'s logger draws it as
 *   one line, rewritten in place: a bar, the step, the percentage and the estimated time left; a
 *   {@link line} clears that line, prints itself, and the bar is drawn again. Elsewhere (a pipe, a
 *   file, a test) ticks print nothing, and the output is the plain lines.
 * - Lines logged at Warn and above go to stderr, the rest to stdout, through the `Console` service
 *   (so a test that captures the console sees them).
 *
 * Without the layer, the lines go to whatever logger the program installed (Effect's default one
 * prefixes each with a timestamp and its level). Library users get this module as `Progress` from
 * `conceptmoe/train`.
 *
 * @since 0.4.0
 */
import { Console, Context, Effect, Layer, Logger, LogLevel, References } from "effect"

const key = "conceptmoe/progress"

/** One finished step of a run of `steps` (`label`: what is running, e.g. the model's name). */
export interface Tick {
  readonly label: string
  readonly step: number
  readonly steps: number
}

/** A line of progress, at level Info. */
export const line = (text: string): Effect.Effect<void> => Effect.logInfo(text)

/** A finished step, at level Info: a bar with the time left on a terminal, nothing elsewhere. */
export const tick = (label: string, step: number, steps: number): Effect.Effect<void> =>
  Effect.logInfo("").pipe(Effect.annotateLogs(key, { label, step, steps } satisfies Tick))

/** Removes the bar from the terminal (a run that ends early); nothing elsewhere. */
export const clear: Effect.Effect<void> = Effect.logInfo("").pipe(Effect.annotateLogs(key, "clear"))

/** Where a bar is drawn: whether stdout is a terminal, its width, and a raw write to it. */
export interface Terminal {
  readonly tty: boolean
  readonly columns: number
  readonly write: (text: string) => void
}

/** The process's stdout. */
export const Terminal = Context.Reference<Terminal>("conceptmoe/Progress/Terminal", {
  defaultValue: () => ({
    tty: process.stdout.isTTY === true,
    columns: process.stdout.columns || 80,
    write: (text) => void process.stdout.write(text)
  })
})

/**
 * Seconds as the time left is shown: "42s", "3m 05s", "2h 07m"; "?" when it is not known (no rate
 * measured yet, or not a finite non-negative number).
 */
export const formatDuration = (seconds: number | undefined): string => {
  if (seconds === undefined || !Number.isFinite(seconds) || seconds < 0) return "?"
  const s = Math.round(seconds)
  if (s < 60) return `${s}s`
  const pad = (n: number) => String(n).padStart(2, "0")
  if (s < 3600) return `${Math.floor(s / 60)}m ${pad(s % 60)}s`
  return `${Math.floor(s / 3600)}h ${pad(Math.floor((s % 3600) / 60))}m`
}

/**
 * The time left (seconds) at `now`, from the rate between the run's first tick seen (`first`) and
 * `now`: steps after the first tick took (now.at − first.at) / (now.step − first.step) each.
 * The first tick is the rate's start, so a slow first step (compilation, tuning) is not counted.
 * Undefined until a step after the first has finished.
 */
export const eta = (
  first: { readonly at: number; readonly step: number },
  now: { readonly at: number; readonly step: number },
  steps: number
): number | undefined => {
  const done = now.step - first.step
  if (done <= 0) return undefined
  return (((now.at - first.at) / 1000) / done) * Math.max(0, steps - now.step)
}

/** The bar line: `label [=====>    ] step/steps pct% ETA t`, cut to `columns` − 1 characters. */
export const render = (t: Tick, seconds: number | undefined, columns: number): string => {
  const fraction = t.steps > 0 ? Math.min(1, Math.max(0, t.step / t.steps)) : 0
  const tail = ` ${t.step}/${t.steps} ${Math.floor(fraction * 100)}% ETA ${formatDuration(seconds)}`
  const width = Math.max(10, Math.min(30, columns - 1 - t.label.length - 3 - tail.length))
  const filled = Math.floor(fraction * width)
  const bar = "=".repeat(filled) + (filled < width ? ">" + " ".repeat(width - filled - 1) : "")
  return `${t.label} [${bar}]${tail}`.slice(0, Math.max(1, columns - 1))
}

const isTick = (x: unknown): x is Tick =>
  typeof x === "object" && x !== null && "label" in x && "step" in x && "steps" in x

/** A logger for the command line: plain lines, and on a terminal a bar for the ticks (see the module's notes). */
export const make = (): Logger.Logger<unknown, void> => {
  // the bar now drawn, and the run's first tick (the rate's start)
  let drawn: string | undefined
  let run: { readonly label: string; readonly steps: number; readonly first: { at: number; step: number }; last: number } | undefined
  return Logger.make((options) => {
    const terminal = options.fiber.getRef(Terminal)
    const console = options.fiber.getRef(Console.Console)
    const progress = options.fiber.getRef(References.CurrentLogAnnotations)[key]
    const erase = () => {
      if (drawn !== undefined) terminal.write("\r\x1b[K")
    }
    if (progress !== undefined) {
      if (!terminal.tty) return
      if (!isTick(progress)) {
        erase()
        drawn = undefined
        run = undefined
        return
      }
      const at = options.date.getTime()
      if (run === undefined || run.label !== progress.label || run.steps !== progress.steps || progress.step <= run.last) {
        run = { label: progress.label, steps: progress.steps, first: { at, step: progress.step }, last: progress.step }
      }
      run.last = progress.step
      const text = render(progress, eta(run.first, { at, step: progress.step }, progress.steps), terminal.columns)
      erase()
      if (progress.step >= progress.steps) {
        drawn = undefined
        run = undefined
        return
      }
      terminal.write(text)
      drawn = text
      return
    }
    const message = Array.isArray(options.message) ? options.message.map(String).join(" ") : String(options.message)
    const errors = LogLevel.isGreaterThanOrEqualTo(options.logLevel, "Warn")
    if (terminal.tty) erase()
    if (errors) console.error(message)
    else console.log(message)
    if (terminal.tty && drawn !== undefined) terminal.write(drawn)
  })
}

/** The command line's logger in place of Effect's default one (a fresh one each time the layer is built). */
export const layer: Layer.Layer<never> = Logger.layer([Effect.sync(make)])
