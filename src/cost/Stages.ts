/**
 * Per-stage breakdowns: the cost of the parts of a graph under given node paths.
 *
 * A ConceptMoE graph has stages `embedding`, `encoder`, `chunk`, `conceptModel`, `dechunk`,
 * `decoder` and `head`; its baseline, split the same way by layer index, has `embedding`, `encoder`,
 * `conceptModel` (the layers the concept model replaces), `decoder` and `head`, so the two can be
 * compared stage by stage (paper Table 1 compares the concept model's attention and KV cache).
 *
 * @since 0.1.0
 */
import * as Cost from "./Cost.ts"

/** A stage: the nodes at these paths (and everything under them). */
export interface StageDef {
  readonly name: string
  readonly paths: ReadonlyArray<string>
}

export interface StageCost {
  readonly params: number
  /** Forward matmul FLOPs per input token. */
  readonly matmulPerToken: number
  /** Forward attention-map FLOPs (full) over one sequence of `seqLen` tokens. */
  readonly attentionMap: number
  readonly attentionMapCausal: number
  /** KV-cache elements and bytes after `seqLen` tokens. */
  readonly kvElements: number
  readonly kvBytes: number
}

/**
 * A test "is this path at or under one of the prefixes", in time linear in the path's length (a
 * baseline's stages list one prefix per layer, so scanning the prefixes for every term would be
 * quadratic in the layer count).
 */
const underAny = (prefixes: ReadonlyArray<string>) => {
  const set = new Set(prefixes)
  return (path: string): boolean => {
    if (set.has(path)) return true
    for (let i = path.indexOf("/"); i >= 0; i = path.indexOf("/", i + 1)) {
      if (set.has(path.slice(0, i))) return true
    }
    return false
  }
}

/** The cost of each stage at a sequence length. */
export const stageCosts = (
  a: Cost.Costed,
  stages: ReadonlyArray<StageDef>,
  options: { readonly seqLen: number; readonly bytesPerElement?: number }
): Record<string, StageCost> => {
  const out = new Map<string, StageCost>()
  const bytes = options.bytesPerElement ?? 2
  for (const s of stages) {
    const under = underAny(s.paths)
    const exactly = new Set(s.paths)
    const sub: Cost.Cost = Cost.make({
      attention: a.cost.attention.filter((t) => under(t.path)),
      kv: a.cost.kv.filter((t) => under(t.path))
    })
    const kvElements = Cost.kvElements(sub, options.seqLen)
    out.set(s.name, {
      params: a.params.filter((p) => p.tiedTo === undefined && p.buffer !== true && under(p.path)).reduce((n, p) => n + p.numel, 0),
      matmulPerToken: a.rows.filter((r) => exactly.has(r.path)).reduce((n, r) => n + r.flops, 0),
      attentionMap: Cost.attentionMapFlops(sub, options.seqLen),
      attentionMapCausal: Cost.attentionMapFlops(sub, options.seqLen, true),
      kvElements,
      kvBytes: kvElements * bytes
    })
  }
  return Object.fromEntries(out)
}

const range = (prefix: string, from: number, to: number) => Array.from({ length: to - from }, (_, i) => `${prefix}/${from + i}`)

/** Stages of a ConceptMoE graph built by `buildConceptMoE`. */
export const conceptStages: ReadonlyArray<StageDef> = [
  { name: "embedding", paths: ["embed"] },
  { name: "encoder", paths: ["encoder"] },
  { name: "chunk", paths: ["concept/chunk"] },
  { name: "conceptModel", paths: ["concept/model"] },
  { name: "dechunk", paths: ["concept/dechunk"] },
  { name: "decoder", paths: ["decoder"] },
  { name: "head", paths: ["norm", "lmHead"] }
]

/** The same stages on a baseline decoder graph whose layers [encoder, concept, decoder) are split. */
export const baselineStages = (layout: {
  readonly encoder: readonly [number, number]
  readonly concept: readonly [number, number]
  readonly decoder: readonly [number, number]
}): ReadonlyArray<StageDef> => [
  { name: "embedding", paths: ["embed"] },
  { name: "encoder", paths: range("layers", ...layout.encoder) },
  { name: "conceptModel", paths: range("layers", ...layout.concept) },
  { name: "decoder", paths: range("layers", ...layout.decoder) },
  { name: "head", paths: ["norm", "lmHead"] }
]
