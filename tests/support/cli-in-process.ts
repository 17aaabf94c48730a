/**
 * The command line run in-process: the same command tree and runner as bin/conceptmoe.js, with
 * stdout and stderr captured, so hundreds of invocations take seconds rather than a process each.
 */
import { NodeServices } from "@effect/platform-node"
import { Console, Effect } from "effect"
import { Command } from "effect/cli"
import { bench } from "../../src/cli/bench.ts"
import { budget } from "../../src/cli/budget.ts"
import { compare } from "../../src/cli/compare.ts"
import { convert } from "../../src/cli/convert.ts"
import { exportCommand } from "../../src/cli/export.ts"
import { generate } from "../../src/cli/generate.ts"
import { importCommand } from "../../src/cli/import.ts"
import { reallocate } from "../../src/cli/reallocate.ts"
import { report } from "../../src/cli/report.ts"
import { runCli } from "../../src/cli/Run.ts"
import { train, verify } from "../../src/cli/train.ts"

export const cli = Command.make("conceptmoe").pipe(
  Command.withSubcommands([budget, reallocate, report, train, verify, compare, generate, bench, exportCommand, importCommand, convert])
)

export interface Ran {
  readonly code: number
  readonly out: string
  readonly err: string
  /** An unexpected failure (a bug), if the run ended in one. */
  readonly defect: unknown
}

const text = (args: ReadonlyArray<unknown>) => args.map((a) => (typeof a === "string" ? a : String(a))).join(" ")

/** Runs `conceptmoe <args>` in this process. */
export const runInProcess = (args: ReadonlyArray<string>): Promise<Ran> => {
  const out: Array<string> = []
  const err: Array<string> = []
  const noop = () => {}
  const console: Console.Console = {
    assert: noop,
    clear: noop,
    count: noop,
    countReset: noop,
    debug: (...a) => err.push(text(a)),
    dir: noop,
    dirxml: noop,
    error: (...a) => err.push(text(a)),
    group: noop,
    groupCollapsed: noop,
    groupEnd: noop,
    info: (...a) => err.push(text(a)),
    log: (...a) => out.push(text(a)),
    table: noop,
    time: noop,
    timeEnd: noop,
    timeLog: noop,
    trace: (...a) => err.push(text(a)),
    warn: (...a) => err.push(text(a))
  }
  return Effect.runPromise(
    runCli(cli, args, "test").pipe(
      Effect.provideService(Console.Console, console),
      Effect.provide(NodeServices.layer),
      Effect.map((o) => ({ code: o.code, out: out.join("\n"), err: err.join("\n"), defect: o.defect }))
    )
  )
}
