import { Effect } from "effect"
import * as fs from "node:fs"
import * as path from "node:path"
import { modelFromJson } from "../../src/models/Load.ts"

export const root = path.join(import.meta.dirname, "..", "..")

/** Loads a config object (as if read from `file`). */
export const load = (json: unknown, file = "inline.json") => modelFromJson(json, file)

/** Loads a config file from the repository. */
export const loadFile = (rel: string) =>
  Effect.suspend(() => modelFromJson(JSON.parse(fs.readFileSync(path.join(root, rel), "utf8")), rel))
