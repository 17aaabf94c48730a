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
 *
 * @since 0.1.0
 */
import type { FlopCounter, Tensor, Tf } from "../graph/Apply.ts"
import { settingsOf } from "./Env.ts"
import { type Gemm, makeGemm } from "./wasm/Gemm.ts"

const zeroGradKernels = ["Equal", "NotEqual", "Greater", "GreaterEqual", "Less", "LessEqual", "LogicalAnd", "LogicalOr", "LogicalNot"]

const installed = new Set<string>()

/** Registers the missing gradients (once) and, per backend, our kernels (once each). */
export const install = (tf: Tf, backend: string): void => {
  if (!installed.has("grads")) {
    installZeroGradients(tf)
    installed.add("grads")
  }
  if (backend === "wasm" && !installed.has("wasm") && tf.getKernel("UnsortedSegmentSum", "wasm") === undefined) {
    installWasmSegmentSum(tf)
    installed.add("wasm")
  }
  if (backend === "wasm" && !installed.has("wasm-slice")) {
    installWasmSlice(tf)
    installed.add("wasm-slice")
  }
  if (backend === "wasm" && !installed.has("wasm-matmul")) {
    installWasmMatMul(tf)
    installWasmGather(tf)
    installWasmIdentity(tf)
    installed.add("wasm-matmul")
  }
  if (backend === "cpu" && !installed.has("cpu")) {
    installCpuSegmentSum(tf)
    installed.add("cpu")
  }
  if (backend === "webgpu" && !installed.has("webgpu")) {
    const gpu = tf.backend() as unknown as WebGpuBackend
    installWebGpuAddN(tf, gpu)
    installWebGpuCumsum(tf, gpu)
    logGpuErrors(gpu)
    installed.add("webgpu")
  }
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

/** Fix 3: wasm has no `UnsortedSegmentSum`: one loop over the heap. */
const installWasmSegmentSum = (tf: Tf): void => {
  tf.registerKernel({
    kernelName: "UnsortedSegmentSum",
    backendName: "wasm",
    kernelFunc: ({ attrs, backend: b, inputs }) => {
      const wasm = b as unknown as {
        makeOutput: (shape: Array<number>, dtype: string) => { dataId: unknown; shape: Array<number>; dtype: string }
        typedArrayFromHeap: (t: unknown) => Float32Array
      }
      const x = inputs["x"] as unknown as { dataId: unknown; shape: Array<number> }
      const ids = inputs["segmentIds"] as unknown as { dataId: unknown }
      const numSegments = (attrs as { numSegments: number }).numSegments
      const out = wasm.makeOutput([numSegments, ...x.shape.slice(1)], "float32")
      // views of the heap, taken after the output's allocation (which may grow the heap)
      const xs = wasm.typedArrayFromHeap(x)
      const seg = wasm.typedArrayFromHeap(ids)
      const inner = x.shape.slice(1).reduce((a, c) => a * c, 1)
      const o = wasm.typedArrayFromHeap(out)
      o.fill(0)
      for (let i = 0; i < seg.length; i++) {
        const s = seg[i]!
        if (s < 0 || s >= numSegments) continue
        for (let j = 0; j < inner; j++) o[s * inner + j]! += xs[i * inner + j]!
      }
      return out as never
    }
  })
}

/** wasm's `Slice`, reading the heap in place. */
const installWasmSlice = (tf: Tf): void => {
  // tfjs-backend-wasm 4.22's Slice copies its whole input out of the heap (readSync) before taking
  // the slice: slicing one expert out of a stacked [E, d, h] parameter, or a prefix out of a KV
  // cache, costs the whole tensor. This one reads the heap in place.
  tf.unregisterKernel("Slice", "wasm")
  tf.registerKernel({
    kernelName: "Slice",
    backendName: "wasm",
    kernelFunc: ({ attrs, backend: b, inputs }) => {
      const wasm = b as unknown as {
        makeOutput: (shape: Array<number>, dtype: string) => { dataId: unknown; shape: Array<number>; dtype: string }
        typedArrayFromHeap: (t: unknown) => Float32Array | Int32Array
      }
      const x = inputs["x"] as unknown as { dataId: unknown; shape: Array<number>; dtype: string }
      const [begin, size] = tf.slice_util.parseSliceParams(x as never, (attrs as { begin: Array<number> }).begin, (attrs as { size: Array<number> }).size)
      const out = wasm.makeOutput(size!, x.dtype)
      const src = wasm.typedArrayFromHeap(x)
      const dst = wasm.typedArrayFromHeap(out)
      stridedCopy(src, x.shape, begin!, size!, dst)
      return out as never
    }
  })
}

/** Fix 10: wasm's `Identity`, sharing the data. */
const installWasmIdentity = (tf: Tf): void => {
  // 10. Identity shares the data (as the cpu backend's and wasm's own Reshape do) instead of
  // copying it: tfjs clones every tensor a kernel saves for its gradient (1,791 copies in a
  // ConceptMoE step); tensors are immutable, and the reference count frees the data once
  tf.unregisterKernel("Identity", "wasm")
  tf.registerKernel({
    kernelName: "Identity",
    backendName: "wasm",
    kernelFunc: ({ inputs, backend: b }) => {
      const x = inputs["x"] as unknown as Info
      ;(b as unknown as { incRef: (id: unknown) => void }).incRef(x.dataId)
      return { dataId: x.dataId, shape: [...x.shape], dtype: x.dtype } as never
    }
  })
}

/** Fix 3: cpu's `UnsortedSegmentSum` in linear time (the stock kernel loops over every segment for every row). */
const installCpuSegmentSum = (tf: Tf): void => {
  tf.unregisterKernel("UnsortedSegmentSum", "cpu")
  tf.registerKernel({
    kernelName: "UnsortedSegmentSum",
    backendName: "cpu",
    kernelFunc: ({ attrs, backend: b, inputs }) => {
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
    }
  })
}

/** Fix 6: webgpu's `AddN` of more inputs than a shader stage may bind, summed in groups. */
const installWebGpuAddN = (tf: Tf, gpu: WebGpuBackend): void => {
  const stock = tf.getKernel("AddN", "webgpu")!.kernelFunc
  const most = Math.max(2, gpu.device.limits.maxStorageBuffersPerShaderStage - 1)
  tf.unregisterKernel("AddN", "webgpu")
  tf.registerKernel({
    kernelName: "AddN",
    backendName: "webgpu",
    kernelFunc: (args) => {
      let xs = args.inputs as unknown as Array<{ dataId: unknown }>
      const made: Array<{ dataId: unknown }> = []
      while (xs.length > most) {
        const next: Array<{ dataId: unknown }> = []
        for (let i = 0; i < xs.length; i += most) {
          const group = xs.slice(i, i + most)
          if (group.length === 1) next.push(group[0]!)
          else {
            const part = stock({ ...args, inputs: group as never }) as unknown as { dataId: unknown }
            made.push(part)
            next.push(part)
          }
        }
        xs = next
      }
      const out = stock({ ...args, inputs: xs as never })
      for (const t of made) gpu.disposeData(t.dataId)
      return out
    }
  })
}

/** Fix 7: webgpu's reverse `Cumsum` as reverse → forward cumsum → reverse. */
const installWebGpuCumsum = (tf: Tf, gpu: WebGpuBackend): void => {
  const cumsum = tf.getKernel("Cumsum", "webgpu")!.kernelFunc
  const reverse = tf.getKernel("Reverse", "webgpu")!.kernelFunc
  tf.unregisterKernel("Cumsum", "webgpu")
  tf.registerKernel({
    kernelName: "Cumsum",
    backendName: "webgpu",
    kernelFunc: (args) => {
      const a = args.attrs as { axis: number; exclusive: boolean; reverse: boolean }
      if (!a.reverse) return cumsum(args)
      const x = args.inputs["x"] as unknown as { shape: Array<number> }
      const axis = a.axis < 0 ? a.axis + x.shape.length : a.axis
      const flip = (t: unknown) => reverse({ ...args, inputs: { x: t } as never, attrs: { dims: [axis] } }) as unknown as { dataId: unknown }
      const flipped = flip(x)
      const summed = cumsum({ ...args, inputs: { x: flipped } as never, attrs: { ...a, axis, reverse: false } }) as unknown as { dataId: unknown }
      const out = flip(summed)
      gpu.disposeData(flipped.dataId)
      gpu.disposeData(summed.dataId)
      return out as never
    }
  })
}

/** Fix 6: collects the first validation errors the device reports (see `gpuErrors`). */
const logGpuErrors = (gpu: WebGpuBackend): void => {
  gpu.device.addEventListener("uncapturederror", (event: unknown) => {
    const e = event as { error?: { message?: string } }
    if (gpuErrorLog.length < 16) gpuErrorLog.push(String(e.error?.message ?? e).split("\n")[0]!)
  })
}

/** The parts of tfjs-backend-wasm's backend that our wasm kernels use. */
interface WasmBackend {
  readonly wasm: {
    cwrap: (name: string, ret: null, args: Array<string>) => (...a: Array<unknown>) => void
    tfjs: { registerTensor: (id: number, size: number, offset: number) => void; disposeData: (id: number) => void }
    readonly asm?: { readonly memory?: WebAssembly.Memory }
    _malloc: (bytes: number) => number
    _free: (pointer: number) => void
  }
  dataIdNextNumber: number
  readonly dataIdMap: { get: (dataId: unknown) => { id: number; memoryOffset: number } }
  makeOutput: (shape: Array<number>, dtype: string) => { dataId: unknown; shape: Array<number>; dtype: string }
  disposeData: (dataId: unknown) => boolean
}

type Info = { dataId: unknown; shape: Array<number>; dtype: string }

/**
 * 8. wasm: `BatchMatMul` through our kernel (`wasm/Gemm.ts`), every product of at least
 *    {@link fastRowsAtLeast} rows per matrix: one call for the whole batch, transpose flags as strides
 *    (no Transpose kernel). Measured on this project's 2-core machine (`node bench/wasm-matmul.ts`):
 *    see docs/performance.md. With `CONCEPTMOE_MATMUL=tfjs`, or where the engine lacks 128-bit SIMD,
 *    as before: every product takes XNNPACK's fast path. tfjs-backend-wasm 4.22 runs
 *    only un-transposed products of one matrix each there (36–40 GFLOP/s for a 1024×512×128
 *    product on one core); a batch of matrices, or a transpose flag, falls to a scalar loop of
 *    0.5–3 GFLOP/s (attention's `[32, 128, 32]·[32, 32, 128]` took 30–60 ms). This kernel transposes
 *    a flagged operand once (tfjs's Transpose kernel, whole batch) and then runs one fast 2-D
 *    product per matrix on views of the heap: each matrix of A, B and the output is registered under
 *    a fresh id at its offset inside its tensor (no copy) and unregistered after its product (which
 *    also frees XNNPACK's operator cached for it). One tfjs kernel, however many matrices: the
 *    per-matrix slices, reshapes and the stack that `makeMatMul` used to issue are gone. Batches
 *    broadcast where one side has a single matrix. Matrices of fewer than {@link fastRowsAtLeast}
 *    rows stay on the stock kernel. Tested equal to the cpu backend
 *    (tests/runtime-fixes.test.ts).
 */
/**
 * Products with fewer rows per matrix stay on the stock kernel: XNNPACK packs B for every matrix, which
 * costs as much as the product when A has a few rows (a decode step's one query: 8 × [1, 32]·[32, 4096]
 * took 15 ms this way against about 1.6 ms in the stock loop).
 */
export const fastRowsAtLeast = 16

const installWasmMatMul = (tf: Tf): void => {
  const stock = tf.getKernel("BatchMatMul", "wasm")!
  const transpose = tf.getKernel("Transpose", "wasm")!.kernelFunc
  let product: ((...a: Array<unknown>) => void) | undefined
  // our kernel over this backend's heap, made on the first product (null: none on this engine)
  let gemm: Gemm | null | undefined
  tf.unregisterKernel("BatchMatMul", "wasm")
  tf.registerKernel({
    kernelName: "BatchMatMul",
    backendName: "wasm",
    ...(stock.setupFunc === undefined ? {} : { setupFunc: stock.setupFunc }),
    kernelFunc: (args) => {
      const b = args.backend as unknown as WasmBackend
      const x = args.inputs["a"] as unknown as Info
      const y = args.inputs["b"] as unknown as Info
      const { transposeA, transposeB } = args.attrs as { transposeA: boolean; transposeB: boolean }
      const lead = (t: Info) => t.shape.slice(0, -2).reduce((p, c) => p * c, 1)
      const ba = lead(x)
      const bb = lead(y)
      // one matrix each and no flags: the stock kernel's fast path already; other dtypes and
      // batches that broadcast in other ways: the stock kernel
      const rows = transposeA ? x.shape[x.shape.length - 1]! : x.shape[x.shape.length - 2]!
      const plain = ba === 1 && bb === 1 && !transposeA && !transposeB && settingsOf(tf).matmul === "tfjs"
      if (plain || rows < fastRowsAtLeast || x.dtype !== "float32" || y.dtype !== "float32" || (ba !== bb && ba !== 1 && bb !== 1)) {
        return stock.kernelFunc(args)
      }
      if (settingsOf(tf).matmul !== "tfjs") {
        gemm ??= b.wasm.asm?.memory === undefined ? null : (makeGemm({ memory: b.wasm.asm.memory, malloc: b.wasm._malloc, free: b.wasm._free }) ?? null)
        if (gemm !== null) return ours(b, gemm, x, y, transposeA, transposeB, ba, bb) as never
      }
      product ??= b.wasm.cwrap("BatchMatMul", null, ["number", "array", "number", "number", "array", "number", "number", "number", "number"])
      const made: Array<Info> = []
      // a flagged operand, transposed once (its last two axes swapped)
      const upright = (t: Info, flagged: boolean): Info => {
        if (!flagged) return t
        const r = t.shape.length
        const perm = [...Array(r).keys()]
        perm[r - 1] = r - 2
        perm[r - 2] = r - 1
        const out = transpose({ ...args, inputs: { x: t } as never, attrs: { perm } as never }) as unknown as Info
        made.push(out)
        return out
      }
      const A = upright(x, transposeA)
      const B = upright(y, transposeB)
      const [m, k] = A.shape.slice(-2) as [number, number]
      const [k2, n] = B.shape.slice(-2) as [number, number]
      if (k !== k2) {
        // tfjs's own message for this shape error (a block's bug; shapes from a user are checked before)
        for (const t of made) b.disposeData(t.dataId)
        throw new Error(`Error in matMul: inner shapes (${k}) and (${k2}) of tensors with shapes ${x.shape} and ${y.shape} and transposeA=${transposeA} and transposeB=${transposeB} must match.`)
      }
      const batchShape = (ba >= bb ? x : y).shape.slice(0, -2)
      const batch = Math.max(ba, bb)
      const out = b.makeOutput([...batchShape, m, n], "float32")
      const offA = b.dataIdMap.get(A.dataId).memoryOffset
      const offB = b.dataIdMap.get(B.dataId).memoryOffset
      const offO = b.dataIdMap.get(out.dataId).memoryOffset
      const shapeA = new Uint8Array(new Int32Array([1, m, k]).buffer)
      const shapeB = new Uint8Array(new Int32Array([1, k, n]).buffer)
      const view = (offset: number, size: number) => {
        const id = b.dataIdNextNumber++
        b.wasm.tfjs.registerTensor(id, size, offset)
        return id
      }
      for (let i = 0; i < batch; i++) {
        const ia = view(offA + (ba === 1 ? 0 : i * m * k * 4), m * k)
        const ib = view(offB + (bb === 1 ? 0 : i * k * n * 4), k * n)
        const io = view(offO + i * m * n * 4, m * n)
        product(ia, shapeA, 3, ib, shapeB, 3, false, false, io)
        b.wasm.tfjs.disposeData(ia)
        b.wasm.tfjs.disposeData(ib)
        b.wasm.tfjs.disposeData(io)
      }
      for (const t of made) b.disposeData(t.dataId)
      return out as never
    }
  })
}

/** Fix 8 through our kernel: the whole batch in one call, the flags as strides. */
const ours = (b: WasmBackend, gemm: Gemm, x: Info, y: Info, transposeA: boolean, transposeB: boolean, ba: number, bb: number): Info => {
  const [m, k] = (transposeA ? x.shape.slice(-2).reverse() : x.shape.slice(-2)) as [number, number]
  const [k2, n] = (transposeB ? y.shape.slice(-2).reverse() : y.shape.slice(-2)) as [number, number]
  if (k !== k2) {
    throw new Error(`Error in matMul: inner shapes (${k}) and (${k2}) of tensors with shapes ${x.shape} and ${y.shape} and transposeA=${transposeA} and transposeB=${transposeB} must match.`)
  }
  const batchShape = (ba >= bb ? x : y).shape.slice(0, -2)
  const out = b.makeOutput([...batchShape, m, n], "float32")
  gemm.product({
    a: b.dataIdMap.get(x.dataId).memoryOffset,
    b: b.dataIdMap.get(y.dataId).memoryOffset,
    c: b.dataIdMap.get(out.dataId).memoryOffset,
    batch: Math.max(ba, bb),
    aBatched: ba > 1,
    bBatched: bb > 1,
    m,
    k,
    n,
    transposeA,
    transposeB
  })
  return out
}

/**
 * 9. wasm: `GatherV2` (without batch dimensions) as contiguous copies over the heap. The stock
 *    kernel took 5–95 ms per call in a training step's profile (the MoE's gathers of token rows and
 *    expert matrices, `[3073, 64]` rows by 16,384 indices); one `copyWithin` per gathered slice is
 *    a memory copy. Indices outside the axis give zeros (tfjs's cpu kernel refuses them; no caller
 *    passes them). Tested equal to the cpu backend (tests/wasm-kernels.test.ts).
 */
const installWasmGather = (tf: Tf): void => {
  const stock = tf.getKernel("GatherV2", "wasm")!
  tf.unregisterKernel("GatherV2", "wasm")
  tf.registerKernel({
    kernelName: "GatherV2",
    backendName: "wasm",
    ...(stock.setupFunc === undefined ? {} : { setupFunc: stock.setupFunc }),
    kernelFunc: (args) => {
      const b = args.backend as unknown as WasmBackend & { typedArrayFromHeap: (t: Info) => Float32Array | Int32Array }
      const x = args.inputs["x"] as unknown as Info
      const indices = args.inputs["indices"] as unknown as Info
      const { axis: given, batchDims } = args.attrs as { axis: number; batchDims?: number }
      if ((batchDims ?? 0) !== 0 || (x.dtype !== "float32" && x.dtype !== "int32") || indices.dtype !== "int32") return stock.kernelFunc(args)
      const axis = given < 0 ? given + x.shape.length : given
      const outer = x.shape.slice(0, axis).reduce((p, c) => p * c, 1)
      const dim = x.shape[axis]!
      const inner = x.shape.slice(axis + 1).reduce((p, c) => p * c, 1)
      const out = b.makeOutput([...x.shape.slice(0, axis), ...indices.shape, ...x.shape.slice(axis + 1)], x.dtype)
      // views after the output's allocation (which may grow the heap)
      const src = b.typedArrayFromHeap(x)
      const at = b.typedArrayFromHeap(indices)
      const dst = b.typedArrayFromHeap(out)
      const n = at.length
      for (let o = 0; o < outer; o++) {
        for (let j = 0; j < n; j++) {
          const i = at[j]!
          const to = (o * n + j) * inner
          if (i < 0 || i >= dim) dst.fill(0, to, to + inner)
          else if (inner === 1) dst[to] = src[o * dim + i]!
          else dst.set(src.subarray((o * dim + i) * inner, (o * dim + i + 1) * inner), to)
        }
      }
      return out as never
    }
  })
}

/** The parts of tfjs-backend-webgpu's backend that the fixes use. */
interface WebGpuBackend {
  readonly device: {
    readonly limits: { readonly maxStorageBuffersPerShaderStage: number }
    addEventListener: (type: string, listener: (event: unknown) => void) => void
  }
  disposeData: (dataId: unknown) => boolean
}

const gpuErrorLog: Array<string> = []

/**
 * Validation and out-of-memory errors that the WebGPU device reported since the last call (Dawn
 * reports them asynchronously and drops the failing command buffer); empty elsewhere. Clears them.
 */
export const gpuErrors = (): ReadonlyArray<string> => gpuErrorLog.splice(0, gpuErrorLog.length)

/**
 * Copies the box `begin … begin+size` of a row-major array of `shape` into `dst`, one contiguous
 * run of the innermost dimensions at a time.
 */
export const stridedCopy = (
  src: Float32Array | Int32Array,
  shape: ReadonlyArray<number>,
  begin: ReadonlyArray<number>,
  size: ReadonlyArray<number>,
  dst: Float32Array | Int32Array
): void => {
  const rank = shape.length
  const strides = new Array<number>(rank).fill(1)
  for (let i = rank - 2; i >= 0; i--) strides[i] = strides[i + 1]! * shape[i + 1]!
  // the innermost dimensions taken whole (after the first partial one) form one run
  let inner = rank
  while (inner > 0 && (inner === rank || (begin[inner]! === 0 && size[inner]! === shape[inner]!))) inner--
  const run = size.slice(inner).reduce((a, c) => a * c, 1)
  const outer = size.slice(0, inner)
  const total = outer.reduce((a, c) => a * c, 1)
  const index = new Array<number>(inner).fill(0)
  for (let k = 0; k < total; k++) {
    let offset = begin[inner] === undefined ? 0 : begin[inner]! * strides[inner]!
    for (let i = 0; i < inner; i++) offset += (begin[i]! + index[i]!) * strides[i]!
    dst.set(src.subarray(offset, offset + run), k * run)
    for (let i = inner - 1; i >= 0; i--) {
      if (++index[i]! < outer[i]!) break
      index[i] = 0
    }
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
  return (a: Tensor, b: Tensor, category: keyof FlopCounter): Tensor => {
    counter[category] += matMulFlops(a, b)
    return f(a, b) as Tensor
  }
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
