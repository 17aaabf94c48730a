/**
 * Reading model configs: file → JSON → Schema decode → config → builder → graph → analysis.
 *
 * A config is one of:
 * - a Hugging Face `config.json` (it has `model_type`);
 * - a conceptmoe config (it has `kind`): `dense`, `moe`, `graph` (a block graph written node by
 *   node), or `conceptmoe` (an MoE baseline plus a concept spec).
 *
 * Every failure is a {@link ConfigError} naming the file and the field.
 *
 * @since 0.1.0
 */
import { Effect, FileSystem, Result, Schema } from "effect"
import * as nodePath from "node:path"
import type { AnyBlock } from "../graph/Block.ts"
import { type Analysis, analyzeResult } from "../graph/Analyze.ts"
import { BlockRegistry, fromJson as graphFromJson, type Registry } from "../blocks/Registry.ts"
import { DimAtMost } from "../graph/Limits.ts"
import { formatPath, problemsOf, withDefault } from "../graph/Spec.ts"
import { buildConceptMoE, type ConceptLayout, ConceptMoEConfig, type ConceptSpec } from "./ConceptMoE.ts"
import { ModelConfig, modelKinds, toDecoder } from "./Config.ts"
import { buildDecoder, type DecoderConfig } from "./Decoder.ts"
import { ConfigError } from "./Errors.ts"
import { fromHf, hfModelTypes, hfSchemas, isHfModelType } from "./HuggingFace.ts"

/** What a ConceptMoE config was built from. */
export interface ConceptInfo {
  readonly baseline: DecoderConfig
  readonly baselineFormat: string
  readonly spec: ConceptSpec
  readonly layout: ConceptLayout
}

/** A model read from a config and analysed. */
export interface LoadedModel {
  readonly file: string
  /** e.g. `"hf/mixtral"`, `"conceptmoe/moe"`, `"conceptmoe/conceptmoe"`. */
  readonly format: string
  readonly name: string
  readonly graph: AnyBlock
  readonly analysis: Analysis
  readonly contextLength: number
  /** The normalised decoder, for decoder-only configs (dense, MoE, Hugging Face). */
  readonly decoder?: DecoderConfig
  /** For ConceptMoE configs. */
  readonly concept?: ConceptInfo
  /** The config as read, self-contained (a ConceptMoE's baseline path replaced by its content). */
  readonly config: unknown
}

type Problem = { readonly field: string; readonly message: string }
type Failure = { readonly reason: "unsupported" | "invalid"; readonly problems: ReadonlyArray<Problem> }
type Built = Omit<LoadedModel, "file" | "analysis" | "name" | "config"> & { readonly name: string }

const decodeWith = <S extends Schema.Decoder<unknown>>(schema: S, json: unknown) =>
  Result.mapError(
    Schema.decodeUnknownResult(schema, { errors: "all" })(json),
    (e): Failure => ({ reason: "invalid", problems: problemsOf(e.issue).map((p) => ({ field: formatPath(p.path), message: p.message })) })
  )

/** A config value as a message shows it: JSON, cut to 60 characters. */
const shown = (value: unknown): string => {
  const text = JSON.stringify(value) ?? String(value)
  return text.length > 60 ? `${text.slice(0, 57)}...` : text
}

const unsupported = (field: string, value: unknown, expected: ReadonlyArray<string>): Result.Result<never, Failure> =>
  Result.fail({
    reason: "unsupported",
    problems: [{ field, message: `${value === undefined ? `missing ${field}` : `unsupported ${field} ${shown(value)}`}; expected one of ${expected.join(", ")}` }]
  })

/** The `kind`s conceptmoe configs may have. */
export const configKinds = [...modelKinds, "graph", "conceptmoe"] as const

/** A decoder-only config (Hugging Face, `dense`, `moe`) as a normalised decoder. */
export const decoderFromJson = (
  json: Record<string, unknown>,
  name: string
): Result.Result<{ readonly format: string; readonly decoder: DecoderConfig }, Failure> => {
  if (Object.hasOwn(json, "model_type")) {
    const t = json["model_type"]
    if (!isHfModelType(t)) return unsupported("model_type", t, hfModelTypes)
    return Result.map(decodeWith(hfSchemas[t], json), (c) => ({ format: `hf/${t}`, decoder: fromHf(c, name) }))
  }
  const k = own(json, "kind")
  if (typeof k !== "string" || !(modelKinds as ReadonlyArray<string>).includes(k)) return unsupported("kind", k, configKinds)
  return Result.map(decodeWith(ModelConfig, json), (c) => ({ format: `conceptmoe/${c.kind}`, decoder: toDecoder(c, name) }))
}

/**
 * A graph written out node by node: `{ "kind": "graph", "graph": { "block": ..., "children": [...] } }`.
 * Block kinds are looked up in the registry, so user-defined kinds work once registered.
 */
export const GraphConfig = Schema.Struct({
  kind: Schema.Literal("graph"),
  name: Schema.optionalKey(Schema.String),
  contextLength: withDefault(DimAtMost("seqLen"), 2048),
  graph: Schema.Unknown
})

const isRecord = (u: unknown): u is Record<string, unknown> => typeof u === "object" && u !== null && !Array.isArray(u)

/** A config field, read by own key only (a config's strings never reach Object.prototype). */
const own = (json: Record<string, unknown>, key: string): unknown => (Object.hasOwn(json, key) ? json[key] : undefined)

const prefixed = (prefix: string, f: Failure): Failure => ({
  reason: f.reason,
  problems: f.problems.map((p) => ({ field: p.field === "" ? prefix : `${prefix}.${p.field}`, message: p.message }))
})

const build = (json: Record<string, unknown>, name: string, registry: Registry): Result.Result<Built, Failure> => {
  const hf = Object.hasOwn(json, "model_type")
  if (!hf && !Object.hasOwn(json, "kind")) {
    return Result.fail({
      reason: "invalid",
      problems: [{ field: "", message: `cannot tell the config format: expected a key "model_type" (Hugging Face config.json) or "kind" (conceptmoe config)` }]
    })
  }
  const kind = own(json, "kind")
  if (!hf && kind === "graph") {
    return Result.flatMap(decodeWith(GraphConfig, json), (c) =>
      Result.mapBoth(graphFromJson(c.graph, registry), {
        onFailure: (problems): Failure => ({ reason: "invalid", problems }),
        onSuccess: (graph): Built => ({
          name: c.name ?? name,
          format: "conceptmoe/graph",
          graph: c.name === undefined ? graph : { ...graph, name: c.name },
          contextLength: c.contextLength
        })
      }))
  }
  if (!hf && kind === "conceptmoe") {
    return Result.flatMap(decodeWith(ConceptMoEConfig, json), (c) => {
      if (!isRecord(c.baseline)) {
        const message = typeof c.baseline === "string"
          ? `${JSON.stringify(c.baseline)} is a path, which only a config read from its file can use (budget, train); here the baseline must be written inline`
          : "expected a config object, or a path to one"
        return Result.fail<Failure>({ reason: "invalid", problems: [{ field: "baseline", message }] })
      }
      const modelName = c.name ?? name
      return Result.flatMap(
        Result.mapError(decoderFromJson(c.baseline, `${modelName}-baseline`), (f) => prefixed("baseline", f)),
        ({ decoder, format }) =>
          Result.mapBoth(buildConceptMoE(decoder, c, modelName), {
            onFailure: (p): Failure => ({ reason: "invalid", problems: [p] }),
            onSuccess: ({ graph, layout }): Built => ({
              name: modelName,
              format: "conceptmoe/conceptmoe",
              graph,
              contextLength: decoder.contextLength,
              concept: { baseline: decoder, baselineFormat: format, spec: c, layout }
            })
          })
      )
    })
  }
  return Result.map(decoderFromJson(json, name), ({ decoder, format }) => ({
    name: decoder.name,
    format,
    graph: buildDecoder(decoder),
    contextLength: decoder.contextLength,
    decoder
  }))
}

const baseName = (file: string) => file.replace(/^.*[\\/]/, "").replace(/\.json$/i, "")

/**
 * Builds and analyses a model from parsed JSON. `file` is only used in messages (and for the
 * default name). Block kinds of `graph` configs are resolved in the {@link BlockRegistry}.
 *
 * @category loading
 */
export const modelFromJson = (json: unknown, file: string): Effect.Effect<LoadedModel, ConfigError> =>
  Effect.flatMap(Effect.service(BlockRegistry), (registry) => {
    const fail = (reason: ConfigError["reason"], problems: ConfigError["problems"]) =>
      Effect.fail(new ConfigError({ file, reason, problems }))
    if (!isRecord(json)) return fail("invalid", [{ field: "", message: "expected a JSON object" }])
    const name = typeof own(json, "name") === "string" ? json["name"] as string : baseName(file)
    const built = build(json, name, registry)
    if (Result.isFailure(built)) return fail(built.failure.reason, built.failure.problems)
    const analysis = analyzeResult(built.success.graph, { input: "ids" })
    if (Result.isFailure(analysis)) {
      return fail("invalid", analysis.failure.problems.map((p) => ({ field: `(graph)${p.path === "" ? "" : ` ${p.path}`}${p.field ? ` ${p.field}` : ""}`, message: p.message })))
    }
    return Effect.succeed({ file, ...built.success, analysis: analysis.success, config: json })
  })

/** Parses JSON text, failing with a {@link ConfigError} that gives the parser's message. */
export const parseJson = (text: string, file: string): Effect.Effect<unknown, ConfigError> =>
  Effect.try({
    try: () => JSON.parse(text) as unknown,
    catch: (e) => new ConfigError({ file, reason: "json", problems: [{ field: "", message: `not valid JSON: ${(e as Error).message}` }] })
  })

/** Reads and parses a JSON file. */
export const readJson = Effect.fnUntraced(function*(file: string) {
  const fs = yield* FileSystem.FileSystem
  if (file === "") {
    return yield* new ConfigError({ file: `""`, reason: "missing", problems: [{ field: "", message: "the path is empty; expected a JSON config file" }] })
  }
  const text = yield* fs.readFileString(file).pipe(
    Effect.mapError((e) => {
      // keep the operating system's reason ("EISDIR: illegal operation on a directory"), not the platform's tag
      const cause = "cause" in e.reason ? e.reason.cause : undefined
      const os = cause instanceof Error ? cause.message.replace(/, \w+( '.*')?$/, "") : e.message
      return new ConfigError({
        file,
        reason: e.reason._tag === "NotFound" ? "missing" : "unreadable",
        problems: [{ field: "", message: e.reason._tag === "NotFound" ? "no such file" : `cannot read: ${os}` }]
      })
    })
  )
  return yield* parseJson(text, file)
})

/**
 * Reads, decodes, builds and analyses the model config at `file`. A ConceptMoE config's `baseline`
 * may be a path, relative to the config's directory.
 *
 * @category loading
 */
export const loadModel = Effect.fnUntraced(function*(file: string) {
  let json = yield* readJson(file)
  if (isRecord(json) && own(json, "kind") === "conceptmoe" && typeof own(json, "baseline") === "string") {
    const baselineFile = nodePath.resolve(nodePath.dirname(file), json["baseline"] as string)
    const baseline = yield* readJson(baselineFile).pipe(
      Effect.mapError((e) => new ConfigError({ file, reason: e.reason, problems: e.problems.map((p) => ({ field: "baseline", message: `${baselineFile}: ${p.message}` })) }))
    )
    json = { ...json, baseline }
  }
  return yield* modelFromJson(json, file)
})
