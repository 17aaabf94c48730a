/**
 * Every setting read from the environment, declared in one place with Effect's `Config` (so a test
 * or a library user can give them through a `ConfigProvider` instead of `process.env`). A value that
 * is not one of those expected is a {@link SettingError} naming the variable, its value and what was
 * expected.
 *
 * Effect code reads a setting with {@link get}. The runtime's settings ({@link runtime}) are
 * resolved once, when a backend loads (`runtime/Backend.ts`), and kept with the tensor library
 * (`runtime/Env.ts`), where the synchronous tensor code reads them: nothing else reads
 * `process.env`. Effect's default `ConfigProvider` reads the environment as it was when first
 * asked; a process that changes its environment later gives a fresh `ConfigProvider.fromEnv()`.
 *
 * The table of settings in docs/performance.md lists {@link all} (checked by tests/errors.test.ts).
 *
 * @since 0.5.0
 */
import { Config, Effect, Option, Schema } from "effect"
import { SettingError } from "./RunErrors.ts"

/** One environment variable: its Config, what it accepts, its default and what it does. */
export interface Setting<A> {
  readonly variable: string
  readonly config: Config.Config<A>
  /** What a value may be, as the error message says it. */
  readonly expected: string
  /** The value when unset (or empty), as written in the docs. */
  readonly default: string
  readonly description: string
}

/**
 * Reads a setting: its value, or (when the value is not one it accepts) a {@link SettingError}
 * naming the variable.
 */
export const get = <A>(setting: Setting<A>): Effect.Effect<A, SettingError> =>
  Effect.catch(setting.config, () =>
    Config.String(setting.variable).pipe(
      Effect.orElseSucceed(() => ""),
      Effect.flatMap((value) => Effect.fail(new SettingError({ variable: setting.variable, value, expected: setting.expected })))
    ))

/** An on/off setting: unset (or empty) and `on` are on, `off` is off. */
export const onOff = (variable: string, description: string): Setting<boolean> => ({
  variable,
  config: Config.Literals(["on", "off"], variable).pipe(Config.withDefault("on" as const), Config.map((v) => v === "on")),
  expected: "on or off",
  default: "on",
  description
})

export const backendNames = ["wasm", "cpu", "webgpu", "tensorflow"] as const
export type BackendName = typeof backendNames[number]

/** The tensor backend when no `--backend` flag names one. */
export const backend: Setting<Option.Option<BackendName>> = {
  variable: "CONCEPTMOE_BACKEND",
  config: Config.option(Config.Literals(backendNames, "CONCEPTMOE_BACKEND")),
  expected: `one of ${backendNames.join(", ")}`,
  default: "wasm",
  description: "the tensor backend of `train`, `verify`, `generate`, `bench`, `compare` and `convert` when `--backend` is not given"
}

/** Our fused kernels: WGSL on webgpu, JavaScript loops over the heap on wasm. */
export const fused = onOff("CONCEPTMOE_FUSED", "`off`: none of our fused kernels (the WGSL ones on webgpu, the wasm ones for AdamW, Σx², RMSNorm, rotary, the loss and GELU); every op through tfjs")

/** Recording training steps on webgpu and replaying them. */
export const capture = onOff("CONCEPTMOE_CAPTURE", "`off`: every training step on webgpu runs through tfjs (no recording, no replay)")

/** Dispatches per command buffer of a replayed step. */
export const submitEvery: Setting<number> = {
  variable: "CONCEPTMOE_SUBMIT_EVERY",
  config: Config.schema(Schema.Int.check(Schema.isGreaterThanOrEqualTo(0)), "CONCEPTMOE_SUBMIT_EVERY").pipe(Config.withDefault(128)),
  expected: "a whole number of dispatches ≥ 0 (0: one command buffer per step)",
  default: "128",
  description: "dispatches per command buffer of a replayed step on webgpu; 0: one per step"
}

/**
 * The webgpu matmul: `auto`, `tfjs` or a kernel name. The value is checked against the kernels when
 * the runtime reads it (`runtime/webgpu/MatMul.ts` knows them), with this setting's {@link SettingError}.
 */
export const matmul: Setting<string> = {
  variable: "CONCEPTMOE_MATMUL",
  config: Config.String("CONCEPTMOE_MATMUL").pipe(Config.withDefault("auto")),
  expected:
    "auto, tfjs or a kernel TMxTNxTK/RMxRN[/v4[/db|/db2]][/kS], e.g. 128x128x8/8x8/v4 (≤ 256 threads, ≤ 16 KiB of workgroup memory, db2 counting its two tiles; v4: RM, RN, TK divisible by 4)",
  default: "auto",
  description:
    "webgpu only. `auto`: matmul kernels tuned per product shape after step 0 (choices stored in checkpoints); `tfjs`: tfjs's kernel (and the MoE grouped products as gathered weights and tfjs's kernel); a kernel name (`128x128x8/8x8/v4`, see `kernelNames` in `src/runtime/webgpu/MatMul.ts`): that kernel wherever it applies"
}

/** Flags for Dawn's `create` (webgpu). */
export const dawnFlags: Setting<string> = {
  variable: "DAWN_FLAGS",
  config: Config.String("DAWN_FLAGS").pipe(Config.withDefault("")),
  expected: "space-separated Dawn flags",
  default: "(none)",
  description: "space-separated flags for Dawn's `create` (webgpu), e.g. `enable-dawn-features=disable_robustness`; timestamp quantization is turned off unless they name it; given to Dawn as they are"
}

/** A stack trace after an unexpected failure's one line. */
export const debug: Setting<boolean> = {
  variable: "CONCEPTMOE_DEBUG",
  config: Config.option(Config.String("CONCEPTMOE_DEBUG")).pipe(Config.map(Option.isSome)),
  expected: "any value",
  default: "(unset)",
  description: "any value: the command line prints the stack trace after the one line of an unexpected failure (a bug)"
}

/** Every setting, in the order of the docs' table. */
export const all: ReadonlyArray<Setting<unknown>> = [backend, fused, capture, submitEvery, matmul, dawnFlags, debug]

/** The settings the tensor code reads, resolved once when a backend loads. */
export interface RuntimeSettings {
  readonly fused: boolean
  readonly capture: boolean
  readonly submitEvery: number
  /** Unchecked here: see {@link matmul}. */
  readonly matmul: string
  readonly dawnFlags: string
}

/** The runtime's settings when nothing is set. */
export const defaults: RuntimeSettings = { fused: true, capture: true, submitEvery: 128, matmul: "auto", dawnFlags: "" }

/** Reads the runtime's settings; the first bad one is a {@link SettingError}. */
export const runtime: Effect.Effect<RuntimeSettings, SettingError> = Effect.all({
  fused: get(fused),
  capture: get(capture),
  submitEvery: get(submitEvery),
  matmul: get(matmul),
  dawnFlags: get(dawnFlags)
})
