/**
 * The report committed in examples/report is what `conceptmoe report` writes today.
 */
import { assert, describe, it } from "@effect/vitest"
import { spawnSync } from "node:child_process"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { root } from "./support/models.ts"

describe("examples/report", () => {
  it("is reproduced exactly by the command in its README", () => {
    const out = path.join(fs.mkdtempSync(path.join(os.tmpdir(), "conceptmoe-example-report-")), "r")
    const r = spawnSync(process.execPath, ["bin/conceptmoe.js", "report", "examples/moe-base.json", "--out", out], { cwd: root, encoding: "utf8" })
    assert.strictEqual(r.status, 0, r.stderr)
    for (const name of fs.readdirSync(out)) {
      assert.strictEqual(fs.readFileSync(path.join(out, name), "utf8"), fs.readFileSync(path.join(root, "examples/report", name), "utf8"), name)
    }
    assert.strictEqual(fs.readdirSync(out).length, 5)
  })
})
