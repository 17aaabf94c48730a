/**
 * Tensor backends as an Effect service.
 *
 * - `wasm` (default on CPU): XNNPACK SIMD, tfjs-backend-wasm;
 * - `cpu`: the plain JavaScript reference;
 * - `webgpu`: tfjs-backend-webgpu on the npm package `webgpu` (Dawn), loaded only when both are
 *   installed and an adapter exists; `DAWN_FLAGS` (space-separated) go to Dawn's `create`
 *   ({@link dawnFlags}: timestamps unquantized unless they say otherwise); `CONCEPTMOE_MATMUL`
 *   chooses the matmul (`MatMul.ts`);
 * - `tensorflow`: tfjs-node-gpu or tfjs-node, loaded only when installed. They cannot be installed
 *   on this project's machines (their install script downloads libtensorflow), so this path is
 *   untested here.
 *
 * The choice comes from a flag or `CONCEPTMOE_BACKEND`. Loading a backend installs our fixes
 * (`Fixes.ts`) once.
 *
 * @since 0.1.0
 */
import { Context, Effect, Layer, Schema } from "effect"
import type { Tf } from "../graph/Apply.ts"
import { install } from "./Fixes.ts"
import { matMulMode, parseMode, tilesName, useMatMul } from "./MatMul.ts"

export const backendNames = ["wasm", "cpu", "webgpu", "tensorflow"] as const
export type BackendName = typeof backendNames[number]

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
 * (`MatMul.ts`) and the step profile read garbage.
 */
export const dawnFlags = (given: string | undefined): Array<string> => {
  const flags = (given ?? "").split(/\s+/).filter((s) => s !== "")
  if (flags.some((f) => f.includes("timestamp_quantization"))) return flags
  const i = flags.findIndex((f) => f.startsWith("disable-dawn-features="))
  if (i < 0) return [...flags, "disable-dawn-features=timestamp_quantization"]
  return flags.map((f, j) => (j === i ? `${f},timestamp_quantization` : f))
}

/** Loads tfjs and a backend, and installs the fixes. */
export const load = (name: BackendName): Effect.Effect<Runtime, BackendError> =>
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
          value: { gpu: webgpu.create(dawnFlags(process.env["DAWN_FLAGS"])) },
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
      if (name === "webgpu") {
        // the matmul mode is set once per process, when the backend first loads (loading it again,
        // e.g. for another layer, keeps the kernels chosen so far)
        if (matMulMode() === "unset") {
          const given = process.env["CONCEPTMOE_MATMUL"]
          const mode = parseMode(given)
          if (mode === undefined) {
            throw new Error(`CONCEPTMOE_MATMUL="${given}": expected auto, tfjs or a kernel TMxTNxTK/RMxRN[/v4[/db|/db2]][/kS], e.g. 128x128x8/8x8/v4 (≤ 256 threads, ≤ 16 KiB of workgroup memory, db2 counting its two tiles; v4: RM, RN, TK divisible by 4)`)
          }
          useMatMul(tf, mode)
        }
        const mode = matMulMode()
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

/** The backend named by `name`, else by `CONCEPTMOE_BACKEND`, else wasm. */
export const resolveName = (name: string | undefined): Effect.Effect<BackendName, BackendError> => {
  const chosen = name ?? process.env["CONCEPTMOE_BACKEND"] ?? "wasm"
  return (backendNames as ReadonlyArray<string>).includes(chosen)
    ? Effect.succeed(chosen as BackendName)
    : Effect.fail(new BackendError({
      backend: chosen,
      message: `${name !== undefined ? "--backend" : "CONCEPTMOE_BACKEND"}: unknown backend "${chosen}"; expected one of ${backendNames.join(", ")}`
    }))
}

/** A layer providing {@link Tensors} for a backend. */
export const layer = (name?: string): Layer.Layer<Tensors, BackendError> =>
  Layer.effect(Tensors, Effect.flatMap(resolveName(name), load))
