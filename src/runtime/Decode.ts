/**
 * Incremental decoding: prefill a batch of prompts, then decode one token at a time, with caches.
 *
 * A session runs the lowered graph on each new piece of every row (`feed`), with a
 * {@link DecodeCache} in the forward context: attention layers append to their KV caches (one per
 * loop pass), the chunk module keeps each row's previous token, a concept stage keeps its pending
 * merge and runs the concept model only on the concepts the piece closed (per row: rows close
 * concepts at different steps), and the dechunk carries its EMA. In evaluation mode the logits equal
 * a full forward pass over the same tokens (tested to 1e-4).
 *
 * @since 0.2.0
 */
import type { DecodeCache, RowBuffer, Tensor, Tensor2D } from "../graph/Apply.ts"
import type { AnyBlock } from "../graph/Block.ts"
import { joinPath } from "../graph/Analyze.ts"
import { ContextOverflow, InvalidInput, NeedsFeedAsync, NotDecodable, Unsupported } from "../internal/RunErrors.ts"
import { syncReads } from "./Backend.ts"
import { bufferBytes, rowBuffer } from "./Cache.ts"
import { forward, type ForwardOptions, type Lowered, PendingRead } from "./Lower.ts"
import { backendOps } from "./Ops.ts"

export { ContextOverflow, NeedsFeedAsync, NotDecodable } from "../internal/RunErrors.ts"

export interface SessionOptions {
  /** Rows decoded together. */
  readonly rows: number
  /** Longest row the session accepts (the model's context length); unbounded by default. */
  readonly maxLength?: number
  /**
   * Boundaries imposed on concept stages instead of the chunk module's decisions (benchmarks that
   * need an exact ratio); position 0 is always a boundary.
   */
  readonly forcedBoundary?: (row: number, position: number) => boolean
  /** Initial cache capacity per row, in positions (grown by doubling). */
  readonly initialCapacity?: number
  /**
   * MoE dispatch (see `MoE.Dispatch`). By default `fitted` on wasm: a piece's pairs in as many
   * groups as its routing needs, a fixed number of kernels per layer whatever the top-k, where
   * `sparse` runs each chosen expert as its own kernels (decode steps of `bench inference`'s models
   * 1.3–1.6× faster; 4096-token prompts as fast or faster, with a third of the kernels, though
   * each expert's rows are padded to whole groups); elsewhere the runtime's default.
   */
  readonly dispatch?: ForwardOptions["dispatch"]
}

export interface CacheBytes {
  readonly total: number
  readonly used: number
  readonly byScope: ReadonlyMap<string, { readonly allocated: number; readonly used: number }>
}

export interface Session {
  readonly rows: number
  /** Tokens consumed per row. */
  readonly length: number
  /**
   * Runs the next `n` tokens of every row (`ids` row-major, `rows·n`); returns their logits
   * `[rows·n, vocab]`, which the caller disposes.
   */
  feed(ids: Int32Array, n: number): Tensor2D
  /**
   * {@link feed} for backends that read only asynchronously (webgpu in Node): a piece that needs a
   * host value (a concept stage's boundaries) stops at that read, the caches forget what it
   * appended, the value is read with `await`, and the piece runs again with it. Same logits.
   */
  feedAsync(ids: Int32Array, n: number): Promise<Tensor2D>
  /** Feeds `n` tokens per row in pieces of at most `chunk`; returns the last position's logits `[rows, vocab]`. */
  prefill(ids: Int32Array, n: number, chunk?: number): Tensor2D
  /** {@link prefill} through {@link feedAsync}. */
  prefillAsync(ids: Int32Array, n: number, chunk?: number): Promise<Tensor2D>
  /**
   * Bytes of the KV caches: `total` allocated (capacity), `used` holding entries, and both by node
   * scope (a looped layer has one scope per pass).
   */
  cacheBytes(): CacheBytes
  /** Tokens and concepts seen by concept stages so far. */
  readonly compression: { readonly tokens: number; readonly concepts: number }
  dispose(): void
}

/** Checks that every kind of the graph declares how it runs on a stream. */
export const checkDecodable = (root: AnyBlock): void => {
  const walk = (b: AnyBlock, path: string) => {
    if (b.kind.stream === undefined) throw new NotDecodable({ path, kind: b.kind.name })
    b.children.forEach((c, i) => walk(c, joinPath(path, c.name ?? `${i}`)))
  }
  walk(root, "")
}

/** Opens a decoding session on a lowered model (evaluation mode). */
export const session = (m: Lowered, options: SessionOptions): Session => {
  checkDecodable(m.analysis.root)
  const { tf } = m
  const sync = syncReads(tf)
  const rows = options.rows
  const dispatch = options.dispatch ?? backendOps(tf).dispatch?.decode
  const { cache, states, buffers } = sessionCache(tf, options)
  let length = 0
  const compression = { tokens: 0, concepts: 0 }
  const check = (ids: Int32Array, n: number) => checkPiece(ids, n, rows, length, options.maxLength)
  /** Runs a piece with host reads through `read`; commits the session's counters when it completes. */
  const run = (ids: Int32Array, n: number, read: ((t: Tensor) => Float32Array | Int32Array) | undefined): Tensor2D => {
    const positions = new Int32Array(rows * n)
    for (let r = 0; r < rows; r++) for (let i = 0; i < n; i++) positions[r * n + i] = length + i
    const logits = tf.tidy(() => {
      try {
        const { ctx, logits } = forward(m, { rows, length: n, ids }, {
          training: false,
          seed: 0,
          cache,
          positions,
          ...(read === undefined ? {} : { read }),
          ...(dispatch === undefined ? {} : { dispatch })
        })
        compression.tokens += ctx.compression.tokens
        compression.concepts += ctx.compression.concepts
        return logits
      } catch (e) {
        // the tensor to read must outlive this scope
        if (e instanceof PendingRead) throw new PendingRead(tf.keep(e.tensor))
        throw e
      }
    })
    length += n
    return logits
  }
  /** {@link run}; if the piece stops half-way, the caches forget what it appended (see feedAsync). */
  let broken: string | undefined
  const attempt = (ids: Int32Array, n: number, read: ((t: Tensor) => Float32Array | Int32Array) | undefined): Tensor2D => {
    if (broken !== undefined) {
      throw new Unsupported({ at: "decoding session", problem: `it stopped in the middle of a piece (${broken}) and cannot go on; open a new one` })
    }
    const lengths = new Map([...buffers.values()].flat().map((b) => [b, [...b.lengths]] as const))
    try {
      return run(ids, n, read)
    } catch (e) {
      // caches made during the stopped run (its first piece) start empty again
      for (const b of [...buffers.values()].flat()) b.truncate(lengths.get(b) ?? b.lengths.map(() => 0))
      // a piece stopped at its first read has changed nothing else; any other stop may have moved
      // block state (the chunk module's last key, a pending merge, the EMA) that cannot be undone
      if (!(e instanceof PendingRead || e instanceof NeedsFeedAsync)) broken = (e as Error).message ?? String(e)
      throw e
    }
  }
  const feed = (ids: Int32Array, n: number): Tensor2D => {
    check(ids, n)
    return attempt(ids, n, sync ? undefined : () => {
      throw new NeedsFeedAsync({ backend: tf.getBackend() })
    })
  }
  const feedAsync = async (ids: Int32Array, n: number): Promise<Tensor2D> => {
    check(ids, n)
    const values: Array<Float32Array | Int32Array> = []
    for (;;) {
      let pending: Tensor
      try {
        let i = 0
        return attempt(ids, n, (t) => {
          if (i < values.length) {
            const v = values[i++]!
            // an invariant of this session (the same piece reads the same tensors), not an input
            if (v.length !== t.size) throw new Error(`a replayed read of ${v.length} values for a tensor of ${t.size}`)
            return v
          }
          // before its first read a piece has only appended to caches, which attempt undoes; a
          // later read could follow changes to block state that a second run would repeat
          if (i > 0) {
            throw new Unsupported({ at: "feedAsync", problem: "decoding asynchronously takes at most one host read per piece; use dense or grouped MoE dispatch" })
          }
          throw new PendingRead(t)
        })
      } catch (e) {
        if (!(e instanceof PendingRead)) throw e
        pending = e.tensor
      }
      try {
        values.push((await pending.data()) as Float32Array | Int32Array)
      } finally {
        pending.dispose()
      }
    }
  }
  const piecesOf = (ids: Int32Array, n: number, chunk: number) => promptPieces(ids, n, rows, chunk)
  const lastOf = (logits: Tensor2D, len: number) => lastPositions(tf, logits, rows, len)
  return {
    rows,
    get length() {
      return length
    },
    feed,
    feedAsync,
    prefill: (ids, n, chunk = 512) => {
      let last: Tensor2D | undefined
      for (const [piece, len] of piecesOf(ids, n, chunk)) {
        last?.dispose()
        last = lastOf(feed(piece, len), len)
      }
      return last!
    },
    prefillAsync: async (ids, n, chunk = 512) => {
      let last: Tensor2D | undefined
      for (const [piece, len] of piecesOf(ids, n, chunk)) {
        last?.dispose()
        last = lastOf(await feedAsync(piece, len), len)
      }
      return last!
    },
    cacheBytes: () => cacheBytesOf(buffers),
    compression,
    dispose: () => disposeCaches(tf, states, buffers)
  }
}

/**
 * The {@link DecodeCache} of a session: block state by scope, and the row buffers each scope made
 * (so that their bytes can be counted and a stopped piece's appends undone).
 */
const sessionCache = (tf: Lowered["tf"], options: SessionOptions) => {
  const states = new Map<string, unknown>()
  const buffers = new Map<string, Array<RowBuffer>>()
  let scope = ""
  const cache: DecodeCache = {
    rows: options.rows,
    state: <A>(s: string, init: () => A): A => {
      if (!states.has(s)) {
        scope = s
        states.set(s, init())
      }
      return states.get(s) as A
    },
    buffer: (r, width, layout) => {
      const b = rowBuffer(tf, r, width, options.initialCapacity ?? 64, layout)
      const list = buffers.get(scope) ?? []
      list.push(b)
      buffers.set(scope, list)
      return b
    },
    forcedBoundary: options.forcedBoundary === undefined
      ? undefined
      : (row, position) => position === 0 || options.forcedBoundary!(row, position)
  }
  return { cache, states, buffers }
}

/** Checks a piece of `n` tokens per row for a session of `rows` rows that has consumed `length`. */
const checkPiece = (ids: Int32Array, n: number, rows: number, length: number, maxLength: number | undefined): void => {
  if (!Number.isInteger(n) || n <= 0) throw new InvalidInput({ input: "feed n (tokens per row)", expected: "a whole number ≥ 1", got: `${n}` })
  if (ids.length !== rows * n) throw new InvalidInput({ input: "feed ids", expected: `rows × n = ${rows}×${n} = ${rows * n} ids`, got: `${ids.length}` })
  if (maxLength !== undefined && length + n > maxLength) throw new ContextOverflow({ length: length + n, maxLength })
}

/** The pieces of at most `chunk` tokens per row of a prompt `ids [rows, n]`. */
const promptPieces = (ids: Int32Array, n: number, rows: number, chunk: number): Array<readonly [Int32Array, number]> => {
  if (!Number.isInteger(n) || n <= 0) throw new InvalidInput({ input: "prefill n (tokens per row)", expected: "a whole number ≥ 1", got: `${n}` })
  if (ids.length !== rows * n) throw new InvalidInput({ input: "prefill ids", expected: `rows × n = ${rows}×${n} = ${rows * n} ids`, got: `${ids.length}` })
  if (!Number.isInteger(chunk) || chunk <= 0) throw new InvalidInput({ input: "prefill chunk", expected: "a whole number of tokens ≥ 1", got: `${chunk}` })
  const out: Array<readonly [Int32Array, number]> = []
  for (let s = 0; s < n; s += chunk) {
    const len = Math.min(chunk, n - s)
    const piece = new Int32Array(rows * len)
    for (let r = 0; r < rows; r++) piece.set(ids.subarray(r * n + s, r * n + s + len), r * len)
    out.push([piece, len])
  }
  return out
}

/** Each row's last position of a piece's logits `[rows, vocab]`; frees the piece's logits. */
const lastPositions = (tf: Lowered["tf"], logits: Tensor2D, rows: number, len: number): Tensor2D => {
  const last = tf.tidy(() => tf.gather(logits, tf.tensor1d(Array.from({ length: rows }, (_, r) => r * len + len - 1), "int32")) as Tensor2D)
  logits.dispose()
  return last
}

/** Bytes of a session's row buffers, allocated and used, in all and by scope. */
const cacheBytesOf = (buffers: ReadonlyMap<string, ReadonlyArray<RowBuffer>>): CacheBytes => {
  const byScope = new Map<string, { allocated: number; used: number }>()
  let total = 0
  let used = 0
  for (const [s, list] of buffers) {
    const allocated = list.reduce((a, b) => a + bufferBytes(b), 0)
    const held = list.reduce((a, b) => a + b.lengths.reduce((x, l) => x + l, 0) * b.width * 4, 0)
    byScope.set(s, { allocated, used: held })
    total += allocated
    used += held
  }
  return { total, used, byScope }
}

/** Frees a session's row buffers and the tensors its blocks keep in their state. */
const disposeCaches = (tf: Lowered["tf"], states: Map<string, unknown>, buffers: Map<string, Array<RowBuffer>>): void => {
  for (const list of buffers.values()) for (const b of list) b.dispose()
  // block state holds kept tensors (the chunk module's key, the pending sum, the EMA); buffers are freed above
  for (const st of states.values()) {
    for (const v of Object.values(st as Record<string, unknown>)) if (v instanceof tf.Tensor) v.dispose()
  }
  buffers.clear()
  states.clear()
}
