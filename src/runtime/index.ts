/**
 * `conceptmoe/runtime`: running a graph on TensorFlow.js. Backends as an Effect service
 * (`Backend.layer("wasm" | "cpu" | "webgpu" | "tensorflow")` provides `Backend.Tensors`), lowering
 * (`Lower.materialize` creates one variable per parameter of an analysis, `Lower.forward` and
 * `Lower.loss` run it), the executed-cost check (`Verify.verify`) and incremental decoding with KV
 * caches (`Decode.session`). The tensor library is loaded when a backend layer is built, not on import.
 *
 * @since 0.3.0
 */
export * as Backend from "./Backend.ts"
export * as Decode from "./Decode.ts"
export * as Lower from "./Lower.ts"
export * as Verify from "./Verify.ts"
/** The typed errors of running a model that a user can cause, and `attempt` for calling tensor code from an Effect. */
export * as RunErrors from "../internal/RunErrors.ts"
