/**
 * What a user can cause while running a model is a typed error (internal/RunErrors.ts) whose message
 * names the input, node or variable and what was expected: each is triggered here for real, through
 * the library (a tagged error thrown from tensor code, a typed failure through `attempt`) and through
 * the command line (exit code 1, one `error:` line, no stack).
 */
import { assert, describe, it, layer } from "@effect/vitest"
import { Cause, ConfigProvider, Console, Effect, Exit } from "effect"
import { Command } from "effect/cli"
import { NodeServices } from "@effect/platform-node"
import { spawnSync } from "node:child_process"
import * as fs from "node:fs"
import * as path from "node:path"
import type { ForwardContext } from "../src/graph/Apply.ts"
import { type AnyBlock, leaf } from "../src/graph/Block.ts"
import { joinPath } from "../src/graph/Analyze.ts"
import { MoE } from "../src/blocks/MoE.ts"
import {
  attempt,
  attemptPromise,
  ContextOverflow,
  InvalidInput,
  isRunFailure,
  NotDecodable,
  NotLowerable,
  SettingError,
  Unsupported
} from "../src/internal/RunErrors.ts"
import * as Settings from "../src/internal/Settings.ts"
import { runCli } from "../src/cli/Run.ts"
import { layer as backendLayer, load, resolveName, Tensors } from "../src/runtime/Backend.ts"
import { settingsOf } from "../src/runtime/Env.ts"
import { session } from "../src/runtime/Decode.ts"
import { forward, type Lowered, materialize, release } from "../src/runtime/Lower.ts"
import { load as loadModel, root } from "./support/models.ts"

const dense = { kind: "dense", vocab: 64, hidden: 24, layers: 2, heads: 3, ffnHidden: 40, contextLength: 16 }
const moe = { kind: "moe", vocab: 64, hidden: 32, layers: 2, heads: 4, kvHeads: 2, experts: 4, topK: 2, expertHidden: 16 }

/** What `f` throws (fails the test if it returns). */
const thrown = (f: () => unknown): unknown => {
  try {
    f()
  } catch (e) {
    return e
  }
  return assert.fail("expected a throw")
}

/** The typed failure of an Effect (fails the test on success or a defect). */
const failureOf = <E>(self: Effect.Effect<unknown, E>): Effect.Effect<E> =>
  Effect.exit(self).pipe(Effect.map((exit) => {
    if (Exit.isSuccess(exit)) return assert.fail("expected a failure")
    const found = Cause.findErrorOption(exit.cause)
    if (found._tag === "None") return assert.fail(`expected a typed failure, got ${Cause.pretty(exit.cause)}`)
    return found.value
  }))

/** The paths of the nodes of `root` whose kind is `name`. */
const pathsOf = (root: AnyBlock, name: string): Array<string> => {
  const out: Array<string> = []
  const walk = (b: AnyBlock, at: string) => {
    if (b.kind.name === name) out.push(at)
    b.children.forEach((c, i) => walk(c, joinPath(at, c.name ?? `${i}`)))
  }
  walk(root, "")
  return out
}

layer(backendLayer("cpu"))("typed errors of running a model", (it) => {
  it.effect("a decoding session given the wrong number of ids: InvalidInput naming the input, as thrown and through attempt", () =>
    Effect.gen(function*() {
      const { tf } = yield* Tensors
      const m = yield* loadModel(dense)
      const low = materialize(tf, m.analysis, 1)
      const s = session(low, { rows: 2, maxLength: 16 })
      const e = thrown(() => s.feed(new Int32Array(5), 3))
      assert.instanceOf(e, InvalidInput)
      assert.strictEqual((e as InvalidInput)._tag, "InvalidInput")
      assert.strictEqual((e as InvalidInput).message, "feed ids: expected rows × n = 2×3 = 6 ids, got 5")
      const p = yield* failureOf(attempt(() => s.prefill(new Int32Array(7), 4)))
      assert.strictEqual(p._tag, "InvalidInput")
      assert.strictEqual(p.message, "prefill ids: expected rows × n = 2×4 = 8 ids, got 7")
      const z = yield* failureOf(attempt(() => s.feed(new Int32Array(0), 0)))
      assert.strictEqual(z.message, "feed n (tokens per row): expected a whole number ≥ 1, got 0")
      // nothing was consumed: the session still decodes
      s.feed(new Int32Array(4), 2).dispose()
      assert.strictEqual(s.length, 2)
      // past the context: ContextOverflow with both lengths
      const o = yield* failureOf(attempt(() => s.feed(new Int32Array(30), 15)))
      assert.instanceOf(o, ContextOverflow)
      assert.strictEqual(o._tag, "ContextOverflow")
      assert.strictEqual(o.message, "17 tokens exceed the model's context of 16")
      s.dispose()
      release(low)
    }))

  it.effect("a kind without `stream` is NotDecodable and one without `apply` NotLowerable, each naming the kind and the node", () =>
    Effect.gen(function*() {
      const { tf } = yield* Tensors
      const m = yield* loadModel(dense)
      const low = materialize(tf, m.analysis, 1)
      const { stream: _, apply: __, ...bare } = { ...low.analysis.root.kind, name: "opaque" }
      const opaque = { ...low.analysis, root: { ...leaf(bare, {}), children: [] } }
      const d = thrown(() => session({ ...low, analysis: opaque } as Lowered, { rows: 1 }))
      assert.instanceOf(d, NotDecodable)
      assert.strictEqual((d as NotDecodable).message, "block kind \"opaque\" at (root) does not declare `stream`: it cannot be decoded incrementally")
      const l = yield* failureOf(attempt(() => materialize(tf, opaque, 1)))
      assert.instanceOf(l, NotLowerable)
      assert.strictEqual(l._tag, "NotLowerable")
      assert.strictEqual(l.message, "block kind \"opaque\" at (root) has no tensor implementation (apply)")
      release(low)
    }))

  it.effect("attention that is not causal, decoded incrementally: Unsupported naming the node", () =>
    Effect.gen(function*() {
      const { tf } = yield* Tensors
      const m = yield* loadModel(dense)
      const low = materialize(tf, m.analysis, 1)
      const specs = new Map([...low.analysis.specs].map(([p, s]) => [p, typeof s === "object" && s !== null && "causal" in s ? { ...s, causal: false } : s] as const))
      const bidirectional = { ...low, analysis: { ...low.analysis, specs } }
      const s = session(bidirectional, { rows: 1 })
      const e = yield* failureOf(attempt(() => s.feed(Int32Array.of(1, 2), 2)))
      assert.instanceOf(e, Unsupported)
      assert.strictEqual(e._tag, "Unsupported")
      assert.match(e.message, /^layers\/0\/\S+: the attention is not causal \(causal: false\): it cannot be decoded incrementally$/)
      s.dispose()
      release(low)
    }))

  it.effect("sparse MoE dispatch over padded positions: Unsupported naming the layer and the dispatch to use", () =>
    Effect.gen(function*() {
      const { tf } = yield* Tensors
      const m = yield* loadModel(moe)
      const low = materialize(tf, m.analysis, 1)
      const n = 6
      const { ctx, logits } = forward(low, { rows: 1, length: n, ids: new Int32Array(n) }, { training: false, seed: 0, dispatch: "sparse" })
      logits.dispose()
      const at = pathsOf(low.analysis.root, MoE.name)[0]!
      const valid = tf.ones([n])
      const x = tf.zeros([n, 32])
      const padded: ForwardContext = { ...ctx, scope: at, stream: { ...ctx.stream, valid } }
      const e = thrown(() => MoE.apply!(padded, low.analysis.specs.get(at) as never, x, low.nodeParams.get(at)!, []))
      assert.instanceOf(e, Unsupported)
      assert.strictEqual((e as Unsupported).message, `${at}: sparse MoE dispatch does not take padded positions (the empty slots of a static-shape concept stage); use dense or grouped dispatch`)
      tf.dispose([valid, x])
      release(low)
    }))

  it.effect("attempt and attemptPromise: a typed error fails, anything else is a defect", () =>
    Effect.gen(function*() {
      const bug = yield* Effect.exit(attempt(() => {
        throw new Error("a bug")
      }))
      assert.isTrue(Exit.isFailure(bug) && Cause.hasDies(bug.cause))
      const asyncBug = yield* Effect.exit(attemptPromise(() => Promise.reject(new TypeError("a bug"))))
      assert.isTrue(Exit.isFailure(asyncBug) && Cause.hasDies(asyncBug.cause))
      const typed = yield* failureOf(attemptPromise(() => Promise.reject(new SettingError({ variable: "X", value: "y", expected: "z" }))))
      assert.strictEqual(typed.message, "X=\"y\": expected z")
      assert.strictEqual(yield* attempt(() => 3), 3)
      assert.isFalse(isRunFailure(new Error("Unsupported")))
      assert.isTrue(isRunFailure(new Unsupported({ at: "a", problem: "b" })))
    }))
})

/** The environment `env` as a ConfigProvider (Effect's default one reads the environment once). */
const withEnv = (env: Record<string, string>) => Effect.provideService(ConfigProvider.ConfigProvider, ConfigProvider.fromEnv({ env }))

describe("environment settings", () => {
  it.effect("a bad value of each setting is a SettingError naming the variable, its value and what was expected", () =>
    Effect.gen(function*() {
      const cases: ReadonlyArray<readonly [Record<string, string>, string]> = [
        [{ CONCEPTMOE_FUSED: "nonsense" }, "CONCEPTMOE_FUSED=\"nonsense\": expected on or off"],
        [{ CONCEPTMOE_CAPTURE: "0" }, "CONCEPTMOE_CAPTURE=\"0\": expected on or off"],
        [{ CONCEPTMOE_SUBMIT_EVERY: "-1" }, "CONCEPTMOE_SUBMIT_EVERY=\"-1\": expected a whole number of dispatches ≥ 0 (0: one command buffer per step)"],
        [{ CONCEPTMOE_SUBMIT_EVERY: "1.5" }, "CONCEPTMOE_SUBMIT_EVERY=\"1.5\": expected a whole number of dispatches ≥ 0 (0: one command buffer per step)"]
      ]
      for (const [env, message] of cases) {
        const e = yield* failureOf(Settings.runtime.pipe(withEnv(env)))
        assert.instanceOf(e, SettingError)
        assert.strictEqual(e._tag, "SettingError")
        assert.strictEqual(e.message, message)
      }
      // loading a backend resolves them: CONCEPTMOE_MATMUL is checked against the kernels on any backend
      const m = yield* failureOf(load("cpu").pipe(withEnv({ CONCEPTMOE_MATMUL: "bad" })))
      assert.strictEqual(m._tag, "SettingError")
      assert.match(m.message, /^CONCEPTMOE_MATMUL="bad": expected auto, tfjs or a kernel TMxTNxTK\/RMxRN/)
      const b = yield* failureOf(resolveName(undefined).pipe(withEnv({ CONCEPTMOE_BACKEND: "nonsense" })))
      assert.strictEqual(b._tag, "SettingError")
      assert.strictEqual(b.message, "CONCEPTMOE_BACKEND=\"nonsense\": expected one of wasm, cpu, webgpu, tensorflow")
      // --backend names the flag
      const f = yield* failureOf(resolveName("tpu"))
      assert.strictEqual(f.message, "--backend: unknown backend \"tpu\"; expected one of wasm, cpu, webgpu, tensorflow")
    }))

  it.effect("good values are read, defaults fill the rest, and a backend load keeps them for the tensor code", () =>
    Effect.gen(function*() {
      assert.strictEqual(yield* resolveName(undefined).pipe(withEnv({ CONCEPTMOE_BACKEND: "cpu" })), "cpu")
      assert.strictEqual(yield* resolveName(undefined).pipe(withEnv({})), "wasm")
      assert.deepStrictEqual(yield* Settings.runtime.pipe(withEnv({})), Settings.defaults)
      assert.deepStrictEqual(
        yield* Settings.runtime.pipe(withEnv({ CONCEPTMOE_FUSED: "off", CONCEPTMOE_CAPTURE: "on", CONCEPTMOE_SUBMIT_EVERY: "0", CONCEPTMOE_MATMUL: "tfjs", DAWN_FLAGS: "backend=vulkan" })),
        { fused: false, capture: true, submitEvery: 0, matmul: "tfjs", dawnFlags: "backend=vulkan" }
      )
      assert.isTrue(yield* Settings.get(Settings.debug).pipe(withEnv({ CONCEPTMOE_DEBUG: "1" })))
      assert.isFalse(yield* Settings.get(Settings.debug).pipe(withEnv({})))
      const { tf } = yield* load("cpu").pipe(withEnv({ CONCEPTMOE_FUSED: "off", CONCEPTMOE_SUBMIT_EVERY: "7" }))
      try {
        assert.strictEqual(settingsOf(tf).fused, false)
        assert.strictEqual(settingsOf(tf).submitEvery, 7)
      } finally {
        yield* load("cpu").pipe(withEnv({}))
      }
      assert.deepStrictEqual(settingsOf(tf), Settings.defaults)
    }))

  it("docs/performance.md lists every setting with its default", () => {
    const doc = fs.readFileSync(path.join(root, "docs", "performance.md"), "utf8")
    for (const s of Settings.all) {
      const row = doc.split("\n").find((l) => l.startsWith(`| \`${s.variable}\` |`))
      assert.isDefined(row, s.variable)
      assert.include(row!.split("|")[2], s.default, s.variable)
    }
  })
})

describe("the command line", () => {
  it.effect("a typed runtime error thrown from tensor code that no Effect caught: exit 1, its one line, not an internal failure", () =>
    Effect.gen(function*() {
      const err: Array<string> = []
      const cmd = Command.make("t", {}, () =>
        Effect.sync(() => {
          throw new Unsupported({ at: "layers/0/ffn/moe", problem: "sparse MoE dispatch does not take padded positions" })
        }))
      const outcome = yield* runCli(cmd, [], "test").pipe(
        Effect.provideService(Console.Console, { ...globalThis.console, error: (...a: Array<unknown>) => err.push(a.join(" ")), log: () => {} } as Console.Console),
        Effect.provide(NodeServices.layer)
      )
      assert.strictEqual(outcome.code, 1)
      assert.isUndefined(outcome.defect)
      assert.deepStrictEqual(err, ["error: layers/0/ffn/moe: sparse MoE dispatch does not take padded positions"])
    }))

  it("conceptmoe with a bad environment setting exits 1 with one line naming the variable, and no stack", () => {
    const r = spawnSync(process.execPath, [path.join(root, "bin", "conceptmoe.js"), "verify", path.join(root, "examples", "dense-small.json")], {
      env: { ...process.env, CONCEPTMOE_FUSED: "nonsense" },
      encoding: "utf8",
      timeout: 120_000
    })
    assert.strictEqual(r.status, 1, r.stderr)
    assert.strictEqual(r.stderr, "error: CONCEPTMOE_FUSED=\"nonsense\": expected on or off\n")
    assert.notMatch(r.stderr, /\n\s+at /)
  }, 130_000)
})
