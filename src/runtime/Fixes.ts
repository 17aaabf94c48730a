/**
 * Our fixes for tfjs 4.22, in one place. Each has a test that fails without it
 * (tests/runtime-fixes.test.ts); docs/training.md lists them with the symptoms each one fixes.
 *
 * 1. `matMul` with explicit-transpose gradients: wasm's fast path covers only un-transposed 2-D
 *    products, and the stock gradient uses transpose flags (a training step 1038 → 353 ms).
 * 2. Zero gradients for comparison and logical kernels, which tfjs leaves without one, so a mask
 *    computed on the tape does not break backprop.
 * 3. An `UnsortedSegmentSum` kernel for wasm (absent there), which `gather`'s gradient and the MoE
 *    combine need; and a linear-time one for cpu, whose stock kernel loops over every segment for
 *    every row (2.4 s of a 4.3 s training step of the compare model, measured with tf.profile).
 * 4. `detach` and `ste`: tfjs has no stopGradient.
 * 5. `oneHot` as a float32 comparison: wasm's float oneHot writes int bit patterns, webgpu's int→float
 *    cast only relabels the buffer.
 * 6. webgpu: `addN` of more inputs than a shader stage may bind (`maxStorageBuffersPerShaderStage` − 1,
 *    7 on lavapipe) fails pipeline validation, and Dawn then drops the whole submitted command buffer
 *    without an exception: the gradient-norm `addN` of a 20-parameter model left every Adam moment at
 *    zero. It now sums in groups. Validation errors are also collected (`gpuErrors`), so the steps
 *    can fail loudly instead of training on garbage.
 * 7. webgpu: a reverse `cumsum` (the gradient of every cumsum) compiles the row length into its shader
 *    but leaves it out of the pipeline-cache key, so after the first length every other length reuses
 *    a stale shader and sums the wrong elements (the dechunk EMA's gradient was off by 30%). It now
 *    runs as reverse → forward cumsum → reverse, whose shaders depend on no length.
 * 8. wasm: `BatchMatMul` through our SIMD kernel (`wasm/Gemm.ts`: transposes read in place, batches
 *    in one call; 1.5–3.5× XNNPACK's time on the training steps' shapes), or, with
 *    `CONCEPTMOE_MATMUL=tfjs`, through XNNPACK's fast 2-D path, one product per matrix on views of the
 *    heap (the stock kernel's scalar loop ran at 0.5–3 GFLOP/s).
 * 9. wasm: `GatherV2` as memory copies over the heap (the stock kernel took up to 95 ms a call).
 * 10. wasm: `Identity` (tfjs's clone of every tensor saved for a gradient) shares the data instead
 *    of copying it, as the cpu backend's does.
 * 11. wasm: `Add`, `Sub`, `Multiply` and `RealDiv` of float32 tensors (same shapes, trailing
 *    dimensions, one number, or one number per row) as one SIMD pass over the heap
 *    (`wasm/Elementwise.ts`): 0.053 → 0.033 ms for a [1024, 128] Add, the kernels alone, alternating
 *    in one process; a [1024, 64] by [1024, 1] Multiply took the stock kernel 1.4 ms.
 * 12. wasm: `Transpose` of 4-byte tensors as at most four loops of copies over the heap (runs of
 *    vectors where the last axis stays): the attention's head split [8, 128, 4, 32] → [8, 4, 128,
 *    32] 0.036 → 0.020 ms, its keys' [0, 2, 3, 1] 0.122 → 0.090 ms (the same way).
 * 13. wasm: `Sin` and `Cos` of float32 as JavaScript loops (`Math.sin`, `Math.cos`, as cpu's): 0.94 →
 *    0.31 ms for the rotary embedding's [1024, 1, 16] angles.
 * 14. `UnsortedSegmentSum`'s gradient as one gather of dy with a zero row appended (negative ids read
 *    it), instead of tfjs's nine kernels, among them a LogicalAnd of the ids broadcast against a
 *    tensor of ones of the gradient's shape: 3.5 ms on wasm for the ConceptMoE's [1024, 64] merge.
 * 15. A tensor that a kernel's gradient saves is a second reference to its data (as `makeStop`
 *    makes), where tfjs clones it through an `Identity` kernel and records a tape node for the
 *    clone: 117 such clones in a dense d128 training step, 1,210 in the ConceptMoE's. The same for what
 *    a `customGrad` saves (tfjs clones it through the engine's `clone`, which nothing else calls):
 *    59 more in the dense step.
 * 16. A `Reshape` on cpu, wasm or webgpu (whose kernels only re-label the input's data) without the
 *    engine's dispatch: the kernel and the tape node directly. A dense d128 training step makes 85
 *    (a reshape and its gradient about 4 µs less together, alternating in one process).
 *
 * @since 0.1.0
 */
import type { CausalTriangle, FlopCounter, Tensor, Tf } from "../graph/Apply.ts"
import { hasKernel, runKernel } from "./Fused.ts"
import { kernels, wasmKernels } from "./KernelNames.ts"
import { installCpuFixes } from "./cpu/Fixes.ts"
import { installWasmFixes } from "./wasm/Fixes.ts"
import { installWebGpuFixes } from "./webgpu/Fixes.ts"

const zeroGradKernels = ["Equal", "NotEqual", "Greater", "GreaterEqual", "Less", "LessEqual", "LogicalAnd", "LogicalOr", "LogicalNot"]

// what has been installed, per tensor library (keyed by its environment object, as Env.ts keys settings)
const installedIn = new WeakMap<object, Set<string>>()

/**
 * Registers the missing gradients (once) and the fixes of `backend` (its folder's, once each), per
 * tensor library: wasm/Fixes.ts, webgpu/Fixes.ts, cpu/Fixes.ts.
 */
export const install = (tf: Tf, backend: string): void => {
  const installed = installedIn.get(tf.env()) ?? new Set<string>()
  installedIn.set(tf.env(), installed)
  if (!installed.has("grads")) {
    installZeroGradients(tf)
    installSegmentSumGradient(tf)
    installSharedSaves(tf)
    installDirectReshapes(tf)
    installed.add("grads")
  }
  if (installed.has(backend)) return
  if (backend === "wasm") installWasmFixes(tf)
  if (backend === "cpu") installCpuFixes(tf)
  if (backend === "webgpu") installWebGpuFixes(tf)
  installed.add(backend)
}

/** Fix 2: zero gradients for the comparison and logical kernels that tfjs leaves without one. */
const installZeroGradients = (tf: Tf): void => {
  for (const kernelName of zeroGradKernels) {
    if (tf.getGradient(kernelName) === undefined) {
      tf.registerGradient({
        kernelName,
        inputsToSave: ["a", "b"].slice(0, kernelName === "LogicalNot" ? 0 : 2),
        gradFunc: (dy: Tensor | Array<Tensor>, saved: Array<Tensor>) => {
          const d = Array.isArray(dy) ? dy[0]! : dy
          // float zeros whatever the inputs' dtype (tfjs requires float gradients, even for int inputs)
          const zeros = (t: Tensor) => tf.zeros(t.shape, "float32")
          return kernelName === "LogicalNot"
            ? { x: () => zeros(d) }
            : { a: () => zeros(saved[0] ?? d), b: () => zeros(saved[1] ?? d) }
        }
      })
    }
  }
}

/** Fix 14: the gradient of a segment sum, dx = dy[ids] (0 where an id is negative), as one gather. */
const installSegmentSumGradient = (tf: Tf): void => {
  tf.registerGradient({
    kernelName: "UnsortedSegmentSum",
    inputsToSave: ["segmentIds"],
    gradFunc: (dy: Tensor | Array<Tensor>, [ids]: Array<Tensor>) => ({
      x: () => {
        const d = Array.isArray(dy) ? dy[0]! : dy
        const rows = d.shape[0]!
        // row `rows` is zeros: where negative ids read
        const padded = tf.pad(d, [[0, 1], ...d.shape.slice(1).map((): [number, number] => [0, 0])])
        return tf.gather(padded, tf.where(tf.less(ids!, 0), tf.fill(ids!.shape, rows, "int32"), ids!))
      }
    })
  })
}

/**
 * Fix 15: what a gradient saves, as new references to the same data (the engine disposes them after
 * backprop): a kernel's saved tensors, and what a `customGrad` saves (the engine's `clone`, which
 * only those saves call).
 */
const installSharedSaves = (tf: Tf): void => {
  const engine = tf.engine() as unknown as { saveTensorsForBackwardMode: (ts: Array<Tensor>) => Array<Tensor>; keep: <T>(t: T) => T; clone: (t: Tensor) => Tensor }
  const share = makeStop(tf)
  engine.saveTensorsForBackwardMode = (tensors) => tensors.map((t) => engine.keep(share(t)))
  engine.clone = share
}

/** The backends whose `Reshape` kernel only makes a new tensor on its input's data (tfjs 4.22's cpu, wasm and webgpu). */
const sharingReshape = new Set(["cpu", "wasm", "webgpu"])

interface EngineInternals {
  readonly backendName: string
  readonly backend: unknown
  runKernel: (kernelName: string, inputs: Record<string, Tensor>, attrs?: Record<string, unknown>) => Tensor | Array<Tensor>
  makeTensorFromTensorInfo: (info: unknown) => Tensor
  isTapeOn: () => boolean
  saveTensorsForBackwardMode: (ts: Array<Tensor>) => Array<Tensor>
  addTapeNode: (kernelName: string, inputs: Record<string, Tensor>, outputs: Array<Tensor>, gradient: null, saved: Array<Tensor>, attrs: Record<string, unknown>) => void
}

/**
 * Fix 16: a `Reshape` on a backend whose kernel only re-labels its input's data runs that kernel
 * directly and records its tape node (the registered gradient: a reshape of dy back), without the
 * engine's dispatch (scopes, profiler hooks, kernel lookup): a dense d128 training step makes 85
 * reshapes, forward and in gradients (`Add`'s of same-shape inputs is a reshape). Other backends
 * (tfjs-node's) dispatch as before.
 */
const installDirectReshapes = (tf: Tf): void => {
  const engine = tf.engine() as unknown as EngineInternals
  const dispatch = engine.runKernel.bind(engine)
  engine.runKernel = (kernelName, inputs, attrs = {}) => {
    if (kernelName !== "Reshape" || !sharingReshape.has(engine.backendName)) return dispatch(kernelName, inputs, attrs)
    const kernel = tf.getKernel("Reshape", engine.backendName)
    if (kernel === undefined) return dispatch(kernelName, inputs, attrs)
    const y = engine.makeTensorFromTensorInfo(kernel.kernelFunc({ inputs, attrs, backend: engine.backend } as never))
    if (engine.isTapeOn()) engine.addTapeNode("Reshape", inputs, [y], null, engine.saveTensorsForBackwardMode([inputs["x"]!]), attrs)
    return y
  }
}

/** Matmul FLOPs of `a·b` (batched over leading dims). */
export const matMulFlops = (a: Tensor, b: Tensor): number => {
  const [m, k] = a.shape.slice(-2) as [number, number]
  const n = b.shape[b.shape.length - 1]!
  const batch = a.shape.slice(0, -2).reduce((x, y) => x * y, 1)
  return 2 * batch * m * n * k
}

/**
 * A matmul whose gradient transposes explicitly (on webgpu and wasm through the product's transpose
 * flags, which their kernels read: webgpu's programs in place, our wasm kernel (fix 8) with one
 * transpose of the flagged operand before its fast 2-D products); counts executed FLOPs into
 * `counter`. On cpu the transposes are explicit ops.
 */
export const makeMatMul = (tf: Tf, counter: FlopCounter) => {
  const product = (a: Tensor, b: Tensor): Tensor => tf.matMul(a, b)
  const swap = (t: Tensor) => {
    const r = t.rank
    const perm = [...Array(r).keys()]
    perm[r - 1] = r - 2
    perm[r - 2] = r - 1
    return tf.transpose(t, perm)
  }
  // webgpu's matmul programs read transposed operands themselves, and our wasm kernel (fix 8)
  // transposes a flagged operand once inside the kernel: no transpose ops on the tape
  const flags = tf.getBackend() === "webgpu" || tf.getBackend() === "wasm"
  const f = tf.customGrad(((a: Tensor, b: Tensor, save: (ts: Array<Tensor>) => void) => {
    save([a, b])
    return {
      value: product(a, b),
      gradFunc: (dy: Tensor, [sa, sb]: Array<Tensor>) =>
        flags ? [tf.matMul(dy, sb!, false, true), tf.matMul(sa!, dy, true, false)] : [product(dy, swap(sb!)), product(swap(sa!), dy)]
    }
  }) as unknown as Parameters<Tf["customGrad"]>[0])
  const triangular = hasKernel(tf, wasmKernels.triangularMatMul) && hasKernel(tf, kernels.softmax) ? makeTriangular(tf) : undefined
  return (a: Tensor, b: Tensor, category: keyof FlopCounter, triangle?: CausalTriangle): Tensor => {
    counter[category] += matMulFlops(a, b)
    return (triangle !== undefined && triangular !== undefined ? triangular[triangle](a, b) : f(a, b)) as Tensor
  }
}

/**
 * The two products of causal attention where the backend has a kernel that skips a triangle (wasm:
 * `wasm/Gemm.ts`'s `Triangle`), each with its gradients' triangles: the scores S = Q·Kᵀ, of which
 * only S's lower triangle is used (`lowerC`: dQ = dS·K reads dS's lower triangle, dK = Qᵀ·dS from
 * each column's diagonal down), and the output P·V with P lower triangular (`lowerA`: dP = dO·Vᵀ
 * only below the diagonal, dV = Pᵀ·dO from each row's diagonal on). Exact where the caller keeps
 * the promise ({@link CausalTriangle}): the skipped terms are zeros.
 */
const makeTriangular = (tf: Tf) => {
  const run = (a: Tensor, b: Tensor, transposeA: boolean, transposeB: boolean, triangle: string): Tensor =>
    runKernel(tf, wasmKernels.triangularMatMul, { a, b }, { transposeA, transposeB, triangle })
  const product = (forward: string, dA: string, dB: string) =>
    tf.customGrad(((a: Tensor, b: Tensor, save: (ts: Array<Tensor>) => void) => {
      save([a, b])
      return {
        value: run(a, b, false, false, forward),
        gradFunc: (dy: Tensor, [sa, sb]: Array<Tensor>) => [run(dy, sb!, false, true, dA), run(sa!, dy, true, false, dB)]
      }
    }) as unknown as Parameters<Tf["customGrad"]>[0])
  return { lowerC: product("lowerC", "lowerA", "lowerB"), lowerA: product("lowerA", "lowerC", "upperA") }
}

/** Forward: the value; backward: nothing flows. */
export const makeDetach = (tf: Tf) => {
  const f = tf.customGrad(((x: Tensor) => ({ value: tf.clone(x), gradFunc: (dy: Tensor) => [tf.zerosLike(dy)] })) as unknown as Parameters<Tf["customGrad"]>[0])
  return (x: Tensor): Tensor => f(x) as Tensor
}

/**
 * The same values off the tape: a new tensor on `x`'s data that no recorded op made, so nothing
 * computed from it is differentiated (integer indices derived from it can feed a gather without
 * tfjs asking for their gradient). No copy, no dispatch.
 */
export const makeStop = (tf: Tf) => (x: Tensor): Tensor => {
  const dataId = (x as unknown as { dataId: object }).dataId
  // the new tensor holds a reference of its own to the data (as tfjs's reshape does)
  ;(tf.engine().backend as unknown as { incRef: (id: object) => void }).incRef(dataId)
  return tf.engine().makeTensorFromTensorInfo({ dataId, shape: [...x.shape], dtype: x.dtype }) as Tensor
}

/** Straight-through estimator: forward 1, backward identity (method spec §6.1). */
export const makeSte = (tf: Tf) => {
  const f = tf.customGrad(((x: Tensor) => ({ value: tf.onesLike(x), gradFunc: (dy: Tensor) => [dy] })) as unknown as Parameters<Tf["customGrad"]>[0])
  return (x: Tensor): Tensor => f(x) as Tensor
}

/** A float32 one-hot built from a comparison, correct on every backend. */
export const makeOneHot = (tf: Tf) => (indices: Tensor, depth: number): Tensor =>
  tf.mul(tf.cast(tf.equal(tf.expandDims(indices, -1), tf.range(0, depth, 1, "int32")), "float32"), tf.scalar(1))
