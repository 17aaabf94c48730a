/**
 * Our fixes for tfjs-backend-wasm 4.22 (the numbering of `../Fixes.ts`, which lists them all with
 * their symptoms): 3. an `UnsortedSegmentSum` kernel (absent there); a `Slice` that reads the heap in
 * place; 8. `BatchMatMul` through our SIMD product (`Gemm.ts`); 9. `GatherV2` as memory copies;
 * 10. `Identity` sharing the data; 11. `Add`, `Sub`, `Multiply` and 12. `Transpose` as loops over the
 * heap (`Elementwise.ts`); 13. `Sin` and `Cos` of float32 as JavaScript loops. Each is tested against the cpu backend (tests/runtime-fixes.test.ts,
 * tests/wasm-kernels.test.ts, tests/wasm-gemm.test.ts, tests/wasm-elementwise.test.ts).
 *
 * @since 0.4.0
 */
import type { Tf } from "../../graph/Apply.ts"
import { InvalidInput } from "../../internal/RunErrors.ts"
import { settingsOf } from "../Env.ts"
import { wasmKernels } from "../KernelNames.ts"
import { overrideKernel } from "../Override.ts"
import { type BinaryOp, type ElementwiseKernels, makeElementwise } from "./Elementwise.ts"
import { type Gemm, makeGemm, type Triangle } from "./Gemm.ts"

/** Installs the wasm fixes (once per tensor library: `../Fixes.ts`'s `install`). */
export const installWasmFixes = (tf: Tf): void => {
  if (tf.getKernel("UnsortedSegmentSum", "wasm") === undefined) installWasmSegmentSum(tf)
  installWasmSlice(tf)
  installWasmMatMul(tf)
  installWasmGather(tf)
  installWasmIdentity(tf)
  installWasmElementwise(tf)
  installWasmTrig(tf)
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
  overrideKernel(tf, "Slice", "wasm", () => ({ attrs, backend: b, inputs }) => {
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
  })
}

/** Fix 10: wasm's `Identity`, sharing the data. */
const installWasmIdentity = (tf: Tf): void => {
  // 10. Identity shares the data (as the cpu backend's and wasm's own Reshape do) instead of
  // copying it: tfjs clones every tensor a kernel saves for its gradient (1,791 copies in a
  // ConceptMoE step); tensors are immutable, and the reference count frees the data once
  overrideKernel(tf, "Identity", "wasm", () => ({ inputs, backend: b }) => {
    const x = inputs["x"] as unknown as Info
    ;(b as unknown as { incRef: (id: unknown) => void }).incRef(x.dataId)
    return { dataId: x.dataId, shape: [...x.shape], dtype: x.dtype } as never
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
  const transpose = tf.getKernel("Transpose", "wasm")!.kernelFunc
  let product: ((...a: Array<unknown>) => void) | undefined
  // our kernel over this backend's heap, made on the first product (null: none on this engine)
  let gemm: Gemm | null | undefined
  overrideKernel(tf, "BatchMatMul", "wasm", (stock) => (args) => {
    const b = args.backend as unknown as WasmBackend
    const x = args.inputs["a"] as unknown as Info
    const y = args.inputs["b"] as unknown as Info
    const { transposeA, transposeB, triangle } = args.attrs as { transposeA: boolean; transposeB: boolean; triangle?: Triangle }
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
      if (gemm !== null) return ours(b, gemm, x, y, transposeA, transposeB, ba, bb, triangle) as never
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
      for (const t of made) b.disposeData(t.dataId)
      throw innerMismatch(k, k2, x.shape, y.shape, transposeA, transposeB)
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
  })
  // the same kernel for a product told its triangle (`Gemm.ts`'s `Triangle`, an attribute
  // BatchMatMul's other callers never pass); stock products compute it whole, as the triangles allow
  const batchMatMul = tf.getKernel("BatchMatMul", "wasm")!.kernelFunc
  tf.registerKernel({ kernelName: wasmKernels.triangularMatMul, backendName: "wasm", kernelFunc: (args) => batchMatMul(args) })
}

/**
 * A product whose inner sizes differ: a typed error naming both shapes (a user's custom block can
 * cause it; the built-in blocks' shapes are checked before they run).
 */
const innerMismatch = (k: number, k2: number, a: ReadonlyArray<number>, b: ReadonlyArray<number>, ta: boolean, tb: boolean) =>
  new InvalidInput({
    input: "matMul",
    expected: "inner sizes that match",
    got: `${k} and ${k2} (shapes [${a.join(", ")}]${ta ? "ᵀ" : ""} and [${b.join(", ")}]${tb ? "ᵀ" : ""})`
  })

/** Fix 8 through our kernel: the whole batch in one call, the flags as strides. */
const ours = (b: WasmBackend, gemm: Gemm, x: Info, y: Info, transposeA: boolean, transposeB: boolean, ba: number, bb: number, triangle: Triangle | undefined): Info => {
  const [m, k] = (transposeA ? x.shape.slice(-2).reverse() : x.shape.slice(-2)) as [number, number]
  const [k2, n] = (transposeB ? y.shape.slice(-2).reverse() : y.shape.slice(-2)) as [number, number]
  if (k !== k2) {
    throw innerMismatch(k, k2, x.shape, y.shape, transposeA, transposeB)
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
    transposeB,
    ...(triangle === undefined ? {} : { triangle })
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
  overrideKernel(tf, "GatherV2", "wasm", (stock) => (args) => {
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
  })
}

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

/**
 * 11. wasm: `Add`, `Sub`, `Multiply` and `RealDiv` of float32 tensors whose sizes are multiples of
 *     4, where one side is the other's shape, its trailing dimensions, one number, or one number per
 *     row (`[n, 1]` by `[n, d]`, d a multiple of 4), as one SIMD pass over the heap
 *     (`Elementwise.ts`); other cases (ints, other broadcasts, odd sizes, the small side first in a
 *     Sub or RealDiv) the stock kernel.
 * 12. wasm: `Transpose` of float32 and int32 tensors as four nested loops of copies (runs of
 *     vectors where the last axis stays), after merging the axes that stay neighbours; the stock
 *     kernel where more than four loops remain.
 * tfjs-backend-wasm 4.22 took about 0.3 ms for either on [1024, 128] (2.4 ns an element). Tested equal
 * to the cpu backend (tests/wasm-elementwise.test.ts).
 */
/**
 * How many calls took our loops (fixes 11 and 12) rather than the stock kernels, for tests.
 *
 * @internal
 */
export const elementwiseCalls = { binary: 0, transpose: 0 }


const installWasmElementwise = (tf: Tf): void => {
  // made on the first call, over this backend's heap (null: no SIMD in this engine)
  let loops: ElementwiseKernels | null | undefined
  const kernelsOf = (b: WasmBackend) => (loops ??= b.wasm.asm?.memory === undefined ? null : (makeElementwise(b.wasm.asm.memory) ?? null))
  const offset = (b: WasmBackend, t: Info) => b.dataIdMap.get(t.dataId).memoryOffset
  const size = (shape: ReadonlyArray<number>) => shape.reduce((p, c) => p * c, 1)
  const binary = (kernelName: string, op: BinaryOp, commutes: boolean) => {
    overrideKernel(tf, kernelName, "wasm", (stock) => (args) => {
      const b = args.backend as unknown as WasmBackend
      const kernels = kernelsOf(b)
      const [x, y] = [args.inputs["a"] as unknown as Info, args.inputs["b"] as unknown as Info]
      if (kernels === null || x.dtype !== "float32" || y.dtype !== "float32") return stock.kernelFunc(args)
      const shape = tf.backend_util.assertAndGetBroadcastShape(x.shape, y.shape)
      const n = size(shape)
      // the full-size side first; the other must be its trailing dimensions (or one number)
      const [big, small] = size(x.shape) === n ? [x, y] : commutes && size(y.shape) === n ? [y, x] : [undefined, undefined]
      if (big === undefined || small === undefined || n % 4 !== 0 || n === 0) return stock.kernelFunc(args)
      const m = size(small.shape)
      const trailing = small.shape.filter((d, i) => d !== 1 || small.shape.slice(0, i).some((e) => e !== 1))
      const suffix = trailing.every((d, i) => d === shape[shape.length - trailing.length + i])
      // one number per row: the small side is the big one's shape with a last axis of 1 ([n, 1] by [n, d])
      const last = shape[shape.length - 1]!
      const perRow = m !== 1 && m * last === n && last % 4 === 0 && small.shape[small.shape.length - 1] === 1 &&
        small.shape.slice(0, -1).filter((d) => d !== 1).every((d, i, xs) => d === shape[shape.length - 1 - xs.length + i])
      if (m !== 1 && !perRow && (!suffix || m % 4 !== 0)) return stock.kernelFunc(args)
      const out = b.makeOutput(shape, "float32")
      elementwiseCalls.binary++
      if (m === 1) kernels.binaryScalar(op, offset(b, big), offset(b, small), offset(b, out), 4 * n)
      else if (perRow && !suffix) kernels.binaryRows(op, offset(b, big), offset(b, small), offset(b, out), 4 * n, 4 * last)
      else kernels.binary(op, offset(b, big), offset(b, small), offset(b, out), 4 * n, 4 * m)
      return out as never
    })
  }
  binary("Add", "add", true)
  binary("Sub", "sub", false)
  binary("Multiply", "mul", true)
  binary("RealDiv", "div", false)
  overrideKernel(tf, "Transpose", "wasm", (stock) => (args) => {
    const b = args.backend as unknown as WasmBackend
    const kernels = kernelsOf(b)
    const x = args.inputs["x"] as unknown as Info
    const perm = (args.attrs as { perm: Array<number> }).perm
    if (kernels === null || (x.dtype !== "float32" && x.dtype !== "int32")) return stock.kernelFunc(args)
    const out = b.makeOutput(perm.map((p) => x.shape[p]!), x.dtype)
    if (size(x.shape) === 0 || kernels.transpose(offset(b, x), offset(b, out), x.shape, perm)) {
      elementwiseCalls.transpose++
      return out as never
    }
    b.disposeData(out.dataId)
    return stock.kernelFunc(args)
  })
}

/**
 * 13. wasm: `Sin` and `Cos` of float32 tensors as JavaScript loops over the heap (`Math.sin`,
 *     `Math.cos`, as the cpu backend's): tfjs-backend-wasm 4.22 took 0.94 ms for the rotary
 *     embedding's [1024, 1, 16] angles, the loop 0.31 ms (alternating in one process).
 */
const installWasmTrig = (tf: Tf): void => {
  for (const [kernelName, f] of [["Sin", Math.sin], ["Cos", Math.cos]] as const) {
    overrideKernel(tf, kernelName, "wasm", (stock) => (args) => {
      const b = args.backend as unknown as WasmBackend & { typedArrayFromHeap: (t: Info) => Float32Array | Int32Array }
      const x = args.inputs["x"] as unknown as Info
      if (x.dtype !== "float32") return stock.kernelFunc(args)
      const out = b.makeOutput([...x.shape], "float32")
      // views after the output's allocation (which may grow the heap)
      const v = b.typedArrayFromHeap(x)
      const w = b.typedArrayFromHeap(out)
      for (let i = 0; i < v.length; i++) w[i] = f(v[i]!)
      return out as never
    })
  }
}
