/**
 * A small WebAssembly assembler: the instructions our wasm kernels use, as byte arrays, and a module
 * of exported functions that imports one memory (tfjs-backend-wasm's heap, so that a kernel reads
 * and writes tensors where they lie). Only what `Gemm.ts` needs; each instruction is named after its
 * WebAssembly text form.
 *
 * @since 0.4.0
 */

export type Code = ReadonlyArray<number>

/** Unsigned LEB128. */
export const uleb = (n: number): Array<number> => {
  const out: Array<number> = []
  let v = n >>> 0
  do {
    const byte = v & 0x7f
    v >>>= 7
    out.push(v === 0 ? byte : byte | 0x80)
  } while (v !== 0)
  return out
}

/** Signed LEB128 (32-bit). */
export const sleb = (n: number): Array<number> => {
  const out: Array<number> = []
  let v = n | 0
  for (;;) {
    const byte = v & 0x7f
    v >>= 7
    if ((v === 0 && (byte & 0x40) === 0) || (v === -1 && (byte & 0x40) !== 0)) {
      out.push(byte)
      return out
    }
    out.push(byte | 0x80)
  }
}

const vec = (items: ReadonlyArray<Code>): Array<number> => [...uleb(items.length), ...items.flat()]
const name = (s: string): Array<number> => vec([...new TextEncoder().encode(s)].map((b) => [b]))
const section = (id: number, body: Code): Array<number> => [id, ...uleb(body.length), ...body]

export const i32 = 0x7f
export const f32 = 0x7d
export const f64 = 0x7c
export const v128 = 0x7b
type ValueType = typeof i32 | typeof f32 | typeof f64 | typeof v128

// control
export const block = (...body: ReadonlyArray<Code>): Code => [0x02, 0x40, ...body.flat(), 0x0b]
export const loop = (...body: ReadonlyArray<Code>): Code => [0x03, 0x40, ...body.flat(), 0x0b]
export const if_ = (cond: Code, then: ReadonlyArray<Code>, otherwise: ReadonlyArray<Code> = []): Code =>
  otherwise.length === 0 ? [...cond, 0x04, 0x40, ...then.flat(), 0x0b] : [...cond, 0x04, 0x40, ...then.flat(), 0x05, ...otherwise.flat(), 0x0b]
export const br = (depth: number): Code => [0x0c, ...uleb(depth)]
export const brIf = (depth: number): Code => [0x0d, ...uleb(depth)]

// locals and globals
export const get = (i: number): Code => [0x20, ...uleb(i)]
export const set = (i: number): Code => [0x21, ...uleb(i)]
export const tee = (i: number): Code => [0x22, ...uleb(i)]
export const globalGet = (i: number): Code => [0x23, ...uleb(i)]

// i32
export const const32 = (n: number): Code => [0x41, ...sleb(n)]
export const add = [0x6a] as Code
export const sub = [0x6b] as Code
export const mul = [0x6c] as Code
export const ltS = [0x48] as Code
export const geS = [0x4e] as Code
export const eq = [0x46] as Code
export const gtS = [0x4a] as Code
export const and = [0x71] as Code
export const shl = [0x74] as Code
export const ltU = [0x49] as Code
export const remU = [0x70] as Code
export const divU = [0x6e] as Code
export const eqz = [0x45] as Code
export const i32Load = (offset = 0): Code => [0x28, 2, ...uleb(offset)]
/** `select`: of two values, the first where the condition (on top) is non-zero. */
export const select = [0x1b] as Code

/** `for (i = 0; i < limit; i += step) body` over the i32 locals i and limit. */
export const forUp = (i: number, limit: number, step: number, body: ReadonlyArray<Code>): Code =>
  [...const32(0), ...set(i), ...block(loop(get(i), get(limit), geS, brIf(1), ...body, get(i), const32(step), add, set(i), br(0)))]

// f32 scalars
export const f32Load = (offset = 0): Code => [0x2a, 2, ...uleb(offset)]
export const f32Store = (offset = 0): Code => [0x38, 2, ...uleb(offset)]
export const f32Zero: Code = [0x43, 0, 0, 0, 0]
export const f32Const = (x: number): Code => [0x43, ...new Uint8Array(new Float32Array([x]).buffer)]
export const i32TruncF32S: Code = [0xa8]
export const f64PromoteF32: Code = [0xbb]
export const f32Add = [0x92] as Code
export const f32Sub = [0x93] as Code
export const f32Mul = [0x94] as Code
export const f32Div = [0x95] as Code
/** NaN-propagating maximum. */
export const f32Max = [0x97] as Code
export const f64Add = [0xa0] as Code

// 128-bit SIMD
const simd = (op: number, ...immediates: ReadonlyArray<number>): Code => [0xfd, ...uleb(op), ...immediates]
export const v128Load = (offset = 0): Code => simd(0x00, 4, ...uleb(offset))
export const v128Store = (offset = 0): Code => simd(0x0b, 4, ...uleb(offset))
/** Loads one f32 into all four lanes. */
export const load32Splat = (offset = 0): Code => simd(0x09, 2, ...uleb(offset))
export const v128Zero: Code = simd(0x0c, ...new Array<number>(16).fill(0))
/** Four copies of a float32 constant. */
export const f32x4Const = (x: number): Code => simd(0x0c, ...new Uint8Array(new Float32Array([x, x, x, x]).buffer))
/** Four float32 constants, lane by lane. */
export const f32x4Lanes = (xs: readonly [number, number, number, number]): Code => simd(0x0c, ...new Uint8Array(new Float32Array(xs).buffer))
/** Four copies of an int32 constant. */
export const i32x4Const = (x: number): Code => simd(0x0c, ...new Uint8Array(new Int32Array([x, x, x, x]).buffer))
export const f32x4ExtractLane = (lane: number): Code => simd(0x1f, lane)
export const v128And = simd(0x4e)
export const v128Bitselect = simd(0x52)
/** a & ~b */
export const v128AndNot = simd(0x4f)
export const f32x4Lt = simd(0x43)
export const f32x4Ge = simd(0x46)
export const f32x4Nearest = simd(0x6a)
export const i32x4Shl = simd(0xab)
export const i32x4ShrU = simd(0xad)
export const i32x4Add = simd(0xae)
export const i32x4Sub = simd(0xb1)
export const v128Or = simd(0x50)
export const f32x4Gt = simd(0x44)
export const f32x4ConvertI32x4S = simd(0xfa)
export const f32x4Abs = simd(0xe0)
export const f32x4Neg = simd(0xe1)
export const f32x4Min = simd(0xe8)
export const f32x4Max = simd(0xe9)
/** Pseudo-minimum b < a ? b : a (one minps; NaN in a passes). */
export const f32x4Pmin = simd(0xea)
/** Pseudo-maximum a < b ? b : a (one maxps; NaN in a passes). */
export const f32x4Pmax = simd(0xeb)
export const i32x4TruncSatF32x4S = simd(0xf8)
export const f32x4Splat = simd(0x13)
export const f32x4Sqrt = simd(0xe3)
export const f32x4Add = simd(0xe4)
export const f32x4Sub = simd(0xe5)
export const f32x4Mul = simd(0xe6)
export const f32x4Div = simd(0xe7)
/** The low two lanes of an f32x4 as an f64x2. */
export const f64x2PromoteLowF32x4 = simd(0x5f)
/** Each f64 lane rounded to f32, in the low two lanes (the high two zero). */
export const f32x4DemoteF64x2Zero = simd(0x5e)
export const f64x2Splat = simd(0x14)
export const f64x2Add = simd(0xf0)
export const f64x2Mul = simd(0xf2)
export const f64x2ExtractLane = (lane: number): Code => simd(0x21, lane)
/** Of two vectors' 32 bytes, the 16 named by `lanes` (0–15 the first's, 16–31 the second's). */
export const i8x16Shuffle = (lanes: ReadonlyArray<number>): Code => simd(0x0d, ...lanes)
/** Lanes 2, 3 of a vector in lanes 0, 1 (to promote a vector's high half to f64x2). */
export const highHalf = i8x16Shuffle([8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7])
/** The low halves of two vectors as one (two f32x4.demote_f64x2_zero results joined). */
export const joinLowHalves = i8x16Shuffle([0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23])
/** Relaxed SIMD: the truncation of f32 lanes to i32 (as cvttps2dq: out of range lanes are unspecified). */
export const i32x4RelaxedTruncF32x4S = simd(0x101)
/** Relaxed SIMD: a·b + c, fused where the hardware has an FMA (one rounding), else two roundings. */
export const f32x4RelaxedMadd = simd(0x105)

/** A function of the module: its name, parameters (a count of i32s, or their types), its result (none if absent), extra locals and body. */
export interface Func {
  readonly name: string
  readonly params: number | ReadonlyArray<ValueType>
  readonly result?: ValueType
  readonly locals: ReadonlyArray<readonly [count: number, type: ValueType]>
  readonly body: ReadonlyArray<Code>
}

/**
 * The binary of a module that imports `env.memory` and exports `functions` (each returns nothing or its `result`).
 */
/**
 * Vector constants held in a module's mutable v128 globals. TurboFan re-materialises a known vector
 * constant at every use, even one set into a local before a loop (it schedules the constant, and
 * anything pure computed from it, where it is used): three instructions a use, two of them on the
 * shuffle port (the exact GELU's loop, fifteen constants, ran at 18 cycles a vector; Liftoff's code
 * at 12). A `global.get` is a load, which stays where it is: a local set from it before the loop
 * holds the constant in a register or a stack slot. `get(c)` pushes the global holding `c` (a
 * v128.const's code, one global per distinct constant); `inits` goes to {@link moduleBytes}.
 */
export const vectorConstants = () => {
  const inits: Array<Code> = []
  const index = new Map<string, number>()
  return {
    get: (c: Code): Code => {
      const key = c.join(",")
      let i = index.get(key)
      if (i === undefined) {
        i = inits.length
        inits.push(c)
        index.set(key, i)
      }
      return globalGet(i)
    },
    inits: (): ReadonlyArray<Code> => inits
  }
}
export type VectorConstants = ReturnType<typeof vectorConstants>

/** A module of `functions`, exported by name, importing `env.memory`; `globals`: mutable v128 globals' initial values (see {@link vectorConstants}). */
export const moduleBytes = (functions: ReadonlyArray<Func>, globals: ReadonlyArray<Code> = []): Uint8Array<ArrayBuffer> => {
  const types = functions.map((f) => [0x60, ...vec((typeof f.params === "number" ? new Array<ValueType>(f.params).fill(i32) : f.params).map((t) => [t])), ...(f.result === undefined ? [0] : [1, f.result])])
  const bodies = functions.map((f) => {
    const code = [...vec(f.locals.map(([count, type]) => [...uleb(count), type])), ...f.body.flat(), 0x0b]
    return [...uleb(code.length), ...code]
  })
  return new Uint8Array([
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00,
    ...section(1, vec(types)),
    ...section(2, vec([[...name("env"), ...name("memory"), 0x02, 0x00, 0x01]])),
    ...section(3, vec(functions.map((_, i) => uleb(i)))),
    ...(globals.length === 0 ? [] : section(6, vec(globals.map((init) => [v128, 0x01, ...init, 0x0b])))),
    ...section(7, vec(functions.map((f, i) => [...name(f.name), 0x00, ...uleb(i)]))),
    ...section(10, vec(bodies))
  ])
}
