/**
 * What a backend adds to the generic runtime beyond the kernels it registers, provided by the
 * backend's folder when it loads (`Backend.load`) and kept with the tensor library it was loaded
 * for, per backend (as the runtime's settings are kept: `Env.ts`). Lowering (`Lower.ts`) asks for it
 * here and knows no backend: today the webgpu backend's grouped product that reads each group's
 * expert matrix in place (`webgpu/MatMul.ts`), how decode buffers append in place (a view of a
 * tensor's storage on cpu and wasm, a device-side scatter on webgpu: `Cache.ts`), and each backend's
 * MoE dispatch where the caller sets none (webgpu: grouped, static shapes for its replay; wasm: fitted to each step's routing); a
 * backend without them gathers the matrices and dispatches sparse.
 *
 * @since 0.4.0
 */
import type { Tensor, Tf } from "../graph/Apply.ts"
import type { Dispatch } from "../blocks/MoE.ts"

export type GroupedProduct = (x: Tensor, w: Tensor, groups: Tensor) => Tensor

export interface BackendOps {
  /** `x [G, T, a]` times each group's expert matrix of `w [E, a, b]`, given the gathering `fallback`. */
  readonly groupedMatMul?: (tf: Tf, fallback: GroupedProduct) => GroupedProduct
  /**
   * How MoE layers dispatch on this backend where the caller does not say (`MoE.Dispatch`; else
   * `sparse`): in a forward pass, in a decoding session, and in training for a capacity factor
   * (`expertCapacity`, or null).
   */
  /**
   * The kernels the backend chose by timing (webgpu's tuned matmuls), as an opaque record that a
   * checkpoint keeps (`saved`) and a resumed run takes back (`take`: how many were taken, and the
   * names it does not know).
   */
  readonly kernelChoices?: {
    readonly saved: () => Readonly<Record<string, string>>
    readonly take: (choices: Readonly<Record<string, string>>) => { readonly taken: number; readonly unknown: ReadonlyArray<string> }
  }
  /** Errors the device reported since the last call, cleared (webgpu: Dawn drops a failing command buffer silently). */
  readonly deviceErrors?: () => ReadonlyArray<string>
  /** A writable view of a float32 tensor's storage, for appends in place (cpu, wasm: `Cache.ts`). */
  readonly storage?: (t: Tensor) => Float32Array | undefined
  /**
   * `Σ_s weights[s]·g_s` of a gradient and the same gradient from other training threads
   * (`train/Parallel.ts`), as `Parallel.weightedSum` computes it, bit for bit (wasm: in SIMD).
   */
  readonly weightedSum?: (first: Tensor, rest: ReadonlyArray<Float32Array>, weights: ReadonlyArray<number>) => Tensor
  /** Writes `x [total, width]` into a buffer tensor's device storage, token t at row `rowOf[t]`, position `posOf[t]` (webgpu). */
  readonly scatterRows?: (store: Tensor, x: Tensor, rowOf: Int32Array, posOf: Int32Array, capacity: number, columns: boolean) => void
  readonly dispatch?: {
    readonly forward?: Dispatch
    readonly decode?: Dispatch
    readonly training?: (capacity: number | null) => Dispatch | undefined
  }
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
