#!/usr/bin/env node
// Launcher for the `conceptmoe` command. The CLI is TypeScript run by Node's type stripping, which
// needs Node >= 22.18; on an older Node this re-runs itself with the Node 22 that the `node`
// devDependency installs (node_modules/node/bin/node). Written to run on any Node >= 18.
// Run from the sources, it resolves `conceptmoe` (and its subpaths) to them, through the exports
// condition "conceptmoe-source", so modules given to --blocks can import the package as users do.
import { spawnSync } from "node:child_process"
import * as nodeModule from "node:module"
import { existsSync } from "node:fs"
import { dirname, join } from "node:path"
import { fileURLToPath, pathToFileURL } from "node:url"

const root = join(dirname(fileURLToPath(import.meta.url)), "..")
const built = join(root, "dist", "src", "cli", "main.js")
const entry = existsSync(built) ? built : join(root, "src", "cli", "main.ts")
const [major, minor] = process.versions.node.split(".").map(Number)
const canRun = entry.endsWith(".js") || major > 22 || (major === 22 && minor >= 18)
const source = "conceptmoe-source"

if (canRun) {
  if (!entry.endsWith(".js")) {
    nodeModule.registerHooks({
      resolve: (specifier, context, next) =>
        next(specifier, context.conditions.includes(source) ? context : { ...context, conditions: [...context.conditions, source] })
    })
  }
  await import(pathToFileURL(entry).href)
} else {
  const candidates = [join(root, "node_modules", "node", "bin", "node"), join(root, "..", "node", "bin", "node")]
  const node = candidates.find((p) => existsSync(p))
  if (node === undefined) {
    process.stderr.write(
      `error: conceptmoe needs Node >= 22.18 (this is ${process.version}); run \`npm ci\` to install the pinned Node, or use a newer Node\n`
    )
    process.exit(1)
  }
  const r = spawnSync(node, [`--conditions=${source}`, entry, ...process.argv.slice(2)], { stdio: "inherit" })
  process.exit(r.status ?? 1)
}
