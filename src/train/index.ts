/**
 * `conceptmoe/train`: data (the byte tokenizer and the State of the Union corpus), the training loop
 * (`Train.train`, with the optimizer step and evaluation of `Train`'s re-exported step module), and
 * checkpoints (`Checkpoint.read`, `Checkpoint.write`: safetensors with metadata).
 *
 * @since 0.3.0
 */
export * as Checkpoint from "./Checkpoint.ts"
export * as Data from "./Data.ts"
export * as Train from "./Train.ts"
