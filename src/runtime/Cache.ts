/**
 * Growable per-row buffers for KV caches and other decode state.
 *
 * A buffer is one float32 tensor `[rows, capacity, width]`, preallocated and doubled when a row
 * outgrows it. On the cpu and wasm backends new elements are written in place into the tensor's
 * storage (the backend's typed array, or its view of the wasm heap), so an append costs only the
 * new elements. On webgpu a small WGSL kernel scatters them into the tensor's GPU buffer, in tfjs's
 * command stream (no read-back), and growing pads on the device. Other backends (tensorflow) keep a
 * host copy and upload the whole buffer again after an append: correct, but O(capacity) per append
 * (see docs/inference.md).
 *
 * @since 0.2.0
 */
import type { RowBuffer, Tensor, Tensor2D, Tf } from "../graph/Apply.ts"

/** A writable view of a float32 tensor's storage, where the backend allows one. */
const storageOf = (tf: Tf, t: Tensor): Float32Array | undefined => {
  const name = tf.getBackend()
  const backend = tf.backend() as unknown as {
    data?: { get: (id: unknown) => { values?: unknown } }
    typedArrayFromHeap?: (t: Tensor) => Float32Array
  }
  if (name === "cpu") {
    const values = backend.data?.get(t.dataId).values
    return values instanceof Float32Array && values.length === t.size ? values : undefined
  }
  if (name === "wasm" && backend.typedArrayFromHeap !== undefined) return backend.typedArrayFromHeap(t)
  return undefined
}

/* The parts of WebGPU and tfjs-backend-webgpu that the device-side append uses. */
interface GpuBuffer {
  readonly size: number
}
interface WebGpuBackend {
  device: {
    createShaderModule: (d: { code: string }) => unknown
    createComputePipeline: (d: { layout: "auto"; compute: { module: unknown; entryPoint: string } }) => { getBindGroupLayout: (i: number) => unknown }
    createBindGroup: (d: { layout: unknown; entries: Array<{ binding: number; resource: { buffer: GpuBuffer } }> }) => unknown
  }
  bufferManager: {
    acquireBuffer: (size: number, usage: number, mappedAtCreation: boolean, reuse: boolean) => GpuBuffer & { getMappedRange: () => ArrayBuffer; unmap: () => void }
  }
  commandEncoder: { beginComputePass: () => { setPipeline: (p: unknown) => void; setBindGroup: (i: number, g: unknown) => void; dispatchWorkgroups: (x: number, y?: number) => void; end: () => void } }
  tensorMap: { get: (dataId: unknown) => { resource: unknown; values: unknown } }
  commandQueueOwnedIds: { add: (dataId: unknown) => void }
  uploadToGPU: (dataId: unknown) => void
  ensureCommandEncoderReady: () => void
  endComputePassEncoder: () => void
  stagingPendingDisposal: Array<unknown>
}

/** One element per invocation: store[dst(t, w)] = x[t·width + w], dst from the token's row and position. */
const scatterShader = `
@group(0) @binding(0) var<storage, read> x : array<f32>;
@group(0) @binding(1) var<storage, read_write> store : array<f32>;
@group(0) @binding(2) var<storage, read> info : array<i32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id : vec3<u32>, @builtin(num_workgroups) groups : vec3<u32>) {
  let total = info[0];
  let width = info[1];
  let capacity = info[2];
  let columns = info[3];
  let i = i32(id.x + id.y * groups.x * 64u);
  if (i >= total * width) { return; }
  let t = i / width;
  let w = i % width;
  let row = info[4 + t];
  let pos = info[4 + total + t];
  var dst : i32;
  if (columns == 1) { dst = (row * width + w) * capacity + pos; } else { dst = (row * capacity + pos) * width + w; }
  store[dst] = x[i];
}`

const pipelines = new WeakMap<object, { getBindGroupLayout: (i: number) => unknown }>()

/**
 * Writes `x [total, width]` into `store`'s GPU buffer in place: token t goes to row `rowOf[t]`,
 * position `posOf[t]`. Encoded into tfjs's command stream, so it runs after the kernel that made `x`
 * and before any later kernel that reads `store`.
 */
const scatterOnGpu = (tf: Tf, store: Tensor, x: Tensor, rowOf: Int32Array, posOf: Int32Array, capacity: number, columns: boolean) => {
  const be = tf.backend() as unknown as WebGpuBackend
  const device = be.device
  let pipeline = pipelines.get(device)
  if (pipeline === undefined) {
    pipeline = device.createComputePipeline({ layout: "auto", compute: { module: device.createShaderModule({ code: scatterShader }), entryPoint: "main" } })
    pipelines.set(device, pipeline)
  }
  const total = rowOf.length
  const width = x.shape[1]!
  const buffer = (t: Tensor) => {
    be.uploadToGPU(t.dataId)
    const d = be.tensorMap.get(t.dataId)
    d.values = null
    // as tfjs does for a program's tensors: a disposal waits for the submit
    be.commandQueueOwnedIds.add(t.dataId)
    return d.resource as GpuBuffer
  }
  const meta = Int32Array.from([total, width, capacity, columns ? 1 : 0, ...rowOf, ...posOf])
  // STORAGE | COPY_DST, filled at creation; destroyed after the next submit, like tfjs's staging buffers
  const metaBuffer = be.bufferManager.acquireBuffer(meta.byteLength, 0x80 | 0x08, true, false)
  new Int32Array(metaBuffer.getMappedRange()).set(meta)
  metaBuffer.unmap()
  const group = device.createBindGroup({
    layout: pipeline.getBindGroupLayout(0),
    entries: [buffer(x), buffer(store), metaBuffer].map((b, binding) => ({ binding, resource: { buffer: b } }))
  })
  be.ensureCommandEncoderReady()
  be.endComputePassEncoder()
  const pass = be.commandEncoder.beginComputePass()
  pass.setPipeline(pipeline)
  pass.setBindGroup(0, group)
  const groups = Math.ceil((total * width) / 64)
  pass.dispatchWorkgroups(Math.min(groups, 65535), Math.ceil(groups / 65535))
  pass.end()
  be.stagingPendingDisposal.push(metaBuffer)
}

/**
 * Creates an empty buffer of `rows` rows of `width` floats, with room for `initial` per row.
 * Layout `rows` stores `[rows, capacity, width]`; `columns` stores `[rows, width, capacity]` (each
 * feature's positions contiguous: keys ready as Kᵀ for a product, with no transpose per step).
 */
export const rowBuffer = (tf: Tf, rows: number, width: number, initial = 16, layout: "rows" | "columns" = "rows"): RowBuffer => {
  let capacity = Math.max(1, initial)
  const lengths = new Array<number>(rows).fill(0)
  const shape = (cap: number): [number, number, number] => (layout === "rows" ? [rows, cap, width] : [rows, width, cap])
  const onGpu = tf.getBackend() === "webgpu"
  const allocate = (cap: number, from?: Float32Array) =>
    tf.keep(from === undefined && onGpu ? tf.zeros(shape(cap)) : tf.tensor3d(from ?? new Float32Array(rows * cap * width), shape(cap)))
  let store = allocate(capacity)
  const inPlace = onGpu || storageOf(tf, store) !== undefined
  // the host copy for backends without writable storage
  let host: Float32Array | undefined = inPlace ? undefined : new Float32Array(rows * capacity * width)
  let stale = false
  const view = (): Float32Array => (host ?? storageOf(tf, store)!)
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
      storageOf(tf, store)!.set(next)
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
        scatterOnGpu(tf, store, tf.reshape(x, [total, width]), rowOf, posOf, capacity, layout === "columns")
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
