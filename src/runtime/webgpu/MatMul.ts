/**
 * fp32 matmul for the webgpu backend: our register-blocked tiled WGSL programs, registered as tfjs's
 * `BatchMatMul` kernel, and a tuner that picks, per product shape, the fastest of them and tfjs's
 * own kernel on the GPU at hand (as `torch.backends.cudnn.benchmark` does for convolutions).
 *
 * A kernel is named `TMxTNxTK/RMxRN[/v4[/db|/db2]][/kS]`:
 * - a workgroup computes a `TM × TN` tile of the output with `(TM/RM)·(TN/RN)` threads, each holding
 *   an `RM × RN` block of accumulators; the operands pass through workgroup memory `TK` deep;
 * - `v4` reads the operands and writes the output as `vec4<f32>`, keeps a thread's accumulators as
 *   named vec4 registers (no dynamic indexing) and gives a thread the column groups `tx + j·(TN/RN)`,
 *   so neighbouring threads read neighbouring words of workgroup memory; it needs M, N and K
 *   divisible by 4 (other products go to tfjs's kernel);
 * - `db` (with v4) issues the next tile's global reads into registers before the current tile is
 *   used, so their latency hides behind its arithmetic (one tile of workgroup memory, two barriers);
 *   `db2` also keeps two tiles of workgroup memory and stores the next tile into one while the
 *   current one is read from the other (one barrier per tile; twice the workgroup memory);
 * - `kS` splits K into S slices computed by separate workgroups (for products with a small output
 *   and a long K, such as weight gradients) and sums them with a second dispatch.
 * Operands are read in their stored layouts (transposed ones too); batches broadcast when one side
 * has a single matrix; edges are zero-padded.
 *
 * `CONCEPTMOE_MATMUL` chooses when the webgpu backend loads: `auto` (the default) runs tfjs's kernel
 * until {@link tuneMatMuls} has timed the candidates on a shape, then the fastest one that agrees
 * with tfjs's result; `tfjs` keeps tfjs's kernel; a kernel name uses that kernel for every product
 * it covers. Training tunes the shapes of its first step before recording (`train/Captured.ts`).
 * Tested against the cpu backend for every kernel in {@link kernelNames} (tests/webgpu.test.ts).
 *
 * The same programs also run the MoE grouped dispatch's products ({@link makeGroupedMatMul}): each
 * group's rows with its expert's matrix read in place through a table, and each expert's weight
 * gradient over its own rows, tuned and checked as they run.
 *
 * @since 0.3.0
 */
import type * as TF from "@tensorflow/tfjs"
import type { Tensor, Tf } from "../../graph/Apply.ts"
import { submitPending } from "./Capture.ts"
import { fusedOn, runKernel } from "../Fused.ts"

export interface Tiles {
  /** Output rows and columns per workgroup, and the depth of one pass through workgroup memory. */
  readonly tm: number
  readonly tn: number
  readonly tk: number
  /** Output rows and columns per thread. */
  readonly rm: number
  readonly rn: number
  /** vec4 loads, stores and accumulators (M, N, K divisible by 4). */
  readonly vec4: boolean
  /** vec4 only: the next tile's global reads are issued into registers before the current tile is used. */
  readonly prefetch: boolean
  /**
   * With prefetch: two tiles of workgroup memory, the next tile stored into one while the current
   * one is read from the other, one barrier per tile instead of two.
   */
  readonly double: boolean
  /** Slices of K, summed by a second dispatch (1: none). */
  readonly split: number
}

/**
 * The kernels a sweep and the tuner try (threads per workgroup ≤ 256, workgroup memory ≤ 16 KiB):
 * large tiles for large outputs, 8×8 per thread on 64-128 threads for outputs too small to fill a
 * GPU with 128×128 tiles (a [4096, 512] output is 128 of them), split K for weight gradients (a
 * [512, 512] gradient over 4,096 tokens is 16 tiles of 128×128 or 64 of 64×64 for 132 SMs: 8 slices
 * make 512 workgroups), and double-buffered workgroup memory (`db2`) for the tiles that fit twice.
 */
export const kernelNames: ReadonlyArray<string> = [
  "32x32x32/4x4",
  "64x64x16/4x4",
  "128x128x8/8x8",
  "32x32x16/4x4/v4",
  "64x64x16/4x4/v4",
  "64x64x32/4x4/v4",
  "128x64x16/8x4/v4",
  "64x128x16/4x8/v4",
  "128x128x8/8x8/v4",
  "128x128x16/8x8/v4",
  "64x64x16/4x4/v4/db",
  "128x64x16/8x4/v4/db",
  "128x128x8/8x8/v4/db",
  "128x128x16/8x8/v4/db",
  "128x128x8/8x8/v4/db2",
  "128x64x8/8x8/v4/db2",
  "64x64x16/8x8/v4/db2",
  "64x64x16/8x8/v4",
  "64x64x16/8x8/v4/db",
  "128x64x16/8x8/v4/db",
  "64x64x16/4x4/v4/k4",
  "64x64x16/8x8/v4/k4",
  "128x128x8/8x8/v4/k4",
  "128x128x16/8x8/v4/k2",
  "64x64x16/4x4/v4/k8",
  "64x64x16/8x8/v4/k8",
  "64x64x16/8x8/v4/db2/k8",
  "128x128x8/8x8/v4/k8"
]

/** The name of a kernel, as {@link parseTiles} reads it. */
export const tilesName = (t: Tiles): string =>
  `${t.tm}x${t.tn}x${t.tk}/${t.rm}x${t.rn}${t.vec4 ? "/v4" : ""}${t.prefetch ? (t.double ? "/db2" : "/db") : ""}${t.split > 1 ? `/k${t.split}` : ""}`

/** Parses `TMxTNxTK/RMxRN[/v4[/db|/db2]][/kS]`; undefined if it is not a valid kernel. */
export const parseTiles = (s: string): Tiles | undefined => {
  const m = /^(\d+)x(\d+)x(\d+)\/(\d+)x(\d+)(\/v4)?(\/db2?)?(?:\/k(\d+))?$/.exec(s.trim())
  if (m === null) return undefined
  const [tm, tn, tk, rm, rn] = m.slice(1, 6).map(Number) as [number, number, number, number, number]
  const vec4 = m[6] !== undefined
  const prefetch = m[7] !== undefined
  const double = m[7] === "/db2"
  const split = m[8] === undefined ? 1 : Number(m[8])
  const threads = (tm / rm) * (tn / rn)
  const ok = [tm, tn, tk, rm, rn].every((x) => x >= 1) && tm % rm === 0 && tn % rn === 0 && threads >= 1 && threads <= 256 &&
    (tm + tn) * tk * 4 * (double ? 2 : 1) <= 16384 && split >= 1 && split <= 64 && (!vec4 || (rm % 4 === 0 && rn % 4 === 0 && tk % 4 === 0)) &&
    // prefetching keeps a whole number of each tile's vec4s per thread in registers
    (!prefetch || (vec4 && ((tm * tk) / 4) % threads === 0 && ((tn * tk) / 4) % threads === 0))
  return ok ? { tm, tn, tk, rm, rn, vec4, prefetch, double, split } : undefined
}

/** One product: `batch × (M × K) · (K × N)` with the operands' stored layouts. */
export interface Product {
  readonly batchA: number
  readonly batchB: number
  readonly m: number
  readonly n: number
  readonly k: number
  readonly transposeA: boolean
  readonly transposeB: boolean
}

/** e.g. `16x[256x64]·[64x256]ᵀ` (`1/16x…` when only B has 16 matrices): the key under which a product's choice is kept. */
export const productKey = (p: Product): string =>
  `${p.batchA === p.batchB ? p.batchA : `${p.batchA}/${p.batchB}`}x[${p.m}x${p.k}]${p.transposeA ? "ᵀ" : ""}·[${p.k}x${p.n}]${p.transposeB ? "ᵀ" : ""}`

type KernelArgs = { inputs: TF.NamedTensorInfoMap; backend: unknown; attrs?: TF.NamedAttrMap }
type KernelFunc = (args: KernelArgs) => TF.TensorInfo | Array<TF.TensorInfo>

/** A way to compute a product: tfjs's kernel, one of ours, or a caller's. */
export interface MatMulKernel {
  readonly name: string
  readonly covers: (p: Product) => boolean
  readonly kernelFunc: KernelFunc
}

interface Program {
  readonly variableNames: Array<string>
  readonly outputShape: Array<number>
  readonly shaderKey: string
  readonly dispatchLayout: { x: Array<number>; y?: Array<number>; z?: Array<number> }
  readonly dispatch: [number, number, number]
  readonly workgroupSize: [number, number, number]
  readonly outputComponent?: number
  readonly variableComponents?: Array<number>
  readonly size?: boolean
  getUserCode: () => string
}

interface WebGpuBackend {
  runWebGPUProgram: (p: Program, inputs: Array<TF.TensorInfo>, dtype: string) => TF.TensorInfo
  disposeData: (id: unknown) => void
}

/**
 * How a program finds its operands beyond their stored layouts: `none`; `gather`, B's matrix of
 * batch z is `Q[z]` (a grouped product: each group's rows with its expert's weights, read in
 * place); `segment`, the output's batch e sums over the rows of K that belong to expert e, the
 * groups g with `Q[g] = e` (ascending), `K / len(Q)` rows each (an expert's weight gradient).
 */
type Indexing = "none" | "gather" | "segment"

/** The slice of K that workgroup z works on (`kStart`, `kEnd`) and its batch, for `split` slices. */
const sliceOfK = (t: Tiles, indexing: Indexing) => indexing === "segment"
  ? `
    let z = i32(workgroupId.z);
    let batch = z / ${t.split};
    // expert batch's groups [first, last) of the ascending table Q, by bisection
    let groupCount = uniforms.qShape;
    var lo = 0;
    var hi = groupCount;
    loop { if (lo >= hi) { break; } let mid = (lo + hi) / 2; if (i32(Q[mid]) < batch) { lo = mid + 1; } else { hi = mid; } }
    let first = lo;
    hi = groupCount;
    loop { if (lo >= hi) { break; } let mid = (lo + hi) / 2; if (i32(Q[mid]) <= batch) { lo = mid + 1; } else { hi = mid; } }
    let groupRows = K / groupCount;
    let segStart = first * groupRows;
    let segEnd = lo * groupRows;
    // the tile loop's bound must be uniform for workgroupBarrier (tfjs keeps workgroupId in a
    // private variable, which the uniformity analysis takes as non-uniform): passed through the
    // first slot of A's tile (no workgroup memory beyond the tiles' budget), which
    // workgroupUniformLoad reads as uniform, and freed by a barrier before the tiles are stored
    if (localId.x == 0u && localId.y == 0u) { As[0] = ${t.vec4 ? "vec4<f32>(" : "("}bitcast<f32>(((segEnd - segStart + ${t.split * t.tk - 1}) / ${t.split * t.tk}) * ${t.tk})); }
    let kChunk = bitcast<i32>(workgroupUniformLoad(&As[0])${t.vec4 ? ".x" : ""});
    workgroupBarrier();
    let kStart = segStart + (z % ${t.split}) * kChunk;
    let kEnd = min(segEnd, kStart + kChunk);`
  : `
    let z = i32(workgroupId.z);
    let batch = z / ${t.split};
    let kChunk = ((K + ${t.split * t.tk - 1}) / ${t.split * t.tk}) * ${t.tk};
    let kStart = (z % ${t.split}) * kChunk;
    let kEnd = min(K, kStart + kChunk);`

const header = (t: Tiles, transposeA: boolean, indexing: Indexing) => `
    let M = uniforms.outShape.y;
    let N = uniforms.outShape.z;
    let K = ${transposeA ? "uniforms.aShape.y" : "uniforms.aShape.z"};${sliceOfK(t, indexing)}
    let aBase = select(batch, 0, uniforms.aShape.x == 1) * M * K;
    let bBase = ${indexing === "gather" ? "i32(Q[batch])" : "select(batch, 0, uniforms.bShape.x == 1)"} * K * N;
    let tx = i32(localId.x);
    let ty = i32(localId.y);
    let tid = ty * ${t.tn / t.rn} + tx;
    let row0 = i32(workgroupId.y) * ${t.tm};
    let col0 = i32(workgroupId.x) * ${t.tn};`

/** The WGSL of the scalar program (any M, N, K): A is `[batch, M, K]`, or `[batch, K, M]` transposed. */
const scalarSource = (t: Tiles, transposeA: boolean, transposeB: boolean, indexing: Indexing) => {
  const threads = (t.tn / t.rn) * (t.tm / t.rm)
  // element (row m, depth k) of A and (depth k, column n) of B, in their stored layouts
  const a = transposeA ? "A[aBase + k * M + m]" : "A[aBase + m * K + k]"
  const b = transposeB ? "B[bBase + n * K + k]" : "B[bBase + k * N + n]"
  // which tile coordinate varies fastest over consecutive threads: the operand's contiguous one
  const aLoad = transposeA ? `let mm = i % ${t.tm}; let kk = i / ${t.tm};` : `let kk = i % ${t.tk}; let mm = i / ${t.tk};`
  const bLoad = transposeB ? `let kk = i % ${t.tk}; let nn = i / ${t.tk};` : `let nn = i % ${t.tn}; let kk = i / ${t.tn};`
  // one operand's tile into workgroup memory, zero past the matrix edges and the slice of K
  const load = (count: number, coords: string, name: string, at: string, bound: string, element: string, slot: string) => `
      for (var i = tid; i < ${count}; i = i + ${threads}) {
        ${coords}
        let ${name} = ${at};
        let k = k0 + kk;
        var v = 0.0;
        if (${name} < ${bound} && k < kEnd) { v = ${element}; }
        ${slot} = v;
      }`
  return `
  var<workgroup> As : array<f32, ${t.tk * t.tm}>;
  var<workgroup> Bs : array<f32, ${t.tk * t.tn}>;
  fn main() {${header(t, transposeA, indexing)}
    var acc : array<array<f32, ${t.rn}>, ${t.rm}>;
    var ra : array<f32, ${t.rm}>;
    var rb : array<f32, ${t.rn}>;
    // bounds from uniforms only: workgroupBarrier needs uniform control flow
    for (var kb = 0; kb < kChunk; kb = kb + ${t.tk}) {
      let k0 = kStart + kb;
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
        if (n < N) { result[(z * M + m) * N + n] = acc[i][j]; }
      }
    }
  }`
}

const range = (n: number) => Array.from({ length: n }, (_, i) => i)

/** One operand's tile load in the vec4 program (see `vec4Source`). */
interface Operand {
  readonly count: number
  /** The slot's place in the tile (from `i`), and in the matrix (from `row0`/`col0` and `k0`). */
  readonly coords: string
  readonly at: string
  readonly inside: string
  readonly read: string
  readonly store: string
}

/**
 * The WGSL of the vec4 program (M, N, K divisible by 4). Workgroup memory holds A's tile as
 * `[TK][TM/4]` and B's as `[TK][TN/4]` vec4s; a thread owns rows `ty·RM + i` (contiguous, read as
 * vec4) and column groups `tx + j·(TN/RN)` (neighbouring threads, neighbouring vec4s).
 */
const vec4Source = (t: Tiles, transposeA: boolean, transposeB: boolean, indexing: Indexing) => {
  const wx = t.tn / t.rn
  const threads = wx * (t.tm / t.rm)
  const [tm4, tn4, tk4, rm4, rn4] = [t.tm / 4, t.tn / 4, t.tk / 4, t.rm / 4, t.rn / 4]
  const components = ["x", "y", "z", "w"]
  // each operand's tile as slots i of vec4s along its contiguous axis: the slot's coordinates, when
  // it is inside the matrix and the slice of K, its global read, and its store into workgroup memory
  const scatter = (slot: (c: number) => string) => range(4).map((c) => `${slot(c)} = v[${c}];`).join(" ")
  const a: Operand = transposeA
    ? { count: t.tk * tm4, coords: `let mm4 = i % ${tm4}; let kk = i / ${tm4};`, at: "let m = row0 + mm4 * 4; let k = k0 + kk;", inside: "m < M && k < kEnd", read: "A[(aBase + k * M + m) / 4]", store: `As[aAt + kk * ${tm4} + mm4] = v;` }
    : { count: t.tm * tk4, coords: `let kk4 = i % ${tk4}; let mm = i / ${tk4};`, at: "let m = row0 + mm; let k = k0 + kk4 * 4;", inside: "m < M && k < kEnd", read: "A[(aBase + m * K + k) / 4]", store: scatter((c) => `As[aAt + (kk4 * 4 + ${c}) * ${tm4} + mm / 4][mm % 4]`) }
  const b: Operand = transposeB
    ? { count: t.tn * tk4, coords: `let kk4 = i % ${tk4}; let nn = i / ${tk4};`, at: "let n = col0 + nn; let k = k0 + kk4 * 4;", inside: "n < N && k < kEnd", read: "B[(bBase + n * K + k) / 4]", store: scatter((c) => `Bs[bAt + (kk4 * 4 + ${c}) * ${tn4} + nn / 4][nn % 4]`) }
    : { count: t.tk * tn4, coords: `let nn4 = i % ${tn4}; let kk = i / ${tn4};`, at: "let n = col0 + nn4 * 4; let k = k0 + kk;", inside: "n < N && k < kEnd", read: "B[(bBase + k * N + n) / 4]", store: `Bs[bAt + kk * ${tn4} + nn4] = v;` }
  const fetch = (o: Operand) => `${o.at} var v = vec4<f32>(0.0); if (${o.inside}) { v = ${o.read}; }`
  // straight: every tile loaded, then used; prefetched: the next tile's reads are issued into
  // registers before the current tile is used, and stored after it; double: stored into the other
  // tile of workgroup memory while the current one is used. Tiles start at aAt and bAt.
  const load = (o: Operand) => `
      for (var i = tid; i < ${o.count}; i = i + ${threads}) { ${o.coords} ${fetch(o)} ${o.store} }`
  const slots = (o: Operand, name: string) => range(o.count / threads).map((r) => [`${name}${r}`, `let i = tid + ${r * threads};`] as const)
  const prefetch = (o: Operand, name: string) =>
    slots(o, name).map(([reg, at]) => `{ ${at} ${o.coords} ${fetch(o)} ${reg} = v; }`).join("\n        ")
  const storeFetched = (o: Operand, name: string) =>
    slots(o, name).map(([reg, at]) => `{ ${at} ${o.coords} let v = ${reg}; ${o.store} }`).join("\n      ")
  const registers = [...slots(a, "pa"), ...slots(b, "pb")].map(([reg]) => `var ${reg} : vec4<f32>;`).join(" ")
  const [aTile, bTile] = [t.tk * tm4, t.tk * tn4]
  const at = (buffer: string) => `let aAt = ${buffer} * ${aTile}; let bAt = ${buffer} * ${bTile};`
  const tileLoop = (compute: string) =>
    t.double
      ? `
    ${registers}
    {
      let k0 = kStart;
      ${prefetch(a, "pa")}
      ${prefetch(b, "pb")}
    }
    {
      ${at("0")}
      ${storeFetched(a, "pa")}
      ${storeFetched(b, "pb")}
    }
    workgroupBarrier();
    // bounds from uniforms only: workgroupBarrier needs uniform control flow
    for (var kb = 0; kb < kChunk; kb = kb + ${t.tk}) {
      let current = (kb / ${t.tk}) % 2;
      let more = kb + ${t.tk} < kChunk;
      if (more) {
        let k0 = kStart + kb + ${t.tk};
        ${prefetch(a, "pa")}
        ${prefetch(b, "pb")}
      }
      {
        ${at("current")}${compute}
      }
      if (more) {
        ${at("(1 - current)")}
        ${storeFetched(a, "pa")}
        ${storeFetched(b, "pb")}
      }
      workgroupBarrier();
    }`
      : t.prefetch
      ? `
    ${registers}
    ${at("0")}
    {
      let k0 = kStart;
      ${prefetch(a, "pa")}
      ${prefetch(b, "pb")}
    }
    // bounds from uniforms only: workgroupBarrier needs uniform control flow
    for (var kb = 0; kb < kChunk; kb = kb + ${t.tk}) {
      ${storeFetched(a, "pa")}
      ${storeFetched(b, "pb")}
      workgroupBarrier();
      if (kb + ${t.tk} < kChunk) {
        let k0 = kStart + kb + ${t.tk};
        ${prefetch(a, "pa")}
        ${prefetch(b, "pb")}
      }${compute}
      workgroupBarrier();
    }`
      : `
    ${at("0")}
    // bounds from uniforms only: workgroupBarrier needs uniform control flow
    for (var kb = 0; kb < kChunk; kb = kb + ${t.tk}) {
      let k0 = kStart + kb;${load(a)}${load(b)}
      workgroupBarrier();${compute}
      workgroupBarrier();
    }`
  const acc = (r: number, j: number) => `acc_${r}_${j}`
  const cells = range(t.rm).flatMap((r) => range(rn4).map((j) => [r, j] as const))
  return `
  var<workgroup> As : array<vec4<f32>, ${(t.double ? 2 : 1) * aTile}>;
  var<workgroup> Bs : array<vec4<f32>, ${(t.double ? 2 : 1) * bTile}>;
  fn main() {${header(t, transposeA, indexing)}
    ${cells.map(([r, j]) => `var ${acc(r, j)} = vec4<f32>(0.0);`).join("\n    ")}
${tileLoop(`
      for (var kk = 0; kk < ${t.tk}; kk = kk + 1) {
        ${range(rm4).map((i) => `let a${i} = As[aAt + kk * ${tm4} + ty * ${rm4} + ${i}];`).join("\n        ")}
        ${range(rn4).map((j) => `let b${j} = Bs[bAt + kk * ${tn4} + tx + ${j * wx}];`).join("\n        ")}
        ${cells.map(([r, j]) => `${acc(r, j)} = fma(vec4<f32>(a${Math.floor(r / 4)}.${components[r % 4]}), b${j}, ${acc(r, j)});`).join("\n        ")}
      }`)}
    ${range(t.rm).map((r) => `
    {
      let m = row0 + ty * ${t.rm} + ${r};
      if (m < M) {
        ${range(rn4).map((j) => `{ let n = col0 + (tx + ${j * wx}) * 4; if (n < N) { result[((z * M + m) * N + n) / 4] = ${acc(r, j)}; } }`).join("\n        ")}
      }
    }`).join("")}
  }`
}

const programOf = (t: Tiles, batch: number, m: number, n: number, transposeA: boolean, transposeB: boolean, indexing: Indexing = "none"): Program => ({
  variableNames: indexing === "none" ? ["A", "B"] : ["A", "B", "Q"],
  outputShape: [batch * t.split, m, n],
  shaderKey: `conceptmoeMatMul_${tilesName(t)}_${transposeA}_${transposeB}${indexing === "none" ? "" : `_${indexing}`}`,
  dispatchLayout: { x: [2], y: [1], z: [0] },
  dispatch: [Math.ceil(n / t.tn), Math.ceil(m / t.tm), batch * t.split],
  workgroupSize: [t.tn / t.rn, t.tm / t.rm, 1],
  ...(t.vec4 ? { outputComponent: 4, variableComponents: indexing === "none" ? [4, 4] : [4, 4, 1] } : {}),
  getUserCode: () => (t.vec4 ? vec4Source : scalarSource)(t, transposeA, transposeB, indexing)
})

/** Sums `[batch·split, M, N]` partial products over the split into `[batch, M, N]`. */
const sumSlices = (split: number, batch: number, m: number, n: number): Program => {
  const width = n % 4 === 0 ? 4 : 1
  return {
    variableNames: ["P"],
    outputShape: [batch, m, n],
    shaderKey: `conceptmoeMatMulSum_${split}_${width}`,
    dispatchLayout: { x: [0, 1, 2] },
    dispatch: [Math.ceil((batch * m * n) / width / 64), 1, 1],
    workgroupSize: [64, 1, 1],
    ...(width === 4 ? { outputComponent: 4, variableComponents: [4] } : {}),
    size: true,
    getUserCode: () => `
      fn main(index : i32) {
        let plane = uniforms.outShape.y * uniforms.outShape.z / ${width};
        if (index < plane * uniforms.outShape.x) {
          let b = index / plane;
          let r = index % plane;
          var s = P[b * ${split} * plane + r];
          for (var i = 1; i < ${split}; i = i + 1) { s = s + P[(b * ${split} + i) * plane + r]; }
          result[index] = s;
        }
      }`
  }
}

/** The product computed by a `BatchMatMul` call; undefined for what our programs do not cover. */
const productOf = (args: KernelArgs): Product | undefined => {
  const a = args.inputs["a"] as TF.TensorInfo
  const b = args.inputs["b"] as TF.TensorInfo
  const { transposeA, transposeB } = args.attrs as unknown as { transposeA: boolean; transposeB: boolean }
  const batchA = a.shape.slice(0, -2).reduce((x, y) => x * y, 1)
  const batchB = b.shape.slice(0, -2).reduce((x, y) => x * y, 1)
  const sameBatch = a.shape.length === b.shape.length && a.shape.slice(0, -2).every((d, i) => d === b.shape[i])
  if (a.dtype !== "float32" || b.dtype !== "float32" || !(sameBatch || batchA === 1 || batchB === 1)) return undefined
  const [ra, ca] = a.shape.slice(-2) as [number, number]
  const [rb, cb] = b.shape.slice(-2) as [number, number]
  const k = transposeA ? ra : ca
  // a batch past 65535 matrices does not fit one dispatch dimension (tfjs's kernel cannot either)
  if ((transposeB ? cb : rb) !== k || Math.max(batchA, batchB) > 65535) return undefined
  return { batchA, batchB, m: transposeA ? ca : ra, n: transposeB ? rb : cb, k, transposeA, transposeB }
}

/** Runs tiles `t` on rank-3 operands (and the table of an indexed program): `[batch, M, N]`, split K summed. */
const runTiled = (backend: WebGpuBackend, t: Tiles, batch: number, p: Product, indexing: Indexing, inputs: Array<TF.TensorInfo>): TF.TensorInfo => {
  const out = backend.runWebGPUProgram(programOf(t, batch, p.m, p.n, p.transposeA, p.transposeB, indexing), inputs, "float32")
  if (t.split === 1) return out
  const summed = backend.runWebGPUProgram(sumSlices(t.split, batch, p.m, p.n), [out], "float32")
  backend.disposeData(out.dataId)
  return summed
}

/** Our kernel with tile shape `t`, for the products it covers. */
export const tiledKernel = (tf: Tf, t: Tiles): MatMulKernel => ({
  name: tilesName(t),
  covers: (p) =>
    Math.max(p.batchA, p.batchB) * t.split <= 65535 && (!t.vec4 || (p.m % 4 === 0 && p.n % 4 === 0 && p.k % 4 === 0)) &&
    (t.split === 1 || p.k >= t.split * t.tk),
  kernelFunc: (args) => {
    const p = productOf(args)!
    const a = args.inputs["a"] as TF.TensorInfo
    const b = args.inputs["b"] as TF.TensorInfo
    const backend = args.backend as WebGpuBackend
    const batch = Math.max(p.batchA, p.batchB)
    // rank-3 views of the operands (tfjs programs take a tensor's shape from the info they are given)
    const view = (x: TF.TensorInfo, rows: number, cols: number, n: number) => ({ ...x, shape: [n, rows, cols] })
    const out = runTiled(backend, t, batch, p, "none", [view(a, a.shape.at(-2)!, a.shape.at(-1)!, p.batchA), view(b, b.shape.at(-2)!, b.shape.at(-1)!, p.batchB)])
    // the batch dimensions broadcast as tfjs's own kernel does (e.g. [3, 5] × [1, 5, 2] → [1, 3, 2])
    const outBatch = tf.backend_util.assertAndGetBroadcastShape(a.shape.slice(0, -2), b.shape.slice(0, -2))
    return { ...out, shape: [...outBatch, p.m, p.n] }
  }
})

export type MatMulMode = "tfjs" | "auto" | Tiles

interface State {
  readonly stock: MatMulKernel
  mode: MatMulMode
  /** The kernel of a fixed mode. */
  fixed: MatMulKernel | undefined
  /** What `auto` tries. */
  candidates: ReadonlyArray<MatMulKernel>
  /** The tuner's choice per product key. */
  readonly chosen: Map<string, MatMulKernel>
  /** Products seen since the mode was set, by key. */
  readonly seen: Map<string, Product>
  /** The grouped products among them (keys `grouped …`): their shapes, to be tuned as they run. */
  readonly grouped: Map<string, GroupedPart>
  /** A kernel every covered product uses while the tuner times it. */
  forced: MatMulKernel | undefined
  readonly report: Array<TuneRow>
  /** Counts the calls to `useMatMul`: a tuning that sees it change stops and keeps nothing. */
  generation: number
  /** Key sets of {@link watchProducts}' callers. */
  readonly watchers: Set<Set<string>>
  /** Seeds of the tuner's operands: every tuning draws its own. */
  drawn: number
}

/**
 * The matmul state of the webgpu backend of each tensor library (keyed by its environment object,
 * as the runtime's settings are: `Env.ts`), made when the backend loads (`useMatMul`): the mode, the
 * products seen and the tuner's choices, which a checkpoint stores as an opaque record
 * ({@link tunedChoices}, {@link takeChoices}).
 */
const states = new WeakMap<object, State>()
const stateOf = (tf: Tf): State | undefined => states.get(tf.env())

/** The kernel a product (kept under `key`) runs with now. */
const kernelFor = (s: State, p: Product, key = productKey(p)): MatMulKernel => {
  const k = s.forced ?? (s.mode === "tfjs" ? s.stock : s.mode === "auto" ? s.chosen.get(key) : s.fixed)
  return k !== undefined && k.covers(p) ? k : s.stock
}

/**
 * Chooses how webgpu's `BatchMatMul` runs: `"tfjs"` (tfjs's kernel), a kernel for every product it
 * covers, or `"auto"` (tfjs's until {@link tuneMatMuls} chose per shape); each call starts over (no
 * product seen or tuned). `candidates` replaces what `auto` tries (default: tfjs's kernel and every one of {@link kernelNames}). Products our
 * programs do not cover (non-float32, batch shapes that differ beyond broadcasting one matrix) always
 * go to tfjs's kernel.
 */
export const useMatMul = (tf: Tf, mode: MatMulMode, options: { readonly candidates?: ReadonlyArray<MatMulKernel> } = {}): void => {
  let state = stateOf(tf)
  if (state === undefined) {
    const original = tf.getKernel("BatchMatMul", "webgpu")?.kernelFunc as KernelFunc | undefined
    if (original === undefined) return
    const stock: MatMulKernel = { name: "tfjs", covers: () => true, kernelFunc: original }
    const s: State = { stock, mode, fixed: undefined, candidates: [], chosen: new Map(), seen: new Map(), grouped: new Map(), forced: undefined, report: [], generation: 0, watchers: new Set(), drawn: 0 }
    state = s
    states.set(tf.env(), s)
    tf.unregisterKernel("BatchMatMul", "webgpu")
    tf.registerKernel({
      kernelName: "BatchMatMul",
      backendName: "webgpu",
      kernelFunc: ((args: KernelArgs) => {
        const p = productOf(args)
        if (p === undefined) return stock.kernelFunc(args)
        // (the tuner's own products, run with a kernel forced, are not noted: a grouped part's
        // reference is a batched product of another key)
        if (s.forced === undefined) noteSeen(s, productKey(p), p)
        return kernelFor(s, p).kernelFunc(args)
      }) as never
    })
  }
  // a new mode starts over: choices made among other candidates, and the products seen before
  state.chosen.clear()
  state.seen.clear()
  state.grouped.clear()
  state.forced = undefined
  state.generation++
  state.mode = mode
  state.fixed = typeof mode === "object" ? tiledKernel(tf, mode) : undefined
  state.candidates = options.candidates ?? [state.stock, ...kernelNames.map((n) => tiledKernel(tf, parseTiles(n)!))]
}

/** The matmul mode now (`unset` before the webgpu backend loaded). */
export const matMulMode = (tf: Tf): MatMulMode | "unset" => stateOf(tf)?.mode ?? "unset"

/** tfjs's own `BatchMatMul` for webgpu, as a candidate (e.g. to build a candidate list around it). */
export const stockKernel = (tf: Tf): MatMulKernel | undefined => stateOf(tf)?.stock

/** Parses `CONCEPTMOE_MATMUL`: `auto` (also when unset), `tfjs` or a kernel name. */
export const parseMode = (value: string | undefined): MatMulMode | undefined => {
  if (value === undefined || value === "" || value === "auto") return "auto"
  if (value === "tfjs") return "tfjs"
  return parseTiles(value)
}

/** What the tuner found for one product: each candidate's kernel time, or why it was left out. */
export interface TuneRow {
  readonly product: string
  readonly chosen: string
  /** Microseconds per product: GPU kernel time (timestamp queries), or wall time where the device has none. */
  readonly us: Record<string, number>
  /** Candidates whose result disagreed with tfjs's kernel, with the largest difference. */
  readonly rejected: Record<string, number>
  /** Candidates that the device refused (a shader or pipeline error while compiling or running), with its message. */
  readonly failed: Record<string, string>
}

/** Every tuning result so far, and the choices per product. */
export const matMulTuning = (tf: Tf): ReadonlyArray<TuneRow> => stateOf(tf)?.report ?? []

/**
 * Starts noting the products that run; the function it returns stops and gives their keys (for
 * {@link tuneMatMuls}'s `products`).
 */
export const watchProducts = (tf: Tf): (() => ReadonlySet<string>) => {
  const keys = new Set<string>()
  const watchers = stateOf(tf)?.watchers
  watchers?.add(keys)
  return () => {
    watchers?.delete(keys)
    return keys
  }
}

/** Notes a product as seen (for the tuner) and tells the watchers its key. */
const noteSeen = (s: State, key: string, p: Product) => {
  s.seen.set(key, p)
  for (const w of s.watchers) w.add(key)
}

/** How the tuner draws operands for one product, computes tfjs's result, and runs a candidate. */
interface TuneTask {
  readonly operands: () => readonly [Tensor, Tensor]
  readonly reference: (a: Tensor, b: Tensor) => Tensor
  readonly run: (c: MatMulKernel, a: Tensor, b: Tensor) => Tensor
  /** Tensors the task made, freed with the operands. */
  readonly owned: ReadonlyArray<Tensor>
}

const draw = (tf: Tf, s: State, shape: Array<number>, std: number) => tf.randomNormal(shape, 0, std, "float32", ++s.drawn)

/** A product through tfjs's `BatchMatMul`, with the candidate (or tfjs's kernel) forced. */
const plainTask = (tf: Tf, s: State, p: Product): TuneTask => {
  const shapeOf = (batch: number, rows: number, cols: number, transpose: boolean) =>
    [...(p.batchA === p.batchB || batch > 1 ? [batch] : []), ...(transpose ? [cols, rows] : [rows, cols])]
  const product = (k: MatMulKernel, x: Tensor, y: Tensor) => {
    s.forced = k
    return tf.matMul(x, y, p.transposeA, p.transposeB) as Tensor
  }
  return {
    operands: () => [draw(tf, s, shapeOf(p.batchA, p.m, p.k, p.transposeA), 1 / Math.sqrt(p.k)), draw(tf, s, shapeOf(p.batchB, p.k, p.n, p.transposeB), 1)],
    reference: (a, b) => product(s.stock, a, b),
    run: product,
    owned: []
  }
}

/**
 * A grouped part as it runs: our grouped kernel with the candidate's tiles, on G groups whose
 * experts are spread evenly over the E (`⌊g·E/G⌋`); tfjs's result from the gathered matrices (and,
 * for the weight gradient, a segment sum over the groups' products), with tfjs's kernel forced.
 */
const groupedTask = (tf: Tf, s: State, g: GroupedPart): TuneTask => {
  const { G, T, a, b, E } = g
  const table = tf.tensor1d(Array.from({ length: G }, (_, i) => Math.floor((i * E) / G)), "float32")
  const index = tf.cast(table, "int32")
  const stock = (f: () => Tensor) => {
    s.forced = s.stock
    return tf.tidy(f)
  }
  const owned = [table, index]
  switch (g.role) {
    case "forward":
      return {
        operands: () => [draw(tf, s, [G, T, a], 1 / Math.sqrt(a)), draw(tf, s, [E, a, b], 1)],
        reference: (x, w) => stock(() => tf.matMul(x, tf.gather(w, index))),
        run: (c, x, w) => runKernel(tf, groupedKernels.product, { a: x, b: w, q: table }, { tiles: c.name, transposeB: false }),
        owned
      }
    case "dx":
      return {
        operands: () => [draw(tf, s, [G, T, b], 1 / Math.sqrt(b)), draw(tf, s, [E, a, b], 1)],
        reference: (dy, w) => stock(() => tf.matMul(dy, tf.gather(w, index), false, true)),
        run: (c, dy, w) => runKernel(tf, groupedKernels.product, { a: dy, b: w, q: table }, { tiles: c.name, transposeB: true }),
        owned
      }
    case "dw":
      return {
        operands: () => [draw(tf, s, [G, T, a], 1 / Math.sqrt((G * T) / E)), draw(tf, s, [G, T, b], 1)],
        reference: (x, dy) => stock(() => tf.unsortedSegmentSum(tf.matMul(x, dy, true, false), index, E)),
        run: (c, x, dy) => runKernel(tf, groupedKernels.sum, { a: x, b: dy, q: table }, { tiles: c.name, experts: E }),
        owned
      }
  }
}

/**
 * In `auto` mode, times every candidate on every product seen so far (or, with `products`, on those
 * of them) and not yet tuned, and keeps
 * the fastest whose result agrees with tfjs's kernel (largest difference ≤ 1e-3 of the largest
 * magnitude, on operands drawn from N(0, 1/K)). Each candidate runs once untimed (compiling its
 * shader, checked), then `reps` times under `tf.time` (by the wall clock where the device has no
 * timestamp queries). The untimed run is submitted on its own inside WebGPU error scopes: a
 * candidate whose shader or pipeline the device refuses is left out with the error's message
 * (`failed`), and its error neither reaches `gpuErrors` (Fixes.ts) nor takes other work's commands with
 * it (Dawn drops a whole command buffer that holds an invalid dispatch). Returns the new rows. Nothing to do (an empty list) in other modes or on
 * other backends. Matmuls issued by other work while it awaits run with the candidate under test:
 * do not overlap it with other work; a `useMatMul` meanwhile makes it stop and keep nothing.
 */
export const tuneMatMuls = async (
  tf: Tf,
  options: { readonly reps?: number; readonly products?: ReadonlySet<string> } = {}
): Promise<ReadonlyArray<TuneRow>> => {
  const s = stateOf(tf)
  if (s === undefined || s.mode !== "auto" || tf.getBackend() !== "webgpu") return []
  const generation = s.generation
  // tfjs reports a kernel time of 0 without timestamp queries: time by the wall clock then
  const timestamps = (tf.backend() as unknown as { device?: { features: { has: (f: string) => boolean } } }).device?.features.has("timestamp-query") === true
  const reps = options.reps ?? 5
  const rows: Array<TuneRow> = []
  const wanted = [...s.seen].filter(([key]) => !s.chosen.has(key) && (options.products === undefined || options.products.has(key)))
  for (const [key, p] of wanted) {
    // what is timed: a product through tfjs's BatchMatMul with the candidate forced, or a grouped
    // part through our grouped kernels with the candidate's tiles; the reference is tfjs's
    const part = s.grouped.get(key)
    const task = part === undefined ? plainTask(tf, s, p) : groupedTask(tf, s, part)
    // checked on one pair of operands and timed on another, both drawn afresh for every tuning:
    // the output of a kernel that leaves some of it unwritten holds what its buffer from tfjs's
    // pool held (a timed product, another tuning's), never the product it is checked against; and
    // the checked outputs stay alive (out of the pool) until the shape is done
    const [ca, cb] = task.operands()
    const [a, b] = task.operands()
    const us: Record<string, number> = {}
    const rejected: Record<string, number> = {}
    const failed: Record<string, string> = {}
    const owned: Array<Tensor> = [ca, cb, a, b, ...task.owned]
    try {
      const reference = task.reference(ca, cb)
      owned.push(reference)
      const scale = await valueOf(tf, () => tf.max(tf.abs(reference)))
      // a grouped product's kernel is one of ours (tfjs's is the reference: it cannot read a table)
      for (const c of s.candidates.filter((c) => c.covers(p) && (part === undefined || (c !== s.stock && parseTiles(c.name) !== undefined)))) {
        if (s.generation !== generation) return []
        const product = (x: Tensor, y: Tensor) => task.run(c, x, y)
        let out: Tensor | undefined
        const error = await deviceError(tf, () => owned.push(out = product(ca, cb)))
        if (error !== undefined || out === undefined) {
          failed[c.name] = error ?? "no result"
          continue
        }
        const checked: Tensor = out
        const worst = await valueOf(tf, () => tf.max(tf.abs(tf.sub(checked, reference))))
        if (!(worst <= 1e-3 * Math.max(scale, 1e-6))) {
          rejected[c.name] = worst
          continue
        }
        if (s.generation !== generation) return []
        if (timestamps) {
          const timing = (await tf.time(() => {
            for (let i = 0; i < reps; i++) tf.dispose(product(a, b))
          })) as unknown as { kernelMs: number }
          us[c.name] = Number(((timing.kernelMs / reps) * 1000).toFixed(2))
        } else {
          const t0 = performance.now()
          const made = Array.from({ length: reps }, () => product(a, b))
          await made[made.length - 1]!.data()
          us[c.name] = Number((((performance.now() - t0) / reps) * 1000).toFixed(2))
          tf.dispose(made)
        }
      }
    } finally {
      // (another mode set meanwhile has already cleared it)
      if (s.generation === generation) s.forced = undefined
      tf.dispose(owned)
    }
    if (s.generation !== generation) return []
    const best = Object.entries(us).sort((x, y) => x[1] - y[1])[0]?.[0]
    const kernel = s.candidates.find((c) => c.name === best) ?? s.stock
    s.chosen.set(key, kernel)
    // none of ours for a grouped part: the fallback's products run from now on, with tfjs's kernel
    // as a run that first meets them after tuning does; kept as choices, so that a run resumed
    // from a checkpoint, which meets them at its first step, does not tune them into others
    if (part !== undefined && kernel === s.stock) {
      for (const q of fallbackProducts(part)) if (!s.chosen.has(productKey(q))) s.chosen.set(productKey(q), s.stock)
    }
    rows.push({ product: key, chosen: kernel.name, us, rejected, failed })
  }
  s.report.push(...rows)
  return rows
}

interface ErrorScopes {
  readonly device: {
    pushErrorScope: (filter: "validation" | "out-of-memory" | "internal") => void
    popErrorScope: () => Promise<{ readonly message: string } | null>
  }
}

/**
 * Runs `f` (which issues GPU work through tfjs) with its commands in a submission of their own
 * inside validation, out-of-memory and internal error scopes; the first error's message, if any.
 * An exception from `f` is reported as its message too.
 */
const deviceError = async (tf: Tf, f: () => void): Promise<string | undefined> => {
  const { device } = tf.backend() as unknown as ErrorScopes
  submitPending(tf)
  const filters = ["internal", "out-of-memory", "validation"] as const
  for (const filter of filters) device.pushErrorScope(filter)
  const message = (e: unknown) => (e instanceof Error ? e.message : String(e))
  let thrown: string | undefined
  try {
    f()
  } catch (e) {
    thrown = message(e)
  } finally {
    // what f encoded, also before it threw, is submitted inside the scopes
    try {
      submitPending(tf)
    } catch (e) {
      thrown ??= message(e)
    }
  }
  const errors: Array<string> = []
  for (const _ of filters) {
    const e = await device.popErrorScope()
    if (e !== null) errors.push(e.message.split("\n")[0]!)
  }
  return thrown ?? errors[0]
}


/** The one number of a scalar made by `f`, read asynchronously. */
const valueOf = async (tf: Tf, f: () => Tensor): Promise<number> => {
  const t = tf.tidy(f)
  try {
    return (await t.data())[0]!
  } finally {
    t.dispose()
  }
}

/** How many products use each kernel now, e.g. `{ "128x128x8/8x8/v4": 5, tfjs: 2 }`. */
export const matMulChoices = (tf: Tf): Record<string, number> => {
  const counts: Record<string, number> = {}
  const state = stateOf(tf)
  if (state === undefined) return counts
  for (const [key, p] of state.seen) {
    // a grouped product that falls back runs as the gathers and products that are counted themselves
    const name = key.startsWith("grouped ") ? groupedKernel(state, p, key) : kernelFor(state, p, key).name
    if (name === undefined) continue
    counts[name] = (counts[name] ?? 0) + 1
  }
  return counts
}

/**
 * One line for a log: how many products each kernel won, the time the tuned kernels save, and the
 * candidates left out (refused by the device, or computing something else) with how many shapes.
 */
export const describeTuning = (rows: ReadonlyArray<TuneRow>): string => {
  const wins = new Map<string, number>()
  let stock = 0
  let best = 0
  for (const r of rows) {
    wins.set(r.chosen, (wins.get(r.chosen) ?? 0) + 1)
    // like with like: the shapes where tfjs's kernel was timed too (not the grouped products)
    if (r.us["tfjs"] === undefined) continue
    stock += r.us["tfjs"]
    best += r.us[r.chosen] ?? 0
  }
  const counted = (m: Map<string, number>) => [...m].sort((a, b) => b[1] - a[1]).map(([k, n]) => `${k} ×${n}`).join(", ")
  const gain = stock > 0 && best > 0 ? `; ${(stock / 1000).toFixed(2)} → ${(best / 1000).toFixed(2)} ms for one of each (tfjs's kernel → chosen)` : ""
  // candidates left out, by why, with how many shapes each was left out of
  const leftOut = (pick: (r: TuneRow) => ReadonlyArray<string>, why: string) => {
    const m = new Map<string, number>()
    for (const r of rows) for (const k of pick(r)) m.set(k, (m.get(k) ?? 0) + 1)
    return m.size === 0 ? "" : `; ${why}: ${counted(m)}`
  }
  const refused = leftOut((r) => Object.keys(r.failed), "refused by the device")
  const wrong = leftOut((r) => Object.keys(r.rejected), "results unlike tfjs's")
  return `tuned ${rows.length} product shape(s): ${counted(wins)}${gain}${refused}${wrong}`
}

/** The tuner's choices now, product key → kernel name (`tfjs` for tfjs's kernel); empty unless `auto`. */
export const tunedChoices = (tf: Tf): Record<string, string> => {
  const state = stateOf(tf)
  return state === undefined || state.mode !== "auto" ? {} : Object.fromEntries([...state.chosen].map(([key, k]) => [key, k.name]))
}

/**
 * Takes choices that {@link tunedChoices} gave (e.g. stored with a checkpoint), so that a resumed run
 * computes with the kernels the original run had from step 1 on, and does not tune them again.
 * Only in `auto` mode (a fixed mode keeps its kernel). Returns how many were taken, and the kernel
 * names it does not know (their products are tuned as usual).
 */
export const takeChoices = (tf: Tf, choices: Readonly<Record<string, string>>): { readonly taken: number; readonly unknown: ReadonlyArray<string> } => {
  const s = stateOf(tf)
  if (s === undefined || s.mode !== "auto") return { taken: 0, unknown: [] }
  let taken = 0
  const unknown: Array<string> = []
  for (const [key, name] of Object.entries(choices)) {
    const tiles = name === "tfjs" ? undefined : parseTiles(name)
    if (name !== "tfjs" && tiles === undefined) {
      unknown.push(name)
      continue
    }
    s.chosen.set(key, tiles === undefined ? s.stock : s.candidates.find((c) => c.name === name) ?? tiledKernel(tf, tiles))
    taken++
  }
  return { taken, unknown }
}

/**
 * Grouped products, for the MoE grouped dispatch (`blocks/MoE.ts`): `x [G, T, a]` (T rows of one
 * expert per group) times the matrix of each group's expert in `w [E, a, b]`, as `groups [G]`
 * names them (float32 whole numbers, ascending) → `[G, T, b]`, differentiable in x and w, without
 * first gathering the groups' matrices (`[G, a, b]`: G·a·b floats per matrix, 64 MiB for 512
 * groups of 2048×16 and more for a large model). The product reads `w[groups[g]]` in place; dx is
 * the same product with wᵀ; dw[e] = Σ over e's groups of x_gᵀ·dy_g, one product per expert whose K
 * runs over its groups' rows (found by bisection in `groups`): no per-group partials, no atomics,
 * the same sums every run.
 *
 * Each of the three runs with the tiles the tuner chose for it (kept under `grouped …` keys, see
 * {@link tunedChoices}): the tuner times our grouped programs themselves, on groups spread evenly
 * over the experts, and checks each against tfjs's gathered products (only our kernels compete);
 * before tuning a default of ours runs, and a fixed kernel where it covers the product. `fallback` (the gathers and batched products) computes it off webgpu, with
 * `CONCEPTMOE_FUSED=off` or `CONCEPTMOE_MATMUL=tfjs`, and where the tuner found none of our
 * kernels valid for one of the three (then the fallback's products keep tfjs's kernel, and a
 * resumed run takes that choice with the others).
 */
export const makeGroupedMatMul = (tf: Tf, fallback: (x: Tensor, w: Tensor, groups: Tensor) => Tensor) => {
  if (!fusedOn(tf) || !registerGrouped(tf)) return fallback
  return (x: Tensor, w: Tensor, groups: Tensor): Tensor => {
    const [G, T, a] = x.shape as [number, number, number]
    const [E, , b] = w.shape as [number, number, number]
    const tiles = groupedTiles(tf, { G, T, a, b, E })
    if (tiles === undefined) return fallback(x, w, groups)
    // the table is saved with the inputs: tfjs frees a pass's other tensors before its backward
    const f = tf.customGrad(((x2: Tensor, w2: Tensor, save: (ts: Array<Tensor>) => void) => {
      save([x2, w2, groups])
      return {
        value: runKernel(tf, groupedKernels.product, { a: x2, b: w2, q: groups }, { tiles: tiles.forward, transposeB: false }),
        gradFunc: (dy: Tensor, [sx, sw, sq]: Array<Tensor>) => [
          runKernel(tf, groupedKernels.product, { a: dy, b: sw!, q: sq! }, { tiles: tiles.dx, transposeB: true }),
          runKernel(tf, groupedKernels.sum, { a: sx!, b: dy, q: sq! }, { tiles: tiles.dw, experts: E })
        ]
      }
    }) as unknown as Parameters<Tf["customGrad"]>[0])
    return f(x, w) as Tensor
  }
}

const groupedKernels = { product: "ConceptmoeGroupedMatMul", sum: "ConceptmoeGroupedMatMulSum" } as const

/**
 * The batched products of the shapes of a grouped product and its two gradients, for their keys
 * and for which tiles cover them: `G` groups of `T` rows of `a` features, experts `[E, a, b]`; an
 * expert's weight gradient with a K of its mean rows, up to a multiple of 4 (it runs over each
 * expert's own rows).
 */
export const groupedProducts = (G: number, T: number, a: number, b: number, E: number) => ({
  forward: { batchA: G, batchB: G, m: T, n: b, k: a, transposeA: false, transposeB: false },
  dx: { batchA: G, batchB: G, m: T, n: a, k: b, transposeA: false, transposeB: true },
  dw: { batchA: E, batchB: E, m: a, n: b, k: 4 * Math.ceil((G * T) / E / 4), transposeA: true, transposeB: false }
}) satisfies Record<string, Product>

/** The key under which a grouped product's choice is kept. */
export const groupedKey = (p: Product): string => `grouped ${productKey(p)}`

/**
 * Our tiles for each of a grouped product's parts (noted as products seen, for the tuner), or
 * undefined where any of them has none (see {@link makeGroupedMatMul}).
 */
const groupedTiles = (tf: Tf, shape: GroupedShape): Record<GroupedPart["role"], string> | undefined => {
  const s = stateOf(tf)
  if (s === undefined) return undefined
  const out: Partial<Record<GroupedPart["role"], string>> = {}
  let all = true
  const products = groupedProducts(shape.G, shape.T, shape.a, shape.b, shape.E)
  for (const role of ["forward", "dx", "dw"] as const) {
    const p = products[role]
    const key = groupedKey(p)
    noteSeen(s, key, p)
    s.grouped.set(key, { ...shape, role })
    const name = groupedKernel(s, p, key)
    if (name === undefined) all = false
    else out[role] = name
  }
  return all ? out as Record<GroupedPart["role"], string> : undefined
}

/**
 * The batched products that the fallback of a grouped product (the gathered matrices, see
 * {@link makeGroupedMatMul}) runs for it and its two gradients.
 */
const fallbackProducts = ({ G, T, a, b, E }: GroupedShape): ReadonlyArray<Product> => {
  // the forward product and the input gradient as the grouped ones; the weight gradient per group
  const { forward, dx } = groupedProducts(G, T, a, b, E)
  return [forward, dx, { batchA: G, batchB: G, m: a, n: b, k: T, transposeA: true, transposeB: false }]
}

/** A grouped product's shape: G groups of T rows of a features, experts `[E, a, b]`. */
interface GroupedShape {
  readonly G: number
  readonly T: number
  readonly a: number
  readonly b: number
  readonly E: number
}

/** One of a grouped product's three parts: the product, its input gradient, its weight gradient. */
interface GroupedPart extends GroupedShape {
  readonly role: "forward" | "dx" | "dw"
}

/**
 * The kernel of a grouped product's part: in `auto` the tuner's choice once tuned (none where it
 * found none of ours valid), until then a default of ours (as every fused kernel, tested on the
 * reference backend); a fixed kernel where it covers the product, else the default; none in `tfjs`.
 */
const groupedKernel = (s: State, p: Product, key: string): string | undefined => {
  if (s.mode === "tfjs") return undefined
  const k = s.mode === "auto" ? s.chosen.get(key) : s.fixed
  if (k === undefined || (s.mode !== "auto" && !k.covers(p))) return defaultTiles(p)
  return k !== s.stock && parseTiles(k.name) !== undefined && k.covers(p) ? k.name : undefined
}

/** Our default kernel for a product: vec4 where it covers it; 32 rows tall for up to 32 rows, else 64. */
const defaultTiles = (p: Product): string =>
  [p.m <= 32 ? "32x32x16/4x4/v4" : "64x64x16/4x4/v4", "32x32x32/4x4"].find((n) => {
    const t = parseTiles(n)!
    return !t.vec4 || (p.m % 4 === 0 && p.n % 4 === 0 && p.k % 4 === 0)
  })!

/** Registers the grouped kernels for webgpu (once); false where the backend cannot run our programs. */
const registerGrouped = (tf: Tf): boolean => {
  if (typeof (tf.backend() as unknown as Partial<WebGpuBackend>).runWebGPUProgram !== "function") return false
  if (tf.getKernel(groupedKernels.product, "webgpu") !== undefined) return true
  const info = (args: KernelArgs, name: string) => args.inputs[name] as TF.TensorInfo
  type Attrs = { tiles: string; transposeB: boolean; experts: number }
  // each kernel: its inputs a, b, q and attributes → a program's output and its shape
  const register = (kernelName: string, run: (a: TF.TensorInfo, b: TF.TensorInfo, q: TF.TensorInfo, attrs: Attrs, backend: WebGpuBackend) => TF.TensorInfo) =>
    tf.registerKernel({
      kernelName,
      backendName: "webgpu",
      kernelFunc: ((args: KernelArgs) =>
        run(info(args, "a"), info(args, "b"), info(args, "q"), args.attrs as unknown as Attrs, args.backend as WebGpuBackend)) as never
    })
  // a [G, T, K] · b[q[g]] ([E, K, N], or [E, N, K] transposed) → [G, T, N]
  register(groupedKernels.product, (a, b, q, { tiles, transposeB }, backend) => {
    const [G, T, k] = a.shape as [number, number, number]
    const n = transposeB ? b.shape[1]! : b.shape[2]!
    const p: Product = { batchA: G, batchB: b.shape[0]!, m: T, n, k, transposeA: false, transposeB }
    return { ...runTiled(backend, parseTiles(tiles)!, G, p, "gather", [a, b, q]), shape: [G, T, n] }
  })
  // Σ over expert e's groups g of a[g]ᵀ · b[g], for a [G, T, M], b [G, T, N] → [E, M, N]
  register(groupedKernels.sum, (a, b, q, { tiles, experts }, backend) => {
    const [G, T, m] = a.shape as [number, number, number]
    const n = b.shape[2]!
    const p: Product = { batchA: 1, batchB: 1, m, n, k: G * T, transposeA: true, transposeB: false }
    const rows = (x: TF.TensorInfo, cols: number) => ({ ...x, shape: [1, G * T, cols] })
    return { ...runTiled(backend, parseTiles(tiles)!, experts, p, "segment", [rows(a, m), rows(b, n), q]), shape: [experts, m, n] }
  })
  return true
}
