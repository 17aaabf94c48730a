/**
 * `conceptmoe import <Hugging Face checkpoint directory> --out RUN`.
 *
 * @since 0.4.0
 */
import { Console, Effect, Option } from "effect"
import { Argument, Command, Flag } from "effect/cli"
import * as Cost from "../cost/Cost.ts"
import { formatNumber } from "../internal/Table.ts"
import { importRun } from "../export/Import.ts"
import { format, handled } from "./shared.ts"

export const importCommand = Command.make(
  "import",
  {
    source: Argument.String("dir").pipe(
      Argument.withDescription("a Hugging Face checkpoint directory: config.json and model.safetensors (or model.safetensors.index.json and its shards)")
    ),
    out: Flag.String("out").pipe(Flag.withDescription("the run directory to write (must not hold a checkpoint yet)")),
    name: Flag.String("name").pipe(Flag.withDescription("the model's name (default: the directory's name)"), Flag.optional),
    format
  },
  Effect.fn("import")(function*(f) {
    const r = yield* importRun(f.source, f.out, Option.isSome(f.name) ? { name: f.name.value } : {})
    const next = [
      `conceptmoe verify --checkpoint ${f.out}`,
      `conceptmoe generate --checkpoint ${f.out} --prompt "..."`,
      `conceptmoe train --config ${r.files.train} --out ${f.out} --resume`
    ]
    if (f.format === "json") {
      yield* Console.log(JSON.stringify({ model: r.model.name, format: r.model.format, params: Cost.total(r.model.analysis.cost.params), dtypes: r.dtypes, ignored: r.ignored, notes: r.notes, files: r.files, next }, null, 2))
      return
    }
    const dtypes = Object.entries(r.dtypes).map(([d, n]) => `${n} ${d}`).join(", ")
    yield* Console.log([
      `imported ${r.model.name} (${r.model.format}): ${formatNumber(Cost.total(r.model.analysis.cost.params))} parameters from ${f.source} (tensors read: ${dtypes}; stored as float32)`,
      ...r.ignored.map((i) => `  not read: ${i.tensor} (${i.why})`),
      ...r.notes.map((n) => `  note: ${n}`),
      `wrote ${r.files.checkpoint} (step 0, Adam moments zero), ${r.files.model}, ${r.files.train}`,
      `next: ${next.join("; ")}`
    ].join("\n"))
  }, handled)
).pipe(Command.withDescription("Import a Hugging Face checkpoint (config.json + safetensors) into a run directory that verify, generate, convert and train --resume read."))
