/**
 * Typed errors of the graph room.
 *
 * @since 0.1.0
 */
import { Schema } from "effect"

/** One thing wrong in a graph, at a node path ("layers/3/ffn/moe") and optionally a spec field. */
export const GraphProblem = Schema.Struct({
  path: Schema.String,
  kind: Schema.String,
  field: Schema.optionalKey(Schema.String),
  message: Schema.String
})
export type GraphProblem = typeof GraphProblem.Type

const formatProblem = (p: GraphProblem) =>
  `${p.path === "" ? "(root)" : p.path} [${p.kind}]${p.field === undefined || p.field === "" ? "" : ` ${p.field}`}: ${p.message}`

/**
 * A graph failed its static checks: a spec that does not decode, sizes that do not line up, a tied
 * parameter with no owner. Every problem found is listed, each with its node path.
 */
export class InvalidGraph extends Schema.TaggedError<InvalidGraph>()("InvalidGraph", {
  problems: Schema.Array(GraphProblem)
}) {
  override get message(): string {
    return `invalid graph (${this.problems.length} problem${this.problems.length === 1 ? "" : "s"}):\n` +
      this.problems.map((p) => `  ${formatProblem(p)}`).join("\n")
  }
}
