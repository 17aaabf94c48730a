/**
 * Functional surgery: new graphs from old ones, by path. Nothing is mutated.
 *
 * Patterns are node paths whose segments may be `*` (any one segment) or `**` (any number of
 * segments): `"layers/*\/ffn/moe"`, `"**\/attn"`.
 *
 * @since 0.1.0
 */
import { type AnyBlock, make } from "./Block.ts"
import { joinPath } from "./Analyze.ts"

const matches = (pattern: ReadonlyArray<string>, path: ReadonlyArray<string>): boolean => {
  if (pattern.length === 0) return path.length === 0
  const [head, ...rest] = pattern
  if (head === "**") return [...Array(path.length + 1).keys()].some((i) => matches(rest, path.slice(i)))
  if (path.length === 0) return false
  return (head === "*" || head === path[0]) && matches(rest, path.slice(1))
}

/** Whether a node path matches a pattern. */
export const pathMatches = (pattern: string, path: string): boolean =>
  matches(pattern.split("/").filter((s) => s !== ""), path.split("/").filter((s) => s !== ""))

/**
 * Replaces every node whose path matches `pattern` with `f(node, path)`. The replacement keeps the
 * node's name unless it sets its own. Matching nodes are not descended into.
 *
 * @category surgery
 */
export const replaceAt = (root: AnyBlock, pattern: string, f: (node: AnyBlock, path: string) => AnyBlock): AnyBlock => {
  const visit = (node: AnyBlock, path: string): AnyBlock => {
    if (path !== "" && pathMatches(pattern, path)) {
      const next = f(node, path)
      return next.name === undefined && node.name !== undefined ? Object.freeze({ ...next, name: node.name }) : next
    }
    if (node.children.length === 0) return node
    const children = node.children.map((c, i) => visit(c, joinPath(path, c.name ?? `${i}`)))
    return children.every((c, i) => c === node.children[i]) ? node : make(node.kind, node.spec, { name: node.name, children })
  }
  return visit(root, "")
}

/** Every node whose path matches `pattern`, with its path. */
export const select = (root: AnyBlock, pattern: string): ReadonlyArray<{ readonly path: string; readonly node: AnyBlock }> => {
  const out: Array<{ path: string; node: AnyBlock }> = []
  const visit = (node: AnyBlock, path: string) => {
    if (path !== "" && pathMatches(pattern, path)) out.push({ path, node })
    node.children.forEach((c, i) => visit(c, joinPath(path, c.name ?? `${i}`)))
  }
  visit(root, "")
  return out
}
