/**
 * What the webgpu backend adds when it loads (`../Backend.ts`): its WGSL kernels, registered with
 * tfjs, and what it provides beyond them (`../Ops.ts`): the grouped MoE product that reads each
 * expert's matrix in place, the tuned matmul choices a checkpoint keeps, the device's errors, the
 * device-side append of decode buffers, and MoE dispatch in static shapes (a recorded step replays
 * them).
 *
 * @since 0.4.0
 */
import type { Tf } from "../../graph/Apply.ts"
import type { BackendOps } from "../Ops.ts"
import { gpuErrors } from "./Fixes.ts"
import { registerWebGpuKernels } from "./Kernels.ts"
import { makeGroupedMatMul, takeChoices, tunedChoices } from "./MatMul.ts"
import { scatterRows } from "./Scatter.ts"

export const webGpuSupport = (tf: Tf): BackendOps => {
  registerWebGpuKernels(tf)
  return {
    groupedMatMul: makeGroupedMatMul,
    kernelChoices: { saved: () => tunedChoices(tf), take: (choices) => takeChoices(tf, choices) },
    deviceErrors: () => gpuErrors(tf),
    scatterRows: scatterRows(tf),
    dispatch: { forward: "grouped", training: (c) => (c === null ? "grouped" : { capacity: c }) }
  }
}
