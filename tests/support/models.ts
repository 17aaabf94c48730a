import { NodeServices } from "@effect/platform-node"
import { Effect } from "effect"
import * as path from "node:path"
import { loadModel, modelFromJson } from "../../src/models/Load.ts"

export const root = path.join(import.meta.dirname, "..", "..")

/** Loads a config object (as if read from `file`). */
export const load = (json: unknown, file = "inline.json") => modelFromJson(json, file)

/** Loads a config file of the repository, as the CLI does (relative baseline paths resolved). */
export const loadFile = (rel: string) =>
  Effect.map(loadModel(path.join(root, rel)).pipe(Effect.provide(NodeServices.layer)), (m) => ({ ...m, file: rel }))
