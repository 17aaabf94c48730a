/**
 * Our fixes for tfjs-backend-webgpu 4.22 (the numbering of `../Fixes.ts`, which lists them all with
 * their symptoms): 6. `AddN` of more inputs than a shader stage may bind, summed in groups, and the
 * device's validation errors collected (`gpuErrors`); 7. a reverse `Cumsum` as reverse → forward
 * cumsum → reverse. Tested in tests/webgpu.test.ts (where an adapter exists).
 *
 * @since 0.4.0
 */
import type { Tf } from "../../graph/Apply.ts"
import { overrideKernel } from "../Override.ts"

/** Installs the webgpu fixes (once per tensor library: `../Fixes.ts`'s `install`). */
export const installWebGpuFixes = (tf: Tf): void => {
  const gpu = tf.backend() as unknown as WebGpuBackend
  installWebGpuAddN(tf, gpu)
  installWebGpuCumsum(tf, gpu)
  logGpuErrors(gpu)
}

/** Fix 6: webgpu's `AddN` of more inputs than a shader stage may bind, summed in groups. */
const installWebGpuAddN = (tf: Tf, gpu: WebGpuBackend): void => {
  const most = Math.max(2, gpu.device.limits.maxStorageBuffersPerShaderStage - 1)
  overrideKernel(tf, "AddN", "webgpu", ({ kernelFunc: stock }) => (args) => {
    let xs = args.inputs as unknown as Array<{ dataId: unknown }>
    const made: Array<{ dataId: unknown }> = []
    while (xs.length > most) {
      const next: Array<{ dataId: unknown }> = []
      for (let i = 0; i < xs.length; i += most) {
        const group = xs.slice(i, i + most)
        if (group.length === 1) next.push(group[0]!)
        else {
          const part = stock({ ...args, inputs: group as never }) as unknown as { dataId: unknown }
          made.push(part)
          next.push(part)
        }
      }
      xs = next
    }
    const out = stock({ ...args, inputs: xs as never })
    for (const t of made) gpu.disposeData(t.dataId)
    return out
  })
}

/** Fix 7: webgpu's reverse `Cumsum` as reverse → forward cumsum → reverse. */
const installWebGpuCumsum = (tf: Tf, gpu: WebGpuBackend): void => {
  const reverse = tf.getKernel("Reverse", "webgpu")!.kernelFunc
  overrideKernel(tf, "Cumsum", "webgpu", ({ kernelFunc: cumsum }) => (args) => {
    const a = args.attrs as { axis: number; exclusive: boolean; reverse: boolean }
    if (!a.reverse) return cumsum(args)
    const x = args.inputs["x"] as unknown as { shape: Array<number> }
    const axis = a.axis < 0 ? a.axis + x.shape.length : a.axis
    const flip = (t: unknown) => reverse({ ...args, inputs: { x: t } as never, attrs: { dims: [axis] } }) as unknown as { dataId: unknown }
    const flipped = flip(x)
    const summed = cumsum({ ...args, inputs: { x: flipped } as never, attrs: { ...a, axis, reverse: false } }) as unknown as { dataId: unknown }
    const out = flip(summed)
    gpu.disposeData(flipped.dataId)
    gpu.disposeData(summed.dataId)
    return out as never
  })
}

/** Fix 6: collects the first validation errors the device reports (see `gpuErrors`). */
const logGpuErrors = (gpu: WebGpuBackend): void => {
  gpu.device.addEventListener("uncapturederror", (event: unknown) => {
    const e = event as { error?: { message?: string } }
    const log = gpuErrorLogs.get(gpu) ?? []
    gpuErrorLogs.set(gpu, log)
    if (log.length < 16) log.push(String(e.error?.message ?? e).split("\n")[0]!)
  })
}

/** The parts of tfjs-backend-webgpu's backend that the fixes use. */
interface WebGpuBackend {
  readonly device: {
    readonly limits: { readonly maxStorageBuffersPerShaderStage: number }
    addEventListener: (type: string, listener: (event: unknown) => void) => void
  }
  disposeData: (dataId: unknown) => boolean
}

// the errors each webgpu backend's device reported, keyed by the backend object (one per tensor library)
const gpuErrorLogs = new WeakMap<object, Array<string>>()

/**
 * Validation and out-of-memory errors that the WebGPU device of `tf`'s webgpu backend reported
 * since the last call (Dawn reports them asynchronously and drops the failing command buffer);
 * empty where `tf` has no webgpu backend. Clears them. Reads the engine's registry of initialised
 * backends, so it never starts one.
 */
export const gpuErrors = (tf: Tf): ReadonlyArray<string> => {
  const gpu = (tf.engine() as unknown as { readonly registry: Readonly<Record<string, object | undefined>> }).registry["webgpu"]
  const log = gpu === undefined ? undefined : gpuErrorLogs.get(gpu)
  return log === undefined ? [] : log.splice(0, log.length)
}
