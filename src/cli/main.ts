/**
 * The `conceptmoe` command line.
 *
 * @since 0.1.0
 */
import { NodeServices } from "@effect/platform-node"
import { Effect, Runtime } from "effect"
import { Command } from "effect/cli"
import { bench } from "./bench.ts"
import { budget } from "./budget.ts"
import { compare } from "./compare.ts"
import { convert } from "./convert.ts"
import { exportCommand } from "./export.ts"
import { generate } from "./generate.ts"
import { importCommand } from "./import.ts"
import { reallocate } from "./reallocate.ts"
import { report } from "./report.ts"
import { runCli } from "./Run.ts"
import { train, verify } from "./train.ts"

const cli = Command.make("conceptmoe").pipe(
  Command.withDescription("Typed block graphs with static budgets; ConceptMoE (arXiv 2601.21420)."),
  Command.withSubcommands([budget, reallocate, report, train, verify, compare, generate, bench, exportCommand, importCommand, convert])
)

/**
 * Exit codes: 0 success, 1 failure, 2 usage error (Run.ts). SIGINT and SIGTERM keep their default
 * action outside a training run (which installs its own handlers, train/Stop.ts): a long
 * synchronous computation (a large budget, the solver) stops at once, rather than when it next
 * yields to the event loop; every file is written to a temporary name and renamed, so nothing is
 * left half-written.
 */
const runMain = Runtime.makeRunMain(({ fiber, teardown }) => {
  fiber.addObserver((exit) => teardown(exit, (code) => {
    if (code !== 0) process.exit(code)
  }))
})

runMain(
  runCli(cli, process.argv.slice(2), "0.1.0").pipe(
    Effect.map((outcome) => {
      if (outcome.code !== 0) process.exitCode = outcome.code
    }),
    Effect.provide(NodeServices.layer)
  ),
  { disableErrorReporting: true }
)
