/**
 * Record a step once on the webgpu backend, then replay its GPU commands without tfjs.
 *
 * tfjs spends tens of µs of host time on every op (kernel lookup, tape, uniforms, a bind group, a
 * buffer from the pool), and a training step issues hundreds of them; PyTorch eager spends a few.
 * Our graphs are static once the host decisions are fixed, so the commands a step sends to the GPU
 * are the same every step: `capture` runs the step once through tfjs while recording, at the
 * WebGPU API, every pipeline, bind group, dispatch and copy, and `Captured.run` re-encodes them in
 * one command buffer. Like a CUDA graph:
 *
 * - the step's host values must come through **feeds**, tensors made before the capture whose
 *   buffers `run` overwrites (`queue.writeBuffer`); everything else the step uploads is taken to
 *   be constant. `captureStatic` checks that by capturing twice and comparing every upload and
 *   every dispatch, and refuses (`NotCapturable`) a step whose uploads change;
 * - during a capture, buffers are not reused within the step (no aliasing, so the recording can
 *   run as one command buffer, and the constants uploaded during the capture stay in place); the
 *   recording keeps them out of tfjs's pool until `dispose` (more memory, as a CUDA graph's pool);
 * - **state** (every tfjs variable the step assigns: parameters, Adam moments) reads from the
 *   buffers it had before the capture and writes to new ones; `run` copies the new values back, so
 *   the variables keep pointing at their latest values, readable as usual;
 * - a read-back, a timestamp query or a new variable inside the step cannot be captured.
 *
 * @since 0.3.0
 */
import type { Tensor, Tf } from "../graph/Apply.ts"

/** Why a step cannot be recorded or replayed. */
export class NotCapturable extends Error {
  readonly _tag = "NotCapturable"
}

/* The parts of WebGPU and of tfjs-backend-webgpu that capture touches. */
interface GpuBuffer {
  readonly size: number
  readonly usage: number
  getMappedRange: (offset?: number, size?: number) => ArrayBuffer
  unmap: () => void
  destroy: () => void
}
interface ComputePass {
  setPipeline: (p: unknown) => void
  setBindGroup: (index: number, group: unknown, offsets?: Iterable<number>) => void
  dispatchWorkgroups: (x: number, y?: number, z?: number) => void
  dispatchWorkgroupsIndirect: (...a: Array<unknown>) => void
  end: () => void
}
interface CommandEncoder {
  beginComputePass: (desc?: { timestampWrites?: unknown }) => ComputePass
  copyBufferToBuffer: (src: GpuBuffer, srcOffset: number, dst: GpuBuffer, dstOffset: number, size: number) => void
  clearBuffer: (buffer: GpuBuffer, offset?: number, size?: number) => void
  resolveQuerySet: (...a: Array<unknown>) => void
  finish: () => unknown
}
interface Device {
  createCommandEncoder: () => CommandEncoder
  createBuffer: (desc: { size: number; usage: number; mappedAtCreation?: boolean }) => GpuBuffer
  createBindGroup: (desc: { entries: Array<{ resource: { buffer?: GpuBuffer } }> }) => unknown
}
interface Queue {
  writeBuffer: (buffer: GpuBuffer, offset: number, data: ArrayBufferView | ArrayBuffer, dataOffset?: number, size?: number) => void
  submit: (buffers: Array<unknown>) => void
}
interface TensorData {
  resource: unknown
  values: unknown
}
interface BufferManager {
  acquireBuffer: (size: number, usage: number, mappedAtCreation?: boolean, reuse?: boolean) => GpuBuffer
  releaseBuffer: (buffer: GpuBuffer, reuse?: boolean) => void
  freeBuffers: Map<string, Array<GpuBuffer>>
  usedBuffers: Map<string, Array<GpuBuffer>>
  numFreeBuffers: number
  numBytesAllocated: number
}
interface Backend {
  device: Device
  queue: Queue
  bufferManager: BufferManager
  tensorMap: { get: (dataId: unknown) => TensorData | undefined }
  commandEncoder: unknown
  uploadToGPU: (dataId: unknown) => void
  read: (dataId: unknown) => unknown
  readSync: (dataId: unknown) => unknown
  endComputePassEncoder: () => void
  submitQueue: () => void
}

const MAP_READ = 0x0001
const MAP_WRITE = 0x0002

type PassCommand =
  | { readonly op: "pipeline"; readonly pipeline: unknown }
  | { readonly op: "bind"; readonly index: number; readonly group: unknown; readonly offsets: Array<number> | undefined }
  | { readonly op: "dispatch"; readonly x: number; readonly y: number; readonly z: number }
type Command =
  | { readonly op: "pass"; readonly commands: Array<PassCommand> }
  | { readonly op: "copy"; readonly src: GpuBuffer; readonly srcOffset: number; readonly dst: GpuBuffer; readonly dstOffset: number; readonly size: number }
  | { readonly op: "clear"; readonly buffer: GpuBuffer; readonly offset: number | undefined; readonly size: number | undefined }

/** A recorded step. */
export interface Captured {
  /** Compute dispatches per run. */
  readonly dispatches: number
  /** Host uploads the recording made (constants, kept in place). */
  readonly uploads: number
  /** The tensors the step returned (kept; `run` writes their new values into them). */
  readonly outputs: ReadonlyArray<Tensor>
  /** Writes each feed's new values, replays the commands, copies the state back. */
  run: (feeds: ReadonlyArray<readonly [Tensor, Float32Array | Int32Array]>) => void
  /** Frees the recording's buffers (those no live tensor owns) and the outputs. */
  dispose: () => void
}

/**
 * Writes host values into feed tensors on webgpu (their buffers, in queue order before anything
 * submitted later), as `Captured.run` does, for the steps that run through tfjs.
 */
export const writeFeeds = (tf: Tf, values: ReadonlyArray<readonly [Tensor, Float32Array | Int32Array]>): void => {
  const be = tf.backend() as unknown as Backend
  // uploading a tensor may encode a copy that tfjs has not submitted: submit before writing over it
  const buffers = values.map(([t]) => bufferOf(be, t))
  flush(be)
  values.forEach(([t, data], i) => {
    if (data.length !== t.size) throw new NotCapturable(`a feed of ${t.size} elements got ${data.length}`)
    be.queue.writeBuffer(buffers[i]!, 0, data)
    const d = be.tensorMap.get((t as unknown as { dataId: unknown }).dataId)
    if (d !== undefined) d.values = null
  })
}

/** Buffers kept out of tfjs's pool, with how many recordings hold each. */
const pins = new Map<GpuBuffer, number>()
const patchedManagers = new WeakSet<BufferManager>()

/** Keeps pinned buffers out of the pool when tfjs releases them (installed once per manager). */
const guardPool = (bm: BufferManager) => {
  if (patchedManagers.has(bm)) return
  patchedManagers.add(bm)
  const release = bm.releaseBuffer.bind(bm)
  bm.releaseBuffer = (buffer, reuse = true) => {
    if (!pins.has(buffer)) return release(buffer, reuse)
    // a recording still uses it: do tfjs's bookkeeping, then take it back out of the pool
    release(buffer, true)
    unpool(bm, buffer)
  }
}

const unpool = (bm: BufferManager, buffer: GpuBuffer) => {
  for (const list of bm.freeBuffers.values()) {
    const i = list.indexOf(buffer)
    if (i >= 0) {
      list.splice(i, 1)
      bm.numFreeBuffers--
      return
    }
  }
}

const bufferOf = (be: Backend, t: Tensor): GpuBuffer => {
  const dataId = (t as unknown as { dataId: unknown }).dataId
  be.uploadToGPU(dataId)
  const d = be.tensorMap.get(dataId)
  if (d === undefined || d.resource === null || typeof d.resource !== "object") throw new NotCapturable("a feed or variable has no GPU buffer")
  return d.resource as GpuBuffer
}

/** Submits what tfjs has encoded so far. */
const flush = (be: Backend) => {
  if (be.commandEncoder !== null && be.commandEncoder !== undefined) {
    be.endComputePassEncoder()
    be.submitQueue()
  }
}

const variablesOf = (tf: Tf): Array<Tensor> =>
  Object.values((tf.engine() as unknown as { state: { registeredVariables: Record<string, Tensor> } }).state.registeredVariables)

/**
 * Runs `step` once through tfjs on webgpu while recording its GPU commands; `feeds` are the tensors
 * whose values change between runs. `step` returns the tensors to keep (its outputs).
 */
export const capture = (tf: Tf, feeds: ReadonlyArray<Tensor>, step: () => ReadonlyArray<Tensor>): Captured => {
  if (tf.getBackend() !== "webgpu") throw new NotCapturable(`capture needs the webgpu backend, not ${tf.getBackend()}`)
  const be = tf.backend() as unknown as Backend
  const bm = be.bufferManager
  guardPool(bm)
  const feedBuffers = new Map(feeds.map((t) => [t, bufferOf(be, t)] as const))
  const variables = variablesOf(tf)
  const before = new Map(variables.map((v) => [v, bufferOf(be, v)] as const))
  flush(be)

  const held = new Set<GpuBuffer>([...feedBuffers.values(), ...before.values()])
  const uploads: Array<Uint8Array> = []
  const staged = new Map<GpuBuffer, Uint8Array>()
  const encoded = new Map<unknown, Array<Command>>()
  const commands: Array<Command> = []
  let failure: string | undefined
  const fail = (why: string): never => {
    failure ??= why
    throw new NotCapturable(why)
  }

  const device = be.device
  const queue = be.queue
  const saved = {
    createCommandEncoder: device.createCommandEncoder,
    createBuffer: device.createBuffer,
    createBindGroup: device.createBindGroup,
    writeBuffer: queue.writeBuffer,
    submit: queue.submit,
    acquire: bm.acquireBuffer,
    read: be.read,
    readSync: be.readSync,
    cpuForward: tf.env().getBool("WEBGPU_CPU_FORWARD")
  }
  const readBack = function(this: Backend, dataId: unknown) {
    const d = this.tensorMap.get(dataId)
    // values already on the host are not a read-back
    if (d?.values !== null && d?.values !== undefined) return d.values
    return fail("the step reads a tensor back to the host")
  }
  be.read = readBack
  be.readSync = readBack
  device.createBuffer = function(desc) {
    const b = saved.createBuffer.call(this, desc)
    if ((desc.usage & (MAP_READ | MAP_WRITE)) === 0) held.add(b)
    if (desc.mappedAtCreation === true) {
      const ranges: Array<ArrayBuffer> = []
      const getMappedRange = b.getMappedRange.bind(b)
      const unmap = b.unmap.bind(b)
      b.getMappedRange = (offset?: number, size?: number) => {
        const r = getMappedRange(offset, size)
        ranges.push(r)
        return r
      }
      b.unmap = () => {
        const bytes = new Uint8Array(ranges.reduce((n, r) => n + r.byteLength, 0))
        let o = 0
        for (const r of ranges) {
          bytes.set(new Uint8Array(r), o)
          o += r.byteLength
        }
        if ((b.usage & MAP_WRITE) !== 0) staged.set(b, bytes)
        else uploads.push(bytes)
        unmap()
      }
    }
    return b
  }
  device.createBindGroup = function(desc) {
    for (const e of desc.entries) if (e.resource.buffer !== undefined) held.add(e.resource.buffer)
    return saved.createBindGroup.call(this, desc)
  }
  device.createCommandEncoder = function() {
    const enc = saved.createCommandEncoder.call(this)
    const mine: Array<Command> = []
    const begin = enc.beginComputePass.bind(enc)
    const copy = enc.copyBufferToBuffer.bind(enc)
    const clear = enc.clearBuffer.bind(enc)
    const finish = enc.finish.bind(enc)
    enc.beginComputePass = (desc) => {
      if (desc?.timestampWrites !== undefined) fail("the step is being profiled (timestamp queries)")
      const pass = begin(desc)
      const recorded: Array<PassCommand> = []
      mine.push({ op: "pass", commands: recorded })
      const setPipeline = pass.setPipeline.bind(pass)
      const setBindGroup = pass.setBindGroup.bind(pass)
      const dispatch = pass.dispatchWorkgroups.bind(pass)
      pass.setPipeline = (pipeline) => {
        recorded.push({ op: "pipeline", pipeline })
        setPipeline(pipeline)
      }
      pass.setBindGroup = (index, group, offsets) => {
        const o = offsets === undefined ? undefined : [...offsets]
        recorded.push({ op: "bind", index, group, offsets: o })
        if (o === undefined) setBindGroup(index, group)
        else setBindGroup(index, group, o)
      }
      pass.dispatchWorkgroups = (x, y = 1, z = 1) => {
        recorded.push({ op: "dispatch", x, y, z })
        dispatch(x, y, z)
      }
      pass.dispatchWorkgroupsIndirect = () => fail("an indirect dispatch")
      return pass
    }
    enc.copyBufferToBuffer = (src, srcOffset, dst, dstOffset, size) => {
      const data = staged.get(src)
      if (data !== undefined) uploads.push(data.slice(srcOffset, srcOffset + size))
      else if ((dst.usage & MAP_READ) !== 0) fail("the step reads a tensor back to the host")
      else {
        mine.push({ op: "copy", src, srcOffset, dst, dstOffset, size })
        held.add(src)
      }
      held.add(dst)
      copy(src, srcOffset, dst, dstOffset, size)
    }
    enc.clearBuffer = (buffer, offset, size) => {
      mine.push({ op: "clear", buffer, offset, size })
      clear(buffer, offset, size)
    }
    enc.resolveQuerySet = () => fail("the step is being profiled (query sets)")
    enc.finish = () => {
      const done = finish()
      encoded.set(done, mine)
      return done
    }
    return enc
  }
  queue.writeBuffer = function(buffer, offset, data, dataOffset, size) {
    const view = ArrayBuffer.isView(data) ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength) : new Uint8Array(data)
    const start = dataOffset ?? 0
    uploads.push(view.slice(start, size === undefined ? undefined : start + size))
    held.add(buffer)
    if (dataOffset === undefined) saved.writeBuffer.call(this, buffer, offset, data)
    else saved.writeBuffer.call(this, buffer, offset, data, dataOffset, size)
  }
  queue.submit = function(buffers) {
    for (const b of buffers) commands.push(...(encoded.get(b) ?? []))
    saved.submit.call(this, buffers)
  }
  // no buffer reuse within the step: no aliasing, constants stay where they were uploaded
  bm.acquireBuffer = function(size, usage, mappedAtCreation, _reuse) {
    return saved.acquire.call(this, size, usage, mappedAtCreation, false)
  }
  tf.env().set("WEBGPU_CPU_FORWARD", false)

  let outputs: ReadonlyArray<Tensor> = []
  try {
    outputs = step().map((t) => tf.keep(t))
    flush(be)
  } finally {
    device.createCommandEncoder = saved.createCommandEncoder
    device.createBuffer = saved.createBuffer
    device.createBindGroup = saved.createBindGroup
    queue.writeBuffer = saved.writeBuffer
    queue.submit = saved.submit
    bm.acquireBuffer = saved.acquire
    be.read = saved.read
    be.readSync = saved.readSync
    tf.env().set("WEBGPU_CPU_FORWARD", saved.cpuForward)
  }
  if (failure !== undefined) throw new NotCapturable(failure)
  if (variablesOf(tf).length !== variables.length) throw new NotCapturable("the step created or disposed variables")
  const state: Array<readonly [GpuBuffer, GpuBuffer]> = []
  const after = new Map<Tensor, GpuBuffer>()
  for (const v of variables) {
    const b = bufferOf(be, v)
    after.set(v, b)
    if (b !== before.get(v)) state.push([b, before.get(v)!])
  }
  for (const b of held) {
    pins.set(b, (pins.get(b) ?? 0) + 1)
    unpool(bm, b)
  }
  // the recording reads the state from the buffers it had before: bring them up to date
  if (state.length > 0) {
    const enc = device.createCommandEncoder()
    for (const [from, to] of state) enc.copyBufferToBuffer(from, 0, to, 0, from.size)
    queue.submit([enc.finish()])
  }
  const dispatches = commands.reduce((n, c) => n + (c.op === "pass" ? c.commands.filter((p) => p.op === "dispatch").length : 0), 0)
  let disposed = false

  const run = (values: ReadonlyArray<readonly [Tensor, Float32Array | Int32Array]>) => {
    if (disposed) throw new NotCapturable("the recording was disposed")
    for (const [v, b] of after) {
      if (v.isDisposed || bufferOf(be, v) !== b) throw new NotCapturable("a variable was assigned outside the recorded step; capture again")
    }
    flush(be)
    for (const [t, data] of values) {
      const b = feedBuffers.get(t)
      if (b === undefined) throw new NotCapturable("a feed that was not given to capture")
      if (data.byteLength !== t.size * 4) throw new NotCapturable(`a feed of ${t.size} elements got ${data.length}`)
      queue.writeBuffer(b, 0, data)
    }
    const enc = device.createCommandEncoder()
    for (const c of commands) {
      if (c.op === "pass") {
        const pass = enc.beginComputePass()
        for (const p of c.commands) {
          if (p.op === "pipeline") pass.setPipeline(p.pipeline)
          else if (p.op === "bind") {
            if (p.offsets === undefined) pass.setBindGroup(p.index, p.group)
            else pass.setBindGroup(p.index, p.group, p.offsets)
          } else pass.dispatchWorkgroups(p.x, p.y, p.z)
        }
        pass.end()
      } else if (c.op === "copy") enc.copyBufferToBuffer(c.src, c.srcOffset, c.dst, c.dstOffset, c.size)
      else enc.clearBuffer(c.buffer, c.offset, c.size)
    }
    for (const [from, to] of state) enc.copyBufferToBuffer(from, 0, to, 0, from.size)
    queue.submit([enc.finish()])
    // values tfjs cached on the host are stale now
    for (const t of [...outputs, ...after.keys()]) {
      const d = be.tensorMap.get((t as unknown as { dataId: unknown }).dataId)
      if (d !== undefined && d.resource !== null) d.values = null
    }
  }

  const dispose = () => {
    if (disposed) return
    disposed = true
    for (const t of outputs) t.dispose()
    const owned = new Set([...bm.usedBuffers.values()].flat())
    for (const b of held) {
      const n = (pins.get(b) ?? 1) - 1
      if (n > 0) {
        pins.set(b, n)
        continue
      }
      pins.delete(b)
      if (!owned.has(b)) {
        b.destroy()
        bm.numBytesAllocated -= b.size
      }
    }
  }

  const captured: Captured = { dispatches, uploads: uploads.length, outputs, run, dispose }
  recorded.set(captured, { uploads, commands })
  return captured
}

const recorded = new WeakMap<Captured, { readonly uploads: ReadonlyArray<Uint8Array>; readonly commands: ReadonlyArray<Command> }>()

const sameBytes = (a: Uint8Array, b: Uint8Array) => a.length === b.length && a.every((x, i) => x === b[i])

/** The work of a recording: each dispatch's pipeline and size, in order. */
const workOf = (commands: ReadonlyArray<Command>): Array<PassCommand | "copy" | "clear"> =>
  commands.flatMap((c): Array<PassCommand | "copy" | "clear"> => (c.op === "pass" ? c.commands.filter((p) => p.op !== "bind") : [c.op]))

/**
 * Whether two recordings of the same step (two consecutive steps) did the same work and uploaded
 * the same bytes: `undefined` if so, else the first difference. A step that passes is static: the
 * only host values it depends on are its feeds, and its recording can replace it.
 */
export const difference = (a: Captured, b: Captured): string | undefined => {
  const x = recorded.get(a)
  const y = recorded.get(b)
  if (x === undefined || y === undefined) return "not a recording"
  const wx = workOf(x.commands)
  const wy = workOf(y.commands)
  if (wx.length !== wy.length) return `the two steps recorded ${wx.length} and ${wy.length} commands`
  const k = wx.findIndex((c, i) => {
    const d = wy[i]!
    if (typeof c === "string" || typeof d === "string") return c !== d
    if (c.op === "pipeline" && d.op === "pipeline") return c.pipeline !== d.pipeline
    if (c.op === "dispatch" && d.op === "dispatch") return c.x !== d.x || c.y !== d.y || c.z !== d.z
    return true
  })
  if (k >= 0) return `the two steps differ at command ${k} of ${wx.length}`
  if (x.uploads.length !== y.uploads.length) return `the two steps uploaded ${x.uploads.length} and ${y.uploads.length} host arrays`
  const i = x.uploads.findIndex((u, n) => !sameBytes(u, y.uploads[n]!))
  return i < 0 ? undefined : `the step uploads host data that changes between steps (upload ${i} of ${x.uploads.length}, ${x.uploads[i]!.length} bytes); pass it as a feed`
}
