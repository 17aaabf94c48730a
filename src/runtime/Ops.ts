/**
 * What a backend adds to the generic runtime beyond the kernels it registers, provided by the
 * backend's folder when it loads (`Backend.load`) and kept with the tensor library it was loaded
 * for, per backend (as the runtime's settings are kept: `Env.ts`). Lowering (`Lower.ts`) asks for it
 * here and knows no backend: today the webgpu backend's grouped product that reads each group's
 * expert matrix in place (`webgpu/MatMul.ts`); a backend without one gathers the matrices.
 *
 * @since 0.4.0
 */
import type { Tensor, Tf } from "../graph/Apply.ts"

export type GroupedProduct = (x: Tensor, w: Tensor, groups: Tensor) => Tensor

export interface BackendOps {
  /** `x [G, T, a]` times each group's expert matrix of `w [E, a, b]`, given the gathering `fallback`. */
  readonly groupedMatMul?: (tf: Tf, fallback: GroupedProduct) => GroupedProduct
}

const provided = new WeakMap<object, Map<string, BackendOps>>()

/** Keeps `ops` for `backend` of the tensor library `tf`. */
export const provideOps = (tf: Tf, backend: string, ops: BackendOps): void => {
  const byBackend = provided.get(tf.env()) ?? new Map<string, BackendOps>()
  byBackend.set(backend, ops)
  provided.set(tf.env(), byBackend)
}

/** What the current backend of `tf` provides (nothing for a backend that provided nothing). */
export const backendOps = (tf: Tf): BackendOps => provided.get(tf.env())?.get(tf.getBackend()) ?? {}
