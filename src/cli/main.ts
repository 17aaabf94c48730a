/**
 * The `conceptmoe` command line.
 *
 * @since 0.1.0
 */
import { NodeRuntime, NodeServices } from "@effect/platform-node"
import { Effect } from "effect"
import { Command } from "effect/cli"
import { budget } from "./budget.ts"
import { reallocate } from "./reallocate.ts"
import { report } from "./report.ts"

const cli = Command.make("conceptmoe").pipe(
  Command.withDescription("Typed block graphs with static budgets; ConceptMoE (arXiv 2601.21420)."),
  Command.withSubcommands([budget, reallocate, report])
)

NodeRuntime.runMain(Command.run(cli, { version: "0.1.0" }).pipe(Effect.provide(NodeServices.layer)), { disableErrorReporting: true })
