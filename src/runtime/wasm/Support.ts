/**
 * What the wasm backend adds when it loads (`../Backend.ts`): its kernels, registered with tfjs,
 * and what it provides beyond them (`../Ops.ts`): a view of the heap for appends in place, MoE
 * dispatch fitted to each step (the routing's counts are read back at no cost), and the SIMD sum of
 * the training threads' gradients.
 *
 * @since 0.4.0
 */
import type { Tf } from "../../graph/Apply.ts"
import type { BackendOps } from "../Ops.ts"
import { heapStorage } from "./Heap.ts"
import { registerWasmKernels } from "./Kernels.ts"
import { wasmWeightedSum } from "./WeightedSum.ts"

export const wasmSupport = (tf: Tf): BackendOps => {
  registerWasmKernels(tf)
  const weightedSum = wasmWeightedSum(tf)
  return {
    storage: heapStorage(tf),
    ...(weightedSum === undefined ? {} : { weightedSum }),
    dispatch: { decode: "fitted", training: (c) => (c === null ? "fitted" : undefined) }
  }
}
