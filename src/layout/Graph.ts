/**
 * The exported graph: the analysed block tree as plain JSON (kind, name, path, decoded spec, own
 * parameters, children) with, for every parameter, its PyTorch layout and its name in the exported
 * `model.safetensors`. The Python package under `python/conceptmoe_torch` builds a `torch.nn.Module`
 * from this JSON, one module per kind.
 *
 * Layout: a matrix the graph applies as `x·W` (`[in, out]`, or `[E, in, out]` stacked over experts)
 * is stored transposed in its last two axes, as `torch.nn.Linear` keeps it (`[out, in]`); embedding
 * tables and vectors are stored as they are. A tied parameter is not stored: it is its owner.
 *
 * Names: Hugging Face's where the model has a Hugging Face counterpart ({@link hfNames}); otherwise
 * the native name, the graph path with `/` written `.` (`encoder.0.mixer.attn.q.weight`), which is
 * also the parameter's name in the PyTorch module's `state_dict()`.
 *
 * @since 0.4.0
 */
import { Schema } from "effect"
import type { Analysis } from "../graph/Analyze.ts"
import { joinPath } from "../graph/Analyze.ts"
import type { AnyBlock, ParamEntry } from "../graph/Block.ts"
import * as Cost from "../cost/Cost.ts"
import type { RowOrder } from "./Names.ts"

/** The block kinds the Python package has a module for. */
export const torchKinds: ReadonlySet<string> = new Set([
  "sequence", "residual", "loop", "branch", "embedding", "lmhead", "linear", "projector", "rmsnorm", "layernorm",
  "rotary", "mlp", "moe", "attention", "joint-attention", "mla", "chunk", "dechunk", "concept-stage"
])

/**
 * A user block kind may carry its PyTorch module as Python source (a file that imports
 * `from conceptmoe_torch.graph import Block, register` and registers a class under the kind's name);
 * the export copies it into the package.
 */
export interface WithTorchModule {
  readonly pytorch?: string
}

/** The graph holds a block kind with no PyTorch module. */
export class UnsupportedKind extends Schema.TaggedError<UnsupportedKind>()("UnsupportedKind", {
  kind: Schema.String,
  path: Schema.String
}) {
  override get message(): string {
    return `block kind "${this.kind}" at ${this.path === "" ? "(root)" : this.path} has no PyTorch module: give the kind a \`pytorch\` field (Python source registering a module for "${this.kind}") to export it`
  }
}

export interface ExportedParam {
  readonly path: string
  readonly name: string
  readonly part: string
  /** Our shape (`[in, out]` matrices). */
  readonly shape: ReadonlyArray<number>
  /** The shape in PyTorch layout. */
  readonly torchShape: ReadonlyArray<number>
  /** Whether the last two axes are swapped between the two layouts. */
  readonly transposed: boolean
  readonly tiedTo: string | null
  /**
   * Its name in `model.safetensors`: one name, or one per slice along axis 0 (stacked experts stored
   * one tensor per expert, as Hugging Face does); null for tied parameters.
   */
  readonly file: string | ReadonlyArray<string> | null
  /** Rows (PyTorch layout) stored in another order in the file (DeepSeek's rotary features), or null. */
  readonly rowOrder: RowOrder | null
  /** A buffer (no gradient reaches it; see `ParamDecl.buffer`). */
  readonly buffer: boolean
}

export interface ExportedNode {
  readonly kind: string
  readonly name: string | null
  readonly path: string
  readonly spec: unknown
  readonly params: ReadonlyArray<ExportedParam>
  readonly children: ReadonlyArray<ExportedNode>
}

export interface ExportedGraph {
  readonly format: "conceptmoe-graph/1"
  readonly name: string
  /** `hf/<model_type>` names or `native`. */
  readonly names: string
  readonly root: ExportedNode
  /** Every parameter in graph order (the same objects as in the nodes). */
  readonly params: ReadonlyArray<ExportedParam>
  /** Static cost: parameters, activated parameters and forward matmul FLOPs per token. */
  readonly cost: { readonly params: number; readonly activated: number; readonly flopsPerToken: number }
  /** Python files of user kinds, by kind. */
  readonly userModules: Readonly<Record<string, string>>
}

/** Parameters kept as they are: lookup tables. */
const tables: Readonly<Record<string, ReadonlyArray<string>>> = { embedding: ["weight", "positions"] }

/** Whether a parameter is a matrix applied as `x·W` (transposed for PyTorch). */
export const isTransposed = (kind: string, p: ParamEntry): boolean =>
  p.tiedTo === undefined && p.shape.length >= 2 && !(tables[kind] ?? []).includes(p.name)

const swapLast = (shape: ReadonlyArray<number>): Array<number> =>
  shape.length < 2 ? [...shape] : [...shape.slice(0, -2), shape[shape.length - 1]!, shape[shape.length - 2]!]

/** The native name of a parameter: its path with `/` written `.`. */
export const nativeName = (path: string): string => path.replaceAll("/", ".")

/**
 * Builds the exported graph. `names` maps a parameter path to its file name(s); parameters it leaves
 * out keep their native name. Fails with {@link UnsupportedKind} at the first kind without a PyTorch module.
 */
export const exportGraph = (
  analysis: Analysis,
  name: string,
  names?: {
    readonly scheme: string
    readonly of: (p: ParamEntry) => string | ReadonlyArray<string> | undefined
    readonly rows?: (kind: string, spec: unknown, p: ParamEntry) => RowOrder | undefined
  },
  /** `anyKind`: name and lay out every parameter even under kinds without a PyTorch module (checkpoints). */
  options?: { readonly anyKind?: boolean }
): ExportedGraph | UnsupportedKind => {
  const byNode = new Map<string, Array<ParamEntry>>()
  for (const p of analysis.params) {
    const node = p.path.slice(0, p.path.length - p.name.length - 1)
    byNode.set(node, [...(byNode.get(node) ?? []), p])
  }
  const all: Array<ExportedParam> = []
  const userModules: Record<string, string> = {}
  let failure: UnsupportedKind | undefined
  const visit = (block: AnyBlock, path: string): ExportedNode => {
    const kind = block.kind.name
    if (!torchKinds.has(kind)) {
      const source = (block.kind as WithTorchModule).pytorch
      if (typeof source === "string") userModules[kind] = source
      else if (options?.anyKind !== true) failure ??= new UnsupportedKind({ kind, path })
    }
    const params = (byNode.get(path) ?? []).map((p): ExportedParam => {
      const transposed = isTransposed(kind, p)
      const e: ExportedParam = {
        path: p.path,
        name: p.name,
        part: p.part,
        shape: [...p.shape],
        torchShape: transposed ? swapLast(p.shape) : [...p.shape],
        transposed,
        tiedTo: p.tiedTo ?? null,
        file: p.tiedTo !== undefined ? null : names?.of(p) ?? nativeName(p.path),
        rowOrder: (p.tiedTo === undefined ? names?.rows?.(kind, analysis.specs.get(path), p) : undefined) ?? null,
        buffer: p.buffer === true
      }
      all.push(e)
      return e
    })
    return {
      kind,
      name: block.name ?? null,
      path,
      spec: analysis.specs.get(path),
      params,
      children: block.children.map((c, i) => visit(c, joinPath(path, c.name ?? `${i}`)))
    }
  }
  const root = visit(analysis.root, "")
  if (failure !== undefined) return failure
  // graph order of the analysis (the visit lists a node's params before its children's, as the analysis does)
  return {
    format: "conceptmoe-graph/1",
    name,
    names: names?.scheme ?? "native",
    root,
    params: all,
    cost: {
      params: Cost.total(analysis.cost.params),
      activated: Cost.total(analysis.cost.activated),
      flopsPerToken: Cost.matmulPerToken(analysis.cost)
    },
    userModules
  }
}
