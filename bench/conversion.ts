/**
 * The conversion experiment of docs/conversion.md, around two `conceptmoe train` runs:
 *
 *   node bench/conversion.ts restart <source run> <out run> [key=value settings…]
 *     a run directory that continues the source MoE's weights as a fresh run (step 0, zero Adam
 *     moments: the same optimizer start as `conceptmoe convert`), with the source run's settings
 *     and the overrides given; `train --config <out>/train.json --out <out> --resume` runs it.
 *   node bench/conversion.ts settings <run> [key=value settings…]
 *     rewrites <run>/train.json and the checkpoint's recorded settings with the overrides (so that
 *     a converted run continues with the same settings as the restarted MoE).
 *   node bench/conversion.ts exact <source run> <converted run> [rows]
 *     the largest difference between the source's logits and the converted model's at ramp 0 (cpu,
 *     evaluation and training mode), on the first validation rows (SOTU, the runs' split).
 *   node bench/conversion.ts report <moe run> <converted run> <plot.svg>
 *     a markdown table of both runs (training loss, validation bits/byte, compression) and a plot.
 */
import * as fs from "node:fs"
import * as path from "node:path"
import { Effect } from "effect"
import { decode, encode } from "../src/train/Checkpoint.ts"
import { lineChart, toSvg } from "../src/report/Plots.ts"
import { modelFromJson } from "../src/models/Load.ts"
import { load as loadBackend } from "../src/runtime/Backend.ts"
import { forward, materialize } from "../src/runtime/Lower.ts"
import { loadParams } from "../src/train/Train.ts"
import { sotuData, validationBatches } from "../src/train/Data.ts"

const [command, ...args] = process.argv.slice(2)

const overrides = (list: ReadonlyArray<string>): Record<string, unknown> =>
  Object.fromEntries(list.map((kv) => {
    const [k, v] = kv.split("=")
    return [k!, JSON.parse(v!)]
  }))

const readCheckpoint = (dir: string) => Effect.runSync(decode(fs.readFileSync(path.join(dir, "checkpoint.safetensors")), dir))

const writeRun = (dir: string, tensors: Parameters<typeof encode>[0], metadata: Record<string, string>, train: Record<string, unknown>) => {
  fs.mkdirSync(dir, { recursive: true })
  fs.writeFileSync(path.join(dir, "train.json"), JSON.stringify(train, null, 2) + "\n")
  fs.writeFileSync(path.join(dir, "checkpoint.safetensors"), encode(tensors, metadata))
}

if (command === "restart") {
  const [source, out, ...rest] = args
  const ck = readCheckpoint(source!)
  const settings = { ...JSON.parse(ck.metadata["settings"]!) as Record<string, unknown>, ...overrides(rest) }
  const config = JSON.parse(ck.metadata["config"]!) as unknown
  const tensors = new Map([...ck.tensors].map(([k, t]) => [k, k.startsWith("adam.") ? { shape: t.shape, data: new Float32Array(t.data.length) } : t] as const))
  fs.mkdirSync(out!, { recursive: true })
  fs.writeFileSync(path.join(out!, "model.json"), JSON.stringify(config, null, 2) + "\n")
  writeRun(out!, tensors, { ...ck.metadata, step: "0", settings: JSON.stringify(settings) }, { model: "model.json", ...settings })
  console.log(`wrote ${out}: ${ck.metadata["model"]} from step ${ck.metadata["step"]} as step 0, Adam moments zero`)
} else if (command === "settings") {
  const [run, ...rest] = args
  const ck = readCheckpoint(run!)
  const train = { ...JSON.parse(fs.readFileSync(path.join(run!, "train.json"), "utf8")) as Record<string, unknown>, ...overrides(rest) }
  const { model: _m, ...settings } = train
  writeRun(run!, ck.tensors, { ...ck.metadata, settings: JSON.stringify(settings) }, train)
  console.log(`${run}: settings ${JSON.stringify(overrides(rest))}`)
} else if (command === "exact") {
  const [source, converted, rows] = args
  const { tf } = await Effect.runPromise(loadBackend("cpu"))
  const lowOf = async (dir: string) => {
    const ck = readCheckpoint(dir)
    const model = await Effect.runPromise(modelFromJson(JSON.parse(ck.metadata["config"]!), dir))
    const low = materialize(tf, model.analysis, 0)
    await Effect.runPromise(loadParams(low, dir, ck.tensors))
    return { low, settings: JSON.parse(ck.metadata["settings"]!) as { seqLen: number; seed: number } }
  }
  const a = await lowOf(source!)
  const b = await lowOf(converted!)
  const batch = validationBatches(sotuData(a.settings.seed).validation, Number(rows ?? 2), a.settings.seqLen, 1)[0]!
  for (const training of [false, true]) {
    const x = tf.tidy(() => forward(a.low, batch, { training, seed: 1 }).logits).dataSync()
    const y = tf.tidy(() => forward(b.low, batch, { training, seed: 1, ramp: 0 }).logits).dataSync()
    const z = tf.tidy(() => forward(b.low, batch, { training, seed: 1, ramp: 1 }).logits).dataSync()
    let d = 0
    let paper = 0
    for (let i = 0; i < x.length; i++) {
      d = Math.max(d, Math.abs(x[i]! - y[i]!))
      paper = Math.max(paper, Math.abs(x[i]! - z[i]!))
    }
    console.log(`${training ? "training" : "evaluation"}: ${batch.rows}×${batch.length} tokens, max |Δ logits| at ramp 0 ${d.toExponential(2)}; with the paper's z = ĥ + ĉ (ramp 1) ${paper.toFixed(3)}`)
  }
} else if (command === "report") {
  const [moe, ct, svg] = args
  type M = { step: number; loss: number; ce: number; valBitsPerByte?: number; compression?: number; valCompression?: number }
  const metrics = (dir: string): Array<M> =>
    fs.readFileSync(path.join(dir, "metrics.jsonl"), "utf8").split("\n").filter((l) => l.trim() !== "").map((l) => JSON.parse(l) as M)
  const a = metrics(moe!)
  const b = metrics(ct!)
  const mean = (xs: ReadonlyArray<number>) => xs.reduce((s, x) => s + x, 0) / xs.length
  const window = (ms: ReadonlyArray<M>, from: number, to: number, f: (m: M) => number | undefined) => {
    const xs = ms.filter((m) => m.step >= from && m.step < to).map(f).filter((x): x is number => x !== undefined)
    return xs.length === 0 ? "" : mean(xs).toFixed(3)
  }
  const steps = Math.max(...a.map((m) => m.step)) + 1
  const rows = ["| steps | MoE train CE | converted train CE | converted sampled R | MoE val bits/byte | converted val bits/byte | converted val R (p ≥ ½) |", "|---|---|---|---|---|---|---|"]
  for (let s = 0; s < steps; s += 10) {
    const val = (ms: ReadonlyArray<M>) => ms.find((m) => m.step >= s && m.step < s + 10 && m.valBitsPerByte !== undefined)
    rows.push(`| ${s + 1}–${s + 10} | ${window(a, s, s + 10, (m) => m.ce)} | ${window(b, s, s + 10, (m) => m.ce)} | ${window(b, s, s + 10, (m) => m.compression)} | ${val(a)?.valBitsPerByte?.toFixed(4) ?? ""} | ${val(b)?.valBitsPerByte?.toFixed(4) ?? ""} | ${val(b)?.valCompression?.toFixed(2) ?? ""} |`)
  }
  console.log(rows.join("\n"))
  const series = (ms: ReadonlyArray<M>, name: string) => [
    ...ms.map((m) => ({ series: `${name} train CE (nats/byte)`, x: m.step + 1, y: m.ce })),
    ...ms.filter((m) => m.valBitsPerByte !== undefined).map((m) => ({ series: `${name} val bits/byte`, x: m.step + 1, y: m.valBitsPerByte! }))
  ]
  const out = await toSvg(lineChart({
    title: "Continued training: the source MoE vs its ConceptMoE conversion (same batches)",
    x: "step of the continued run",
    y: "loss",
    linear: true,
    rows: [...series(a, "MoE"), ...series(b, "converted")]
  }))
  fs.writeFileSync(svg!, out)
  console.log(`wrote ${svg}`)
} else {
  console.error("usage: node bench/conversion.ts restart|settings|report …")
  process.exitCode = 2
}
