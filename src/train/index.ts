/**
 * `conceptmoe/train`: data (the byte tokenizer and the State of the Union corpus), the training loop
 * (`Train.train`, with the optimizer step and evaluation of `Train`'s re-exported step module), and
 * checkpoints (`Checkpoint.read`, `Checkpoint.write`: safetensors with metadata), matched-pair
 * comparisons (`Compare.matchModels`, `Compare.compareMatched`, the pure `Compare.comparisonReport`)
 * and the conversion of a trained MoE run into a ConceptMoE run (`Convert.convertRun`). Training logs its
 * progress through Effect's logger at level Info; `Progress.layer` is the command line's logger
 * (plain lines, a bar with the time left on a terminal).
 *
 * @since 0.3.0
 */
export * as Checkpoint from "./Checkpoint.ts"
export * as Compare from "./Compare.ts"
export * as Convert from "./Convert.ts"
export * as Data from "./Data.ts"
export * as Progress from "../internal/Progress.ts"
export * as Train from "./Train.ts"
