/**
 * The folders of src/ depend on each other one way (issue 21): no import cycle between top-level
 * folders, type-only imports included, and each folder imports only those before it in the order
 * of docs/architecture.md. The edges are read from the sources (static `import`/`export
 * … from` and dynamic `import()` of relative paths); the files that make a cycle are named.
 */
import { assert, describe, it } from "@effect/vitest"
import * as fs from "node:fs"
import * as path from "node:path"

const src = path.join(import.meta.dirname, "..", "src")

/** The top-level folder of a path relative to src/ ("." for a file directly in src/). */
const folderOf = (rel: string): string => (rel.includes("/") ? rel.split("/")[0]! : ".")

/** Folder → folder edges, each with the file imports that make it. */
const folderEdges = (files: ReadonlyMap<string, string>): Map<string, Map<string, Array<string>>> => {
  const edges = new Map<string, Map<string, Array<string>>>()
  for (const [rel, text] of files) {
    for (const m of text.matchAll(/(?:\bfrom|\bimport)\s*\(?\s*["'](\.\.?\/[^"']+)["']/g)) {
      const target = path.posix.normalize(path.posix.join(path.posix.dirname(rel), m[1]!))
      const [a, b] = [folderOf(rel), folderOf(target)]
      if (a === b) continue
      const out = edges.get(a) ?? new Map<string, Array<string>>()
      edges.set(a, out)
      out.set(b, [...(out.get(b) ?? []), `${rel} → ${target}`])
    }
  }
  return edges
}

/** Strongly connected components with more than one folder (Tarjan). */
const cycles = (edges: ReadonlyMap<string, ReadonlyMap<string, unknown>>): Array<Array<string>> => {
  const nodes = new Set<string>([...edges.keys(), ...[...edges.values()].flatMap((m) => [...m.keys()])])
  const index = new Map<string, number>()
  const low = new Map<string, number>()
  const stack: Array<string> = []
  const on = new Set<string>()
  const out: Array<Array<string>> = []
  const visit = (v: string) => {
    index.set(v, index.size)
    low.set(v, index.get(v)!)
    stack.push(v)
    on.add(v)
    for (const w of edges.get(v)?.keys() ?? []) {
      if (!index.has(w)) {
        visit(w)
        low.set(v, Math.min(low.get(v)!, low.get(w)!))
      } else if (on.has(w)) low.set(v, Math.min(low.get(v)!, index.get(w)!))
    }
    if (low.get(v) === index.get(v)) {
      const scc: Array<string> = []
      let w: string
      do {
        w = stack.pop()!
        on.delete(w)
        scc.push(w)
      } while (w !== v)
      if (scc.length > 1) out.push(scc.sort())
    }
  }
  for (const v of [...nodes].sort()) if (!index.has(v)) visit(v)
  return out
}

const sources = (): Map<string, string> =>
  new Map(
    fs.readdirSync(src, { recursive: true }).map(String).filter((f) => f.endsWith(".ts")).map((f) => [f.split(path.sep).join("/"), fs.readFileSync(path.join(src, f), "utf8")])
  )

describe("folder dependencies", () => {
  it("the checker finds a cycle between folders and names the files, and none within a folder", () => {
    const files = new Map([
      ["graph/Block.ts", `import type { Cost } from "../cost/Cost.ts"\nimport { x } from "./Spec.ts"`],
      ["graph/Spec.ts", `import { y } from "./Block.ts"`],
      ["cost/Report.ts", `import {\n  type Analysis\n} from "../graph/Analyze.ts"`],
      ["blocks/MLP.ts", `export { z } from "../graph/Block.ts"\nconst w = await import("../cost/Cost.ts")`]
    ])
    const edges = folderEdges(files)
    assert.deepStrictEqual(cycles(edges), [["cost", "graph"]])
    assert.deepStrictEqual(edges.get("cost")!.get("graph"), ["cost/Report.ts → graph/Analyze.ts"])
    assert.deepStrictEqual([...edges.get("blocks")!.keys()].sort(), ["cost", "graph"])
    assert.isUndefined(edges.get("graph")!.get("graph"))
    files.delete("cost/Report.ts")
    assert.deepStrictEqual(cycles(folderEdges(files)), [])
  })

  it("src/ has no import cycle between its top-level folders", () => {
    const edges = folderEdges(sources())
    const found = cycles(edges)
    // for each cycle, one shortest loop of folders, with one file import per step
    const explain = found.map((scc) => {
      const start = scc[0]!
      const previous = new Map<string, string>()
      const queue = [start]
      while (queue.length > 0 && !previous.has(start)) {
        const a = queue.shift()!
        for (const b of edges.get(a)?.keys() ?? []) {
          if (scc.includes(b) && !previous.has(b)) {
            previous.set(b, a)
            queue.push(b)
          }
        }
      }
      const loop: Array<string> = []
      let b = start
      do {
        const a = previous.get(b)!
        loop.unshift(edges.get(a)!.get(b)![0]!)
        b = a
      } while (b !== start)
      return loop.join(", ")
    })
    assert.deepStrictEqual(found, [], `import cycles between folders: ${explain.join(" | ")}`)
    // the order of docs/architecture.md: each folder imports only folders before it
    const order = ["internal", "cost", "graph", "blocks", "models", "layout", "report", "runtime", "train", "infer", "export", "cli"]
    const folders = fs.readdirSync(src, { withFileTypes: true }).filter((d) => d.isDirectory()).map((d) => d.name).sort()
    assert.deepStrictEqual(folders, [...order].sort(), "a new folder of src/ goes into docs/architecture.md and this order")
    const upward = [...edges].flatMap(([a, out]) =>
      a === "." ? [] : [...out.keys()].filter((b) => order.indexOf(b) > order.indexOf(a)).map((b) => out.get(b)![0]!)
    )
    assert.deepStrictEqual(upward, [], "imports of a folder above the importer's (docs/architecture.md)")
    // the foundations: the cost algebra and the shared helpers import no other folder of src/
    assert.deepStrictEqual([...(edges.get("internal")?.keys() ?? [])], [])
    assert.deepStrictEqual([...(edges.get("cost")?.keys() ?? [])].filter((f) => f !== "internal"), [])
    // the graph core knows no block kind; the block kinds (and their registry) know no model
    assert.deepStrictEqual([...(edges.get("graph")?.keys() ?? [])].sort(), ["cost"])
    assert.isFalse(edges.get("blocks")?.has("models") ?? false)
  })

  it("the backend folders of runtime/ are reached only through Backend.ts, Fixes.ts and the webgpu trainer", () => {
    // generic interpretation (Lower, Decode, Verify, Cache, Fused) knows no backend: what a backend
    // adds comes through runtime/Ops.ts, filled by Backend.load
    const allowed = new Set(["runtime/Backend.ts", "runtime/Fixes.ts", "train/Captured.ts", "train/Step.ts"])
    const reaching: Array<string> = []
    for (const [rel, text] of sources()) {
      if (/^runtime\/(wasm|webgpu|cpu)\//.test(rel)) continue
      for (const m of text.matchAll(/(?:\bfrom|\bimport)\s*\(?\s*["'](\.\.?\/[^"']+)["']/g)) {
        const target = path.posix.normalize(path.posix.join(path.posix.dirname(rel), m[1]!))
        if (/^runtime\/(wasm|webgpu|cpu)\//.test(target) && !allowed.has(rel)) reaching.push(`${rel} → ${target}`)
      }
    }
    assert.deepStrictEqual(reaching, [])
    // Step.ts only for a type
    assert.notMatch(sources().get("train/Step.ts")!, /^import \{[^}]*\} from "\.\.\/runtime\/(wasm|webgpu|cpu)\//m)
  })
})
