/**
 * Appends to decode buffers on webgpu (`../Cache.ts`): a small WGSL kernel scatters new rows into a
 * buffer tensor's GPU storage in place, encoded into tfjs's command stream (no read-back). The
 * webgpu backend provides it when it loads (`../Ops.ts`).
 *
 * @since 0.4.0
 */
import type { Tensor, Tf } from "../../graph/Apply.ts"

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
export const scatterRows = (tf: Tf) => (store: Tensor, x: Tensor, rowOf: Int32Array, posOf: Int32Array, capacity: number, columns: boolean): void => {
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
