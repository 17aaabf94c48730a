/**
 * What the cpu backend provides when it loads (`../Backend.ts`, `../Ops.ts`): a writable view of a
 * float32 tensor's storage (its typed array), for appends in place (`../Cache.ts`).
 *
 * @since 0.4.0
 */
import type { Tensor, Tf } from "../../graph/Apply.ts"
import type { BackendOps } from "../Ops.ts"

/** The tensor's own values, or undefined where they are not a float32 array of its size. */
const cpuStorage = (tf: Tf) => (t: Tensor): Float32Array | undefined => {
  const backend = tf.backend() as unknown as { data?: { get: (id: unknown) => { values?: unknown } } }
  const values = backend.data?.get(t.dataId).values
  return values instanceof Float32Array && values.length === t.size ? values : undefined
}

export const cpuSupport = (tf: Tf): BackendOps => ({ storage: cpuStorage(tf) })
