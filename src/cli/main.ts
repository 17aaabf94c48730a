/**
 * The `conceptmoe` command line.
 *
 * @since 0.1.0
 */
import { NodeRuntime, NodeServices } from "@effect/platform-node"
import { Console, Effect, Option, Result, Schema } from "effect"
import { Argument, Command, Flag } from "effect/cli"
import { diff, match, budgetOf, renderDiff } from "../cost/Budget.ts"
import { budgetReport } from "../cost/Report.ts"
import { loadModel as loadModelWith } from "../models/Load.ts"
import { BlockRegistry, builtins, isBlockKind, register } from "../graph/Registry.ts"
import * as path from "node:path"
import { pathToFileURL } from "node:url"
import { renderBudget } from "./render.ts"

/** A bad command-line value. */
export class UsageError extends Schema.TaggedError<UsageError>()("UsageError", { message: Schema.String }) {}

const format = Flag.Literals("format", ["table", "json"]).pipe(
  Flag.withDescription("table (human) or json (one JSON object)"),
  Flag.withDefault("table")
)

const seqLen = Flag.Int("seq-len").pipe(
  Flag.withDescription("sequence length T for the attention-map, forward and KV-cache figures (default: the model's context length)"),
  Flag.optional
)

const blocks = Flag.String("blocks").pipe(
  Flag.withDescription("comma-separated TypeScript/JavaScript modules whose exported block kinds are registered (for \"kind\": \"graph\" configs)"),
  Flag.optional
)

/** Imports modules and registers every block kind they export. */
const registryWith = (modules: Option.Option<string>) =>
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

const budget = Command.make(
  "budget",
  {
    config: Argument.String("config").pipe(
      Argument.withDescription("a conceptmoe config (\"kind\": dense | moe) or a Hugging Face config.json")
    ),
    seqLen,
    format,
    blocks,
    depth: Flag.Int("depth").pipe(Flag.withDescription("depth of the per-path table (table format)"), Flag.withDefault(2)),
    kvBytes: Flag.Int("kv-bytes").pipe(Flag.withDescription("bytes per cached KV element"), Flag.withDefault(2)),
    against: Flag.String("against").pipe(
      Flag.withDescription("a second config: print both budgets side by side and check they match"),
      Flag.optional
    ),
    tolerance: Flag.Finite("tolerance").pipe(
      Flag.withDescription("relative tolerance for --against (default 0.01)"),
      Flag.withDefault(0.01)
    )
  },
  Effect.fn("budget")(function*({ against, blocks, config, depth, format, kvBytes, seqLen, tolerance }) {
    if (Option.isSome(seqLen) && seqLen.value <= 0) {
      return yield* Effect.fail(new UsageError({ message: `--seq-len must be a positive integer, got ${seqLen.value}` }))
    }
    const registry = yield* registryWith(blocks)
    const loadModel = (file: string) => loadModelWith(file).pipe(Effect.provideService(BlockRegistry, registry))
    const model = yield* loadModel(config)
    const T = Option.getOrElse(seqLen, () => model.contextLength)
    const report = budgetReport(model, { seqLen: T, bytesPerElement: kvBytes })
    if (Option.isNone(against)) {
      yield* Console.log(format === "json" ? JSON.stringify(report, null, 2) : renderBudget(report, model.analysis, depth))
      return
    }
    const other = yield* loadModel(against.value)
    const otherReport = budgetReport(other, { seqLen: T, bytesPerElement: kvBytes })
    const names = [model.name, other.name] as const
    const matched = yield* Effect.result(match(model.analysis, other.analysis, { tolerance, names }))
    const rows = diff(budgetOf(model.analysis), budgetOf(other.analysis))
    if (format === "json") {
      yield* Console.log(JSON.stringify({
        baseline: report,
        candidate: otherReport,
        matched: matched._tag === "Success",
        tolerance,
        diff: rows
      }, null, 2))
    } else {
      yield* Console.log(renderDiff(rows, names))
      yield* Console.log(
        matched._tag === "Success"
          ? `\nmatched within ±${tolerance * 100}%: params ${(matched.success.residual.params * 100).toFixed(3)}%, FLOPs/token ${(matched.success.residual.flops * 100).toFixed(3)}%`
          : `\nNOT matched within ±${tolerance * 100}% (${matched.failure.failed.join(", ")})`
      )
    }
    if (matched._tag === "Failure") return yield* Effect.fail(matched.failure)
  }, (self) => self.pipe(Effect.catch((e) => fail(e._tag === "BudgetMismatch" ? "budgets do not match" : e.message))))
).pipe(
  Command.withDescription("Static parameter, FLOP and KV-cache budget of a model config; no weights are allocated."),
  Command.withExamples([
    { command: "conceptmoe budget examples/moe-small.json", description: "budget table of the example MoE" },
    { command: "conceptmoe budget examples/hf/deepseek-v3.json --seq-len 4096 --format json", description: "DeepSeek-V3 as JSON" },
    { command: "conceptmoe budget examples/moe-small.json --against examples/moe-small-fine.json", description: "side-by-side budgets, matched within the tolerance?" }
  ])
)


const cli = Command.make("conceptmoe").pipe(
  Command.withDescription("Typed block graphs with static budgets; ConceptMoE (arXiv 2601.21420)."),
  Command.withSubcommands([budget])
)

const program = Command.run(cli, { version: "0.1.0" }).pipe(Effect.provide(NodeServices.layer))

/** Prints one clear line (no stack trace) and sets a failing exit code. */
function fail(message: string) {
  return Effect.sync(() => {
    process.stderr.write(`error: ${message}\n`)
    process.exitCode = 1
  })
}

NodeRuntime.runMain(program, { disableErrorReporting: true })
