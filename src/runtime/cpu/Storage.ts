/**
 * A writable view of a float32 tensor's storage on tfjs's cpu backend (its typed array), for
 * appends in place (`../Cache.ts`); the cpu backend provides it when it loads (`../Ops.ts`).
 *
 * @since 0.4.0
 */
import type { Tensor, Tf } from "../../graph/Apply.ts"

/** The tensor's own values, or undefined where they are not a float32 array of its size. */
export const cpuStorage = (tf: Tf) => (t: Tensor): Float32Array | undefined => {
  const backend = tf.backend() as unknown as { data?: { get: (id: unknown) => { values?: unknown } } }
  const values = backend.data?.get(t.dataId).values
  return values instanceof Float32Array && values.length === t.size ? values : undefined
}
