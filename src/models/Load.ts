/**
 * Reading model configs from disk: file → JSON → Schema decode → config → builder → graph → analysis.
 *
 * A file is read as one of the {@link formats}: a Hugging Face `config.json` (it has `model_type`)
 * or a conceptmoe config (it has `kind`). Every failure is a {@link ConfigError} naming the file
 * and the field.
 *
 * @since 0.1.0
 */
import { Effect, FileSystem, Result, Schema } from "effect"
import type { AnyBlock } from "../graph/Block.ts"
import { type Analysis, analyzeResult } from "../graph/Analyze.ts"
import { BlockRegistry, fromJson as graphFromJson, type Registry } from "../graph/Registry.ts"
import { Dim, formatPath, problemsOf, withDefault } from "../graph/Spec.ts"
import { ModelConfig, modelKinds, toDecoder } from "./Config.ts"
import { buildDecoder } from "./Decoder.ts"
import { ConfigError } from "./Errors.ts"
import { fromHf, hfModelTypes, hfSchemas, isHfModelType } from "./HuggingFace.ts"

/** A model read from a config and analysed. */
export interface LoadedModel {
  readonly file: string
  /** e.g. `"hf/mixtral"`, `"conceptmoe/moe"`. */
  readonly format: string
  readonly name: string
  readonly graph: AnyBlock
  readonly analysis: Analysis
  readonly contextLength: number
}

/** How one config format is recognised, decoded and built. */
export interface ConfigFormat {
  readonly name: string
  /** The discriminating key ("model_type", "kind"). */
  readonly key: string
  readonly values: ReadonlyArray<string>
  readonly build: (
    json: Record<string, unknown>,
    name: string,
    registry: Registry
  ) => Result.Result<{ readonly format: string; readonly graph: AnyBlock; readonly contextLength: number }, ConfigFormatFailure>
}

/** What a format reports back: problems with field paths. */
export interface ConfigFormatFailure {
  readonly reason: "unsupported" | "invalid"
  readonly problems: ReadonlyArray<{ readonly field: string; readonly message: string }>
}

const decodeWith = <S extends Schema.Decoder<unknown>>(schema: S, json: unknown) =>
  Result.mapError(
    Schema.decodeUnknownResult(schema, { errors: "all" })(json),
    (e): ConfigFormatFailure => ({ reason: "invalid", problems: problemsOf(e.issue).map((p) => ({ field: formatPath(p.path), message: p.message })) })
  )

/** Hugging Face transformers configs. */
export const huggingFace: ConfigFormat = {
  name: "Hugging Face config.json",
  key: "model_type",
  values: hfModelTypes,
  build: (json, name) => {
    const t = json["model_type"]
    if (!isHfModelType(t)) {
      return Result.fail({
        reason: "unsupported",
        problems: [{ field: "model_type", message: `unsupported model_type ${JSON.stringify(t)}; expected one of ${hfModelTypes.join(", ")}` }]
      })
    }
    return Result.map(decodeWith(hfSchemas[t], json), (c) => {
      const decoder = fromHf(c, name)
      return { format: `hf/${t}`, graph: buildDecoder(decoder), contextLength: decoder.contextLength }
    })
  }
}

/**
 * A graph written out node by node: `{ "kind": "graph", "graph": { "block": ..., "children": [...] } }`.
 * Block kinds are looked up in the registry, so user-defined kinds work once registered.
 */
export const GraphConfig = Schema.Struct({
  kind: Schema.Literal("graph"),
  name: Schema.optionalKey(Schema.String),
  contextLength: withDefault(Dim, 2048),
  graph: Schema.Unknown
})

const configKinds = [...modelKinds, "graph"] as const

/** conceptmoe's own configs. */
export const conceptmoe: ConfigFormat = {
  name: "conceptmoe config",
  key: "kind",
  values: configKinds,
  build: (json, name, registry) => {
    const k = json["kind"]
    if (typeof k !== "string" || !(configKinds as ReadonlyArray<string>).includes(k)) {
      return Result.fail({
        reason: "unsupported",
        problems: [{ field: "kind", message: `unsupported kind ${JSON.stringify(k)}; expected one of ${configKinds.join(", ")}` }]
      })
    }
    if (k === "graph") {
      return Result.flatMap(decodeWith(GraphConfig, json), (c) =>
        Result.mapBoth(graphFromJson(c.graph, registry), {
          onFailure: (problems): ConfigFormatFailure => ({ reason: "invalid", problems }),
          onSuccess: (graph) => ({ format: "conceptmoe/graph", graph: c.name === undefined ? graph : { ...graph, name: c.name }, contextLength: c.contextLength })
        }))
    }
    return Result.map(decodeWith(ModelConfig, json), (c) => {
      const decoder = toDecoder(c, name)
      return { format: `conceptmoe/${c.kind}`, graph: buildDecoder(decoder), contextLength: decoder.contextLength }
    })
  }
}

/** The formats {@link loadModel} tries, in order. */
export const formats: ReadonlyArray<ConfigFormat> = [huggingFace, conceptmoe]

const baseName = (file: string) => file.replace(/^.*[\\/]/, "").replace(/\.json$/i, "")

/**
 * Builds and analyses a model from parsed JSON. `file` is only used in messages.
 *
 * @category loading
 */
export const modelFromJson = (json: unknown, file: string): Effect.Effect<LoadedModel, ConfigError> =>
  Effect.flatMap(Effect.service(BlockRegistry), (registry) => {
    const fail = (reason: ConfigError["reason"], problems: ConfigError["problems"]) =>
      Effect.fail(new ConfigError({ file, reason, problems }))
    if (typeof json !== "object" || json === null || Array.isArray(json)) {
      return fail("invalid", [{ field: "", message: "expected a JSON object" }])
    }
    const record = json as Record<string, unknown>
    const format = formats.find((f) => f.key in record)
    if (format === undefined) {
      return fail("invalid", [{
        field: "",
        message: `cannot tell the config format: expected a key ${formats.map((f) => `"${f.key}" (${f.name})`).join(" or ")}`
      }])
    }
    const name = typeof record["name"] === "string" ? record["name"] : baseName(file)
    const built = format.build(record, name, registry)
    if (Result.isFailure(built)) return fail(built.failure.reason, built.failure.problems)
    const analysis = analyzeResult(built.success.graph, { input: "ids" })
    if (Result.isFailure(analysis)) {
      return fail("invalid", analysis.failure.problems.map((p) => ({ field: `(graph) ${p.path}${p.field ? ` ${p.field}` : ""}`, message: p.message })))
    }
    return Effect.succeed({ file, name, ...built.success, analysis: analysis.success })
  })

/** Parses JSON text, failing with a {@link ConfigError} that gives the parser's message. */
export const parseJson = (text: string, file: string): Effect.Effect<unknown, ConfigError> =>
  Effect.try({
    try: () => JSON.parse(text) as unknown,
    catch: (e) => new ConfigError({ file, reason: "json", problems: [{ field: "", message: `not valid JSON: ${(e as Error).message}` }] })
  })

/**
 * Reads, decodes, builds and analyses the model config at `file`.
 *
 * @category loading
 */
export const loadModel = Effect.fnUntraced(function*(file: string) {
  const fs = yield* FileSystem.FileSystem
  const text = yield* fs.readFileString(file).pipe(
    Effect.mapError((e) =>
      new ConfigError({
        file,
        reason: e.reason._tag === "NotFound" ? "missing" : "unreadable",
        problems: [{ field: "", message: e.reason._tag === "NotFound" ? "no such file" : `cannot read: ${e.message}` }]
      })
    )
  )
  const json = yield* parseJson(text, file)
  return yield* modelFromJson(json, file)
})
