/**
 * A run directory on disk: its lock, its temporary files, and the commit of a checkpoint step.
 *
 * - **Lock.** `run.lock` holds the owner's pid. A second process gets a {@link RunLocked} error
 *   naming that pid; a lock whose process is gone (a crash, `kill -9`) is taken over.
 * - **Commit.** Every file of a step (metrics, run metadata, the checkpoint) is written to a
 *   temporary file `<name>.tmp-<pid>` and fsynced; then they are renamed over their final names in
 *   the order given, the directory fsynced after each rename. The checkpoint is renamed last: it is
 *   the commit point. A kill before it leaves the previous checkpoint, with metrics that reach at
 *   least as far (resume drops the lines past the checkpoint's step); a kill after it leaves the new
 *   step whole. A checkpoint is two files (`Checkpoint.checkpointFiles`): the optimizer state, then
 *   the model, the commit point; a file's `before` and `after` hooks keep the optimizer state that
 *   pairs with the current model until the new model file is renamed.
 * - **Temporary files** are removed on every exit path (the scope's end, `process.exit`, a second
 *   signal) and, for a process that was killed, by the next one that takes the lock.
 * - **Errors** keep the operating system's reason (`EACCES`, `ENOSPC`, …) and the path.
 *
 * @since 0.3.0
 */
import { Effect, Schema, Scope } from "effect"
import * as fs from "node:fs"
import * as path from "node:path"

/** A file-system operation failed: the path, the operation and the operating system's reason. */
export class RunFileError extends Schema.TaggedError<RunFileError>()("RunFileError", {
  file: Schema.String,
  operation: Schema.String,
  /** The OS error code, e.g. `EACCES`, `ENOSPC`, `EROFS` (empty when there is none). */
  code: Schema.String,
  reason: Schema.String
}) {
  override get message(): string {
    return `cannot ${this.operation} ${JSON.stringify(this.file)}: ${this.reason}`
  }
}

/** Another live process holds the run directory's lock. */
export class RunLocked extends Schema.TaggedError<RunLocked>()("RunLocked", {
  file: Schema.String,
  pid: Schema.Number
}) {
  override get message(): string {
    return `${this.file}: the run directory is in use by process ${this.pid}; wait for it to finish or stop it (kill ${this.pid}), or choose another --out`
  }
}

/** Maps a thrown Node.js error to a {@link RunFileError} that keeps its code and message. */
export const osError = (operation: string, file: string) => (e: unknown): RunFileError => {
  const err = e as NodeJS.ErrnoException
  const code = typeof err?.code === "string" ? err.code : ""
  // Node's messages read "EACCES: permission denied, open '/x'": keep the reason, drop the repeated path
  const raw = err instanceof Error ? err.message : String(e)
  const reason = raw.replace(/, \w+ '.*'$/, "").replace(/, \w+ '.*' -> '.*'$/, "")
  return new RunFileError({ file, operation, code, reason: reason === "" ? "unknown error" : reason })
}

const attempt = <A>(operation: string, file: string, f: () => A) => Effect.try({ try: f, catch: osError(operation, file) })

/** The temporary files this process has open, and the locks it holds: removed on any exit. */
const temps = new Set<string>()
const locks = new Set<string>()

/** The temporary name of `file` for this process. */
export const tempName = (file: string) => `${file}.tmp-${process.pid}`

/** A temporary file's name pattern (any process). */
export const isTemp = (name: string) => /\.tmp-\d+$/.test(name)

/** Removes this process's temporary files and releases its locks, synchronously (exit paths). */
export const cleanupSync = () => {
  for (const t of temps) {
    try {
      fs.rmSync(t, { force: true })
    } catch { /* best effort on the way out */ }
  }
  temps.clear()
  for (const l of locks) {
    try {
      if (readPid(l) === process.pid) fs.rmSync(l, { force: true })
    } catch { /* best effort on the way out */ }
  }
  locks.clear()
}

let exitHook = false
const hookExit = () => {
  if (exitHook) return
  exitHook = true
  process.on("exit", cleanupSync)
}

const readPid = (file: string): number | undefined => {
  const text = fs.readFileSync(file, "utf8").trim()
  return /^[1-9]\d{0,9}$/.test(text) ? Number(text) : undefined
}

const alive = (pid: number): boolean => {
  if (pid === process.pid) return true
  try {
    process.kill(pid, 0)
    return true
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM"
  }
}

/** Creates the run directory (and its parents), refusing an empty path. */
export const ensureDir = (dir: string) =>
  dir.trim() === ""
    ? Effect.fail(new RunFileError({ file: dir, operation: "create the run directory", code: "", reason: "the path is empty" }))
    : attempt("create the run directory", dir, () => void fs.mkdirSync(dir, { recursive: true }))

/** fsyncs a directory, so the renames inside it survive a power loss. */
const syncDir = (dir: string) =>
  attempt("sync the directory", dir, () => {
    let fd: number | undefined
    try {
      fd = fs.openSync(dir, "r")
      fs.fsyncSync(fd)
    } catch (e) {
      // some file systems cannot fsync a directory; the rename itself is still atomic
      if (!["EISDIR", "EINVAL", "EPERM", "EBADF"].includes((e as NodeJS.ErrnoException).code ?? "")) throw e
    } finally {
      if (fd !== undefined) fs.closeSync(fd)
    }
  })

/** Writes `bytes` to `file`'s temporary name and fsyncs it; returns the temporary name. */
const writeTemp = (file: string, bytes: Uint8Array | string) =>
  Effect.gen(function*() {
    const tmp = tempName(file)
    temps.add(tmp)
    yield* attempt("write", tmp, () => {
      const fd = fs.openSync(tmp, "w")
      try {
        const data = typeof bytes === "string" ? Buffer.from(bytes, "utf8") : bytes
        let off = 0
        while (off < data.byteLength) off += fs.writeSync(fd, data, off, data.byteLength - off)
        fs.fsyncSync(fd)
      } finally {
        fs.closeSync(fd)
      }
    }).pipe(Effect.tapError(() => Effect.sync(() => removeTemp(tmp))))
    return tmp
  })

const removeTemp = (tmp: string) => {
  try {
    fs.rmSync(tmp, { force: true })
  } catch { /* nothing more to do */ }
  temps.delete(tmp)
}

/** One file of a {@link commit}. */
export interface CommitFile {
  readonly file: string
  readonly bytes: Uint8Array | string
  /** Runs right before this file's rename, once every temporary is written (e.g. keeping the file it replaces). */
  readonly before?: () => void
  /** Runs once every file of the commit is renamed (e.g. removing what `before` kept). */
  readonly after?: () => void
}

/**
 * Writes files as one step: every temporary written and fsynced, then renamed in the given order
 * (the directory fsynced after each). Put the commit point (the checkpoint) last. On failure no
 * temporary file is left behind and the files not yet renamed keep their previous content.
 */
export const commit = (files: ReadonlyArray<CommitFile>) =>
  Effect.gen(function*() {
    const written: Array<readonly [string, string, CommitFile]> = []
    yield* Effect.gen(function*() {
      for (const f of files) written.push([yield* writeTemp(f.file, f.bytes), f.file, f])
      for (const [tmp, file, f] of written) {
        if (f.before !== undefined) {
          yield* attempt("prepare", file, f.before)
          yield* syncDir(path.dirname(file))
        }
        yield* attempt("rename", `${tmp} -> ${file}`, () => fs.renameSync(tmp, file))
        temps.delete(tmp)
        yield* syncDir(path.dirname(file))
      }
      for (const [, file, f] of written) if (f.after !== undefined) yield* attempt("finish", file, f.after)
    }).pipe(Effect.ensuring(Effect.sync(() => {
      for (const [tmp] of written) if (temps.has(tmp)) removeTemp(tmp)
    })))
  })

/** Removes temporary files left in `dir` by processes that were killed; returns their names. */
export const removeStaleTemps = (dir: string) =>
  attempt("list", dir, () => {
    const stale = fs.readdirSync(dir).filter(isTemp)
    for (const name of stale) fs.rmSync(path.join(dir, name), { force: true })
    return stale
  })

/**
 * Takes `dir`'s lock for the scope: fails with {@link RunLocked} if a live process holds it, takes
 * over a lock left by a dead one. Released when the scope closes (and on `process.exit`).
 */
export const lock = (dir: string): Effect.Effect<{ readonly file: string; readonly tookOver: number | undefined }, RunFileError | RunLocked, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.gen(function*() {
      hookExit()
      const file = path.join(dir, "run.lock")
      let tookOver: number | undefined
      for (let attemptNo = 0; attemptNo < 5; attemptNo++) {
        const created = yield* attempt("create the lock", file, () => {
          try {
            fs.writeFileSync(file, `${process.pid}\n`, { flag: "wx" })
            return true
          } catch (e) {
            if ((e as NodeJS.ErrnoException).code === "EEXIST") return false
            throw e
          }
        })
        if (created) {
          locks.add(file)
          return { file, tookOver }
        }
        const holder = yield* attempt("read the lock", file, () => {
          try {
            return readPid(file) ?? 0
          } catch (e) {
            if ((e as NodeJS.ErrnoException).code === "ENOENT") return -1
            throw e
          }
        })
        if (holder === -1) continue // released meanwhile: try again
        if (holder > 0 && alive(holder)) return yield* new RunLocked({ file, pid: holder })
        // a dead holder (or an unreadable lock): move it aside, and make sure it was the one we read
        const aside = `${file}.stale-${process.pid}`
        const moved = yield* attempt("take over the lock", file, () => {
          try {
            fs.renameSync(file, aside)
            return true
          } catch (e) {
            if ((e as NodeJS.ErrnoException).code === "ENOENT") return false
            throw e
          }
        })
        if (!moved) continue
        const was = yield* attempt("read the lock", aside, () => readPid(aside) ?? 0)
        if (was !== holder && was > 0 && alive(was)) {
          // another process took it over between our read and our rename: give it back
          yield* attempt("restore the lock", file, () => {
            try {
              fs.linkSync(aside, file)
            } catch { /* it has made a new one */ }
            fs.rmSync(aside, { force: true })
          })
          return yield* new RunLocked({ file, pid: was })
        }
        yield* attempt("take over the lock", aside, () => fs.rmSync(aside, { force: true }))
        tookOver = holder > 0 ? holder : undefined
      }
      return yield* new RunFileError({ file, operation: "take the lock", code: "", reason: "the lock kept changing hands; try again" })
    }),
    ({ file }) =>
      Effect.sync(() => {
        try {
          if (readPid(file) === process.pid) fs.rmSync(file, { force: true })
        } catch { /* already gone */ }
        locks.delete(file)
      })
  )
