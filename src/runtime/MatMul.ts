/**
 * Our fp32 matmul for the webgpu backend: a register-blocked tiled WGSL program registered as tfjs's
 * `BatchMatMul` kernel, with its tile shape as a parameter, so that a GPU session can sweep shapes
 * against tfjs's own kernel (`node bench/gpu/matmul.ts`) before one becomes the default.
 *
 * A workgroup computes a `TM × TN` tile of the output with `(TM/RM)·(TN/RN)` threads, each holding
 * an `RM × RN` block of accumulators; the operands go through workgroup memory `TK` columns of A and
 * rows of B at a time (zero-padded at the edges), loaded with the fastest-varying index along each
 * operand's contiguous dimension (so transposed operands are read in order too). Batches broadcast
 * when one side has a single matrix.
 *
 * Off by default (tfjs's kernel runs); `CONCEPTMOE_MATMUL=TMxTNxTK/RMxRN` (e.g. `64x64x16/4x4`)
 * turns it on when the webgpu backend loads. Tested against the cpu backend for every shape in
 * {@link tileShapes} (test/webgpu.test.ts).
 *
 * @since 0.3.0
 */
import type * as TF from "@tensorflow/tfjs"
import type { Tf } from "../graph/Apply.ts"

export interface Tiles {
  /** Output rows and columns per workgroup, and the depth of one pass through workgroup memory. */
  readonly tm: number
  readonly tn: number
  readonly tk: number
  /** Output rows and columns per thread. */
  readonly rm: number
  readonly rn: number
}

/** The shapes a sweep tries (threads per workgroup ≤ 256, workgroup memory ≤ 16 KiB). */
export const tileShapes: ReadonlyArray<string> = ["32x32x32/4x4", "64x64x16/4x4", "64x64x32/4x4", "128x64x16/8x4", "64x128x16/4x8", "128x128x8/8x8", "128x128x16/8x8"]

/** Parses `TMxTNxTK/RMxRN`; undefined if it is not a valid shape. */
export const parseTiles = (s: string): Tiles | undefined => {
  const m = /^(\d+)x(\d+)x(\d+)\/(\d+)x(\d+)$/.exec(s.trim())
  if (m === null) return undefined
  const [tm, tn, tk, rm, rn] = m.slice(1).map(Number) as [number, number, number, number, number]
  const threads = (tm / rm) * (tn / rn)
  const ok = [tm, tn, tk, rm, rn].every((x) => x >= 1) && tm % rm === 0 && tn % rn === 0 && threads >= 1 && threads <= 256 && (tm + tn) * tk * 4 <= 16384
  return ok ? { tm, tn, tk, rm, rn } : undefined
}

interface Program {
  readonly variableNames: Array<string>
  readonly outputShape: Array<number>
  readonly shaderKey: string
  readonly dispatchLayout: { x: Array<number>; y: Array<number>; z: Array<number> }
  readonly dispatch: [number, number, number]
  readonly workgroupSize: [number, number, number]
  getUserCode: () => string
}

interface WebGpuBackend {
  runWebGPUProgram: (p: Program, inputs: Array<TF.TensorInfo>, dtype: string) => TF.TensorInfo
}

/** The WGSL of one tile shape and pair of transpose flags (A is `[batch, M, K]`, or `[batch, K, M]` transposed). */
const source = (t: Tiles, transposeA: boolean, transposeB: boolean) => {
  const wx = t.tn / t.rn
  const wy = t.tm / t.rm
  // element (row m, depth k) of A and (depth k, column n) of B, in their stored layouts
  const a = transposeA ? "A[aBase + k * M + m]" : "A[aBase + m * K + k]"
  const b = transposeB ? "B[bBase + n * K + k]" : "B[bBase + k * N + n]"
  // which tile coordinate varies fastest over consecutive threads: the operand's contiguous one
  const aLoad = transposeA
    ? `let mm = i % ${t.tm}; let kk = i / ${t.tm};`
    : `let kk = i % ${t.tk}; let mm = i / ${t.tk};`
  const bLoad = transposeB
    ? `let kk = i % ${t.tk}; let nn = i / ${t.tk};`
    : `let nn = i % ${t.tn}; let kk = i / ${t.tn};`
  // one operand's tile into workgroup memory, zero past the matrix edges
  const load = (count: number, coords: string, name: string, at: string, bound: string, element: string, slot: string) => `
      for (var i = tid; i < ${count}; i = i + ${wx * wy}) {
        ${coords}
        let ${name} = ${at};
        let k = k0 + kk;
        var v = 0.0;
        if (${name} < ${bound} && k < K) { v = ${element}; }
        ${slot} = v;
      }`
  return `
  var<workgroup> As : array<f32, ${t.tk * t.tm}>;
  var<workgroup> Bs : array<f32, ${t.tk * t.tn}>;
  fn main() {
    let batch = i32(workgroupId.z);
    let M = uniforms.outShape.y;
    let N = uniforms.outShape.z;
    let K = ${transposeA ? "uniforms.aShape.y" : "uniforms.aShape.z"};
    let aBase = select(batch, 0, uniforms.aShape.x == 1) * M * K;
    let bBase = select(batch, 0, uniforms.bShape.x == 1) * K * N;
    let tx = i32(localId.x);
    let ty = i32(localId.y);
    let tid = ty * ${wx} + tx;
    let row0 = i32(workgroupId.y) * ${t.tm};
    let col0 = i32(workgroupId.x) * ${t.tn};
    var acc : array<array<f32, ${t.rn}>, ${t.rm}>;
    var ra : array<f32, ${t.rm}>;
    var rb : array<f32, ${t.rn}>;
    for (var k0 = 0; k0 < K; k0 = k0 + ${t.tk}) {
${load(t.tm * t.tk, aLoad, "m", "row0 + mm", "M", a, `As[kk * ${t.tm} + mm]`)}
${load(t.tk * t.tn, bLoad, "n", "col0 + nn", "N", b, `Bs[kk * ${t.tn} + nn]`)}
      workgroupBarrier();
      for (var kk = 0; kk < ${t.tk}; kk = kk + 1) {
        for (var i = 0; i < ${t.rm}; i = i + 1) { ra[i] = As[kk * ${t.tm} + ty * ${t.rm} + i]; }
        for (var j = 0; j < ${t.rn}; j = j + 1) { rb[j] = Bs[kk * ${t.tn} + tx * ${t.rn} + j]; }
        for (var i = 0; i < ${t.rm}; i = i + 1) {
          for (var j = 0; j < ${t.rn}; j = j + 1) { acc[i][j] = fma(ra[i], rb[j], acc[i][j]); }
        }
      }
      workgroupBarrier();
    }
    for (var i = 0; i < ${t.rm}; i = i + 1) {
      let m = row0 + ty * ${t.rm} + i;
      if (m >= M) { break; }
      for (var j = 0; j < ${t.rn}; j = j + 1) {
        let n = col0 + tx * ${t.rn} + j;
        if (n < N) { result[(batch * M + m) * N + n] = acc[i][j]; }
      }
    }
  }`
}

const programOf = (t: Tiles, batch: number, m: number, n: number, transposeA: boolean, transposeB: boolean): Program => ({
  variableNames: ["A", "B"],
  outputShape: [batch, m, n],
  shaderKey: `conceptmoeMatMul_${t.tm}x${t.tn}x${t.tk}_${t.rm}x${t.rn}_${transposeA}_${transposeB}`,
  dispatchLayout: { x: [2], y: [1], z: [0] },
  dispatch: [Math.ceil(n / t.tn), Math.ceil(m / t.tm), batch],
  workgroupSize: [t.tn / t.rn, t.tm / t.rm, 1],
  getUserCode: () => source(t, transposeA, transposeB)
})

type KernelFunc = (args: { inputs: TF.NamedTensorInfoMap; backend: unknown; attrs?: TF.NamedAttrMap }) => TF.TensorInfo | Array<TF.TensorInfo>

let stock: KernelFunc | undefined

/**
 * Makes tfjs's webgpu `BatchMatMul` ours with `tiles`, or tfjs's own again with `undefined`.
 * Products it does not cover (batch shapes that differ beyond broadcasting one matrix, non-float32,
 * bias or activation) go to tfjs's kernel.
 */
export const useMatMul = (tf: Tf, tiles: Tiles | undefined): void => {
  stock ??= tf.getKernel("BatchMatMul", "webgpu")?.kernelFunc as KernelFunc | undefined
  if (stock === undefined) return
  const fallback = stock
  tf.unregisterKernel("BatchMatMul", "webgpu")
  if (tiles === undefined) {
    tf.registerKernel({ kernelName: "BatchMatMul", backendName: "webgpu", kernelFunc: fallback as never })
    return
  }
  tf.registerKernel({
    kernelName: "BatchMatMul",
    backendName: "webgpu",
    kernelFunc: ((args: Parameters<KernelFunc>[0]) => {
      const a = args.inputs["a"] as TF.TensorInfo
      const b = args.inputs["b"] as TF.TensorInfo
      const { transposeA, transposeB } = args.attrs as unknown as { transposeA: boolean; transposeB: boolean }
      const batchA = a.shape.slice(0, -2).reduce((x, y) => x * y, 1)
      const batchB = b.shape.slice(0, -2).reduce((x, y) => x * y, 1)
      const sameBatch = a.shape.length === b.shape.length && a.shape.slice(0, -2).every((d, i) => d === b.shape[i])
      if (a.dtype !== "float32" || b.dtype !== "float32" || !(sameBatch || batchA === 1 || batchB === 1)) return fallback(args)
      const [ra, ca] = a.shape.slice(-2) as [number, number]
      const [rb, cb] = b.shape.slice(-2) as [number, number]
      const m = transposeA ? ca : ra
      const k = transposeA ? ra : ca
      const n = transposeB ? rb : cb
      // a batch past 65535 matrices does not fit one dispatch dimension (tfjs's kernel cannot either)
      if ((transposeB ? cb : rb) !== k || Math.max(batchA, batchB) > 65535) return fallback(args)
      const backend = args.backend as WebGpuBackend
      const batch = Math.max(batchA, batchB)
      // rank-3 views of the operands (tfjs programs take a tensor's shape from the info they are given)
      const view = (t: TF.TensorInfo, n3: [number, number, number]) => ({ ...t, shape: n3 })
      const out = backend.runWebGPUProgram(
        programOf(tiles, batch, m, n, transposeA, transposeB),
        [view(a, [batchA, ra, ca]), view(b, [batchB, rb, cb])],
        "float32"
      )
      // the batch dimensions broadcast as tfjs's own kernel does (e.g. [3, 5] × [1, 5, 2] → [1, 3, 2])
      const outBatch = tf.backend_util.assertAndGetBroadcastShape(a.shape.slice(0, -2), b.shape.slice(0, -2))
      return { ...out, shape: [...outBatch, m, n] }
    }) as never
  })
}
