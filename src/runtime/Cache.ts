/**
 * Growable per-row buffers for KV caches and other decode state.
 *
 * A buffer is one float32 tensor `[rows, capacity, width]`, preallocated and doubled when a row
 * outgrows it. Where the backend provides a writable view of a tensor's storage (`Ops.ts`: the cpu
 * backend's typed array, wasm's view of its heap), new elements are written in place, so an append
 * costs only the new elements. Where it provides a device-side row write (webgpu: a small WGSL kernel
 * in tfjs's command stream, `webgpu/Scatter.ts`), they are scattered into the tensor's GPU buffer
 * without a read-back, and growing pads on the device. Other backends (tensorflow) keep a host copy
 * and upload the whole buffer again after an append: correct, but O(capacity) per append (see
 * docs/inference.md).
 *
 * @since 0.2.0
 */
import type { RowBuffer, Tensor, Tensor2D, Tf } from "../graph/Apply.ts"
import { backendOps } from "./Ops.ts"

/**
 * Creates an empty buffer of `rows` rows of `width` floats, with room for `initial` per row.
 * Layout `rows` stores `[rows, capacity, width]`; `columns` stores `[rows, width, capacity]` (each
 * feature's positions contiguous: keys ready as Kᵀ for a product, with no transpose per step).
 */
export const rowBuffer = (tf: Tf, rows: number, width: number, initial = 16, layout: "rows" | "columns" = "rows"): RowBuffer => {
  let capacity = Math.max(1, initial)
  const lengths = new Array<number>(rows).fill(0)
  const shape = (cap: number): [number, number, number] => (layout === "rows" ? [rows, cap, width] : [rows, width, cap])
  const { storage, scatterRows } = backendOps(tf)
  const storageOf = (t: Tensor) => storage?.(t)
  const onGpu = scatterRows !== undefined
  const allocate = (cap: number, from?: Float32Array) =>
    tf.keep(from === undefined && onGpu ? tf.zeros(shape(cap)) : tf.tensor3d(from ?? new Float32Array(rows * cap * width), shape(cap)))
  let store = allocate(capacity)
  const inPlace = onGpu || storageOf(store) !== undefined
  // the host copy for backends without writable storage
  let host: Float32Array | undefined = inPlace ? undefined : new Float32Array(rows * capacity * width)
  let stale = false
  const view = (): Float32Array => (host ?? storageOf(store)!)
  // contiguous runs of stored values: one per row (rows layout) or per row and feature (columns)
  const runs = layout === "rows" ? rows : rows * width
  const grow = (needed: number) => {
    let cap = capacity
    while (cap < needed) cap *= 2
    if (onGpu) {
      // pad the capacity axis on the device (O(size), once per doubling)
      const next = tf.keep(tf.pad(store, layout === "rows" ? [[0, 0], [0, cap - capacity], [0, 0]] : [[0, 0], [0, 0], [0, cap - capacity]]))
      store.dispose()
      store = next
      capacity = cap
      return
    }
    const old = view()
    const next = new Float32Array(rows * cap * width)
    for (let r = 0; r < runs; r++) {
      const b = layout === "rows" ? r : Math.floor(r / width)
      const held = layout === "rows" ? lengths[b]! * width : lengths[b]!
      const stride = layout === "rows" ? width : 1
      next.set(old.subarray(r * capacity * stride, r * capacity * stride + held), r * cap * stride)
    }
    store.dispose()
    capacity = cap
    if (host !== undefined) {
      host = next
      store = allocate(cap, next)
    } else {
      store = allocate(cap)
      storageOf(store)!.set(next)
    }
  }
  const current = () => {
    if (stale) {
      store.dispose()
      store = allocate(capacity, host)
      stale = false
    }
    return store
  }
  return {
    rows,
    width,
    layout,
    get lengths() {
      return lengths
    },
    get capacity() {
      return capacity
    },
    // the checks below are invariants between blocks and their caches (blocks compute the counts
    // and shapes from a piece that the session has checked), not something an input can cause
    append(x, counts) {
      if (counts.length !== rows) throw new Error(`append: ${counts.length} row counts for a buffer of ${rows} rows`)
      const total = counts.reduce((a, c) => a + c, 0)
      if (total === 0) return
      if (onGpu) {
        if (x.size !== total * width) throw new Error(`append: expected ${total}×${width} values, got ${x.size}`)
        const needed = Math.max(...lengths.map((l, b) => l + counts[b]!))
        if (needed > capacity) grow(needed)
        const rowOf = new Int32Array(total)
        const posOf = new Int32Array(total)
        let t = 0
        counts.forEach((n, b) => {
          for (let i = 0; i < n; i++, t++) {
            rowOf[t] = b
            posOf[t] = lengths[b]! + i
          }
          lengths[b]! += n
        })
        scatterRows(store, tf.reshape(x, [total, width]), rowOf, posOf, capacity, layout === "columns")
        return
      }
      const data = x.dataSync() as Float32Array
      if (data.length !== total * width) throw new Error(`append: expected ${total}×${width} values, got ${data.length}`)
      const needed = Math.max(...lengths.map((l, b) => l + counts[b]!))
      if (needed > capacity) grow(needed)
      const out = view()
      let offset = 0
      for (let b = 0; b < rows; b++) {
        const n = counts[b]!
        if (n === 0) continue
        if (layout === "rows") {
          out.set(data.subarray(offset * width, (offset + n) * width), (b * capacity + lengths[b]!) * width)
        } else {
          for (let i = 0; i < n; i++) {
            const pos = lengths[b]! + i
            for (let w = 0; w < width; w++) out[(b * width + w) * capacity + pos] = data[(offset + i) * width + w]!
          }
        }
        lengths[b]! += n
        offset += n
      }
      if (host !== undefined) stale = true
    },
    store: current,
    row(b) {
      const len = lengths[b]!
      return (layout === "rows"
        ? tf.reshape(tf.slice(current(), [b, 0, 0], [1, len, width]), [len, width])
        : tf.reshape(tf.slice(current(), [b, 0, 0], [1, width, len]), [width, len])) as Tensor2D
    },
    all() {
      const len = lengths[0] ?? 0
      if (lengths.some((l) => l !== len)) throw new Error(`all: rows hold different lengths (${lengths.join(", ")})`)
      return tf.slice(current(), [0, 0, 0], layout === "rows" ? [rows, len, width] : [rows, width, len])
    },
    truncate(to) {
      to.forEach((l, b) => {
        if (l > lengths[b]!) throw new Error(`truncate: row ${b} holds ${lengths[b]}, not ${l}`)
        lengths[b] = l
      })
    },
    dispose() {
      store.dispose()
    }
  }
}

/** Bytes a buffer holds allocated (float32). */
export const bufferBytes = (b: RowBuffer): number => b.rows * b.capacity * b.width * 4
