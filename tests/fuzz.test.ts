/**
 * Hostile configs and command lines (issue 20; docs/reliability.md, "Configs and the command
 * line"). A seeded generator makes 10,000 configs — Hugging Face and native, valid ones mutated
 * with zeros, negatives, fractions, huge numbers, strings, nulls, missing and extra keys, odd
 * `model_type`s and `kind`s — and runs each through the loader, the budget report and (one MoE
 * baseline in eight) the reallocation solver. Then 240 command lines through the CLI, in-process:
 * budget, reallocate, report, verify, train, generate, export and convert with bad flags, values
 * and files (missing, a directory, empty, not JSON, `__proto__`, 10^12 layers, 3,000-deep graphs,
 * broken checkpoints, a 400-layer solver baseline, DeepSeek-V3 to verify and train); the first
 * eight have known outcomes (among them the only real training, two tiny steps on cpu). Each case
 * must end accepted, with exact, finite numbers, or refused with a typed error whose message names
 * what is wrong. A crash, an untyped error, a stack trace, "undefined"
 * or "internal" in a message is a defect; the suite expects 0. It writes only in a temp dir.
 *
 * The seed is fixed (CONCEPTMOE_FUZZ_SEED overrides it; CONCEPTMOE_FUZZ_CONFIGS and
 * CONCEPTMOE_FUZZ_CLI the counts), so a failure names its case and repeats. A case that kills the
 * process (out of memory, an abort) names no case: set CONCEPTMOE_FUZZ_TRACE=<file> and the file
 * holds the last case begun.
 */
import { assert, describe, it } from "@effect/vitest"
import { Cause, Effect, Exit } from "effect"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import * as Cost from "../src/cost/Cost.ts"
import { budgetReport, stringifyExact } from "../src/cost/Report.ts"
import { conceptStages } from "../src/cost/Stages.ts"
import { limits } from "../src/graph/Limits.ts"
import { ConfigError } from "../src/models/Errors.ts"
import { modelFromJson } from "../src/models/Load.ts"
import { reallocate, strategies } from "../src/models/Reallocate.ts"
import { prng } from "../src/internal/Random.ts"
import { runInProcess } from "./support/cli-in-process.ts"
import { root } from "./support/models.ts"

const seed = Number(process.env["CONCEPTMOE_FUZZ_SEED"] ?? 20)
const configCount = Number(process.env["CONCEPTMOE_FUZZ_CONFIGS"] ?? 10_000)
const cliCount = Number(process.env["CONCEPTMOE_FUZZ_CLI"] ?? 240)

/** The project's seeded generator (the suite must not depend on Math.random). */
const rng = prng
type Rand = () => number
const pick = <A>(r: Rand, xs: ReadonlyArray<A>): A => xs[Math.floor(r() * xs.length)]!
const int = (r: Rand, lo: number, hi: number) => lo + Math.floor(r() * (hi - lo + 1))

/** Valid small configs of every format: the starting points that mutations break. */
const bases = (r: Rand): ReadonlyArray<Record<string, unknown>> => {
  const d = pick(r, [8, 16, 32])
  const heads = pick(r, [1, 2, 4])
  const layers = int(r, 1, 4)
  const experts = int(r, 2, 8)
  const small = { vocab_size: int(r, 8, 64), hidden_size: d, num_attention_heads: heads, num_hidden_layers: layers, intermediate_size: int(r, 4, 32) }
  const moe = { kind: "moe", vocab: int(r, 8, 64), hidden: d, layers: layers + 2, heads, experts, topK: int(r, 1, experts), expertHidden: int(r, 4, 32), contextLength: 256 }
  return [
    { model_type: "gpt2", vocab_size: small.vocab_size, n_embd: d, n_head: heads, n_layer: layers, n_positions: 128 },
    { model_type: "llama", ...small, num_key_value_heads: heads },
    { model_type: "mistral", ...small, sliding_window: int(r, 1, 64) },
    { model_type: "mixtral", ...small, num_local_experts: experts, num_experts_per_tok: int(r, 1, experts) },
    { model_type: "qwen2_moe", ...small, num_experts: experts, num_experts_per_tok: 1, moe_intermediate_size: 8, shared_expert_intermediate_size: 8, mlp_only_layers: [0] },
    { model_type: "qwen3_moe", ...small, num_experts: experts, num_experts_per_tok: 1, moe_intermediate_size: 8, decoder_sparse_step: 2 },
    { model_type: "olmoe", ...small, num_experts: experts, num_experts_per_tok: 1 },
    { model_type: "deepseek_v2", ...small, num_attention_heads: heads, kv_lora_rank: 8, q_lora_rank: null, qk_rope_head_dim: 4, qk_nope_head_dim: 4, v_head_dim: 4, n_routed_experts: experts, num_experts_per_tok: 1, n_shared_experts: 1, moe_intermediate_size: 8, first_k_dense_replace: 1 },
    { model_type: "deepseek_v3", ...small, kv_lora_rank: 8, q_lora_rank: 8, qk_rope_head_dim: 4, qk_nope_head_dim: 4, v_head_dim: 4, n_routed_experts: experts, num_experts_per_tok: 1, moe_intermediate_size: 8, first_k_dense_replace: 0 },
    { kind: "dense", vocab: small.vocab_size, hidden: d, layers, heads, ffnHidden: int(r, 4, 32), contextLength: 128 },
    moe,
    { ...moe, sharedHidden: 8, denseLayers: 1, denseHidden: 16, positions: "learned", window: 16, tiedEmbeddings: true },
    { kind: "conceptmoe", baseline: moe, ratio: pick(r, [1.5, 2, 3]), encoderLayers: 1, decoderLayers: 1, topK: 1 },
    { kind: "conceptmoe", baseline: moe, ratio: 2, encoderLayers: 1, decoderLayers: 0, loopLayers: 1, loopTimes: 2, hidden: d * 2 },
    {
      kind: "graph",
      contextLength: 64,
      graph: {
        block: "sequence",
        children: [
          { block: "embedding", spec: { vocab: 16, d } },
          { block: "loop", spec: { times: 2 }, children: [{ block: "linear", spec: { dIn: d, dOut: d } }] },
          { block: "lmhead", spec: { d, vocab: 16 } }
        ]
      }
    }
  ]
}

/** Values a hostile user (or a typo) puts in a config. Layer fields avoid counts near the limit only to keep the suite fast (tests/limits.test.ts costs the limit itself). */
const hostile: ReadonlyArray<unknown> = [
  0, -1, -0.5, 0.5, 1, 2, 3, 7, 1.5, 255, 4096, 65_536, 1e6, 16_777_216, 16_777_217, 1 << 20, (1 << 20) + 1, 2 ** 31, 2 ** 53, 2 ** 53 + 2, 1e12, 1e15,
  1e308, -1e308, Number.MAX_SAFE_INTEGER, Number.MIN_VALUE, NaN, Infinity, -Infinity,
  "8", "", "x", "__proto__", "constructor", "toString", null, true, false, [], [1, 2], {}, { a: 1 }, [null], ["0"]
]
const layerFields = new Set(["num_hidden_layers", "n_layer", "layers", "encoderLayers", "decoderLayers", "loopLayers", "denseLayers", "first_k_dense_replace"])
const oddTypes: ReadonlyArray<unknown> = ["bert", "GPT2", "llama ", "__proto__", "constructor", "hasOwnProperty", "", null, 42, ["llama"], { llama: 1 }]
const extraKeys = ["__proto__", "constructor", "prototype", "toString", "foo", "num_layers", "torch_dtype", ""]

interface Case {
  readonly json: unknown
  /** The keys a mutation touched (the error message should name one of them). */
  readonly touched: ReadonlyArray<string>
  readonly label: string
}

const mutate = (r: Rand, base: Record<string, unknown>): Case => {
  let json: Record<string, unknown> = { ...base }
  const touched: Array<string> = []
  const steps = int(r, 0, 3)
  const labels: Array<string> = []
  for (let i = 0; i < steps; i++) {
    const keys = Object.keys(json)
    const op = r()
    if (op < 0.55 && keys.length > 0) {
      const key = pick(r, keys)
      let value = pick(r, key === "model_type" || key === "kind" ? [...oddTypes, ...hostile] : hostile)
      if (layerFields.has(key) && typeof value === "number" && value > 64 && value <= limits.layers) value = 65
      if (key === "baseline" && r() < 0.5) {
        // mutate inside the baseline instead
        const inner = mutate(r, json[key] as Record<string, unknown>)
        value = inner.json
        touched.push(...inner.touched.map((k) => `baseline.${k}`))
      }
      json[key] = value
      touched.push(key)
      labels.push(`${key}=${JSON.stringify(value) ?? String(value)}`)
    } else if (op < 0.75 && keys.length > 0) {
      const key = pick(r, keys)
      const { [key]: _, ...rest } = json
      json = rest
      touched.push(key)
      labels.push(`-${key}`)
    } else {
      const key = pick(r, extraKeys)
      const value = pick(r, hostile)
      Object.defineProperty(json, key, { value, enumerable: true, writable: true, configurable: true })
      labels.push(`+${key}=${JSON.stringify(value) ?? String(value)}`)
    }
  }
  const label = `${String(base["model_type"] ?? base["kind"])} ${labels.join(" ") || "(valid)"}`
  // half the cases go through JSON text, as a file does (NaN and Infinity become null there)
  return r() < 0.5 ? { json, touched, label } : { json: JSON.parse(JSON.stringify(json)), touched, label }
}

const bad = /undefined|internal|\n\s+at /

/**
 * Whether a message names what is wrong: a key the mutations touched (set, removed, or inside a
 * ConceptMoE's baseline), or — for counts past 2^53, which several fields make together — the limit.
 */
const namesTheProblem = (message: string, c: Case) =>
  c.touched.some((k) => message.includes(k.split(".").pop()!)) || /above 2\^53 − 1/.test(message)

const isExactCount = (x: Cost.Exact) => typeof x === "bigint" ? x >= 0n : Number.isFinite(x) && x >= 0 && x <= Number.MAX_SAFE_INTEGER

describe("fuzz: 10,000 hostile configs through the loader, the budget report and the solver", () => {
  it("every config is accepted with exact finite counts, or refused with a typed error naming the field", () => {
    const r = rng(seed)
    const defects: Array<string> = []
    let accepted = 0
    let refused = 0
    let solved = 0
    const started = performance.now()
    for (let i = 0; i < configCount; i++) {
      const c = mutate(r, pick(r, bases(r)))
      const where = `#${i} ${c.label}`
      if (process.env["CONCEPTMOE_FUZZ_TRACE"] !== undefined) fs.writeFileSync(process.env["CONCEPTMOE_FUZZ_TRACE"], `${where}\n${JSON.stringify(c.json)}\n`)
      const exit = Effect.runSyncExit(modelFromJson(c.json, "fuzz.json"))
      if (Exit.isFailure(exit)) {
        const e = Cause.findErrorOption(exit.cause)
        if (e._tag === "None") {
          defects.push(`${where}: defect ${String(Cause.squash(exit.cause))}`)
          continue
        }
        refused++
        const error = e.value
        if (!(error instanceof ConfigError)) defects.push(`${where}: untyped error ${String(error)}`)
        else if (error.problems.length === 0) defects.push(`${where}: no problem listed`)
        else if (bad.test(error.message)) defects.push(`${where}: message ${JSON.stringify(error.message)}`)
        else if (!namesTheProblem(error.message, c)) defects.push(`${where}: the message names none of ${c.touched.join(", ")}: ${error.message}`)
        continue
      }
      accepted++
      const m = exit.value
      try {
        const T = Math.min(m.contextLength, 4096)
        const report = budgetReport(m, { seqLen: T, ...(m.concept === undefined ? {} : { stages: conceptStages }) })
        const counts: ReadonlyArray<readonly [string, Cost.Exact]> = [
          ["params.total", report.params.total],
          ["params.activated", report.params.activated],
          ["flops.matmulPerToken", report.flops.matmulPerToken],
          ["flops.attentionMap", report.flops.attentionMap],
          ["flops.forward", report.flops.forward],
          ["flops.training", report.flops.training],
          ["kvCache.bytes", report.kvCache.bytes]
        ]
        for (const [name, x] of counts) if (!isExactCount(x)) defects.push(`${where}: ${name} = ${String(x)}`)
        if (!Number.isSafeInteger(report.params.total)) defects.push(`${where}: params.total ${report.params.total} is not a safe integer`)
        JSON.parse(stringifyExact(report))
        if (m.decoder !== undefined && m.concept === undefined && i % 8 === 0 && m.decoder.layers.some((l) => l.ffn.kind === "moe")) {
          const options = {
            ratio: pick(r, [0, 1, 1.5, 2, 4, -2, NaN, 1e9]),
            strategy: pick(r, strategies.filter((s) => s !== "width" || m.decoder!.layers.every((l) => l.mixer.kind === "attention"))),
            encoderLayers: int(r, 0, 2),
            decoderLayers: int(r, 0, 2),
            limit: 1,
            seqLen: T
          }
          const solution = Effect.runSyncExit(reallocate(m.decoder, m.analysis, options))
          solved++
          if (Exit.isFailure(solution)) {
            const e = Cause.findErrorOption(solution.cause)
            if (e._tag === "None") defects.push(`${where} reallocate ${JSON.stringify(options)}: defect ${String(Cause.squash(solution.cause))}`)
            else if (e.value._tag !== "InvalidReallocation" && e.value._tag !== "NoReallocation") defects.push(`${where} reallocate: untyped ${String(e.value)}`)
            else if (bad.test(e.value.message)) defects.push(`${where} reallocate: message ${JSON.stringify(e.value.message)}`)
          }
        }
      } catch (e) {
        defects.push(`${where}: ${String(e)}`)
      }
    }
    console.log(`fuzz configs: seed ${seed}, ${configCount} configs: ${accepted} accepted, ${refused} refused, ${solved} solver runs; ${defects.length} defects; ${((performance.now() - started) / 1000).toFixed(1)} s`)
    assert.deepStrictEqual(defects.slice(0, 20), [], `${defects.length} defects of ${configCount}`)
    // the generator reaches both outcomes, and the solver
    assert.isAbove(accepted, configCount / 10)
    assert.isAbove(refused, configCount / 2)
    assert.isAbove(solved, configCount / 200)
  }, 240_000)
})

/** Bytes of a safetensors file: an 8-byte little-endian header length, the header, the data. */
const safetensors = (header: string, data: Buffer = Buffer.alloc(0), length: bigint = BigInt(Buffer.byteLength(header))) => {
  const n = Buffer.alloc(8)
  n.writeBigUInt64LE(length)
  return Buffer.concat([n, Buffer.from(header), data])
}

describe(`fuzz: ${cliCount} hostile command lines, in-process`, () => {
  it("each ends in exit 0, 1 (an error naming the file, flag or field) or 2 (one line naming the flag or argument), and writes only in its temp dir", async () => {
    const r = rng(seed + 1)
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "conceptmoe-fuzz-"))
    const outside = () => [fs.readdirSync(root).sort().join(","), fs.existsSync(path.join(root, "runs")) ? fs.readdirSync(path.join(root, "runs")).sort().join(",") : ""]
    const before = outside()
    const at = (name: string) => path.join(dir, name)
    const write = (name: string, data: string | Buffer) => {
      fs.writeFileSync(at(name), data)
      return at(name)
    }
    const example = (name: string) => path.join(root, "examples", name)
    // what every command may be given in place of a file: missing, a directory, empty, broken
    const broken: Array<string> = [
      at("missing.json"),
      dir,
      "",
      write("empty.json", ""),
      write("not-json.json", "{ model_type: gpt2"),
      write("array.json", "[1, 2]"),
      write("proto.json", `{"model_type": "__proto__"}`),
      write("huge-layers.json", `{"model_type": "llama", "num_hidden_layers": 1e12}`),
      write("deep.json", `{"kind": "graph", "graph": ${"{\"block\": \"sequence\", \"children\": [".repeat(3000)}{}${"]}".repeat(3000)}}`)
    ]
    const tiny = example("compare/moe-tiny.json")
    const configs: Array<string> = [
      ...broken,
      example("moe-small.json"),
      example("moe-base.json"),
      tiny,
      example("hf/gpt2.json"),
      example("hf/deepseek-v3.json"),
      example("conceptmoe-base-top.json")
    ]
    // for reallocate: deep enough that a search over every loop depth is refused by the solver's limit on work
    const deep = write("deep-layers.json", JSON.stringify({ kind: "moe", vocab: 64, hidden: 32, layers: 400, heads: 4, experts: 8, topK: 2, expertHidden: 32, contextLength: 256 }))
    const cr = rng(seed + 2)
    for (let i = 0; i < 12; i++) configs.push(write(`mutated-${i}.json`, JSON.stringify(mutate(cr, pick(cr, bases(cr))).json) ?? "null"))
    // verify builds the model's weights: only the tiny models, DeepSeek-V3 (refused before it allocates its
    // 671 billion parameters) and what is refused before building
    const small = [...broken, tiny, example("compare/conceptmoe-tiny.json"), example("hf/deepseek-v3.json")]
    // checkpoints: empty, garbage, a header length of 2^62 (refused before allocating it), bad JSON, offsets past the end
    fs.mkdirSync(at("no-checkpoint"))
    const checkpoints = [
      ...broken,
      at("no-checkpoint"),
      write("ck-empty.safetensors", ""),
      write("ck-garbage.safetensors", Buffer.from(Array.from({ length: 64 }, (_, i) => (i * 37 + 11) & 255))),
      write("ck-huge-header.safetensors", safetensors("{}", Buffer.alloc(0), 2n ** 62n)),
      write("ck-bad-json.safetensors", safetensors("{abc}")),
      write("ck-past-end.safetensors", safetensors(`{"w":{"dtype":"F32","shape":[1000000],"data_offsets":[0,4000000]}}`, Buffer.alloc(16))),
      write("ck-bad-step.safetensors", safetensors(`{"__metadata__":{"step":"3.5","format":"conceptmoe"},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}`, Buffer.alloc(8)))
    ]
    // training configs: two tiny steps on cpu (the only real training), and ones refused before it starts
    const trainOk = write("train-ok.json", JSON.stringify({ model: tiny, seqLen: 16, batchSize: 2, steps: 2, seed: 0, logEvery: 1, evalEvery: 2, evalBatches: 1, checkpointEvery: 2, optimizer: { lr: 0.003, warmup: 1 } }))
    const trainConfigs = [
      ...broken,
      trainOk,
      write("train-long.json", JSON.stringify({ model: tiny, seqLen: 4096, batchSize: 2, steps: 2 })),
      write("train-huge.json", JSON.stringify({ model: example("hf/deepseek-v3.json"), seqLen: 16, batchSize: 1, steps: 1 })),
      write("train-no-model.json", JSON.stringify({ seqLen: 16, batchSize: 2, steps: 2 })),
      write("train-bad.json", JSON.stringify({ model: tiny, seqLen: -16, batchSize: "2", steps: 1.5, optimizer: { lr: NaN } })),
      write("train-proto.json", JSON.stringify({ model: { kind: "__proto__" }, seqLen: 16, batchSize: 2, steps: 2 }))
    ]
    const outs = () => pick(r, [at(`run-${Math.floor(r() * 1e9)}`), at("run-shared"), "", at("empty.json"), at("missing-parent/x/y")])

    const numbers = ["0", "-1", "-2", "1", "2", "1.5", "1e3", "1e308", "NaN", "Infinity", "abc", "", "16777217", "4096", "0x10", "--", "99999999999999999999"]
    // values each flag takes in normal use: drawn 40% of the time, so that many command lines get past parsing
    const usual: Record<string, ReadonlyArray<string>> = {
      "--seq-len": ["8", "16", "64"],
      "--kv-bytes": ["1", "2"],
      "--tolerance": ["0.05", "0.2"],
      "--depth": ["1", "2"],
      "--encoder-layers": ["1", "2"],
      "--decoder-layers": ["1", "2"],
      "--loop-layers": ["1", "2"],
      "--limit": ["1", "3"],
      "--batch": ["1", "2"],
      "--seed": ["0", "7"],
      "--temperature": ["0", "0.8"],
      "--top-k": ["0", "5"],
      "--val-fraction": ["0.1", "0.5"]
    }
    const value = (flag: string): string => {
      if (usual[flag] !== undefined && r() < 0.4) return pick(r, usual[flag])
      switch (flag) {
        case "--format": return pick(r, ["json", "table", "xml", ""])
        case "--strategy": return pick(r, ["topk", "loop", "width", "topk,loop", "bogus", ""])
        case "--against": return pick(r, configs)
        case "--blocks": return pick(r, [...configs, ...fs.readdirSync(example("extending")).filter((f) => f.endsWith(".ts")).map((f) => example(`extending/${f}`))])
        case "--overheads": return pick(r, ["exclude", "include", "none"])
        case "--merge": return pick(r, ["sum", "last", "mean"])
        case "--exclude-parts": return pick(r, ["chunk,jointDecoding", "", "__proto__"])
        case "--ratio": return r() < 0.5 ? pick(r, ["2", "1.5", "1.5,2", "1,2", "x"]) : pick(r, numbers)
        case "--checkpoint": return pick(r, checkpoints)
        case "--config": return pick(r, trainConfigs)
        case "--backend": return pick(r, ["cpu", "cpu", "bogus", ""])
        case "--out": return outs()
        case "--steps": case "--max-tokens": return pick(r, ["1", "2", "0", "-1", "1.5", "abc", "", "1e308", "NaN"])
        case "--data": return pick(r, [...broken, at("no-checkpoint")])
        case "--prompt": return pick(r, ["", "hello", "\u0000", "é"])
        default: return pick(r, numbers)
      }
    }
    interface Command {
      readonly weight: number
      readonly positional?: () => string
      readonly flags: ReadonlyArray<string>
      /** Flags every invocation gets (unless the draw drops them), so that most reach the command's work. */
      readonly usual?: ReadonlyArray<readonly [string, () => string]>
    }
    const commands: Record<string, Command> = {
      budget: { weight: 6, positional: () => pick(r, configs), flags: ["--seq-len", "--kv-bytes", "--tolerance", "--depth", "--format", "--against", "--exclude-parts", "--blocks"] },
      reallocate: {
        weight: 4,
        positional: () => pick(r, [...configs, deep]),
        flags: ["--ratio", "--strategy", "--seq-len", "--tolerance", "--kv-bytes", "--encoder-layers", "--decoder-layers", "--loop-layers", "--limit", "--format", "--overheads", "--merge"],
        usual: [["--ratio", () => "2"], ["--strategy", () => "topk"]]
      },
      report: { weight: 2, positional: () => pick(r, configs), flags: ["--ratio", "--strategy", "--seq-len", "--tolerance", "--kv-bytes", "--format"], usual: [["--out", () => at(`report-${Math.floor(r() * 1e9)}`)]] },
      verify: { weight: 2, positional: () => pick(r, small), flags: ["--checkpoint", "--seq-len", "--batch", "--seed", "--format", "--backend"], usual: [["--backend", () => "cpu"], ["--seq-len", () => pick(r, ["8", "16"])], ["--batch", () => "1"]] },
      train: { weight: 2, flags: ["--config", "--out", "--steps", "--backend", "--data", "--val-fraction", "--resume"], usual: [["--config", () => pick(r, trainConfigs)], ["--out", outs], ["--backend", () => "cpu"]] },
      generate: { weight: 1, flags: ["--checkpoint", "--prompt", "--max-tokens", "--temperature", "--top-k", "--seed", "--config"], usual: [["--checkpoint", () => pick(r, [...checkpoints, at("run-shared")])], ["--prompt", () => "a"], ["--max-tokens", () => "4"]] },
      export: { weight: 1, positional: () => pick(r, [...small, ...checkpoints]), flags: ["--to", "--out", "--data", "--config"], usual: [["--to", () => pick(r, ["pytorch", "onnx"])], ["--out", () => at(`export-${Math.floor(r() * 1e9)}`)]] },
      convert: { weight: 1, flags: ["--checkpoint", "--ratio", "--strategy", "--out", "--merge"], usual: [["--checkpoint", () => pick(r, [...checkpoints, at("run-shared")])], ["--out", () => at(`convert-${Math.floor(r() * 1e9)}`)]] },
      bogus: { weight: 0.5, positional: () => pick(r, configs), flags: ["--seq-len"] }
    }
    const names = Object.keys(commands)
    const total = names.reduce((n, k) => n + commands[k]!.weight, 0)
    const drawCommand = () => {
      let x = r() * total
      for (const k of names) if ((x -= commands[k]!.weight) < 0) return k
      return names[0]!
    }
    const booleans = new Set(["--resume", "--data", "--help", "--exact"])

    const defects: Array<string> = []
    const codes = [0, 0, 0]
    const byCommand: Record<string, number> = {}
    const started = performance.now()
    // first, fixed command lines with known outcomes: a real two-step training run (the run directory
    // the hostile lines below resume, generate from and convert), what reads it, and refusals that
    // must come before any work (the solver's limit on work; a model too large to hold)
    const shared = at("run-shared")
    const prelude: ReadonlyArray<readonly [number, ReadonlyArray<string>]> = [
      [0, ["train", "--config", trainOk, "--out", shared, "--backend", "cpu"]],
      [0, ["verify", "--checkpoint", shared, "--backend", "cpu", "--seq-len", "8", "--batch", "1"]],
      [0, ["generate", "--checkpoint", shared, "--prompt", "a", "--max-tokens", "2", "--temperature", "0", "--backend", "cpu"]],
      [0, ["budget", tiny, "--format", "json"]],
      [0, ["reallocate", tiny, "--ratio", "2", "--strategy", "topk", "--encoder-layers", "1", "--decoder-layers", "1", "--limit", "1"]],
      [1, ["reallocate", deep, "--ratio", "2", "--strategy", "loop", "--encoder-layers", "1", "--decoder-layers", "1"]],
      [1, ["verify", example("hf/deepseek-v3.json"), "--backend", "cpu"]],
      [1, ["train", "--config", at("train-huge.json"), "--out", at("run-huge"), "--backend", "cpu"]]
    ]
    for (let i = 0; i < cliCount; i++) {
      const name = i < prelude.length ? prelude[i]![1][0]! : drawCommand()
      const spec = commands[name]!
      byCommand[name] = (byCommand[name] ?? 0) + 1
      const args: Array<string> = [name]
      if (i < prelude.length) args.push(...prelude[i]![1].slice(1))
      else {
        if (spec.positional !== undefined && r() < 0.92) args.push(spec.positional())
        for (let k = int(r, 0, 3); k > 0; k--) {
          const flag = r() < 0.08 ? pick(r, ["--bogus", "-x", "--seq-len=4", "--help"]) : pick(r, spec.flags)
          args.push(flag)
          if (flag === "--data" && name === "export") continue
          if (!flag.includes("=") && !(booleans.has(flag) && flag !== "--data") && r() < 0.93) args.push(value(flag))
        }
        for (const [flag, v] of spec.usual ?? []) if (!args.includes(flag) && r() < 0.85) args.push(flag, v())
      }
      const where = `#${i} conceptmoe ${args.map((a) => JSON.stringify(a)).join(" ")}`
      if (process.env["CONCEPTMOE_FUZZ_TRACE"] !== undefined) fs.writeFileSync(process.env["CONCEPTMOE_FUZZ_TRACE"], `${where}\n`)
      const ran = await runInProcess(args)
      if (ran.defect !== undefined) {
        defects.push(`${where}: defect ${String(ran.defect)}`)
        continue
      }
      if (![0, 1, 2].includes(ran.code)) {
        defects.push(`${where}: exit code ${ran.code}`)
        continue
      }
      codes[ran.code]!++
      if (i < prelude.length && ran.code !== prelude[i]![0]) defects.push(`${where}: exit ${ran.code}, expected ${prelude[i]![0]}: ${ran.err.slice(0, 300)}`)
      if (bad.test(ran.err) || bad.test(ran.out)) defects.push(`${where}: ${JSON.stringify((ran.err + ran.out).match(/.*(undefined|internal|\n\s+at ).*/)?.[0])}`)
      if (ran.code === 0) {
        if (args.includes("--help")) continue
        if (ran.out === "" && ran.err === "") defects.push(`${where}: exit 0 and no output`)
        if (/\bNaN\b|Infinity/.test(ran.out)) defects.push(`${where}: a number that is not finite in the output`)
        const json = args.indexOf("--format")
        if (json >= 0 && args[json + 1] === "json" && name !== "train") {
          // exact integers: JSON past 2^53 is written digit for digit, never as 1.2e+21
          if (/\d[eE]\+\d/.test(ran.out)) defects.push(`${where}: a number in exponent form: the count was rounded`)
          try {
            JSON.parse(ran.out)
          } catch (e) {
            defects.push(`${where}: --format json printed no JSON: ${String(e)}`)
          }
        }
      } else {
        const message = ran.err.split("\n").find((l) => l.startsWith("error: "))
        if (message === undefined) {
          defects.push(`${where}: no "error: " line: ${JSON.stringify(ran.err.slice(0, 200))}`)
          continue
        }
        if (ran.code === 2) {
          if (ran.err.split("\n").length !== 1) defects.push(`${where}: a usage error of several lines: ${JSON.stringify(ran.err.slice(0, 300))}`)
          if (!/--|argument|subcommand|flag/.test(ran.err) && !args.slice(1).some((a) => a.length > 1 && ran.err.includes(a))) defects.push(`${where}: a usage error naming no flag or argument: ${ran.err}`)
        } else {
          // a failure names what it is about: a file or value given, a flag, or a field
          const named = args.slice(1).some((a) => a.length > 1 && ran.err.includes(a)) || /""|--[a-z]|\b[a-z]+[A-Z][A-Za-z]*\b|\bbaseline\b|\bstep\b|\bR=/.test(ran.err)
          if (!named) defects.push(`${where}: names neither a file, a flag nor a field: ${ran.err}`)
        }
      }
    }
    const seconds = (performance.now() - started) / 1000
    console.log(`fuzz command lines: seed ${seed + 1}, ${cliCount} invocations (${names.map((n) => `${n} ${byCommand[n] ?? 0}`).join(", ")}): exit 0 ${codes[0]}, exit 1 ${codes[1]}, exit 2 ${codes[2]}; ${defects.length} defects; ${seconds.toFixed(1)} s`)
    const after = outside()
    fs.rmSync(dir, { recursive: true, force: true })
    assert.deepStrictEqual(defects.slice(0, 20), [], `${defects.length} defects of ${cliCount}`)
    assert.deepStrictEqual(after, before, "nothing written outside the temp dir")
    // each outcome is reached
    assert.isAbove(codes[0]!, cliCount / 20)
    assert.isAbove(codes[1]!, cliCount / 20)
    assert.isAbove(codes[2]!, cliCount / 20)
  }, 240_000)
})
