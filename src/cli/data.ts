/**
 * `--data FILE|DIR` and `--val-fraction`, shared by `train` and `compare`: the flags and the splits
 * they select (State of the Union by default), checked against one batch.
 *
 * @since 0.3.0
 */
import { Effect, Option } from "effect"
import { Flag } from "effect/cli"
import { checkSplits, loadData, sotuData, type Splits } from "../train/Data.ts"
import { UsageError } from "./shared.ts"

/** `--data FILE|DIR` and `--val-fraction`, shared by `train` and `compare`. */
export const dataFlag = Flag.String("data").pipe(
  Flag.withDescription("train on these raw bytes: a file (its last --val-fraction validates) or a directory (one document per file, sorted; every 10th validates); default: the State of the Union corpus"),
  Flag.optional
)
export const valFraction = Flag.Finite("val-fraction").pipe(
  Flag.withDescription("with --data: the share that validates (default 0.1)"),
  Flag.optional
)

/** The splits for a seed: SOTU (validation windows fixed across seeds) or `--data`, checked against one batch. */
export const splitsFor = (data: Option.Option<string>, fraction: Option.Option<number>, rows: number, length: number) => (seed: number) =>
  Effect.gen(function*() {
    let s: Splits
    if (Option.isNone(data)) {
      if (Option.isSome(fraction)) return yield* new UsageError({ message: "--val-fraction applies to --data only (SOTU splits by year)" })
      s = { ...sotuData(seed), validation: sotuData(0).validation }
    } else {
      s = yield* loadData(data.value, { seed, ...(Option.isSome(fraction) ? { valFraction: fraction.value } : {}) })
    }
    yield* checkSplits(s, rows, length)
    return s
  })
