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
import { generate } from "./generate.ts"
import { reallocate } from "./reallocate.ts"
import { report } from "./report.ts"
import { train, verify } from "./train.ts"

const cli = Command.make("conceptmoe").pipe(
  Command.withDescription("Typed block graphs with static budgets; ConceptMoE (arXiv 2601.21420)."),
  Command.withSubcommands([budget, reallocate, report, train, verify, compare, generate, bench])
)

NodeRuntime.runMain(Command.run(cli, { version: "0.1.0" }).pipe(Effect.provide(NodeServices.layer)), { disableErrorReporting: true })
