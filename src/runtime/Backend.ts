/**
 * Tensor backends as an Effect service.
 *
 * - `wasm` (default on CPU): XNNPACK SIMD, tfjs-backend-wasm;
 * - `cpu`: the plain JavaScript reference;
 * - `webgpu`: tfjs-backend-webgpu on the npm package `webgpu` (Dawn), loaded only when both are
 *   installed and an adapter exists; `DAWN_FLAGS` (space-separated) go to Dawn's `create`
 *   ({@link dawnFlags}: timestamps unquantized unless they say otherwise); `CONCEPTMOE_MATMUL`
 *   chooses the matmul (`webgpu/MatMul.ts`);
 * - `tensorflow`: tfjs-node-gpu or tfjs-node, loaded only when installed. They cannot be installed
 *   on this project's machines (their install script downloads libtensorflow), so this path is
 *   untested here.
 *
 * The choice comes from a flag or `CONCEPTMOE_BACKEND`. Loading a backend installs our fixes
 * (`Fixes.ts`) once, and resolves the runtime's environment settings (`internal/Settings.ts`) for
 * the tensor code (`Env.ts`): a bad value fails the load with a `SettingError` naming the variable.
 *
 * @since 0.1.0
 */
import { Context, Effect, Layer, Option, Schema } from "effect"
import type { Tf } from "../graph/Apply.ts"
import { SettingError } from "../internal/RunErrors.ts"
import * as Settings from "../internal/Settings.ts"
import { backendNames, type BackendName } from "../internal/Settings.ts"
import { useSettings } from "./Env.ts"
import { install } from "./Fixes.ts"
import { type BackendOps, provideOps } from "./Ops.ts"
import { cpuSupport } from "./cpu/Support.ts"
import { wasmSupport } from "./wasm/Support.ts"
import { webGpuSupport } from "./webgpu/Support.ts"
import { type MatMulMode, matMulMode, parseMode, tilesName, useMatMul } from "./webgpu/MatMul.ts"

export { backendNames }
export type { BackendName }

/** A backend could not be loaded: which, and why. */
export class BackendError extends Schema.TaggedError<BackendError>()("BackendError", {
  backend: Schema.String,
  message: Schema.String
}) {}

export interface Runtime {
  readonly tf: Tf
  readonly name: BackendName
  /** e.g. `wasm (tfjs 4.22.0, SIMD)`. */
  readonly description: string
}

/**
 * Whether the current backend reads tensors synchronously (`dataSync`). tfjs-backend-webgpu does it
 * through OffscreenCanvas, which Node lacks; training then records its reads asynchronously
 * (`Lower.recordReads`), and decoding goes through `Session.feedAsync`.
 */
export const syncReads = (tf: Tf): boolean => tf.getBackend() !== "webgpu"

export class Tensors extends Context.Service<Tensors, Runtime>()("conceptmoe/Tensors") {}

const dynamicImport = (specifier: string): Promise<unknown> => import(specifier)

/**
 * The flags for Dawn's `create`: `DAWN_FLAGS` (space-separated, e.g.
 * `enable-dawn-features=disable_robustness`), with Dawn's timestamp quantization turned off unless
 * they name it. Dawn rounds GPU timestamps to 32.768 µs by default (a browser's defence against
 * timing attacks); kernels of a few µs then time as 0 or 32.8 µs, and the matmul tuner
 * (`webgpu/MatMul.ts`) and the step profile read garbage.
 */
export const dawnFlags = (given: string | undefined): Array<string> => {
  const flags = (given ?? "").split(/\s+/).filter((s) => s !== "")
  if (flags.some((f) => f.includes("timestamp_quantization"))) return flags
  const i = flags.findIndex((f) => f.startsWith("disable-dawn-features="))
  if (i < 0) return [...flags, "disable-dawn-features=timestamp_quantization"]
  return flags.map((f, j) => (j === i ? `${f},timestamp_quantization` : f))
}

/** The runtime's settings, with `CONCEPTMOE_MATMUL` checked against the kernels. */
const runtimeSettings = Effect.flatMap(Settings.runtime, (settings) => {
  const mode = parseMode(settings.matmul)
  return mode === undefined
    ? Effect.fail(new SettingError({ variable: Settings.matmul.variable, value: settings.matmul, expected: Settings.matmul.expected }))
    : Effect.succeed({ settings, mode })
})

/** Each backend's folder: its kernels, registered as it loads, and what it provides (`Ops.ts`). */
const supports: Partial<Record<string, (tf: Tf) => BackendOps>> = { cpu: cpuSupport, wasm: wasmSupport, webgpu: webGpuSupport }

/** Loads tfjs and a backend, installs the fixes, and resolves the runtime's settings for it. */
export const load = (name: BackendName): Effect.Effect<Runtime, BackendError | SettingError> =>
  Effect.flatMap(runtimeSettings, ({ settings, mode }) => loadWith(name, settings, mode))

const loadWith = (name: BackendName, settings: Settings.RuntimeSettings, matmul: MatMulMode): Effect.Effect<Runtime, BackendError> =>
  Effect.tryPromise({
    try: async () => {
      const tf = (await import("@tensorflow/tfjs")) as unknown as Tf
      tf.env().set("PROD", true)
      let detail = ""
      if (name === "wasm") {
        await import("@tensorflow/tfjs-backend-wasm")
      } else if (name === "webgpu" && tf.findBackendFactory("webgpu") == null) {
        // once per process: a second Dawn instance beside the first crashes it (seen on lavapipe)
        let webgpu: { create: (flags: Array<string>) => unknown; globals: Record<string, unknown> }
        try {
          webgpu = (await dynamicImport("webgpu")) as typeof webgpu
        } catch {
          throw new Error("the npm packages `webgpu` and `@tensorflow/tfjs-backend-webgpu` are not installed")
        }
        Object.assign(globalThis, webgpu.globals)
        Object.defineProperty(globalThis, "navigator", {
          value: { gpu: webgpu.create(dawnFlags(settings.dawnFlags)) },
          configurable: true
        })
        await dynamicImport("@tensorflow/tfjs-backend-webgpu")
      } else if (name === "tensorflow") {
        let loaded = ""
        for (const pkg of ["@tensorflow/tfjs-node-gpu", "@tensorflow/tfjs-node"]) {
          try {
            await dynamicImport(pkg)
            loaded = pkg
            break
          } catch {
            // try the next
          }
        }
        if (loaded === "") {
          throw new Error(
            "neither @tensorflow/tfjs-node-gpu nor @tensorflow/tfjs-node is installed (their install script downloads libtensorflow, which these machines cannot reach; untested here)"
          )
        }
        detail = `, ${loaded}`
      }
      const backendName = name === "tensorflow" ? "tensorflow" : name
      const ok = await tf.setBackend(backendName)
      if (!ok) throw new Error(name === "webgpu" ? "no WebGPU adapter was found" : "setBackend returned false")
      await tf.ready()
      install(tf, backendName)
      // the backend's folder registers its kernels (the makers of Fused.ts run them) and says what
      // it provides beyond them (Ops.ts)
      const support = supports[name]
      if (support !== undefined) provideOps(tf, name, support(tf))
      useSettings(tf, settings)
      if (name === "webgpu") {
        // the matmul mode is set once per process, when the backend first loads (loading it again,
        // e.g. for another layer, keeps the kernels chosen so far)
        if (matMulMode(tf) === "unset") useMatMul(tf, matmul)
        const mode = matMulMode(tf)
        detail = `, matmul ${typeof mode === "object" ? tilesName(mode) : mode}`
      }
      if (name === "wasm") {
        const simd = tf.env().getBool("WASM_HAS_SIMD_SUPPORT")
        detail = simd ? ", SIMD" : ", no SIMD"
      }
      return { tf, name, description: `${name} (tfjs ${tf.version.tfjs}${detail})` } satisfies Runtime
    },
    // everything thrown above (a package not installed, no adapter) is this backend's typed error
    catch: (e) => new BackendError({ backend: name, message: `cannot load backend ${name}: ${(e as Error).message}` })
  })

/** The backend named by `name` (the `--backend` flag), else by `CONCEPTMOE_BACKEND`, else wasm. */
export const resolveName = (name: string | undefined): Effect.Effect<BackendName, BackendError | SettingError> => {
  if (name === undefined) return Effect.map(Settings.get(Settings.backend), Option.getOrElse((): BackendName => "wasm"))
  return (backendNames as ReadonlyArray<string>).includes(name)
    ? Effect.succeed(name as BackendName)
    : Effect.fail(new BackendError({ backend: name, message: `--backend: unknown backend "${name}"; expected one of ${backendNames.join(", ")}` }))
}

/** A layer providing {@link Tensors} for a backend. */
export const layer = (name?: string): Layer.Layer<Tensors, BackendError | SettingError> =>
  Layer.effect(Tensors, Effect.flatMap(resolveName(name), load))
