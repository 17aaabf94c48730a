/**
 * The `conceptmoe` command line.
 *
 * @since 0.1.0
 */
import { NodeRuntime, NodeServices } from "@effect/platform-node"
import { Effect } from "effect"
import { Command } from "effect/cli"
import { bench } from "./bench.ts"
import { budget } from "./budget.ts"
import { compare } from "./compare.ts"
import { exportCommand } from "./export.ts"
import { generate } from "./generate.ts"
import { reallocate } from "./reallocate.ts"
import { report } from "./report.ts"
import { train, verify } from "./train.ts"

const cli = Command.make("conceptmoe").pipe(
  Command.withDescription("Typed block graphs with static budgets; ConceptMoE (arXiv 2601.21420)."),
  Command.withSubcommands([budget, reallocate, report, train, verify, compare, generate, bench, exportCommand])
)

// typed failures are reported by each command; anything unexpected still gets one line, not silence
const program = Command.run(cli, { version: "0.1.0" }).pipe(
  Effect.catchDefect((defect) =>
    Effect.sync(() => {
      const message = defect instanceof Error ? defect.message : String(defect)
      process.stderr.write(`error: internal: ${message}\n`)
      if (process.env["CONCEPTMOE_DEBUG"] !== undefined && defect instanceof Error) process.stderr.write(`${defect.stack}\n`)
      process.exitCode = 1
    })
  ),
  Effect.provide(NodeServices.layer)
)

NodeRuntime.runMain(program, { disableErrorReporting: true })
