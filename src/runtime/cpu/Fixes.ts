/**
 * Our fix for tfjs's cpu backend 4.22 (fix 3 of `../Fixes.ts`): `UnsortedSegmentSum` in linear time.
 *
 * @since 0.4.0
 */
import type { Tf } from "../../graph/Apply.ts"
import { overrideKernel } from "../Override.ts"

/** Installs the cpu fixes (once per tensor library: `../Fixes.ts`'s `install`). */
export const installCpuFixes = (tf: Tf): void => installCpuSegmentSum(tf)

/** Fix 3: cpu's `UnsortedSegmentSum` in linear time (the stock kernel loops over every segment for every row). */
const installCpuSegmentSum = (tf: Tf): void => {
  overrideKernel(tf, "UnsortedSegmentSum", "cpu", () => ({ attrs, backend: b, inputs }) => {
    const cpu = b as unknown as {
      data: { get: (id: unknown) => { values: ArrayLike<number> } }
      makeTensorInfo: (shape: Array<number>, dtype: string, values: Float32Array) => unknown
    }
    const x = inputs["x"] as unknown as { dataId: unknown; shape: Array<number> }
    const ids = inputs["segmentIds"] as unknown as { dataId: unknown }
    const numSegments = (attrs as { numSegments: number }).numSegments
    const xs = cpu.data.get(x.dataId).values
    const seg = cpu.data.get(ids.dataId).values
    const inner = x.shape.slice(1).reduce((a, c) => a * c, 1)
    const o = new Float32Array(numSegments * inner)
    for (let i = 0; i < seg.length; i++) {
      const s = seg[i]!
      if (s < 0 || s >= numSegments) continue
      for (let j = 0; j < inner; j++) o[s * inner + j]! += xs[i * inner + j]!
    }
    return cpu.makeTensorInfo([numSegments, ...x.shape.slice(1)], "float32", o) as never
  })
}
