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
 *   be constant. `difference` checks that on two recordings of consecutive steps (every upload,
 *   every dispatch and the buffers each binds) and names the first difference;
 * - during a capture, buffers are not reused within the step (no aliasing, so the recording can
 *   run as one command buffer, and the constants uploaded during the capture stay in place); the
 *   recording keeps them out of tfjs's pool until `dispose` (more memory, as a CUDA graph's pool);
 * - **state** (every tfjs variable the step assigns: parameters, Adam moments) reads from the
 *   buffers it had before the capture and writes to new ones; `run` copies the new values back, so
 *   the variables keep pointing at their latest values, readable as usual;
 * - a read-back, a timestamp query, a new variable, or a kernel that writes into an existing tensor
 *   in place (the KV-cache scatter of decoding) inside the step cannot be captured.
 *
 * @since 0.3.0
 */
import type { Tensor, Tf } from "../../graph/Apply.ts"
import { Unsupported } from "../../internal/RunErrors.ts"
import { settingsOf } from "../Env.ts"

/**
 * Why a step cannot be recorded or replayed: control flow, not a failure (the trainer catches it and
 * runs the step through tfjs), so a plain class. `outputs` is set when the step itself ran to the end
 * (it was refused afterwards): its results, for the caller to read and free.
 */
export class NotCapturable extends Error {
  readonly _tag = "NotCapturable"
  readonly outputs: ReadonlyArray<Tensor> | undefined
  constructor(message: string, outputs?: ReadonlyArray<Tensor>) {
    super(message)
    this.outputs = outputs
  }
}

/* The parts of WebGPU and of tfjs-backend-webgpu that capture touches. */
interface GpuBuffer {
  readonly size: number
  readonly usage: number
  mapAsync: (mode: number) => Promise<void>
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
  beginComputePass: (desc?: { timestampWrites?: { querySet: QuerySet; beginningOfPassWriteIndex?: number; endOfPassWriteIndex?: number } }) => ComputePass
  copyBufferToBuffer: (src: GpuBuffer, srcOffset: number, dst: GpuBuffer, dstOffset: number, size: number) => void
  clearBuffer: (buffer: GpuBuffer, offset?: number, size?: number) => void
  resolveQuerySet: (...a: Array<unknown>) => void
  finish: () => unknown
}
interface QuerySet {
  destroy: () => void
}
interface Device {
  createQuerySet: (desc: { type: "timestamp"; count: number }) => QuerySet
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
  runWebGPUProgram: (program: { constructor: { name: string }; shaderKey?: string; outputShape?: Array<number> }, ...rest: Array<unknown>) => unknown
}

const MAP_READ = 0x0001
const MAP_WRITE = 0x0002
const COPY_DST = 0x0008
const QUERY_RESOLVE = 0x0200
const COPY_SRC = 0x0004
/** Timestamps per query set (WebGPU's limit is 4096). */
const QUERIES = 4096

type PassCommand =
  | { readonly op: "pipeline"; readonly pipeline: unknown }
  | { readonly op: "bind"; readonly index: number; readonly group: unknown; readonly offsets: Array<number> | undefined; readonly buffers: ReadonlyArray<string> }
  | { readonly op: "dispatch"; readonly x: number; readonly y: number; readonly z: number; readonly label: string }
type Command =
  | { readonly op: "pass"; readonly commands: Array<PassCommand> }
  | { readonly op: "copy"; readonly src: GpuBuffer; readonly srcOffset: number; readonly dst: GpuBuffer; readonly dstOffset: number; readonly size: number; readonly names: readonly [string, string] }
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
  /**
   * `run`, timed on the GPU with timestamp queries (the adapter must have `timestamp-query`):
   * `"step"` encodes as `run` does and times from the start of its first pass to the end of its
   * last; `"dispatches"` gives every dispatch a pass of its own and times each (the passes add
   * their own cost to the span). Resolves when the GPU is done.
   */
  profile: (feeds: ReadonlyArray<readonly [Tensor, Float32Array | Int32Array]>, detail: "step" | "dispatches") => Promise<StepProfile>
  /** Frees the recording's buffers (those no live tensor owns) and the outputs. */
  dispose: () => void
}

/** GPU time of a replayed step (see {@link Captured.profile}). */
export interface StepProfile {
  /** From the start of the first timed pass to the end of the last, in ms. */
  readonly gpuMs: number
  /** With `"dispatches"`: each dispatch's program (tfjs's class, or our kernel's name), output shape and µs. */
  readonly dispatches?: ReadonlyArray<{ readonly program: string; readonly shape: string; readonly us: number }>
}

/** The timestamp queries of one profiled replay. */
interface Timing {
  readonly detail: "step" | "dispatches"
  readonly sets: ReadonlyArray<QuerySet>
  readonly resolve: GpuBuffer
  readonly read: GpuBuffer
  readonly queries: number
}

const setBind = (pass: ComputePass, b: Extract<PassCommand, { op: "bind" }>) => {
  if (b.offsets === undefined) pass.setBindGroup(b.index, b.group)
  else pass.setBindGroup(b.index, b.group, b.offsets)
}

/** A feed takes values of its own dtype and size. */
const checkFeed = (t: Tensor, data: Float32Array | Int32Array) => {
  const dtype = data instanceof Int32Array ? "int32" : "float32"
  if (data.length !== t.size || dtype !== t.dtype) throw new NotCapturable(`a ${t.dtype} feed of ${t.size} elements got ${data.length} ${dtype} values`)
}

/** A process-wide name for a buffer made before a recording (the same object in both recordings). */
const globalNames = new WeakMap<object, number>()
let nextGlobal = 0
const globalName = (b: object) => {
  let n = globalNames.get(b)
  if (n === undefined) globalNames.set(b, n = nextGlobal++)
  return n
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
    checkFeed(t, data)
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

/** Submits the commands tfjs's webgpu backend has encoded and not yet submitted (nothing elsewhere). */
export const submitPending = (tf: Tf): void => {
  if (tf.getBackend() === "webgpu") flush(tf.backend() as unknown as Backend)
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
  const rec = newRecording(feedBuffers, variables, before)
  const outputs = recordStep(tf, be, rec, step)
  const refuse = (why: string): never => {
    releasePins(rec.held)
    throw new NotCapturable(why, outputs)
  }
  if (rec.failure !== undefined) refuse(rec.failure)
  const { state, after } = stateOf(tf, be, variables, before, refuse)
  for (const b of rec.held) unpool(bm, b)
  // the recording reads the state from the buffers it had before: bring them up to date
  if (state.length > 0) {
    const enc = be.device.createCommandEncoder()
    for (const [from, to] of state) enc.copyBufferToBuffer(from, 0, to, 0, from.size)
    be.queue.submit([enc.finish()])
  }
  const plan = replayPlan(rec.commands)
  const dispatches = rec.commands.reduce((n, c) => n + (c.op === "pass" ? c.commands.filter((p) => p.op === "dispatch").length : 0), 0)
  const replaying: Replaying = { tf, be, plan, state, after, feedBuffers, outputs, held: rec.held, disposed: false }
  const captured: Captured = {
    dispatches,
    uploads: rec.uploads.length,
    outputs,
    run: (values) => replayRecording(replaying, values),
    profile: (values, detail) => profileRecording(replaying, values, detail, dispatches),
    dispose: () => disposeRecording(replaying)
  }
  recorded.set(captured, { uploads: rec.uploads, commands: rec.commands })
  return captured
}

/** What a recording collects while the step runs (see {@link patchDevice}). */
interface Recording {
  /** Buffers the recording uses, pinned as soon as they are seen (tfjs may release them mid-step). */
  readonly held: Set<GpuBuffer>
  readonly hold: (b: GpuBuffer) => void
  /** Stable names for buffers, to compare two recordings: feed i, variable i, new i (in creation order). */
  readonly names: Map<GpuBuffer, string>
  created: number
  readonly nameOf: (b: GpuBuffer) => string
  /** The buffers of each bind group, by name. */
  readonly groups: Map<unknown, Array<string>>
  /** False once the step has ended: encoders tfjs still holds then behave as ordinary ones. */
  active: boolean
  readonly uploads: Array<Uint8Array>
  /** What was written into mappable staging buffers, uploaded when copied from. */
  readonly staged: Map<GpuBuffer, Uint8Array>
  /** The commands of each finished command buffer. */
  readonly encoded: Map<unknown, Array<Command>>
  /** The commands submitted, in order. */
  readonly commands: Array<Command>
  /** The first reason the step cannot be recorded. */
  failure: string | undefined
  readonly fail: (why: string) => never
  /** The program behind the dispatches being encoded (see {@link patchDevice}). */
  label: string
}

const newRecording = (
  feedBuffers: ReadonlyMap<Tensor, GpuBuffer>,
  variables: ReadonlyArray<Tensor>,
  before: ReadonlyMap<Tensor, GpuBuffer>
): Recording => {
  const held = new Set<GpuBuffer>()
  const hold = (b: GpuBuffer) => {
    if (held.has(b)) return
    held.add(b)
    pins.set(b, (pins.get(b) ?? 0) + 1)
  }
  for (const b of [...feedBuffers.values(), ...before.values()]) hold(b)
  const names = new Map<GpuBuffer, string>()
  ;[...feedBuffers.values()].forEach((b, i) => names.set(b, `feed ${i}`))
  variables.forEach((v, i) => names.set(before.get(v)!, `variable ${i}`))
  const rec: Recording = {
    held,
    hold,
    names,
    created: 0,
    nameOf: (b) => names.get(b) ?? `existing ${globalName(b)}`,
    groups: new Map(),
    active: true,
    uploads: [],
    staged: new Map(),
    encoded: new Map(),
    commands: [],
    failure: undefined,
    fail: (why) => {
      rec.failure ??= why
      throw new NotCapturable(why)
    },
    label: "?"
  }
  return rec
}

/** Lets go of a recording's pins (a buffer that another recording holds stays pinned). */
const releasePins = (held: ReadonlySet<GpuBuffer>) => {
  for (const b of held) {
    const n = (pins.get(b) ?? 1) - 1
    if (n > 0) pins.set(b, n)
    else pins.delete(b)
  }
}

/** Runs the step with the device patched to record it, and restores the device whatever happens. */
const recordStep = (tf: Tf, be: Backend, rec: Recording, step: () => ReadonlyArray<Tensor>): ReadonlyArray<Tensor> => {
  const saved = patchDevice(tf, be, rec)
  try {
    const outputs = step().map((t) => tf.keep(t))
    flush(be)
    return outputs
  } catch (e) {
    // what tfjs encoded for the stopped step goes out as it is; the recording is dropped
    rec.active = false
    flush(be)
    releasePins(rec.held)
    throw e
  } finally {
    rec.active = false
    restoreDevice(tf, be, saved)
  }
}

/** The functions of the device, queue, pool and backend that {@link patchDevice} replaces. */
const savedHooks = (tf: Tf, be: Backend) => ({
  createCommandEncoder: be.device.createCommandEncoder,
  createBuffer: be.device.createBuffer,
  createBindGroup: be.device.createBindGroup,
  writeBuffer: be.queue.writeBuffer,
  submit: be.queue.submit,
  acquire: be.bufferManager.acquireBuffer,
  read: be.read,
  readSync: be.readSync,
  runProgram: be.runWebGPUProgram,
  cpuForward: tf.env().getBool("WEBGPU_CPU_FORWARD")
})
type Saved = ReturnType<typeof savedHooks>

/** Makes the device record into `rec` what tfjs encodes, uploads and submits; returns what it replaced. */
const patchDevice = (tf: Tf, be: Backend, rec: Recording): Saved => {
  const device = be.device
  const queue = be.queue
  const bm = be.bufferManager
  const saved = savedHooks(tf, be)
  // the program behind each dispatch, for profiles: tfjs's class, or our kernels' own key (read
  // before tfjs extends it with the shapes)
  be.runWebGPUProgram = function(program, ...rest) {
    const outer = rec.label
    rec.label = `${program.constructor.name !== "Object" ? program.constructor.name : String(program.shaderKey)}\u0000${(program.outputShape ?? []).join("×") || "scalar"}`
    try {
      return saved.runProgram.call(this, program, ...rest)
    } finally {
      rec.label = outer
    }
  }
  // (restored as soon as the step ends)
  const readBack = function(this: Backend, dataId: unknown) {
    const d = this.tensorMap.get(dataId)
    // values already on the host are not a read-back
    if (d?.values !== null && d?.values !== undefined) return d.values
    return rec.fail("the step reads a tensor back to the host")
  }
  be.read = readBack
  be.readSync = readBack
  patchCreation(device, rec, saved)
  device.createCommandEncoder = function() {
    return recordingEncoder(saved.createCommandEncoder.call(this), rec)
  }
  patchQueue(queue, rec, saved)
  // no buffer reuse within the step: no aliasing, constants stay where they were uploaded. tfjs's
  // pool keeps a free list per size and usage, made on a first acquisition that may reuse: make it
  bm.acquireBuffer = function(size, usage, mappedAtCreation, _reuse) {
    const key = `${size}_${usage}`
    if (!this.freeBuffers.has(key)) this.freeBuffers.set(key, [])
    return saved.acquire.call(this, size, usage, mappedAtCreation, false)
  }
  tf.env().set("WEBGPU_CPU_FORWARD", false)
  return saved
}

/** Puts back what {@link patchDevice} replaced. */
const restoreDevice = (tf: Tf, be: Backend, saved: Saved) => {
  const device = be.device
  const queue = be.queue
  device.createCommandEncoder = saved.createCommandEncoder
  device.createBuffer = saved.createBuffer
  device.createBindGroup = saved.createBindGroup
  queue.writeBuffer = saved.writeBuffer
  queue.submit = saved.submit
  be.bufferManager.acquireBuffer = saved.acquire
  be.read = saved.read
  be.readSync = saved.readSync
  be.runWebGPUProgram = saved.runProgram
  tf.env().set("WEBGPU_CPU_FORWARD", saved.cpuForward)
}

/** New buffers (named, held; what is written into them at creation recorded as uploads) and bind groups (their buffers named). */
const patchCreation = (device: Device, rec: Recording, saved: Saved) => {
  device.createBuffer = function(desc) {
    const b = saved.createBuffer.call(this, desc)
    if ((desc.usage & (MAP_READ | MAP_WRITE)) === 0) {
      rec.hold(b)
      rec.names.set(b, `new ${rec.created++}`)
    }
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
        if ((b.usage & MAP_WRITE) !== 0) rec.staged.set(b, bytes)
        else rec.uploads.push(bytes)
        unmap()
      }
    }
    return b
  }
  device.createBindGroup = function(desc) {
    const bound: Array<GpuBuffer> = []
    for (const e of desc.entries) {
      if (e.resource.buffer !== undefined) {
        rec.hold(e.resource.buffer)
        bound.push(e.resource.buffer)
      }
    }
    const group = saved.createBindGroup.call(this, desc)
    rec.groups.set(group, bound.map(rec.nameOf))
    return group
  }
}

/** A command encoder that records its passes, copies and clears into `rec` while the step runs. */
const recordingEncoder = (enc: CommandEncoder, rec: Recording): CommandEncoder => {
  const mine: Array<Command> = []
  const begin = enc.beginComputePass.bind(enc)
  const copy = enc.copyBufferToBuffer.bind(enc)
  const clear = enc.clearBuffer.bind(enc)
  const finish = enc.finish.bind(enc)
  // once the capture is over, the encoder tfjs may still hold behaves as an ordinary one
  enc.beginComputePass = (desc) => {
    if (!rec.active) return begin(desc)
    if (desc?.timestampWrites !== undefined) rec.fail("the step is being profiled (timestamp queries)")
    const pass = begin(desc)
    const recorded: Array<PassCommand> = []
    mine.push({ op: "pass", commands: recorded })
    const setPipeline = pass.setPipeline.bind(pass)
    const setBindGroup = pass.setBindGroup.bind(pass)
    const dispatch = pass.dispatchWorkgroups.bind(pass)
    pass.setPipeline = (pipeline) => {
      if (rec.active) recorded.push({ op: "pipeline", pipeline })
      setPipeline(pipeline)
    }
    pass.setBindGroup = (index, group, offsets) => {
      const o = offsets === undefined ? undefined : [...offsets]
      if (rec.active) recorded.push({ op: "bind", index, group, offsets: o, buffers: rec.groups.get(group) ?? [] })
      if (o === undefined) setBindGroup(index, group)
      else setBindGroup(index, group, o)
    }
    pass.dispatchWorkgroups = (x, y = 1, z = 1) => {
      if (rec.active) recorded.push({ op: "dispatch", x, y, z, label: rec.label })
      dispatch(x, y, z)
    }
    pass.dispatchWorkgroupsIndirect = () => rec.fail("an indirect dispatch")
    return pass
  }
  enc.copyBufferToBuffer = (src, srcOffset, dst, dstOffset, size) => {
    if (!rec.active) return copy(src, srcOffset, dst, dstOffset, size)
    const data = rec.staged.get(src)
    if (data !== undefined) rec.uploads.push(data.slice(srcOffset, srcOffset + size))
    else if ((dst.usage & MAP_READ) !== 0) rec.fail("the step reads a tensor back to the host")
    else {
      mine.push({ op: "copy", src, srcOffset, dst, dstOffset, size, names: [rec.nameOf(src), rec.nameOf(dst)] })
      rec.hold(src)
    }
    rec.hold(dst)
    copy(src, srcOffset, dst, dstOffset, size)
  }
  enc.clearBuffer = (buffer, offset, size) => {
    if (rec.active) mine.push({ op: "clear", buffer, offset, size })
    clear(buffer, offset, size)
  }
  const resolve = enc.resolveQuerySet.bind(enc)
  enc.resolveQuerySet = (...a) => (rec.active ? rec.fail("the step is being profiled (query sets)") : resolve(...a))
  enc.finish = () => {
    const done = finish()
    rec.encoded.set(done, mine)
    return done
  }
  return enc
}

/** Writes recorded as uploads; submitted command buffers' commands appended to the recording. */
const patchQueue = (queue: Queue, rec: Recording, saved: Saved) => {
  queue.writeBuffer = function(buffer, offset, data, dataOffset, size) {
    const view = ArrayBuffer.isView(data) ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength) : new Uint8Array(data)
    const start = dataOffset ?? 0
    rec.uploads.push(view.slice(start, size === undefined ? undefined : start + size))
    rec.hold(buffer)
    if (dataOffset === undefined) saved.writeBuffer.call(this, buffer, offset, data)
    else saved.writeBuffer.call(this, buffer, offset, data, dataOffset, size)
  }
  queue.submit = function(buffers) {
    for (const b of buffers) {
      const recordedCommands = rec.encoded.get(b)
      if (recordedCommands === undefined) rec.fail("a command buffer encoded outside the capture was submitted inside it")
      rec.commands.push(...recordedCommands!)
    }
    saved.submit.call(this, buffers)
  }
}

/**
 * The variables' buffers after the step, and the state a replay copies back: each variable the step
 * assigned, from its new buffer into the one the recording reads. Refuses a step that created or
 * disposed variables, or assigned two that share their storage.
 */
const stateOf = (
  tf: Tf,
  be: Backend,
  variables: ReadonlyArray<Tensor>,
  before: ReadonlyMap<Tensor, GpuBuffer>,
  refuse: (why: string) => never
) => {
  const now = variablesOf(tf)
  if (now.length !== variables.length || now.some((v) => !before.has(v))) refuse("the step created or disposed variables")
  const state: Array<readonly [GpuBuffer, GpuBuffer]> = []
  const after = new Map<Tensor, GpuBuffer>()
  const targets = new Set<GpuBuffer>()
  for (const v of variables) {
    const b = bufferOf(be, v)
    after.set(v, b)
    if (b === before.get(v)) continue
    // two variables made from one tensor share a buffer: copying both back into it cannot work
    if (targets.has(before.get(v)!)) refuse("two variables the step assigns share their storage")
    targets.add(before.get(v)!)
    state.push([b, before.get(v)!])
  }
  return { state, after }
}

/**
 * What a replay encodes: consecutive passes as one (dispatches in a pass are ordered as across
 * passes), a pipeline set only when it changes.
 */
const replayPlan = (commands: ReadonlyArray<Command>): Array<Command> => {
  const plan: Array<Command> = []
  for (const c of commands) {
    const last = plan[plan.length - 1]
    if (c.op !== "pass") plan.push(c)
    else if (last?.op === "pass") last.commands.push(...c.commands)
    else plan.push({ op: "pass", commands: [...c.commands] })
  }
  for (const c of plan) {
    if (c.op !== "pass") continue
    let current: unknown
    const kept = c.commands.filter((p) => {
      if (p.op !== "pipeline") return true
      if (p.pipeline === current) return false
      current = p.pipeline
      return true
    })
    c.commands.splice(0, c.commands.length, ...kept)
  }
  return plan
}

/** A finished recording, as its replays, profiles and disposal use it. */
interface Replaying {
  readonly tf: Tf
  readonly be: Backend
  readonly plan: ReadonlyArray<Command>
  readonly state: ReadonlyArray<readonly [GpuBuffer, GpuBuffer]>
  readonly after: ReadonlyMap<Tensor, GpuBuffer>
  readonly feedBuffers: ReadonlyMap<Tensor, GpuBuffer>
  readonly outputs: ReadonlyArray<Tensor>
  readonly held: ReadonlySet<GpuBuffer>
  disposed: boolean
}

/** Writes the feeds, encodes the replay (timestamps as `timing` asks), submits, marks host copies stale. */
const replayRecording = (r: Replaying, values: ReadonlyArray<readonly [Tensor, Float32Array | Int32Array]>, timing?: Timing) => {
  const { tf, be, plan, state, after, feedBuffers, outputs } = r
  const device = be.device
  const queue = be.queue
  if (r.disposed) throw new NotCapturable("the recording was disposed")
  for (const [v, b] of after) {
    if (v.isDisposed || bufferOf(be, v) !== b) throw new NotCapturable("a variable was assigned outside the recorded step; capture again")
  }
  flush(be)
  for (const [t, data] of values) {
    const b = feedBuffers.get(t)
    if (b === undefined) throw new NotCapturable("a feed that was not given to capture")
    checkFeed(t, data)
    queue.writeBuffer(b, 0, data)
  }
  let enc = device.createCommandEncoder()
  const passes = plan.filter((c) => c.op === "pass").length
  // untimed: submitted in parts, so that the GPU starts on the first while the rest is encoded
  // dispatches per command buffer (CONCEPTMOE_SUBMIT_EVERY, 0: the whole step in one): the GPU
  // starts on the first part while the host encodes the next
  const split = timing === undefined ? settingsOf(tf).submitEvery : 0
  let sinceSubmit = 0
  let pass = 0
  let query = 0
  // one pass per dispatch: the pipeline and bind groups in force are set again in each
  let pipeline: unknown
  const bound = new Map<number, Extract<PassCommand, { op: "bind" }>>()
  for (const c of plan) {
    if (c.op === "pass") {
      if (timing?.detail === "dispatches") {
        for (const p of c.commands) {
          if (p.op === "pipeline") pipeline = p.pipeline
          else if (p.op === "bind") bound.set(p.index, p)
          else {
            const q = query++
            const one = enc.beginComputePass({ timestampWrites: { querySet: timing.sets[Math.floor(q / (QUERIES / 2))]!, beginningOfPassWriteIndex: (2 * q) % QUERIES, endOfPassWriteIndex: (2 * q + 1) % QUERIES } })
            one.setPipeline(pipeline)
            for (const b of bound.values()) setBind(one, b)
            one.dispatchWorkgroups(p.x, p.y, p.z)
            one.end()
          }
        }
        continue
      }
      const first = pass === 0
      const last = ++pass === passes
      const writes = timing === undefined || !(first || last)
        ? undefined
        : { querySet: timing.sets[0]!, ...(first ? { beginningOfPassWriteIndex: 0 } : {}), ...(last ? { endOfPassWriteIndex: 1 } : {}) }
      let one = enc.beginComputePass(writes === undefined ? undefined : { timestampWrites: writes })
      bound.clear()
      c.commands.forEach((p, i) => {
        if (p.op === "pipeline") one.setPipeline(pipeline = p.pipeline)
        else if (p.op === "bind") {
          setBind(one, p)
          bound.set(p.index, p)
        } else {
          one.dispatchWorkgroups(p.x, p.y, p.z)
          if (split > 0 && ++sinceSubmit >= split && i < c.commands.length - 1) {
            one.end()
            queue.submit([enc.finish()])
            enc = device.createCommandEncoder()
            sinceSubmit = 0
            one = enc.beginComputePass()
            one.setPipeline(pipeline)
            for (const b of bound.values()) setBind(one, b)
          }
        }
      })
      one.end()
    } else if (c.op === "copy") enc.copyBufferToBuffer(c.src, c.srcOffset, c.dst, c.dstOffset, c.size)
    else enc.clearBuffer(c.buffer, c.offset, c.size)
  }
  for (const [from, to] of state) enc.copyBufferToBuffer(from, 0, to, 0, from.size)
  if (timing !== undefined) {
    timing.sets.forEach((set, i) => {
      const count = Math.min(QUERIES, timing.queries - i * QUERIES)
      enc.resolveQuerySet(set, 0, count, timing.resolve, i * QUERIES * 8)
    })
    enc.copyBufferToBuffer(timing.resolve, 0, timing.read, 0, timing.queries * 8)
  }
  queue.submit([enc.finish()])
  // values tfjs cached on the host are stale now
  for (const t of [...outputs, ...after.keys(), ...feedBuffers.keys()]) {
    const d = be.tensorMap.get((t as unknown as { dataId: unknown }).dataId)
    if (d !== undefined && d.resource !== null) d.values = null
  }
}

/** A replay timed with timestamp queries (see {@link Captured.profile}). */
const profileRecording = async (
  r: Replaying,
  values: ReadonlyArray<readonly [Tensor, Float32Array | Int32Array]>,
  detail: "step" | "dispatches",
  dispatches: number
): Promise<StepProfile> => {
  const device = r.be.device
  if (!(device as unknown as { features: { has: (f: string) => boolean } }).features.has("timestamp-query")) {
    throw new Unsupported({ at: "profile", problem: "the GPU device has no timestamp queries (the adapter lacks the timestamp-query feature)" })
  }
  const queries = detail === "step" ? 2 : 2 * dispatches
  const sets = Array.from({ length: Math.ceil(queries / QUERIES) }, (_, i) => device.createQuerySet({ type: "timestamp", count: Math.min(QUERIES, queries - i * QUERIES) }))
  const resolve = device.createBuffer({ size: queries * 8, usage: QUERY_RESOLVE | COPY_SRC })
  const read = device.createBuffer({ size: queries * 8, usage: MAP_READ | COPY_DST })
  try {
    replayRecording(r, values, { detail, sets, resolve, read, queries })
    await read.mapAsync(1)
    const ns = new BigUint64Array(read.getMappedRange().slice(0))
    read.unmap()
    const gpuMs = Number(ns[queries - 1]! - ns[0]!) / 1e6
    if (detail === "step") return { gpuMs }
    const labels = r.plan.flatMap((c) => (c.op === "pass" ? c.commands.flatMap((p) => (p.op === "dispatch" ? [p.label] : [])) : []))
    return {
      gpuMs,
      dispatches: labels.map((l, i) => {
        const [program, shape] = l.split("\u0000") as [string, string | undefined]
        return { program, shape: shape ?? "", us: Number(ns[2 * i + 1]! - ns[2 * i]!) / 1e3 }
      })
    }
  } finally {
    for (const set of sets) set.destroy()
    resolve.destroy()
    read.destroy()
  }
}

/** Frees the outputs and the recording's buffers that no live tensor owns and no other recording holds. */
const disposeRecording = (r: Replaying) => {
  if (r.disposed) return
  r.disposed = true
  const bm = r.be.bufferManager
  for (const t of r.outputs) t.dispose()
  const owned = new Set([...bm.usedBuffers.values()].flat())
  releasePins(r.held)
  for (const b of r.held) {
    if (pins.has(b) || owned.has(b)) continue
    b.destroy()
    bm.numBytesAllocated -= b.size
  }
}

const recorded = new WeakMap<Captured, { readonly uploads: ReadonlyArray<Uint8Array>; readonly commands: ReadonlyArray<Command> }>()

const sameBytes = (a: Uint8Array, b: Uint8Array) => a.length === b.length && a.every((x, i) => x === b[i])

/** The work of a recording: each dispatch's pipeline and size, in order. */
const workOf = (commands: ReadonlyArray<Command>): Array<PassCommand | string> =>
  commands.flatMap((c): Array<PassCommand | string> =>
    c.op === "pass" ? c.commands : c.op === "copy" ? [`copy ${c.names.join(" → ")} ${c.srcOffset} ${c.dstOffset} ${c.size}`] : ["clear"]
  )

/**
 * Whether two recordings of the same step (two consecutive steps) did the same work on the same
 * buffers and uploaded the same bytes: `undefined` if so, else the first difference. A step that passes is static: the
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
    // the same buffers (by role: feed, variable, made in the step in the same order, or made before)
    if (c.op === "bind" && d.op === "bind") return c.index !== d.index || c.buffers.join(",") !== d.buffers.join(",")
    return true
  })
  if (k >= 0) return `the two steps differ at command ${k} of ${wx.length}`
  if (x.uploads.length !== y.uploads.length) return `the two steps uploaded ${x.uploads.length} and ${y.uploads.length} host arrays`
  const i = x.uploads.findIndex((u, n) => !sameBytes(u, y.uploads[n]!))
  return i < 0 ? undefined : `the step uploads host data that changes between steps (upload ${i} of ${x.uploads.length}, ${x.uploads[i]!.length} bytes); pass it as a feed`
}
