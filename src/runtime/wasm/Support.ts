/**
 * What the wasm backend adds when it loads (`../Backend.ts`): its kernels, registered with tfjs,
 * and what it provides beyond them (`../Ops.ts`): a view of the heap for appends in place, and MoE
 * dispatch fitted to each step (the routing's counts are read back at no cost).
 *
 * @since 0.4.0
 */
import type { Tf } from "../../graph/Apply.ts"
import type { BackendOps } from "../Ops.ts"
import { heapStorage } from "./Heap.ts"
import { registerWasmKernels } from "./Kernels.ts"

export const wasmSupport = (tf: Tf): BackendOps => {
  registerWasmKernels(tf)
  return { storage: heapStorage(tf), dispatch: { decode: "fitted", training: (c) => (c === null ? "fitted" : undefined) } }
}
