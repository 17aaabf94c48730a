/**
 * `conceptmoe budget`: the static budget of one config, or two side by side.
 *
 * @since 0.1.0
 */
import { Console, Effect, Option } from "effect"
import { Argument, Command, Flag } from "effect/cli"
import { budgetOf, diff, match, renderDiff } from "../cost/Budget.ts"
import { budgetReport, stringifyExact } from "../cost/Report.ts"
import { conceptStages } from "../cost/Stages.ts"
import { type LoadedModel, loadModel } from "../models/Load.ts"
import { renderBudget } from "./render.ts"
import { blocks, flagLimits, format, handled, intFlag, kvBytes, reportFailure, seqLen, seqLenWithin, tolerance, withBlocks } from "./shared.ts"

const reportOf = (m: LoadedModel, T: number, bytesPerElement: number) =>
  budgetReport(m, { seqLen: T, bytesPerElement, ...(m.concept === undefined ? {} : { stages: conceptStages }) })

export const budget = Command.make(
  "budget",
  {
    config: Argument.String("config").pipe(
      Argument.withDescription("a conceptmoe config (\"kind\": dense | moe | conceptmoe | graph) or a Hugging Face config.json")
    ),
    seqLen,
    format,
    blocks,
    depth: intFlag("depth", 0, flagLimits.depth).pipe(Flag.withDescription("depth of the per-path table (table format)"), Flag.withDefault(2)),
    kvBytes,
    against: Flag.String("against").pipe(
      Flag.withDescription("a second config: print both budgets side by side and check they match within --tolerance"),
      Flag.optional
    ),
    tolerance,
    excludeParts: Flag.String("exclude-parts").pipe(
      Flag.withDescription("comma-separated parts left out of both budgets with --against (e.g. chunk,jointDecoding: the paper's convention)"),
      Flag.withDefault("")
    )
  },
  Effect.fn("budget")(function*({ against, blocks, config, depth, excludeParts, format, kvBytes, seqLen, tolerance }) {
    const load = (file: string) => withBlocks(blocks, loadModel(file))
    const model = yield* load(config)
    yield* seqLenWithin(seqLen, model)
    const T = Option.getOrElse(seqLen, () => model.contextLength)
    const report = reportOf(model, T, kvBytes)
    if (Option.isNone(against)) {
      yield* Console.log(format === "json" ? stringifyExact(report, 2) : renderBudget(report, model.analysis, depth))
      return
    }
    const other = yield* load(against.value)
    yield* seqLenWithin(seqLen, other)
    const names = [model.name, other.name] as const
    const exclude = excludeParts.split(",").map((s) => s.trim()).filter((s) => s !== "")
    const matched = yield* Effect.result(match(model.analysis, other.analysis, { tolerance, names, exclude }))
    const rows = diff(budgetOf(model.analysis, exclude), budgetOf(other.analysis, exclude))
    if (format === "json") {
      yield* Console.log(stringifyExact({
        baseline: report,
        candidate: reportOf(other, T, kvBytes),
        matched: matched._tag === "Success",
        tolerance,
        excludedParts: exclude,
        diff: rows
      }, 2))
    } else {
      yield* Console.log(renderDiff(rows, names))
      yield* Console.log(
        matched._tag === "Success"
          ? `\nmatched within ±${tolerance * 100}%: params ${(matched.success.residual.params * 100).toFixed(3)}%, FLOPs/token ${(matched.success.residual.flops * 100).toFixed(3)}%`
          : `\nNOT matched within ±${tolerance * 100}% (${matched.failure.failed.join(", ")})`
      )
    }
    if (matched._tag === "Failure") {
      yield* reportFailure(`budgets do not match: ${config} and --against ${against.value} differ by more than ±${tolerance * 100}% in ${matched.failure.failed.join(", ")}`)
    }
  }, handled)
).pipe(
  Command.withDescription("Static parameter, FLOP and KV-cache budget of a model config; no weights are allocated."),
  Command.withExamples([
    { command: "conceptmoe budget examples/moe-small.json", description: "budget table of the example MoE" },
    { command: "conceptmoe budget examples/hf/deepseek-v3.json --seq-len 4096 --format json", description: "DeepSeek-V3 as JSON" },
    { command: "conceptmoe budget examples/moe-small.json --against examples/moe-small-fine.json", description: "side-by-side budgets, matched within the tolerance?" },
    { command: "conceptmoe budget examples/conceptmoe-base-top.json --format json", description: "a ConceptMoE config, with its per-stage breakdown" }
  ])
)
