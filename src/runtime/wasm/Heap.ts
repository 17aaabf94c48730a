/**
 * Kernels over tfjs-backend-wasm's heap: a tfjs kernel whose body is a JavaScript loop over typed
 * views of its inputs and outputs, where they lie in the wasm module's memory (no copy in or out).
 *
 * @since 0.4.0
 */
import type * as TF from "@tensorflow/tfjs"
import type { Tf } from "../../graph/Apply.ts"

/** The parts of tfjs-backend-wasm's backend that heap kernels use. */
export interface WasmBackend {
  makeOutput: (shape: Array<number>, dtype: string) => TF.TensorInfo
  typedArrayFromHeap: (t: TF.TensorInfo) => Float32Array | Int32Array
}

/**
 * A writable view of a float32 tensor where it lies in the heap, for appends in place
 * (`../Cache.ts`; valid until the next allocation, which may grow the heap).
 */
export const heapStorage = (tf: Tf) => (t: TF.Tensor): Float32Array | undefined =>
  (tf.backend() as unknown as WasmBackend).typedArrayFromHeap(t) as Float32Array

/** Whether the current backend is tfjs-backend-wasm with the heap interface. */
export const hasHeap = (tf: Tf): boolean => {
  if (tf.getBackend() !== "wasm") return false
  const backend = tf.backend() as unknown as Partial<WasmBackend>
  return typeof backend.makeOutput === "function" && typeof backend.typedArrayFromHeap === "function"
}

/**
 * Registers `kernelName` for wasm: `outputs(shapes, attrs)` gives the outputs' shapes (float32), and
 * `run` fills them from views of the inputs, in the order the caller names them (views taken after
 * every output is allocated: an allocation may grow the heap and detach earlier views).
 */
export const registerHeapKernel = (
  tf: Tf,
  kernelName: string,
  outputs: (shapes: Array<Array<number>>, attrs: Record<string, number>) => Array<Array<number>>,
  run: (xs: Array<Float32Array | Int32Array>, outs: Array<Float32Array>, shapes: Array<Array<number>>, attrs: Record<string, number>) => void
): void => {
  tf.registerKernel({
    kernelName,
    backendName: "wasm",
    kernelFunc: ({ inputs, backend: b, attrs }) => {
      const wasm = b as unknown as WasmBackend
      const given = Object.values(inputs) as Array<TF.TensorInfo>
      const shapes = given.map((t) => [...t.shape])
      const a = attrs as unknown as Record<string, number>
      const made = outputs(shapes, a).map((shape) => wasm.makeOutput(shape, "float32"))
      run(given.map((t) => wasm.typedArrayFromHeap(t)), made.map((t) => wasm.typedArrayFromHeap(t) as Float32Array), shapes, a)
      return made.length === 1 ? made[0]! : made
    }
  })
}
