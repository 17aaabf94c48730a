/**
 * Our kernels for tfjs-backend-webgpu: WGSL programs registered under the names of
 * `../KernelNames.ts`, which the makers of `../Fused.ts` run (that module's doc says what each one
 * replaces). Each is tested against the cpu backend's ops in tests/webgpu.test.ts (where an adapter
 * exists, or on lavapipe).
 *
 * @since 0.4.0
 */
import type * as TF from "@tensorflow/tfjs"
import type { Tf } from "../../graph/Apply.ts"
import { kernels } from "../KernelNames.ts"

/** tfjs-backend-webgpu's program interface (the fields a flat elementwise program needs). */
interface Program {
  readonly variableNames: Array<string>
  readonly outputShape: Array<number>
  readonly shaderKey: string
  readonly dispatchLayout: { x: Array<number>; y?: Array<number> }
  readonly dispatch: [number, number, number]
  readonly workgroupSize: [number, number, number]
  readonly size: boolean
  readonly uniforms: string
  getUserCode: () => string
}

interface WebGpuBackend {
  runWebGPUProgram: (p: Program, inputs: Array<TF.TensorInfo>, dtype: string, uniforms: Array<{ type: string; data: Array<number> }>) => TF.TensorInfo
}

/** A flat elementwise program over `shape`: `body` computes `value` from `index`. */
const flatProgram = (name: string, shape: Array<number>, inputs: Array<string>, uniforms: Array<string>, body: string): Program => {
  const size = shape.reduce((a, b) => a * b, 1)
  return {
    variableNames: inputs,
    outputShape: shape,
    shaderKey: name,
    dispatchLayout: { x: shape.map((_, i) => i) },
    dispatch: [Math.ceil(size / 64), 1, 1],
    workgroupSize: [64, 1, 1],
    size: true,
    uniforms: uniforms.map((u) => `${u} : f32,`).join(" "),
    getUserCode: () => `
      fn main(index : i32) {
        if (index < uniforms.size) {
          ${body}
          setOutputAtIndex(index, value);
        }
      }`
  }
}

/**
 * A program with one workgroup of 64 threads per row of its first input `[rows, width]`, whose
 * output is `[rows, width]` or, with `perRow`, `[rows, 1]`. `code` runs in every thread with `rows`,
 * `width`, `row`, `valid` (row < rows) and `t` (the thread, 0–63) defined; its barriers must stay
 * outside `if (valid)`.
 */
const rowWise = (name: string, first: string, rows: number, width: number, inputs: Array<string>, uniforms: Array<string>, perRow: boolean, code: string): Program => ({
  variableNames: inputs,
  outputShape: perRow ? [rows, 1] : [rows, width],
  shaderKey: name,
  // not flat: main() reads the workgroup and thread ids itself; rows past 65535 go to y
  dispatchLayout: { x: [0], y: [1] },
  dispatch: [Math.min(rows, 65535), Math.ceil(rows / 65535), 1],
  workgroupSize: [64, 1, 1],
  size: false,
  uniforms: uniforms.map((u) => `${u} : f32,`).join(" "),
  getUserCode: () => `
    var<workgroup> partA : array<f32, 64>;
    var<workgroup> partB : array<f32, 64>;
    fn main() {
      let rows = uniforms.${first.toLowerCase()}Shape.x;
      let width = uniforms.${first.toLowerCase()}Shape.y;
      let row = i32(workgroupId.x) + i32(workgroupId.y) * i32(numWorkgroups.x);
      let valid = row < rows;
      let t = i32(localId.x);
      ${code}
    }`
})

/** Sums `a` (and `b`) over the workgroup into `partA[0]` (and `partB[0]`), or takes their max. */
const reduceRow = (op: "sum" | "max", both: boolean) => {
  const combine = (part: string) => (op === "sum" ? `${part}[t] = ${part}[t] + ${part}[t + k];` : `${part}[t] = max(${part}[t], ${part}[t + k]);`)
  return `
      workgroupBarrier();
      for (var k = 32; k > 0; k = k / 2) {
        if (t < k) { ${combine("partA")} ${both ? combine("partB") : ""} }
        workgroupBarrier();
      }`
}

/**
 * RMSNorm's row kernels: `accumulate` adds to `sa` and `sb` for element `base` (column `c`); then
 * `write` sets `result[base]` with `r = 1/√(sa/width + eps)` and `s = sb`.
 */
const normCode = (accumulate: string, write: string) => `
      var sa = 0.0;
      var sb = 0.0;
      if (valid) {
        for (var c = t; c < width; c = c + 64) {
          let base = row * width + c;
          ${accumulate}
        }
      }
      partA[t] = sa;
      partB[t] = sb;${reduceRow("sum", true)}
      let r = inverseSqrt(partA[0] / f32(width) + uniforms.eps);
      let s = partB[0];
      if (valid) {
        for (var c = t; c < width; c = c + 64) {
          let base = row * width + c;
          ${write}
        }
      }`

/** The cross-entropy's row kernels: the row's `lse` = log Σ exp over `L`, then `write`. */
const softmaxCode = (write: string) => `
      var mx = -3.402823e38;
      if (valid) { for (var c = t; c < width; c = c + 64) { mx = max(mx, L[row * width + c]); } }
      partA[t] = mx;${reduceRow("max", false)}
      let top = partA[0];
      workgroupBarrier();
      var se = 0.0;
      if (valid) { for (var c = t; c < width; c = c + 64) { se = se + exp(L[row * width + c] - top); } }
      partA[t] = se;${reduceRow("sum", false)}
      let lse = top + log(partA[0]);
      if (valid) {
        ${write}
      }`

/**
 * Registers the webgpu kernels (when the backend loads: `Backend.load`); false, registering none,
 * if the backend's program interface is not there.
 */
export const registerWebGpuKernels = (tf: Tf): boolean => {
  const backend = tf.backend() as unknown as Partial<WebGpuBackend>
  if (typeof backend.runWebGPUProgram !== "function") return false
  if (tf.getKernel(kernels.w, "webgpu") !== undefined) return true
  const k = registrar(tf)
  registerAdam(k)
  registerNorms(k)
  registerActivations(k)
  registerRowKernels(k)
  registerCombine(k)
  registerRouting(k)
  registerSlots(k)
  registerRotary(k)
  return true
}

/** How our webgpu kernels are registered, by the shape of their program. */
interface Registrar {
  /** Registers `kernelName` for webgpu: its inputs by name, f32 uniforms from the attributes of the same names. */
  readonly register: (kernelName: string, inputs: Array<string>, uniforms: Array<string>, program: (shapes: Array<Array<number>>, attrs: Record<string, number>) => Program) => void
  /** A flat elementwise kernel over the first input's shape. */
  readonly define: (kernelName: string, inputs: Array<string>, uniforms: Array<string>, body: string) => void
  /** A kernel with a workgroup per row of the first input `[rows, width]`. */
  readonly defineRows: (kernelName: string, inputs: Array<string>, uniforms: Array<string>, perRow: boolean, code: string) => void
  /** A flat kernel whose output shape comes from the inputs' shapes. */
  readonly flat: (kernelName: string, inputs: Array<string>, out: (shapes: Array<Array<number>>) => Array<number>, body: string) => void
}

const registrar = (tf: Tf): Registrar => {
  const register = (kernelName: string, inputs: Array<string>, uniforms: Array<string>, program: (shapes: Array<Array<number>>, attrs: Record<string, number>) => Program) =>
    tf.registerKernel({
      kernelName,
      backendName: "webgpu",
      kernelFunc: ({ inputs: given, backend: b, attrs }) => {
        const xs = inputs.map((n) => given[n.toLowerCase()] as TF.TensorInfo)
        const a = attrs as unknown as Record<string, number>
        return (b as unknown as WebGpuBackend).runWebGPUProgram(program(xs.map((x) => [...x.shape]), a), xs, "float32", uniforms.map((u) => ({ type: "float32", data: [a[u]!] })))
      }
    })
  const define = (kernelName: string, inputs: Array<string>, uniforms: Array<string>, body: string) =>
    register(kernelName, inputs, uniforms, (shapes) => flatProgram(kernelName, shapes[0]!, inputs, uniforms, body))
  const defineRows = (kernelName: string, inputs: Array<string>, uniforms: Array<string>, perRow: boolean, code: string) =>
    register(kernelName, inputs, uniforms, (shapes) => rowWise(kernelName, inputs[0]!, shapes[0]![0]!, shapes[0]![1]!, inputs, uniforms, perRow, code))
  const flat = (kernelName: string, inputs: Array<string>, out: (shapes: Array<Array<number>>) => Array<number>, body: string) =>
    register(kernelName, inputs, [], (shapes) => flatProgram(kernelName, out(shapes), inputs, [], body))
  return { register, define, defineRows, flat }
}

/** AdamW's first and second moments and the weight update. */
const registerAdam = ({ define }: Registrar): void => {
  const moment = (square: boolean) => `
          let gs = G[index] * S[0];
          let value = uniforms.beta * X[index] + (1.0 - uniforms.beta) * ${square ? "gs * gs" : "gs"};`
  define(kernels.m, ["X", "G", "S"], ["beta"], moment(false))
  define(kernels.v, ["X", "G", "S"], ["beta"], moment(true))
  define(kernels.w, ["W", "M", "V", "H"], ["lrScale", "eps", "decay"], `
          let w = W[index];
          let update = (M[index] / H[1]) / (sqrt(V[index] / H[2]) + uniforms.eps);
          let value = w - H[0] * uniforms.lrScale * (update + uniforms.decay * w);`)
}

/** RMSNorm and its two gradients. */
const registerNorms = ({ defineRows }: Registrar): void => {
  const squares = "let v = X[base]; sa = sa + v * v;"
  defineRows(kernels.norm, ["X", "G"], ["eps"], false, normCode(squares, "result[base] = X[base] * r * G[c];"))
  // dx = r·g·dy − x·r³·Σ(dy·g·x)/d
  defineRows(kernels.normDx, ["X", "G", "DY"], ["eps"], false, normCode(
    "let v = X[base]; sa = sa + v * v; sb = sb + DY[base] * G[c] * v;",
    "result[base] = r * G[c] * DY[base] - X[base] * r * r * r * s / f32(width);"
  ))
  // per row: dy·x·r, summed over rows into dg by tfjs
  defineRows(kernels.normDg, ["X", "DY"], ["eps"], false, normCode(squares, "result[base] = DY[base] * X[base] * r;"))
}

/** GELU (exact) and SiLU, with their gradients. */
const registerActivations = ({ define }: Registrar): void => {
  // erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), as tfjs's own kernels
  const erf = `
          let z = abs(x) * 0.7071067811865476;
          let q = 1.0 / (1.0 + 0.3275911 * z);
          let poly = q * (0.254829592 + q * (-0.284496736 + q * (1.421413741 + q * (-1.453152027 + q * 1.061405429))));
          let erfv = sign(x) * (1.0 - poly * exp(-z * z));`
  define(kernels.gelu, ["X"], [], `
          let x = X[index];${erf}
          let value = 0.5 * x * (1.0 + erfv);`)
  // d/dx x·Φ(x) = Φ(x) + x·φ(x)
  define(kernels.geluGrad, ["X", "DY"], [], `
          let x = X[index];${erf}
          let value = DY[index] * (0.5 * (1.0 + erfv) + x * exp(-0.5 * x * x) * 0.3989422804014327);`)
  define(kernels.silu, ["X"], [], `
          let x = X[index];
          let value = x / (1.0 + exp(-x));`)
  // d/dx x·σ(x) = σ(x)·(1 + x·(1 − σ(x)))
  define(kernels.siluGrad, ["X", "DY"], [], `
          let x = X[index];
          let sg = 1.0 / (1.0 + exp(-x));
          let value = DY[index] * sg * (1.0 + x * (1.0 - sg));`)
}

/** Row kernels: the masked attention softmax and its gradient, Σx² by chunks, the masked NLL and its gradient. */
const registerRowKernels = ({ defineRows }: Registrar): void => {
  // attention rows: logits S·scale + M[row mod n]
  const logit = "S[row * width + c] * uniforms.scale + M[(row % uniforms.mShape.x) * width + c]"
  defineRows(kernels.softmax, ["S", "M"], ["scale"], false, `
      var mx = -3.402823e38;
      if (valid) { for (var c = t; c < width; c = c + 64) { mx = max(mx, ${logit}); } }
      partA[t] = mx;${reduceRow("max", false)}
      let top = partA[0];
      workgroupBarrier();
      var se = 0.0;
      if (valid) { for (var c = t; c < width; c = c + 64) { se = se + exp(${logit} - top); } }
      partA[t] = se;${reduceRow("sum", false)}
      let total = partA[0];
      if (valid) { for (var c = t; c < width; c = c + 64) { result[row * width + c] = exp(${logit} - top) / total; } }`)
  defineRows(kernels.softmaxGrad, ["P", "DP"], ["scale"], false, `
      var sa = 0.0;
      if (valid) { for (var c = t; c < width; c = c + 64) { sa = sa + P[row * width + c] * DP[row * width + c]; } }
      partA[t] = sa;${reduceRow("sum", false)}
      let dot = partA[0];
      if (valid) {
        for (var c = t; c < width; c = c + 64) {
          let i = row * width + c;
          result[i] = uniforms.scale * P[i] * (DP[i] - dot);
        }
      }`)
  // Σ x² per row (a chunk of a tensor), a workgroup each
  defineRows(kernels.sumSquares, ["X"], [], true, `
      var sa = 0.0;
      if (valid) { for (var c = t; c < width; c = c + 64) { let v = X[row * width + c]; sa = sa + v * v; } }
      partA[t] = sa;${reduceRow("sum", false)}
      if (valid && t == 0) { result[row] = partA[0]; }`)
  // a label outside [0, V) contributes nothing, as with the one-hot of the op-by-op path
  defineRows(kernels.nll, ["L", "Y", "M"], [], true, softmaxCode(`
        let y = Y[row];
        if (t == 0) { result[row] = select(0.0, M[row] * (lse - L[row * width + clamp(y, 0, width - 1)]), y >= 0 && y < width); }`))
  defineRows(kernels.nllGrad, ["L", "Y", "M", "DY"], [], false, softmaxCode(`
        let scale = select(0.0, M[row] * DY[0], Y[row] >= 0 && Y[row] < width);
        for (var c = t; c < width; c = c + 64) {
          var g = exp(L[row * width + c] - lse);
          if (c == Y[row]) { g = g - 1.0; }
          result[row * width + c] = g * scale;
        }`))
}

/** The MoE top-k mask, the repeat's gradient and the weighted combine of expert outputs with its gradients. */
const registerCombine = ({ define, flat }: Registrar): void => {
  // makeRepeat's gradient (X [o, t, m] → [o, m]) and makeCombine: Y [E, n, d], G [n, E], DY [n, d]
  // E, n, d from a rank-3 shape uniform; `value` as the sum of `term` over `v` < `count`
  const dims = (shape: string) => `let E = uniforms.${shape}.x; let n = uniforms.${shape}.y; let d = uniforms.${shape}.z;`
  const sum = (v: string, count: string, term: string) =>
    `var s = 0.0; for (var ${v} = 0; ${v} < ${count}; ${v} = ${v} + 1) { s = s + ${term}; } let value = s;`
  define(kernels.topMask, ["P"], ["k"], `
          let E = uniforms.pShape.y;
          let row = (index / E) * E;
          let e = index % E;
          let v = P[index];
          var rank = 0.0;
          for (var j = 0; j < E; j = j + 1) {
            let w = P[row + j];
            if (w > v || (w == v && j < e)) { rank = rank + 1.0; }
          }
          let value = select(0.0, 1.0, rank < uniforms.k);`)
  flat(kernels.sumMiddle, ["X"], (sh) => [sh[0]![0]!, sh[0]![2]!], `
          let t = uniforms.xShape.y; let m = uniforms.xShape.z;
          let o = index / m; let i = index % m;
          ${sum("c", "t", "X[(o * t + c) * m + i]")}`)
  flat(kernels.combine, ["Y", "G"], (sh) => [sh[0]![1]!, sh[0]![2]!], `
          ${dims("yShape")}
          let i = index / d; let j = index % d;
          ${sum("e", "E", "G[i * E + e] * Y[(e * n + i) * d + j]")}`)
  flat(kernels.combineGradY, ["G", "DY"], (sh) => [sh[0]![1]!, sh[0]![0]!, sh[1]![1]!], `
          ${dims("outShape")}
          let e = index / (n * d); let r = index % (n * d);
          let value = G[(r / d) * E + e] * DY[r];`)
  flat(kernels.combineGradG, ["Y", "DY"], (sh) => [sh[0]![1]!, sh[0]![0]!], `
          ${dims("yShape")}
          let i = index / E; let e = index % E;
          ${sum("j", "d", "Y[(e * n + i) * d + j] * DY[i * d + j]")}`)
}

/** Expert dispatch by slots: the slot of each pair, the pair of each row, the expert of each group, sums by group. */
const registerRouting = ({ register }: Registrar): void => {
  // expert dispatch by slots (makeRoute, makeSlots): M [n, E] mask, C [E] its column sums, P [E, n]
  // slots, T [rows] pairs (e·n + i), W [n, E]; a layout by capacity, or by tile (capacity 0)
  const route = (kernelName: string, tokens: boolean): void =>
    register(kernelName, ["M", "C"], ["capacity", "tile", "rows"], (shapes, a) => {
      const [n, E] = shapes[0] as [number, number]
      return {
        variableNames: ["M", "C"],
        outputShape: tokens ? [1, a["rows"]!] : [E, n],
        shaderKey: kernelName,
        // not flat: main() reads the workgroup and thread ids itself
        dispatchLayout: { x: [0], y: [1] },
        dispatch: [E, 1, 1],
        workgroupSize: [64, 1, 1],
        size: false,
        uniforms: "capacity : f32, tile : f32, rows : f32,",
        // a workgroup per expert: where its rows start and how many it has, then each thread counts
        // its run of tokens and numbers them after the counts of the runs before it
        getUserCode: () => `
    var<workgroup> counts : array<f32, 64>;
    fn main() {
      let n = uniforms.mShape.x;
      let E = uniforms.mShape.y;
      let tile = i32(uniforms.tile);
      let e = i32(workgroupId.x);
      let t = i32(localId.x);
      var first = e * i32(uniforms.capacity);
      var span = i32(uniforms.capacity);
      var room = span;
      if (tile > 0) {
        first = 0;
        for (var j = 0; j < e; j = j + 1) { first = first + ((i32(C[j]) + tile - 1) / tile) * tile; }
        span = ((i32(C[e]) + tile - 1) / tile) * tile;
        room = n;
      }
      let run = (n + 63) / 64;
      let start = min(n, t * run);
      let end = min(n, start + run);
      var count = 0.0;
      for (var i = start; i < end; i = i + 1) { count = count + M[i * E + e]; }
      counts[t] = count;
      workgroupBarrier();
      var before = 0.0;
      var total = 0.0;
      for (var j = 0; j < 64; j = j + 1) {
        if (j < t) { before = before + counts[j]; }
        total = total + counts[j];
      }
      var r = i32(before);
      for (var i = start; i < end; i = i + 1) {
        let routed = M[i * E + e] > 0.5;
        ${tokens
        ? "if (routed && r < room) { result[first + r] = f32(e * n + i); }"
        : "var v = -1.0; if (routed && r < room) { v = f32(first + r); } result[e * n + i] = v;"}
        if (routed) { r = r + 1; }
      }
      ${tokens
      ? `// the expert's empty rows, and after the last expert's the rows no expert uses
      for (var c = min(i32(total), span) + t; c < span; c = c + 64) { result[first + c] = -1.0; }
      if (e == E - 1) { for (var c = first + span + t; c < i32(uniforms.rows); c = c + 64) { result[c] = -1.0; } }`
      : ""}
    }`
      }
    })
  route(kernels.routeSlots, false)
  route(kernels.routeTokens, true)
  // each group of T rows: the first expert whose padded rows end after its first row (else the last)
  register(kernels.routeGroups, ["C"], ["tile"], (_, a) => flatProgram(kernels.routeGroups, [a["rows"]! / a["tile"]!], ["C"], ["tile"], `
          let T = i32(uniforms.tile);
          let E = uniforms.cShape;
          var found = E - 1;
          var end = 0;
          for (var j = 0; j < E; j = j + 1) {
            end = end + ((i32(C[j]) + T - 1) / T) * T;
            if (index * T < end) { found = j; break; }
          }
          let value = f32(found);`))
  // makeSlots' gatherGroups gradient: X [G, size], Q [G] experts in ascending order → [E, size],
  // an expert's groups (found by bisection) summed in order
  register(kernels.sumGroups, ["X", "Q"], [], (shapes, a) => flatProgram(kernels.sumGroups, [a["experts"]!, shapes[0]![1]!], ["X", "Q"], [], `
          let size = uniforms.xShape.y;
          let G = uniforms.xShape.x;
          let e = index / size;
          let j = index % size;
          var lo = 0;
          var hi = G;
          while (lo < hi) {
            let mid = (lo + hi) / 2;
            if (i32(Q[mid]) < e) { lo = mid + 1; } else { hi = mid; }
          }
          var s = 0.0;
          for (var g = lo; g < G; g = g + 1) {
            if (i32(Q[g]) != e) { break; }
            s = s + X[g * size + j];
          }
          let value = s;`))
}

/** Rows to slots and back (with the gate weights), and the gradient by the weights. */
const registerSlots = ({ flat }: Registrar): void => {
  // row s holds pair v = e·n + i (n: the rows of X): X's row i, times W[i, e] if weighted; zero when empty
  const toSlots = (weighted: boolean) => `
          let d = uniforms.xShape.y;
          let n = uniforms.xShape.x;
          let s = index / d;
          let v = i32(T[s]);
          var value = 0.0;
          if (v >= 0) { value = X[(v % n) * d + index % d]${weighted ? " * W[(v % n) * uniforms.wShape.y + v / n]" : ""}; }`
  flat(kernels.toSlots, ["X", "T"], (sh) => [sh[1]![0]!, sh[0]![1]!], toSlots(false))
  flat(kernels.toSlotsWeighted, ["X", "T", "W"], (sh) => [sh[1]![0]!, sh[0]![1]!], toSlots(true))
  const slotDims = "let d = uniforms.yShape.y; let E = uniforms.pShape.x; let n = uniforms.pShape.y;"
  flat(kernels.fromSlots, ["Y", "P", "W"], (sh) => [sh[1]![1]!, sh[0]![1]!], `
          ${slotDims}
          let i = index / d; let j = index % d;
          var s = 0.0;
          for (var e = 0; e < E; e = e + 1) {
            let p = i32(P[e * n + i]);
            if (p >= 0) { s = s + W[i * E + e] * Y[p * d + j]; }
          }
          let value = s;`)
  flat(kernels.fromSlotsGradW, ["Y", "P", "DY"], (sh) => [sh[1]![1]!, sh[1]![0]!], `
          ${slotDims}
          let i = index / E; let e = index % E;
          let p = i32(P[e * n + i]);
          var s = 0.0;
          if (p >= 0) { for (var j = 0; j < d; j = j + 1) { s = s + DY[i * d + j] * Y[p * d + j]; } }
          let value = s;`)
}

/** The rotary embedding and its inverse (the gradient). */
const registerRotary = ({ define }: Registrar): void => {
  // rotate-half: out1 = x1·cos ∓ x2·sin, out2 = x2·cos ± x1·sin (the lower signs undo the rotation)
  const rotation = (back: boolean) => `
          let hd = uniforms.xShape.z;
          let dim = i32(uniforms.dim);
          let half = dim / 2;
          let j = index % hd;
          let t = index / (uniforms.xShape.y * hd);
          var value = X[index];
          if (j < dim) {
            let f = j % half;
            let c = C[t * half + f];
            let sn = ${back ? "-" : ""}S[t * half + f];
            if (j < half) { value = X[index] * c - X[index + half] * sn; }
            else { value = X[index] * c + X[index - half] * sn; }
          }`
  define(kernels.rotate, ["X", "C", "S"], ["dim"], rotation(false))
  define(kernels.unrotate, ["X", "C", "S"], ["dim"], rotation(true))
}
