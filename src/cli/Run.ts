/**
 * Running the command line: usage errors end in one line on stderr and exit code 2 (the help is
 * printed only when asked for with `--help`), failures in one `error:` line and exit code 1.
 * {@link runCli} runs a command tree on given arguments and returns the exit code, so tests run
 * the CLI in-process.
 *
 * @since 0.3.0
 */
import { Cause, Console, Effect } from "effect"
import { CliError, CliOutput, Command } from "effect/cli"
import { ExitCode } from "./shared.ts"
import * as Progress from "../internal/Progress.ts"
import { isRunFailure } from "../internal/RunErrors.ts"
import * as Settings from "../internal/Settings.ts"

/** What a run ended with: its exit code, and the unexpected failure (a bug) if there was one. */
export interface Outcome {
  readonly code: number
  readonly defect: unknown
}

const usageLine = (commandPath: ReadonlyArray<string>, message: string) =>
  `error: ${message.trim().replace(/\s*\n\s*/g, "; ")} (see ${commandPath.join(" ")} --help)`

/** Help only on `--help`; a parse error or a missing subcommand is one line on stderr. */
const presenter: CliOutput.Presenter = {
  present: (event) => {
    switch (event._tag) {
      case "InvalidInvocation": {
        const [first, ...rest] = event.errors
        const message = first === undefined ? "invalid arguments" : first.message
        return Console.error(usageLine(event.commandPath, message + (rest.length > 0 ? ` (and ${rest.length} more)` : "")))
      }
      case "Help":
        if (event.reason === "Implicit") {
          return Console.error(usageLine(event.commandPath, "a subcommand is required"))
        }
        return CliOutput.defaultPresenter.present(event)
      default:
        return CliOutput.defaultPresenter.present(event)
    }
  }
}

const isShowHelp = (e: unknown): boolean => CliError.isCliError(e) && e._tag === "ShowHelp"

/**
 * Runs `command` on `args`. Typed failures are reported by each command (`handled`); a parse error
 * is reported here with exit code 2; anything else (a bug) is one line with exit code 1, and is
 * returned as `defect`.
 */
export const runCli = <const Name extends string, Input, ContextInput, E, R>(
  command: Command.Command<Name, Input, ContextInput, E, R>,
  args: ReadonlyArray<string>,
  version: string
): Effect.Effect<Outcome, never, R | Command.Environment> =>
  Effect.suspend(() => {
    const exit = { code: 0 }
    let defect: unknown = undefined
    return Command.runWith(command, { version })(args).pipe(
      Effect.catchCause((cause) => {
        if (Cause.hasInterruptsOnly(cause)) return Effect.interrupt
        const failure = Cause.findErrorOption(cause)
        if (failure._tag === "Some" && isShowHelp(failure.value)) {
          exit.code = 2
          return Effect.void
        }
        const error = failure._tag === "Some" ? failure.value : Cause.squash(cause)
        // a typed error of the runtime thrown from tensor code that no Effect caught is the user's too
        const expected = failure._tag === "Some" || isRunFailure(error)
        if (!expected) defect = error
        const message = error instanceof Error ? error.message : String(error)
        exit.code = 1
        return Console.error(`error: ${expected ? message : `unexpected failure, please report it: ${message}`}`).pipe(
          Effect.andThen(Settings.get(Settings.debug).pipe(
            Effect.orElseSucceed(() => false),
            Effect.flatMap((debug) => (debug && error instanceof Error ? Console.error(error.stack) : Effect.void))
          ))
        )
      }),
      Effect.provideService(ExitCode, exit),
      Effect.provideService(CliOutput.Presenter, presenter),
      // progress through Effect's logger: plain lines, a bar on a terminal, silenced by --log-level warn
      Effect.provide(Progress.layer),
      Effect.map(() => ({ code: exit.code, defect }))
    )
  })
