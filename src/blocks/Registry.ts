/**
 * The block-kind registry: maps kind names to kinds so graphs can be read from JSON.
 *
 * A graph built in TypeScript needs no registry (each node holds its kind). A graph read from a
 * file names its kinds, and {@link fromJson} resolves them in the registry held by the
 * {@link BlockRegistry} reference: the built-ins by default, more with {@link register}.
 *
 * JSON form of a node: `{ "block": "<kind>", "name"?: string, "spec"?: {...}, "children"?: [...] }`.
 *
 * @since 0.1.0
 */
import { Context, Result } from "effect"
import { Attention } from "./Attention.ts"
import { Chunker } from "./Chunker.ts"
import { ConceptStage } from "./ConceptStage.ts"
import { Dechunk } from "./Dechunk.ts"
import { JointAttention } from "./JointAttention.ts"
import { Projector } from "./Projector.ts"
import { Embedding } from "./Embedding.ts"
import { LayerNorm } from "./LayerNorm.ts"
import { Linear } from "./Linear.ts"
import { LMHead } from "./LMHead.ts"
import { MLA } from "./MLA.ts"
import { MLP } from "./MLP.ts"
import { MoE } from "./MoE.ts"
import { RMSNorm } from "./RMSNorm.ts"
import { Rotary } from "./Rotary.ts"
import { type AnyBlock, type BlockKind, make } from "../graph/Block.ts"
import { formatLimit, limits } from "../graph/Limits.ts"
import { Branch, Loop, Residual, Sequence } from "../graph/Combinators.ts"

export interface Registry {
  readonly kinds: ReadonlyMap<string, BlockKind>
}

/** Every kind that ships with the library. */
export const builtinKinds: ReadonlyArray<BlockKind> = [
  Sequence,
  Residual,
  Loop,
  Branch,
  Embedding,
  Linear,
  RMSNorm,
  LayerNorm,
  Rotary,
  Attention,
  MLA,
  MLP,
  MoE,
  LMHead,
  Chunker,
  Dechunk,
  JointAttention,
  Projector,
  ConceptStage
]

/** A registry of the given kinds. */
export const makeRegistry = (kinds: ReadonlyArray<BlockKind>): Registry => ({ kinds: new Map(kinds.map((k) => [k.name, k])) })

/** The built-in registry. */
export const builtins: Registry = makeRegistry(builtinKinds)

/**
 * A registry with more kinds. A kind whose name is taken by a different kind is refused (the
 * message names it); registering the same kind twice is harmless.
 *
 * @category registration
 */
export const register = (registry: Registry, ...kinds: ReadonlyArray<BlockKind>): Result.Result<Registry, string> => {
  const next = new Map(registry.kinds)
  for (const k of kinds) {
    const existing = next.get(k.name)
    if (existing !== undefined && existing !== k) return Result.fail(`a different block kind is already registered as "${k.name}"`)
    next.set(k.name, k)
  }
  return Result.succeed({ kinds: next })
}

/** The registry graphs are read with; the built-ins unless provided. */
export const BlockRegistry = Context.Reference<Registry>("conceptmoe/BlockRegistry", { defaultValue: () => builtins })

/** A structural test for "this value is a block kind" (used when importing kind modules). */
export const isBlockKind = (u: unknown): u is BlockKind =>
  typeof u === "object" && u !== null && typeof (u as BlockKind).name === "string" && typeof (u as BlockKind).io === "function" &&
  typeof (u as BlockKind).cost === "function" && (u as BlockKind).spec != null

/** A problem reading a JSON graph, with its JSON path. */
export interface JsonProblem {
  readonly field: string
  readonly message: string
}

/**
 * Reads a JSON graph node (recursively, to at most {@link limits}.depth levels and
 * {@link limits}.nodes nodes: deeper or larger graphs are refused with the field that passes the
 * limit). Specs are checked later, by analysis; here only the shape of the JSON and the kind names
 * are.
 *
 * @category decoding
 */
export const fromJson = (json: unknown, registry: Registry, at = "graph"): Result.Result<AnyBlock, ReadonlyArray<JsonProblem>> =>
  readNode(json, registry, at, 0, { nodes: 0 })

const readNode = (
  json: unknown,
  registry: Registry,
  at: string,
  depth: number,
  seen: { nodes: number }
): Result.Result<AnyBlock, ReadonlyArray<JsonProblem>> => {
  if (depth >= limits.depth) {
    const field = at.length > 120 ? `${at.slice(0, 60)}...${at.slice(-40)}` : at
    return Result.fail([{ field, message: `the graph nests deeper than ${formatLimit(limits.depth)} levels (the limit on graph depth)` }])
  }
  if (++seen.nodes > limits.nodes) {
    return Result.fail([{ field: at, message: `the graph has more than ${formatLimit(limits.nodes)} nodes (the limit on graph nodes)` }])
  }
  if (typeof json !== "object" || json === null || Array.isArray(json)) {
    return Result.fail([{ field: at, message: "expected an object { block, name?, spec?, children? }" }])
  }
  const node = json as Record<string, unknown>
  const own = (key: string): unknown => (Object.hasOwn(node, key) ? node[key] : undefined)
  const kindName = own("block")
  const kind = typeof kindName === "string" ? registry.kinds.get(kindName) : undefined
  if (kind === undefined) {
    return Result.fail([{
      field: `${at}.block`,
      message: `unknown block kind ${kindName === undefined ? "(none given)" : JSON.stringify(kindName)}; registered: ${[...registry.kinds.keys()].join(", ")}`
    }])
  }
  const name = own("name")
  if (name !== undefined && typeof name !== "string") return Result.fail([{ field: `${at}.name`, message: "expected a string" }])
  const rawChildren = own("children") ?? []
  if (!Array.isArray(rawChildren)) return Result.fail([{ field: `${at}.children`, message: "expected an array" }])
  const children: Array<AnyBlock> = []
  const problems: Array<JsonProblem> = []
  for (let i = 0; i < rawChildren.length; i++) {
    const r = readNode(rawChildren[i], registry, `${at}.children[${i}]`, depth + 1, seen)
    if (Result.isSuccess(r)) children.push(r.success)
    else {
      for (const p of r.failure) problems.push(p)
      if (seen.nodes > limits.nodes || problems.length >= 100) break
    }
  }
  if (problems.length > 0) return Result.fail(problems)
  return Result.succeed(make(kind, own("spec") ?? {}, { name, children }))
}

/** The JSON form of a graph (inverse of {@link fromJson}). */
export const toJson = (block: AnyBlock): unknown => ({
  block: block.kind.name,
  ...(block.name === undefined ? {} : { name: block.name }),
  spec: block.spec,
  ...(block.children.length === 0 ? {} : { children: block.children.map(toJson) })
})
