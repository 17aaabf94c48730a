/**
 * Counts what the webgpu backend does for a piece of work: compute dispatches by program and host
 * uploads (tensors whose values go from JS to a GPU buffer). Each costs host time (tens of µs per
 * dispatch in tfjs), which is what separates a small training step from PyTorch eager, so the
 * counts are the device-independent part of the GPU benchmark. Wraps the backend's own methods.
 */
import type { Tf } from "../../src/graph/Apply.ts"

interface Backend {
  runWebGPUProgram: (program: { constructor: { name: string }; shaderKey?: string }, ...rest: Array<unknown>) => unknown
  uploadToGPU: (dataId: unknown) => void
  tensorMap: { get: (dataId: unknown) => { resource: unknown; values: unknown } }
}

export interface Counts {
  dispatches: number
  uploads: number
  readonly byProgram: Map<string, number>
}

/** Starts counting on the current (webgpu) backend; `stop` restores it and returns the counts. */
export const countDispatches = (tf: Tf): { readonly counts: Counts; readonly stop: () => Counts } => {
  const be = tf.backend() as unknown as Backend
  const counts: Counts = { dispatches: 0, uploads: 0, byProgram: new Map() }
  const run = be.runWebGPUProgram
  const upload = be.uploadToGPU
  be.runWebGPUProgram = function (program, ...rest) {
    // our kernels are plain objects: name them by their shader key
    const name = program.constructor.name === "Object" ? String(program.shaderKey) : program.constructor.name
    counts.dispatches++
    counts.byProgram.set(name, (counts.byProgram.get(name) ?? 0) + 1)
    return run.call(this, program, ...rest)
  }
  be.uploadToGPU = function (dataId) {
    const d = this.tensorMap.get(dataId)
    if (d.resource == null && d.values != null) counts.uploads++
    return upload.call(this, dataId)
  }
  return {
    counts,
    stop: () => {
      be.runWebGPUProgram = run
      be.uploadToGPU = upload
      return counts
    }
  }
}
