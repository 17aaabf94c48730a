/**
 * Static analysis of a graph: decode every spec, check every size, list every parameter, fold the
 * cost. No tensor is allocated; a 671B-parameter graph is analysed in milliseconds.
 *
 * @since 0.1.0
 */
import { Effect, Result, Schema } from "effect"
import * as Cost from "../cost/Cost.ts"
import { type AnyBlock, type Block, numel, type ParamEntry, type Width } from "./Block.ts"
import { type GraphProblem, InvalidGraph } from "./Errors.ts"
import { limits, safeText } from "./Limits.ts"
import { formatPath, problemsOf } from "./Spec.ts"

/** One row of the per-path table. */
export interface Row {
  readonly path: string
  readonly kind: string
  readonly depth: number
  readonly in: Width
  readonly out: Width
  /** Unique parameters in this subtree. */
  readonly params: number
  /** Activated parameters per position in this subtree. */
  readonly activated: number
  /**
   * Forward matmul FLOPs per input token of the model in this subtree (attention map excluded):
   * inside a concept stage, per-position figures are scaled by the stage's rate.
   */
  readonly flops: number
}

/** The result of a successful analysis. */
export interface Analysis {
  readonly root: AnyBlock
  readonly cost: Cost.Cost
  /** Every parameter, tied ones included (flagged with `tiedTo`), in graph order. */
  readonly params: ReadonlyArray<ParamEntry>
  /** One row per node, in pre-order. */
  readonly rows: ReadonlyArray<Row>
  /** The decoded spec of every node, by path (for lowering). */
  readonly specs: ReadonlyMap<string, unknown>
}

/** Joins path segments. */
export const joinPath = (parent: string, segment: string): string => (parent === "" ? segment : `${parent}/${segment}`)

/**
 * Checks and costs a graph. Fails with {@link InvalidGraph} listing every problem (with its path) if
 * any spec does not decode, any sizes do not line up, the root does not accept `options.input`, or a
 * tied parameter has no owner of the same shape.
 *
 * @category analysis
 */
export const analyze = (
  root: AnyBlock,
  options?: { readonly input?: Width }
): Effect.Effect<Analysis, InvalidGraph> =>
  Effect.suspend(() => {
    const result = analyzeResult(root, options)
    return Result.isSuccess(result) ? Effect.succeed(result.success) : Effect.fail(result.failure)
  })

/** {@link analyze} as a plain `Result`, for pure callers. */
export const analyzeResult = (
  root: AnyBlock,
  options?: { readonly input?: Width }
): Result.Result<Analysis, InvalidGraph> => {
  const problems: Array<GraphProblem> = []
  const params: Array<ParamEntry> = []
  const rows: Array<Row> = []
  const specs = new Map<string, unknown>()

  if (options?.input !== undefined && root.in !== options.input) {
    problems.push({ path: "", kind: root.kind.name, message: `expects input ${root.in}, but the model input is ${options.input}` })
  }

  const visit = (block: Block, path: string, depth: number, rate: number): Cost.Cost => {
    const kind = block.kind
    if (depth > limits.depth) {
      // bounded here, so no graph can make this recursion (or lowering's) overflow the stack
      problems.push({ path, kind: kind.name, message: `nests deeper than ${limits.depth} levels (the limit on graph depth)` })
      return Cost.zero
    }
    const decoded = Schema.decodeUnknownResult(kind.spec, { errors: "all" })(block.spec)
    if (Result.isFailure(decoded)) {
      for (const p of problemsOf(decoded.failure.issue)) {
        problems.push({ path, kind: kind.name, field: formatPath(p.path), message: p.message })
      }
      return Cost.zero
    }
    const spec = decoded.success
    specs.set(path, spec)
    for (const message of kind.connect?.(spec, block.children) ?? []) {
      problems.push({ path, kind: kind.name, message })
    }
    const rowIndex = rows.length
    rows.push({ path, kind: kind.name, depth, in: block.in, out: block.out, params: 0, activated: 0, flops: 0 })

    const own: Array<ParamEntry> = (kind.params?.(spec) ?? []).map((d) => ({
      ...d,
      path: joinPath(path, d.name),
      numel: numel(d.shape)
    }))
    for (const p of own) {
      if (p.shape.some((s) => !Number.isInteger(s) || s <= 0)) {
        problems.push({ path, kind: kind.name, field: p.name, message: `parameter shape [${p.shape}] is not made of positive integers` })
      } else if (!Number.isSafeInteger(p.numel)) {
        problems.push({ path, kind: kind.name, field: p.name, message: `parameter shape [${p.shape}] has more than 2^53 − 1 elements (${safeText}), beyond which counts are not exact` })
      }
    }
    params.push(...own)

    const seen = new Set<string>()
    const children = block.children.map((child, i) => {
      const segment = child.name ?? `${i}`
      if (seen.has(segment)) problems.push({ path, kind: kind.name, message: `two children are named "${segment}"` })
      seen.add(segment)
      return visit(child, joinPath(path, segment), depth + 1, rate * (kind.childRate?.(spec, i) ?? 1))
    })

    const cost = Cost.add(ownParamCost(own), kind.cost(spec, { path, params: own, children }))
    rows[rowIndex] = {
      ...rows[rowIndex]!,
      params: Cost.total(cost.params),
      activated: Cost.total(cost.activated),
      flops: rate * Cost.total(cost.flops)
    }
    return cost
  }

  const cost = visit(root, "", 0, 1)
  if (problems.length === 0) problems.push(...countProblems(root.kind.name, cost))

  const byPath = new Map(params.map((p) => [p.path, p]))
  for (const p of params) {
    if (p.tiedTo === undefined) continue
    const owner = byPath.get(p.tiedTo)
    if (owner === undefined || owner.tiedTo !== undefined) {
      problems.push({ path: p.path, kind: "param", message: `is tied to "${p.tiedTo}", which is not a parameter of this graph` })
    } else if (owner.numel !== p.numel) {
      problems.push({ path: p.path, kind: "param", message: `is tied to "${p.tiedTo}" of shape [${owner.shape}], but has shape [${p.shape}]` })
    }
  }
  const paths = new Set<string>()
  for (const p of params) {
    if (paths.has(p.path)) problems.push({ path: p.path, kind: "param", message: "two parameters have this path" })
    paths.add(p.path)
  }

  if (problems.length > 0) return Result.fail(new InvalidGraph({ problems: capped(problems) }))
  return Result.succeed({ root, cost, params, rows, specs })
}

/** At most 50 problems, then one that counts the rest (a 100,000-layer graph repeats each problem per layer). */
const capped = (problems: ReadonlyArray<GraphProblem>): ReadonlyArray<GraphProblem> =>
  problems.length <= 50
    ? problems
    : [...problems.slice(0, 50), { path: "", kind: "graph", message: `and ${problems.length - 50} more problems` }]

/** The parameter counts a leaf's own parameters contribute (tied ones and buffers count zero). */
const ownParamCost = (own: ReadonlyArray<ParamEntry>): Cost.Cost => {
  const total = new Map<string, number>()
  const activated = new Map<string, number>()
  for (const p of own) {
    if (p.tiedTo !== undefined || p.buffer === true) continue
    total.set(p.part, (total.get(p.part) ?? 0) + p.numel)
    const act = p.active === undefined ? p.numel : (p.numel / p.active.of) * p.active.used
    activated.set(p.part, (activated.get(p.part) ?? 0) + act)
  }
  return Cost.make({ params: Cost.partsOf(total), activated: Cost.partsOf(activated) })
}

/**
 * Per-token counts must be exact doubles: every part and total of the parameters, activated
 * parameters, matmul FLOPs per token and KV elements per token at most 2^53 − 1. Sequence totals
 * (which multiply these by the sequence length) are computed exactly past that, as bigints.
 */
const countProblems = (kind: string, cost: Cost.Cost): Array<GraphProblem> => {
  const out: Array<GraphProblem> = []
  const check = (what: string, value: number) => {
    if (!Number.isFinite(value) || Math.abs(value) > Number.MAX_SAFE_INTEGER) {
      out.push({ path: "", kind, message: `${what} is ${value.toExponential(3)}, above 2^53 − 1 (${safeText}), beyond which counts are not exact` })
    }
  }
  for (const [label, parts] of [["parameters", cost.params], ["activated parameters", cost.activated], ["matmul FLOPs per token", cost.flops]] as const) {
    for (const [name, v] of Object.entries(parts)) check(`${label} of part "${name}"`, v)
    check(`total ${label}`, Cost.total(parts))
  }
  check("KV elements per token", Cost.kvElementsPerToken(cost))
  const pair = (t: Cost.AttentionTerm) => t.passes * t.rate * 2 * t.heads * (t.dQK + t.dV)
  const worst = cost.attention.find((t) => !(pair(t) <= Number.MAX_SAFE_INTEGER))
  if (worst !== undefined) check(`attention-map FLOPs per position pair of ${worst.path}`, pair(worst))
  return out
}
